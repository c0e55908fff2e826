"""Bad data is refused or loudly warned: 16-bit and palette PNGs, duplicates, leakage, empty groups,
image paths that resolve outside the data folder (absolute, `..`, symbolic links)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from data.folders import DataError, check_folder, load_metadata, read_image
from data.synth import SynthSpec, generate


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture
def wb(tmp_path) -> Path:
    return generate(tmp_path / "wb", SynthSpec(scale=0.01, size=16, seed=0))


def records(root: Path) -> tuple[list[str], list[dict]]:
    with open(root / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def rewrite(root: Path, fields, recs) -> None:
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(recs)


# ---------------------------------------------------------------- image modes
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(8 * 8, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out.min() == 0 and out.max() == 255 and (out < 255).mean() > 0.9  # not all white


def test_palette_png_goes_through_its_palette(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:3] = (200, 30, 10)
    rgb[3:] = (5, 90, 250)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_image(tmp_path / "p.png"), rgb)


def test_data_check_on_a_16bit_png_and_a_one_pixel_image(wb):
    fields, recs = records(wb)
    name = recs[0]["img_filename"]
    gray = np.asarray(Image.open(wb / name).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(wb / name)
    one = recs[1]["img_filename"]
    Image.new("RGB", (1, 1), (10, 20, 30)).save(wb / one)
    meta, problems = check_folder(wb, progress=False, warn=(seen := []).append)
    assert problems == []
    assert any("1x1 pixel image" in w and one in w for w in seen), seen
    r = invoke("data", "check", "--root", str(wb))
    assert r.exit_code == 0 and "warning: row 3:" in r.output and "1x1 pixel image" in r.output
    img = read_image(wb / name)
    assert 0 < img.mean() < 250


# ---------------------------------------------------------------- duplicates and leakage
def test_duplicate_row_and_cross_split_leakage_refused_waterbirds(wb):
    fields, recs = records(wb)
    train = next(r for r in recs if r["split"] == "0")
    twin = dict(train, img_id="9001")                    # the same split, listed twice
    leak = dict(train, img_id="9002", split="2", img_filename="./" + train["img_filename"])  # and in test
    rewrite(wb, fields, recs + [twin, leak])
    with pytest.raises(DataError) as e:
        load_metadata(wb)
    text = str(e.value)
    n = len(recs)
    assert f"row {n + 2}: {train['img_filename']}: image listed again (first at row" in text
    assert f"row {n + 3}: ./{train['img_filename']}: the same image as row" in text
    assert "in two splits (train and test): cross-split leakage" in text
    r = invoke("data", "check", "--root", str(wb))
    assert r.exit_code == 1 and "2 problem(s)" in r.output and "cross-split leakage" in r.output


def test_cross_split_leakage_refused_csv(tmp_path):
    root = tmp_path / "c"
    rows = []
    for i, (y, a, s) in enumerate((y, a, s) for s in ("train", "val", "test") for y in (0, 1) for a in (0, 1)):
        rows.append((f"img/{i}.png", y, a, s))
    rows.append(("img/./0.png", 0, 0, "test"))  # train's img/0.png again, in test
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label", "attribute", "split"), *rows])
    for i in range(12):
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save((root / "img").mkdir(exist_ok=True) or
                                                                   root / f"img/{i}.png")
    with pytest.raises(DataError,
                       match=r"row 14: img/\./0\.png: the same image as row 2 .* \(train and test\)"):
        load_metadata(root, "csv")


def test_same_bytes_under_two_names_is_a_warning(wb):
    fields, recs = records(wb)
    a = next(r for r in recs if r["split"] == "0")["img_filename"]
    b = next(r for r in recs if r["split"] == "2")["img_filename"]
    (wb / b).write_bytes((wb / a).read_bytes())
    _, problems = check_folder(wb, progress=False, warn=(seen := []).append)
    assert problems == []
    assert any(f"{b}: the same bytes as row" in w and "in two splits (train and test)" in w for w in seen), seen


# ---------------------------------------------------------------- empty groups
@pytest.mark.parametrize("split, code, means", [("val", "1", "validation WGA"), ("test", "2", "test WGA"),
                                                ("train", "0", "never sees it")])
def test_empty_group_refused_with_what_wga_would_mean(wb, split, code, means):
    fields, recs = records(wb)
    kept = [r for r in recs if not (r["split"] == code and r["y"] == "1" and r["place"] == "0")]
    for r in recs:
        if r not in kept:
            (wb / r["img_filename"]).unlink()
    rewrite(wb, fields, kept)
    with pytest.raises(DataError) as e:
        load_metadata(wb)
    assert f"split {split}: no row in group(s) waterbird/land" in str(e.value) and means in str(e.value)
    r = invoke("data", "check", "--root", str(wb))
    assert r.exit_code == 1 and "1 problem(s)" in r.output and f"split {split}: no row" in r.output
    assert "rows\n" in r.output and "waterbird/land" in r.output  # the count table is still shown


# ---------------------------------------------------------------- paths outside the data folder
OUTSIDE = "outside the data folder"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A private folder beside the data folder, holding a file that is no image: if anything opened
    it, `data check` would also report it as unreadable."""
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "key.png").write_bytes(b"not an image: a private key")
    return folder


