"""`data synth` and `data check` as a user runs them: exit codes, messages, never a traceback."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from data.waterbirds import METADATA_COLUMNS


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    # an uncaught exception would be swallowed by CliRunner into result.exception: only a
    # deliberate exit (sys.exit or click's own) is acceptable
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def synth(out: Path, seed: int = 0):
    return invoke("data", "synth", "--out", str(out), "--scale", "0.01", "--size", "16", "--seed", str(seed))


def image(path: Path, seed: int = 0, side: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def folder(root: Path, rows: list[tuple], columns=METADATA_COLUMNS, images: bool = True) -> Path:
    """Metadata from (img_filename, y, split, place) rows (+ the images, unless told not to)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, (fname, y, split, place) in enumerate(rows):
            rec = {"img_id": i + 1, "img_filename": fname, "y": y, "split": split, "place": place,
                   "place_filename": f"/x/{i}.jpg", "extra": "?"}
            w.writerow([rec[c] for c in columns])
            if images:
                image(root / fname, i)
    return root


GOOD = [("a/0.png", 0, 0, 0), ("a/1.png", 1, 1, 1), ("b/2.jpg", 1, 2, 0), ("b/3.jpg", 0, 0, 1)]
# the rows that give every group a row in every split (an empty group is a problem of its own)
FILL = [("d/4.png", 1, 0, 0), ("d/5.png", 1, 0, 1), ("d/6.png", 0, 1, 0), ("d/7.png", 0, 1, 1),
        ("d/8.png", 1, 1, 0), ("d/9.png", 0, 2, 0), ("d/10.png", 0, 2, 1), ("d/11.png", 1, 2, 1)]
FULL = GOOD + FILL


def test_synth_then_check(tmp_path):
    out = tmp_path / "waterbirds_v1.0"
    r = synth(out)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    # the count table: train 35/2/1/11, val 5/5/1/1, test 23/23/6/6 (scale 0.01, see test_data)
    lines = {ln.split()[0]: ln.split()[1:] for ln in r.output.splitlines() if ln.split()[:1] in (["train"], ["val"], ["test"])}
    assert lines == {"train": ["35", "2", "1", "11", "49"], "val": ["5", "5", "1", "1", "12"],
                     "test": ["23", "23", "6", "6", "58"]}
    r = invoke("data", "check", "--root", str(tmp_path))  # the parent folder resolves
    assert r.exit_code == 0, r.output
    assert f"{out}: 119 rows" in r.output and "no problems found" in r.output


def test_synth_deterministic(tmp_path):
    assert synth(tmp_path / "a", seed=4).exit_code == 0
    assert synth(tmp_path / "b", seed=4).exit_code == 0
    assert synth(tmp_path / "c", seed=5).exit_code == 0
    files = {k: sorted(p.relative_to(tmp_path / k) for p in (tmp_path / k).rglob("*.png")) for k in "abc"}
    assert files["a"] == files["b"] == files["c"] and len(files["a"]) == 119
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files["a"])
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files["a"])


@pytest.mark.parametrize("args,message", [
    (["--size", "4"], "at least 8 px"),
    (["--scale", "0"], "scale must be > 0"),
])
def test_synth_bad_options(tmp_path, args, message):
    r = invoke("data", "synth", "--out", str(tmp_path / "x"), *args)
    assert r.exit_code != 0 and message in r.output


def test_synth_out_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke("data", "synth", "--out", str(tmp_path / "file"), "--scale", "0.01")
    assert r.exit_code != 0 and "is not a folder" in r.output