def _refused(root: Path, row: int, name: str, dataset: str = "waterbirds", *options: str) -> None:
    """``name`` at ``row`` is refused by load_metadata, check_folder, `data check` and a stage, and the
    file outside is never opened."""
    with pytest.raises(DataError) as e:
        load_metadata(root, dataset)
    assert f"row {row}: {name}: resolves to " in str(e.value) and OUTSIDE in str(e.value), str(e.value)
    assert "GRKD_ALLOW_OUTSIDE_PATHS=1" in str(e.value)
    meta, problems = check_folder(root, dataset, progress=False, warn=lambda w: None)
    mine = [p for p in problems if p.startswith(f"row {row}:")]
    assert meta is None and len(mine) == 1 and OUTSIDE in mine[0], problems
    assert not any("unreadable" in p or "key.png" in p and OUTSIDE not in p for p in problems), problems
    r = invoke("data", "check", "--root", str(root), "--dataset", dataset, *options)
    assert r.exit_code == 1 and f"row {row}: {name}: resolves to " in r.output and "Traceback" not in r.output
    assert "no problems found" not in r.output


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_waterbirds_path_outside_the_folder_refused(wb, secret, how):
    fields, recs = records(wb)
    name = str(secret / "key.png") if how == "absolute" else "images/../../private/key.png"
    recs[4]["img_filename"] = name
    rewrite(wb, fields, recs)
    _refused(wb, 6, name)


def test_csv_dotdot_path_refused(tmp_path, secret):
    root = tmp_path / "c"
    (root / "img").mkdir(parents=True)
    rows = []
    combos = [(y, a, s) for s in ("train", "val", "test") for y in (0, 1) for a in (0, 1)]
    for i, (y, a, s) in enumerate(combos):
        rows.append((f"img/{i}.png", y, a, s))
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(root / f"img/{i}.png")
    (root / "img/0.png").unlink()
    rows[0] = ("img/../../private/key.png", 0, 0, "train")
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label", "attribute", "split"), *rows])
    _refused(root, 2, "img/../../private/key.png", "csv")


def test_symlink_to_a_folder_elsewhere_refused(wb, secret):
    """A folder under images/ that is a symbolic link to a private folder: the metadata names
    ordinary relative paths, the files are elsewhere."""
    fields, recs = records(wb)
    name = recs[2]["img_filename"]
    (secret / "x.png").write_bytes((wb / name).read_bytes())  # a real image there: it must not be read
    (wb / "images" / "elsewhere").symlink_to(secret, target_is_directory=True)
    (wb / name).unlink()
    recs[2]["img_filename"] = "images/elsewhere/x.png"
    rewrite(wb, fields, recs)
    _refused(wb, 4, "images/elsewhere/x.png")


def test_symlinked_image_file_refused_but_a_link_inside_the_folder_is_fine(wb, secret):
    fields, recs = records(wb)
    a, b = recs[0]["img_filename"], recs[1]["img_filename"]
    (secret / "b.png").write_bytes((wb / b).read_bytes())
    (wb / b).unlink()
    (wb / b).symlink_to(secret / "b.png")                    # the file itself links out
    with pytest.raises(DataError, match=f"row 3: {b}: resolves to {secret / 'b.png'}, {OUTSIDE}"):
        load_metadata(wb)
    (wb / b).unlink()
    (wb / "kept").mkdir()
    (wb / "kept" / "b.png").write_bytes((secret / "b.png").read_bytes())
    (wb / b).symlink_to(wb / "kept" / "b.png")                # a link that stays inside is allowed
    (wb / "images_link").symlink_to(wb / "images", target_is_directory=True)
    recs[0]["img_filename"] = "images_link/" + a.split("/", 1)[1]
    rewrite(wb, fields, recs)
    assert len(load_metadata(wb)) == len(recs)


def test_celeba_image_linked_out_refused(tmp_path, secret):
    root = tmp_path / "celeba"
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 13)]
    combos = [(y, a, s) for s in (0, 1, 2) for y in (-1, 1) for a in (-1, 1)]
    with open(root / "list_attr_celeba.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "Blond_Hair", "Male"])
        w.writerows([n, y, a] for n, (y, a, _) in zip(names, combos))
    with open(root / "list_eval_partition.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "partition"), *((n, s) for n, (_, _, s) in zip(names, combos))])
    for i, n in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(images / n)
    assert len(load_metadata(root, "celeba")) == 12
    (images / names[5]).unlink()
    (images / names[5]).symlink_to(secret / "key.png")
    _refused(root, 7, names[5], "celeba")


def test_a_stage_refuses_the_row_too(wb, secret, tmp_path):
    fields, recs = records(wb)
    recs[0]["img_filename"] = "../private/key.png"
    rewrite(wb, fields, recs)
    r = invoke("teachers", "--data-root", str(wb), "--out", str(tmp_path / "t"), "--device", "cpu")
    assert r.exit_code == 1 and "row 2: ../private/key.png: resolves to" in r.output and OUTSIDE in r.output
    assert "Traceback" not in r.output and not (tmp_path / "t" / "manifest.json").exists()


def test_outside_paths_allowed_explicitly(wb, secret, monkeypatch):
    from core.manifest import ALLOW_OUTSIDE_ENV

    fields, recs = records(wb)
    name = recs[0]["img_filename"]
    (secret / "a.png").write_bytes((wb / name).read_bytes())
    (wb / name).unlink()
    recs[0]["img_filename"] = str(secret / "a.png")
    rewrite(wb, fields, recs)
    monkeypatch.setenv(ALLOW_OUTSIDE_ENV, "1")
    meta = load_metadata(wb)
    assert meta.filenames[0] == str(secret / "a.png")
    assert read_image(meta.root / meta.filenames[0]).shape[2] == 3
    r = invoke("data", "check", "--root", str(wb))
    assert r.exit_code == 0 and "no problems found" in r.output, r.output
    monkeypatch.setenv(ALLOW_OUTSIDE_ENV, "0")
    with pytest.raises(DataError, match=OUTSIDE):
        load_metadata(wb)


def test_unlisted_image_scan_does_not_follow_links_out_or_loop(wb, secret):
    (secret / "other.png").write_bytes(b"x")
    (wb / "images" / "out").symlink_to(secret, target_is_directory=True)
    (wb / "images" / "loop").symlink_to(wb / "images", target_is_directory=True)
    meta, problems = check_folder(wb, progress=False, warn=lambda w: None)
    assert meta is not None and problems == [], problems