def test_check_real_layout(tmp_path):
    folder(tmp_path / "waterbird_complete95_forest2water2", FULL)
    r = invoke("data", "check", "--root", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "12 rows" in r.output and "no problems found" in r.output


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN = {
    "missing column": (lambda root: folder(root, FULL, columns=[c for c in METADATA_COLUMNS if c != "place"]),
                       ["missing column(s) place"]),
    "extra column": (lambda root: folder(root, FULL, columns=METADATA_COLUMNS + ["extra"]),
                     ["unexpected column(s) extra"]),
    "unknown split": (lambda root: folder(root, GOOD[:2] + [("b/2.jpg", 1, 7, 0)]),
                      ["row 4: b/2.jpg: split='7' is not one of [0, 1, 2]"]),
    "label outside {0,1}": (lambda root: folder(root, [("a/0.png", 2, 0, 0), ("a/1.png", 0, 1, 5)]),
                            ["row 2: a/0.png: y='2' is not one of [0, 1]",
                             "row 3: a/1.png: place='5' is not one of [0, 1]"]),
    "missing image": (lambda root: [(r / f).unlink() for r in [folder(root, FULL)]
                                    for f in ("a/0.png", "b/2.jpg", "b/3.jpg")],
                      ["row 2: a/0.png: missing image file", "row 4: b/2.jpg: missing image file",
                       "row 5: b/3.jpg: missing image file"]),
    "truncated image": (lambda root: folder(root, FULL) and _truncate(root / "b/3.jpg"),
                        ["row 5: b/3.jpg: unreadable image"]),
    "not an image": (lambda root: folder(root, FULL) and (root / "a/1.png").write_bytes(b"<html>"),
                     ["row 3: a/1.png: unreadable image"]),
    "extra image": (lambda root: folder(root, FULL) and image(root / "c/stray.jpg"),
                    ["1 image file(s) not listed in the metadata, e.g. c/stray.jpg"]),
    "garbage metadata": (lambda root: root.mkdir() or (root / "metadata.csv").write_bytes(b"\x00\xff\xfe"),
                         ["metadata.csv: not a readable"]),
    "no metadata": (lambda root: root.mkdir(), ["no metadata.csv in"]),
    "no folder": (lambda root: None, ["does not exist (generate one with `python cli.py data synth --out"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_broken_folder(tmp_path, case):
    make, messages = BROKEN[case]
    root = tmp_path / "wb"
    make(root)
    r = invoke("data", "check", "--root", str(root))
    assert r.exit_code == 1, r.output
    for m in messages:
        assert m in r.output, f"{case}: {m!r} not in\n{r.output}"
    assert f"{len(messages)} problem(s)" in r.output  # and nothing else is blamed


def test_check_lists_all_problems_at_once(tmp_path):
    root = folder(tmp_path / "wb", GOOD + [("c/4.png", 3, 0, 0), ("c/5.png", 0, 9, 1), ("c/6.png", 1, 1, 1)],
                  columns=METADATA_COLUMNS + ["extra"])
    (root / "a/1.png").unlink()
    _truncate(root / "c/6.png")
    image(root / "stray.png")
    r = invoke("data", "check", "--root", str(root))
    assert r.exit_code == 1
    expected = ["metadata.csv: unexpected column(s) extra",
                "row 3: a/1.png: missing image file",
                "row 6: c/4.png: y='3' is not one of [0, 1]",
                "row 7: c/5.png: split='9' is not one of [0, 1, 2]",
                "row 8: c/6.png: unreadable image",
                "1 image file(s) not listed in the metadata, e.g. stray.png"]
    assert "6 problem(s)" in r.output
    positions = [r.output.find(m) for m in expected]
    assert -1 not in positions, r.output
    assert positions == sorted(positions)


def test_check_requires_root():
    r = CliRunner().invoke(cli, ["data", "check"])
    assert r.exit_code == 2 and "--root" in r.output


def test_data_synth_draws_the_demo_scenario(tmp_path):
    """`data synth` writes the data the demo uses (its spec recorded beside the metadata), and with
    --independent a set whose four groups are equal in every split (a pretraining set)."""
    import json

    from data.synth import SPEC_FILE, SynthSpec, made_with
    from experiments import defaults

    out = tmp_path / "wb"
    assert invoke("data", "synth", "--out", str(out), "--scale", "0.01", "--size", "16").exit_code == 0
    assert made_with(out, SynthSpec(**{**defaults.SYNTH, "scale": 0.01, "size": 16}))
    ind = tmp_path / "ind"
    made = invoke("data", "synth", "--out", str(ind), "--scale", "0.05", "--size", "16", "--independent")
    assert made.exit_code == 0
    assert json.loads((ind / SPEC_FILE).read_text())["independent"] is True
    from data.folders import load_metadata

    meta = load_metadata(ind)
    for code in (0, 1, 2):
        counts = np.bincount(meta.group[meta.split == code], minlength=4)
        assert counts.min() == counts.max(), counts
