"""The data foundation: group metrics, synthetic generator, loader and folder checks, views, image store.

Everything here runs on tiny folders written in tmp_path (a 119-image synthetic set of 16 px, or a
hand-written Waterbirds-layout folder of a few JPEGs), never on the session's teachers or cache.
"""
from __future__ import annotations

import csv
import json
import math
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError
from data.metrics import group_metrics
from data.store import ImageStore, Pixels, StoreError, build_store, merge_stores, store_size_for
from data.synth import SPEC_FILE, WATERBIRDS_COUNTS, SynthSpec, generate, group_counts, made_with
from data.views import (EVAL_CROP, EVAL_RESIZE, IMAGENET_MEAN, IMAGENET_STD, ViewSpec, eval_box,
                        pixel_box, pixel_boxes, render, sample_views)
from data.folders import DataError, Metadata, check_folder, fingerprint, load_metadata, read_image
from data.waterbirds import KNOWN_SUBFOLDERS, METADATA_COLUMNS, resolve_root


# Group counts of SynthSpec(scale=0.01), worked by hand from the real counts: round(c * 0.01), at
# least 1: train 34.98->35, 1.84->2, 0.56->1, 10.57->11; val 4.67->5, 4.66->5, 1.33->1, 1.33->1;
# test 22.55->23, 22.55->23, 6.42->6, 6.42->6. 119 images in all.
SCALE = 0.01
COUNTS_1PCT = {"train": (35, 2, 1, 11), "val": (5, 5, 1, 1), "test": (23, 23, 6, 6)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "wb", SynthSpec(scale=SCALE, size=16, seed=0))


def write_metadata(root: Path, rows: list[dict], columns=METADATA_COLUMNS) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_image(path: Path, seed: int, size=(20, 14)) -> None:
    """Random-noise RGB image (noise: no compression makes a truncated file still decodable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def row(i: int, fname: str, y, split, place) -> dict:
    return {"img_id": i + 1, "img_filename": fname, "y": y, "split": split, "place": place,
            "place_filename": f"/{'o/ocean' if place == 1 else 'f/forest'}/{i:08d}.jpg"}


# Real-layout folder: CUB class folders, JPEGs of a non-square size, rows deliberately not sorted
# by split or group, every group in every split (the data check refuses an empty one). (split, y,
# place) per row; counts worked by hand below.
REAL_ROWS = [(0, 0, 0), (2, 1, 1), (0, 1, 1), (1, 0, 1), (0, 0, 0), (0, 0, 1), (2, 0, 0), (1, 1, 0),
             (0, 1, 0), (0, 1, 1), (1, 0, 0), (2, 1, 0), (1, 1, 1), (0, 0, 0), (2, 0, 1)]
REAL_COUNTS = {"train": [3, 1, 1, 2], "val": [1, 1, 1, 1], "test": [1, 1, 1, 1]}


def make_real_layout(parent: Path, sub: str) -> Path:
    root = parent / sub
    rows = []
    for i, (split, y, place) in enumerate(REAL_ROWS):
        cls = "001.Black_footed_Albatross" if y else "095.Baltimore_Oriole"
        fname = f"{cls}/{cls.split('.')[1]}_{i:04d}_{100 + i}.jpg"
        write_image(root / fname, i)
        rows.append(row(i, fname, y, split, place))
    write_metadata(root, rows)
    return root


# ---------------------------------------------------------------- metrics
def test_group_metrics_golden_values():
    # group 0: 4 samples, 3 right -> 0.75     group 1: 2 samples, 1 right -> 0.5
    # group 2: 3 samples, 3 right -> 1.0      group 3: 4 samples, 2 right -> 0.5
    # mean_acc = 9/13; wga = 0.5; without train counts avg_acc = mean_acc.
    # With the real train counts (3498, 184, 56, 1057), total 4795:
    #   avg_acc = (3498*0.75 + 184*0.5 + 56*1.0 + 1057*0.5) / 4795 = 3300 / 4795
    y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    place = [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    pred = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0]
    group = 2 * np.asarray(y) + np.asarray(place)
    assert group.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    m = group_metrics(np.array(pred), np.array(y), group)
    assert m["group_acc"] == pytest.approx([0.75, 0.5, 1.0, 0.5])
    assert m["group_count"] == [4, 2, 3, 4]
    assert m["wga"] == pytest.approx(0.5)
    assert m["mean_acc"] == pytest.approx(9 / 13)
    assert m["avg_acc"] == pytest.approx(9 / 13)
    # torch tensors work the same, and the train-proportion weighting changes avg_acc only
    mt = group_metrics(torch.tensor(pred), torch.tensor(y), torch.from_numpy(group),
                       train_group_counts=WATERBIRDS_COUNTS["train"])
    assert mt["avg_acc"] == pytest.approx(3300 / 4795)
    assert mt["wga"] == pytest.approx(0.5) and mt["mean_acc"] == pytest.approx(9 / 13)


def test_group_metrics_empty_group_is_nan_and_excluded():
    # group 0: 2/2 -> 1.0; group 1: empty; group 2: 1/2 -> 0.5; group 3: 1/1 -> 1.0.
    # wga = 0.5 (not NaN, not 0); mean_acc = 4/5.
    # train counts (10, 5, 2, 8): the empty group's weight is dropped:
    #   avg_acc = (10*1.0 + 2*0.5 + 8*1.0) / (10 + 2 + 8) = 19/20
    y = [0, 0, 1, 1, 1]
    place = [0, 0, 0, 0, 1]
    pred = [0, 0, 1, 0, 1]
    m = group_metrics(pred, y, 2 * np.asarray(y) + np.asarray(place), train_group_counts=[10, 5, 2, 8])
    assert math.isnan(m["group_acc"][1])
    assert m["group_acc"][0] == 1.0 and m["group_acc"][2] == 0.5 and m["group_acc"][3] == 1.0
    assert m["group_count"] == [2, 0, 2, 1]
    assert m["wga"] == 0.5
    assert m["mean_acc"] == pytest.approx(0.8)
    assert m["avg_acc"] == pytest.approx(0.95)


def test_group_metrics_all_wrong_group_and_errors():
    # group 3 entirely wrong -> wga 0 even though the others are perfect
    m = group_metrics([0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 2, 3])
    assert m["group_acc"] == [1.0, 0.0, 1.0, 0.0] and m["wga"] == 0.0 and m["avg_acc"] == 0.5
    with pytest.raises(ValueError, match="length"):
        group_metrics([0, 1], [0], [0])
    with pytest.raises(ValueError):
        group_metrics([], [], [])


# ---------------------------------------------------------------- synthetic generator
def test_group_counts_scale():
    assert group_counts(1.0) == {"train": (3498, 184, 56, 1057), "val": (467, 466, 133, 133),
                                 "test": (2255, 2255, 642, 642)}
    # 0.1: 349.8->350, 18.4->18, 5.6->6, 105.7->106; 46.7->47, 46.6->47, 13.3->13; 225.5->226?
    # (2255 * 0.1 is 225.50000000000003 in floating point, so it rounds up), 64.2->64
    assert group_counts(0.1) == {"train": (350, 18, 6, 106), "val": (47, 47, 13, 13),
                                 "test": (226, 226, 64, 64)}
    assert group_counts(SCALE) == COUNTS_1PCT
    assert group_counts(1e-6)["train"] == (1, 1, 1, 1)  # every group keeps one image


def test_synth_counts_and_metadata(synth):
    meta = load_metadata(synth)
    assert len(meta) == 119
    for split, counts in COUNTS_1PCT.items():
        assert meta.group_counts(split).tolist() == list(counts), split
    with open(synth / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == METADATA_COLUMNS
        recs = list(reader)
    assert [int(r["img_id"]) for r in recs] == list(range(1, 120))
    for r, y, place in zip(recs, meta.y, meta.attr):
        assert r["img_filename"].startswith("images/waterbird/" if y else "images/landbird/")
        assert r["place_filename"].startswith("/w/water/" if place else "/l/land/")
    im = Image.open(synth / recs[0]["img_filename"])
    assert im.size == (16, 16) and im.mode == "RGB"
    meta_ok, problems = check_folder(synth, progress=False)
    assert problems == [] and len(meta_ok) == 119


def test_synth_deterministic_bytes(synth, tmp_path):
    again = generate(tmp_path / "again", SynthSpec(scale=SCALE, size=16, seed=0))
    other = generate(tmp_path / "other", SynthSpec(scale=SCALE, size=16, seed=1))
    ref = _files(synth)
    assert _files(again) == ref
    other_files = _files(other)
    assert other_files.keys() == ref.keys()
    assert other_files["metadata.csv"] == ref["metadata.csv"]  # same rows, other pixels
    changed = [k for k in ref if k != "metadata.csv" and other_files[k] != ref[k]]
    assert len(changed) == len(ref) - 1



def test_synth_val_factor_changes_only_the_validation_split(synth, tmp_path):
    """A larger validation split (for estimating what a concept eraser removes) adds images after
    every other row: the training and test images, and the first validation images of each group,
    are those of val_factor 1, byte for byte; a smaller one keeps each group's first images."""
    # val 4.67 * 3 = 14.01 -> 14, 4.66 * 3 = 13.98 -> 14, 1.33 * 3 = 3.99 -> 4; 0.5: 2.3 -> 2, 0.7 -> 1
    assert group_counts(SCALE, val_factor=3) == {**COUNTS_1PCT, "val": (14, 14, 4, 4)}
    assert group_counts(SCALE, val_factor=0.5) == {**COUNTS_1PCT, "val": (2, 2, 1, 1)}
    base, base_files = load_metadata(synth), _files(synth)
    for factor, added in ((3, 14 + 14 + 4 + 4 - 12), (0.5, 6 - 12)):
        out = generate(tmp_path / f"val{factor}", SynthSpec(scale=SCALE, size=16, seed=0, val_factor=factor))
        meta, files = load_metadata(out), _files(out)
        assert len(meta) == len(base) + added
        assert meta.group_counts("val").tolist() == list(group_counts(SCALE, val_factor=factor)["val"])
        for split in ("train", "test"):
            assert meta.group_counts(split).tolist() == list(COUNTS_1PCT[split])
        images = {f for f in files if f.startswith("images/")}
        shared = images & set(base_files)
        assert all(files[f] == base_files[f] for f in shared)  # no image of val_factor 1 redrawn
        gone = {f for f in base_files if f.startswith("images/")} - images
        split_of = dict(zip(base.filenames, base.split))
        assert all(split_of[f] == 1 for f in gone)  # only validation images dropped (split code 1)
        if factor > 1:
            new_split = dict(zip(meta.filenames, meta.split))
            assert not gone and all(new_split[f] == 1 for f in images - shared)  # the added ones are validation images
            # the first validation image of each group is the one of val_factor 1
            for g in range(4):
                first = lambda m: m.filenames[np.flatnonzero((m.split == 1) & (m.group == g))[0]]
                assert first(meta) == first(base)
        assert not made_with(out, SynthSpec(scale=SCALE, size=16, seed=0))


def test_synth_spec_file_without_a_later_knob_reads_as_its_default(synth, tmp_path):
    """A folder generated before ``val_factor`` existed (its spec file lacks it) holds the bytes of
    val_factor 1: it is reused, not regenerated, and not taken for another val_factor."""
    old = tmp_path / "old"
    shutil.copytree(synth, old)
    spec = json.loads((old / SPEC_FILE).read_text())
    spec.pop("val_factor")
    (old / SPEC_FILE).write_text(json.dumps(spec, sort_keys=True) + "\n")
    assert made_with(old, SynthSpec(scale=SCALE, size=16, seed=0))
    assert not made_with(old, SynthSpec(scale=SCALE, size=16, seed=0, val_factor=2))
    assert not made_with(old, SynthSpec(scale=SCALE, size=16, seed=1))
    with pytest.raises(ConfigError):
        SynthSpec(val_factor=0)

# ---------------------------------------------------------------- loader and folder checks
@pytest.mark.parametrize("sub", KNOWN_SUBFOLDERS)
def test_loader_real_layout_from_parent(tmp_path, sub):
    root = make_real_layout(tmp_path, sub)
    assert resolve_root(tmp_path) == root and resolve_root(root) == root
    meta = load_metadata(tmp_path)
    assert meta.root == root and len(meta) == len(REAL_ROWS)
    for split, counts in REAL_COUNTS.items():
        assert meta.group_counts(split).tolist() == counts, split
    assert meta.rows("val").tolist() == [3, 7, 10, 12]
    assert meta.group.tolist() == [2 * y + p for _, y, p in REAL_ROWS]
    assert meta.filenames[1] == "001.Black_footed_Albatross/Black_footed_Albatross_0001_101.jpg"
    meta2, problems = check_folder(tmp_path, progress=False)
    assert problems == [] and meta2.root == root
    test = meta.rows("test")
    assert len(test) == 4 and test[0] == 1 and meta.group[1] == 3
    assert read_image(root / meta.filenames[1]).shape == (14, 20, 3)


def test_missing_folder_and_missing_metadata(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_metadata(tmp_path / "nope")
    with pytest.raises(DataError, match="no metadata.csv"):
        load_metadata(tmp_path)


def test_missing_and_extra_columns_listed_together(tmp_path):
    cols = ["img_id", "img_filename", "split", "place_filename", "bird_name"]  # no y, no place
    write_metadata(tmp_path, [row(0, "a.png", 0, 0, 0)], columns=cols)
    meta, problems = check_folder(tmp_path, progress=False)
    assert meta is None
    text = "\n".join(problems)
    assert "missing column(s) y, place" in text and "unexpected column(s) bird_name" in text
    with pytest.raises(DataError) as e:
        load_metadata(tmp_path)
    assert "y, place" in str(e.value) and "bird_name" in str(e.value) and "2 problem(s)" in str(e.value)


def make_broken_folder(root: Path) -> dict[int, str]:
    """Six good rows and every kind of problem, each in its own row; returns {row: problem}.

    Rows are numbered as in a spreadsheet: the header is row 1, metadata row i is row i + 2.
    """
    rows = []
    for i in range(6):
        write_image(root / f"ok/{i}.png", i)
        rows.append(row(i, f"ok/{i}.png", i % 2, i % 3, (i // 2) % 2))
    write_image(root / "bad/split.png", 10)
    rows.append(row(6, "bad/split.png", 0, 3, 0))             # row 8: unknown split code
    write_image(root / "bad/label.png", 11)
    rows.append(row(7, "bad/label.png", 2, 0, 0))             # row 9: y outside {0, 1}
    write_image(root / "bad/place.png", 12)
    rows.append(row(8, "bad/place.png", 1, 1, "-1"))          # row 10: place outside {0, 1}
    rows.append(row(9, "bad/missing.jpg", 1, 2, 1))           # row 11: file missing
    write_image(root / "bad/trunc.png", 13, size=(40, 40))
    data = (root / "bad/trunc.png").read_bytes()
    (root / "bad/trunc.png").write_bytes(data[: len(data) // 2])
    rows.append(row(10, "bad/trunc.png", 0, 1, 1))            # row 12: truncated PNG
    write_image(root / "bad/trunc.jpg", 14, size=(40, 40))
    data = (root / "bad/trunc.jpg").read_bytes()
    (root / "bad/trunc.jpg").write_bytes(data[: len(data) // 2])
    rows.append(row(11, "bad/trunc.jpg", 1, 0, 1))            # row 13: truncated JPEG
    (root / "bad/text.jpg").write_bytes(b"this is not an image")
    rows.append(row(12, "bad/text.jpg", 0, 2, 0))             # row 14: not an image at all
    rows.append(row(13, "bad/y.png", "bird", 0, 0))           # row 15: y not a number
    write_image(root / "bad/y.png", 15)
    write_image(root / "stray/extra.png", 16)                 # in no row
    write_metadata(root, rows)
    return {8: "row 8: bad/split.png: split='3' is not one of [0, 1, 2]",
            9: "row 9: bad/label.png: y='2' is not one of [0, 1]",
            10: "row 10: bad/place.png: place='-1' is not one of [0, 1]",
            11: "row 11: bad/missing.jpg: missing image file",
            12: "row 12: bad/trunc.png: unreadable image",
            13: "row 13: bad/trunc.jpg: unreadable image",
            14: "row 14: bad/text.jpg: unreadable image",
            15: "row 15: bad/y.png: y='bird' is not one of [0, 1]"}


def test_broken_folder_lists_every_problem(tmp_path):
    expected = make_broken_folder(tmp_path)
    meta, problems = check_folder(tmp_path, progress=False)
    assert meta is None
    text = "\n".join(problems)
    for r, msg in expected.items():
        assert msg in text, f"row {r} not reported:\n{text}"
    positions = [text.index(msg) for msg in expected.values()]
    assert positions == sorted(positions)  # listed in row order
    assert "1 image file(s) not listed in the metadata" in text and "stray/extra.png" in text
    assert not any(f"row {n}:" in text for n in range(2, 8))  # the good rows are not blamed
    # load_metadata raises on the label problems alone, all of them in one message
    with pytest.raises(DataError) as e:
        load_metadata(tmp_path)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for r in (8, 9, 10, 15):
        assert f"row {r}:" in msg


def test_extra_image_alone_is_a_problem(tmp_path):
    make_real_layout(tmp_path, KNOWN_SUBFOLDERS[1])
    write_image(tmp_path / KNOWN_SUBFOLDERS[1] / "001.Black_footed_Albatross/stray.JPG", 99)
    meta, problems = check_folder(tmp_path, progress=False)
    assert meta is not None and len(problems) == 1
    assert "001.Black_footed_Albatross/stray.JPG" in problems[0]


def test_unreadable_metadata_is_a_problem(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(b"img_id,img_filename\n\xff\xfe\x00\x81garbage\n")
    meta, problems = check_folder(tmp_path, progress=False)
    assert meta is None and len(problems) >= 1 and "metadata.csv" in problems[0]
    with pytest.raises(DataError):
        load_metadata(tmp_path)


def test_fingerprint_tracks_content_not_location(synth, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    fp = fingerprint(load_metadata(synth))
    assert fingerprint(load_metadata(copy)) == fp
    meta = load_metadata(copy)
    img = copy / meta.filenames[7]
    img.write_bytes(img.read_bytes() + b"\0")
    assert fingerprint(meta) != fp
    meta2 = load_metadata(synth)
    meta2.y[3] = 1 - meta2.y[3]
    assert fingerprint(meta2) != fp


# ---------------------------------------------------------------- views
def test_eval_box_is_resize256_centercrop224():
    assert eval_box() == pytest.approx((16 / 256, 16 / 256, 224 / 256, 224 / 256))
    assert pixel_box(eval_box(), EVAL_RESIZE) == (16, 16, EVAL_CROP, EVAL_CROP)
    spec = ViewSpec(random_views=3, seed=5, out_size=32)
    assert ViewSpec(**spec.to_dict()) == spec


def test_sample_views_deterministic_and_independent_of_batch():
    spec = ViewSpec(random_views=4, seed=3)
    box, flip = sample_views(np.array([9, 5, 0, 123456]), spec)
    assert box.shape == (4, 5, 4) and box.dtype == np.float32 and flip.shape == (4, 5)
    box5, flip5 = sample_views(np.array([5]), spec)
    np.testing.assert_array_equal(box5[0], box[1])
    np.testing.assert_array_equal(flip5[0], flip[1])
    again, flip_again = sample_views(np.array([9, 5, 0, 123456]), spec)
    np.testing.assert_array_equal(again, box)
    np.testing.assert_array_equal(flip_again, flip)
    other, _ = sample_views(np.array([9, 5, 0, 123456]), ViewSpec(random_views=4, seed=4))
    assert not np.allclose(other[:, 1:], box[:, 1:])
    # distinct rows and distinct views of one row get distinct boxes
    assert not np.allclose(box[0, 1:], box[1, 1:])
    assert len({tuple(b) for b in box[1, 1:]}) == 4
    # K = 0: the eval view only
    b0, f0 = sample_views(np.arange(3), ViewSpec(random_views=0))
    assert b0.shape == (3, 1, 4) and not f0.any()


def test_view_boxes_respect_ranges():
    spec = ViewSpec(random_views=4, seed=0)
    box, flip = sample_views(np.arange(300), spec)
    np.testing.assert_allclose(box[:, 0], np.broadcast_to(eval_box(), (300, 4)), rtol=0, atol=1e-7)
    assert not flip[:, 0].any()
    rand = box[:, 1:].reshape(-1, 4).astype(np.float64)
    top, left, h, w = rand.T
    eps = 1e-6
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= 1 + eps).all() and (left + w <= 1 + eps).all()
    area, aspect = h * w, w / h  # relative terms: the stored image is square
    assert area.min() >= 0.7 - eps and area.max() <= 1 + eps
    assert aspect.min() >= 3 / 4 - eps and aspect.max() <= 4 / 3 + eps
    # the draws cover their ranges, and about half the random views are flipped
    assert area.min() < 0.72 and area.max() > 0.95 and aspect.min() < 0.8 and aspect.max() > 1.25
    assert 0.4 < flip[:, 1:].mean() < 0.6
    # narrow ranges are honoured too
    box2, _ = sample_views(np.arange(50), ViewSpec(random_views=2, scale=(0.3, 0.4), ratio=(1.0, 1.0)))
    h2, w2 = box2[:, 1:, 2].astype(np.float64), box2[:, 1:, 3].astype(np.float64)
    np.testing.assert_allclose(h2, w2, atol=1e-6)
    assert (h2 * w2 >= 0.3 - eps).all() and (h2 * w2 <= 0.4 + eps).all()


def test_pixel_boxes_matches_pixel_box():
    box, _ = sample_views(np.arange(40), ViewSpec(random_views=3, seed=1))
    flat = torch.from_numpy(box.reshape(-1, 4))
    for size in (7, 37, 256):
        want = torch.tensor([pixel_box(b, size) for b in flat.tolist()], dtype=torch.float32)
        torch.testing.assert_close(pixel_boxes(flat, size), want, rtol=0, atol=0)
        assert (want[:, 0] + want[:, 2] <= size).all() and (want[:, 1] + want[:, 3] <= size).all()


# render vs torchvision in float32: both take the same taps and weights (render rounds the source
# coordinate once, as PyTorch's kernel does), so they differ only in rounding the blend
# (p0 w0 + p1 w1) v0 + (p2 w2 + p3 w3) v1 of values <= 255 with weights summing to 1: each
# rounding errs by at most u = 2**-24 relative, 4 of them on torchvision's side (gamma_4 * 255)
# and 5 on render's (at a crop's edge it sums w0 + w1 once, onto one pixel): 9 u * 255 = 1.4e-4.
RENDER_ATOL = 9 * 2.0 ** -24 * 255


def _reference_views(images, box, flip, out_size):
    from torchvision.transforms.v2 import functional as TF

    outs = []
    for img, b, f in zip(images, box, flip):
        x = TF.resized_crop(img, *pixel_box(b, tuple(img.shape[-2:])), [out_size, out_size], antialias=False)
        outs.append(TF.horizontal_flip(x) if f else x)
    return torch.stack(outs)


@pytest.mark.parametrize("size,out_size", [(16, 24), (37, 16), (64, 20), (48, 48)])
def test_render_equals_torchvision_resized_crop(size, out_size):
    # (16 -> 24: every crop is upsampled; 37/64 -> 16/20: downsampled; 48 -> 48: mixed)
    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (12, 3, size, size), dtype=torch.uint8, generator=gen)
    box, flip = sample_views(np.arange(6), ViewSpec(random_views=1, seed=size))
    box = torch.from_numpy(box.reshape(-1, 4))
    flip = torch.from_numpy(flip.reshape(-1))
    flip[0] = True  # the eval view, flipped, too
    # odd boxes: a corner, a thin strip, a 1-pixel box
    box[1] = torch.tensor([0.0, 0.5, 0.5, 0.5])
    box[2] = torch.tensor([0.3, 0.0, 0.1, 1.0])
    box[3] = torch.tensor([0.99, 0.99, 0.001, 0.001])
    got = render(images, box, flip, out_size, normalize=False)
    assert got.shape == (12, 3, out_size, out_size) and got.dtype == torch.float32
    want = _reference_views(images.float(), box, flip, out_size)
    torch.testing.assert_close(got, want, rtol=0, atol=RENDER_ATOL)
    # the same images as Pixels (no canvas) render the same
    torch.testing.assert_close(render(Pixels.from_images(images), box, flip, out_size, normalize=False), got,
                               rtol=0, atol=0)
    # torchvision's uint8 path rounds (with its own fixed-point arithmetic): within one level
    want_u8 = _reference_views(images, box, flip, out_size)
    assert (got - want_u8.float()).abs().max() <= 1.0 + 1e-3  # its fixed-point weights, not float32
    # normalisation is ImageNet's, on the 0-255 scale
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(render(images, box, flip, out_size), (want - mean) / std,
                               rtol=0, atol=1e-4)


CUB_LIKE = [(48, 36), (36, 48), (40, 40), (25, 60), (37, 50), (60, 60), (18, 40), (50, 37)]


def test_render_mixed_aspect_batch_equals_torchvision_per_image():
    """Portrait, landscape, square and beyond 2:1 images in one Pixels batch, every view kind
    (eval view, random crops, flips, odd boxes), downsampled and upsampled: each sample is
    torchvision's resized_crop (+ hflip) of its own image."""
    gen = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in CUB_LIKE]
    pixels = Pixels.from_images(images)
    assert pixels.nbytes == sum(3 * h * w for h, w in CUB_LIKE) + 24 * len(CUB_LIKE)
    hw = np.array(CUB_LIKE)
    for out_size in (16, 24, 64):
        box, flip = sample_views(np.arange(len(hw)), ViewSpec(random_views=3, seed=out_size, out_size=out_size), hw)
        box, flip = torch.from_numpy(box), torch.from_numpy(flip)
        box[1, 1], box[2, 2] = torch.tensor([0.99, 0.99, 0.001, 0.001]), torch.tensor([0.3, 0.0, 0.1, 1.0])
        flip[0, 0] = True
        # a batch drawn with repeats and out of order, as a sampler draws it
        idx = torch.tensor([3, 0, 7, 3, 1, 2, 6, 5, 4, 0])
        for v in range(4):
            b, f = box[idx, v], flip[idx, v]
            got = render(pixels[idx], b, f, out_size, normalize=False)
            assert got.shape == (len(idx), 3, out_size, out_size)
            want = torch.stack([_reference_views([images[i].float()], b[k:k + 1], f[k:k + 1], out_size)[0]
                                for k, i in enumerate(idx.tolist())])
            torch.testing.assert_close(got, want, rtol=0, atol=RENDER_ATOL)


def test_render_edges_canvases_and_one_pixel_wide_images():
    """A 1-pixel-wide crop in column 0 of the buffer's last image (and a 1-pixel-wide image) render
    as torchvision does; canvases holding images in their top-left corner render as the Pixels."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(9, 14), (12, 7), (5, 1)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes]
    box = torch.tensor([[0.0, 0.0, 1.0, 0.01], [0.9, 0.0, 0.1, 0.01], [0.5, 0.0, 0.5, 1.0]])
    for out_size in (4, 11):
        for flip in (torch.tensor([False, True, False]), torch.tensor([True, False, True])):
            got = render(Pixels.from_images(images), box, flip, out_size, normalize=False)
            want = torch.cat([_reference_views([im.float()], box[k:k + 1], flip[k:k + 1], out_size)
                              for k, im in enumerate(images)])
            torch.testing.assert_close(got, want, rtol=0, atol=RENDER_ATOL)
            canvas = torch.zeros(3, 3, 12, 14, dtype=torch.uint8)
            for k, im in enumerate(images):
                canvas[k, :, :im.shape[1], :im.shape[2]] = im
            torch.testing.assert_close(render(canvas, box, flip, out_size, torch.tensor(shapes), normalize=False),
                                       got, rtol=0, atol=0)


def test_render_with_index_draws_in_place_what_a_copy_draws():
    """render(pixels, ..., index=i) is render(pixels[i], ...) bit for bit, with repeated rows and
    1-pixel-wide images, the buffer's last among them (its window ends past the buffer), and
    without it."""
    gen = torch.Generator().manual_seed(4)
    for shapes in ([(9, 14), (5, 1), (12, 7), (6, 1)], [(6, 1), (9, 14), (12, 7)]):
        pixels = Pixels.from_images([torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
                                     for h, w in shapes])
        index = torch.tensor([len(shapes) - 1, 0, 1, 1, len(shapes) - 1])
        box = torch.rand(len(index), 4, generator=gen) * 0.5 + torch.tensor([0.0, 0.0, 0.5, 0.5])
        flip = torch.tensor([True, False, True, False, False])
        for out_size in (3, 8):
            want = render(pixels[index], box, flip, out_size)
            torch.testing.assert_close(render(pixels, box, flip, out_size, index=index), want, rtol=0, atol=0)


def test_pixels_index_copy_and_move():
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in CUB_LIKE]
    pixels = Pixels.from_images(images)
    assert len(pixels) == len(images) and pixels.hw.tolist() == [list(s) for s in CUB_LIKE]
    for idx in ([5, 2, 2, 7, 0], np.array([1, 2, 3]), torch.tensor([4]), slice(2, 6), []):
        sub = pixels[idx]
        rows = np.arange(len(images))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        assert len(sub) == len(rows) and sub.flat.numel() == sum(3 * h * w for h, w in np.array(CUB_LIKE)[rows])
        for k, r in enumerate(rows):
            assert torch.equal(sub.image(k), images[r])
    sub = pixels[[1, 2]]
    sub.flat.zero_()  # a copy: the source is untouched
    assert torch.equal(pixels.image(1), images[1])
    moved = pixels.to("cpu")
    assert torch.equal(moved.flat, pixels.flat) and moved.offset.dtype == torch.int64


def test_eval_view_at_256_is_an_exact_center_crop():
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    box = torch.tensor([eval_box()] * 2, dtype=torch.float32)
    got = render(images, box, torch.tensor([False, True]), EVAL_CROP, normalize=False)
    crop = images[:, :, 16:240, 16:240].float()
    assert torch.equal(got[0], crop[0])
    assert torch.equal(got[1], crop[1].flip(-1))


# ---------------------------------------------------------------- image store
def test_store_size_for():
    assert store_size_for(224) == 256 and store_size_for(32) == 37 and store_size_for(16) == 18


def test_store_build_and_load(tmp_path):
    from torchvision.transforms import Resize

    root = make_real_layout(tmp_path, KNOWN_SUBFOLDERS[0])
    meta = load_metadata(root)
    fp = fingerprint(meta)
    path = build_store(meta, tmp_path / "store" / "images.h5", 12, fp, "squash", workers=2, progress=False)
    store = ImageStore(path, fp, 12, "squash")
    assert store.size == 12 and store.num_rows == len(meta) and store.fingerprint == fp
    assert store.side == 12 and (store.hw == 12).all()
    every = store.load_all()
    assert isinstance(every, Pixels) and len(every) == len(meta) and every.flat.dtype == torch.uint8
    assert every.flat.numel() == store.nbytes == store.nbytes_of(range(len(meta))) == len(meta) * 3 * 12 * 12
    for r in range(len(meta)):
        want = read_image(root / meta.filenames[r], 12)
        np.testing.assert_array_equal(every.image(r).numpy(), want.transpose(2, 0, 1))
        # the stored pixels are torchvision's Resize((12, 12)) of the decoded image
        with Image.open(root / meta.filenames[r]) as im:
            tv = np.asarray(Resize((12, 12))(im.convert("RGB")))
        np.testing.assert_array_equal(every.image(r).numpy(), tv.transpose(2, 0, 1))
    # any order, repeats included (a sampler with replacement), and the empty batch
    rows = [5, 2, 13, 2, 0]
    assert torch.equal(store.load(rows).flat, every[rows].flat) and store.nbytes_of(rows) == 5 * 3 * 12 * 12
    assert len(store.load([])) == 0
    # picklable for DataLoader workers, the open handle is not sent
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None
    assert torch.equal(clone.load([3]).flat, every[[3]].flat)


def test_keep_aspect_store_and_eval_view_are_torchvisions(tmp_path):
    """Keep-aspect: each image is torchvision's Resize(S) (short side S), top-left in its canvas,
    and view 0 renders exactly Resize(S) + CenterCrop(out) of the non-square image."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    root = make_real_layout(tmp_path, KNOWN_SUBFOLDERS[0])  # 20 x 14 (w x h) images
    meta = load_metadata(root)
    fp = fingerprint(meta)
    out = 10
    S = store_size_for(out)  # 11
    store = ImageStore(build_store(meta, tmp_path / "ka.h5", S, fp, "keep-aspect", progress=False), fp, S, "keep-aspect")
    assert store.resize == "keep-aspect" and (store.hw == [S, int(S * 20 / 14)]).all() and store.side == 15
    pixels = store.load_all()
    box, flip = sample_views(np.arange(len(meta)), ViewSpec(out_size=out), store.hw)
    views = render(pixels, torch.from_numpy(box[:, 0]), torch.from_numpy(flip[:, 0]), out, normalize=False)
    for r in range(len(meta)):
        with Image.open(root / meta.filenames[r]) as im:
            resized = np.asarray(Resize(S)(im.convert("RGB"))).transpose(2, 0, 1)
            want = np.asarray(Compose([Resize(S), CenterCrop(out)])(im.convert("RGB"))).transpose(2, 0, 1)
        h, w = store.hw[r]
        np.testing.assert_array_equal(pixels.image(r).numpy(), resized)
        np.testing.assert_array_equal(views[r].round().byte().numpy(), want)


def test_store_resume_after_kill(synth, tmp_path, monkeypatch):
    import data.store as S

    meta = load_metadata(synth)
    fp = fingerprint(meta)
    ref = build_store(meta, tmp_path / "ref.h5", 16, fp, workers=1, progress=False)
    with h5py.File(ref, "r") as f:
        ref_images = f["pixels"][:]
    assert len(meta) > S.CHUNK_ROWS  # two chunks: the kill lands in the second one

    real_read = S.read_image

    def dying_read(path, size=None, hw=None):
        if int(Path(path).stem) >= S.CHUNK_ROWS + 10:
            raise KeyboardInterrupt("killed")
        return real_read(path, size, hw)

    path = tmp_path / "resumed.h5"
    monkeypatch.setattr(S, "read_image", dying_read)
    with pytest.raises(KeyboardInterrupt):
        build_store(meta, path, 16, fp, workers=1, progress=False)
    monkeypatch.setattr(S, "read_image", real_read)
    with h5py.File(path, "r") as f:
        done = f["done"][:]
    assert done[:S.CHUNK_ROWS].all() and not done[S.CHUNK_ROWS:].any()
    with pytest.raises(StoreError, match="incomplete"):
        ImageStore(path, fp, 16)

    build_store(meta, path, 16, fp, workers=1, progress=False)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["pixels"][:], ref_images)
        assert f["done"][:].all()

    # lost "done" flags and garbage pixels in those rows: the rebuild rewrites exactly them
    with h5py.File(path, "a") as f:
        f["done"][3:9] = False
        f["pixels"][f["offset"][3]:f["offset"][9]] = 7
    calls = []
    monkeypatch.setattr(S, "read_image", lambda p, size=None, hw=None: calls.append(p) or real_read(p, size, hw))
    build_store(meta, path, 16, fp, workers=1, progress=False)
    assert 0 < len(calls) <= S.CHUNK_ROWS  # only the chunk holding rows 3..8
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["pixels"][:], ref_images)
    calls.clear()
    build_store(meta, path, 16, fp, workers=1, progress=False)  # complete: reused, nothing read
    assert calls == []
    np.testing.assert_array_equal(ImageStore(path, fp, 16).load_all().flat.numpy(), ref_images)


def test_store_refuses_other_folder_size_and_files(synth, tmp_path):
    meta = load_metadata(synth)
    fp = fingerprint(meta)
    path = build_store(meta, tmp_path / "s.h5", 8, fp, workers=1, progress=False)
    other = make_real_layout(tmp_path / "other", "wb")
    other_meta = load_metadata(other)
    other_fp = fingerprint(other_meta)
    with pytest.raises(StoreError, match="another data folder"):
        build_store(other_meta, path, 8, other_fp, workers=1, progress=False)
    with pytest.raises(StoreError, match="another data folder"):
        ImageStore(path, other_fp, 8)
    with pytest.raises(StoreError, match="8px images, 12px asked"):
        build_store(meta, path, 12, fp, workers=1, progress=False)
    with pytest.raises(StoreError, match="8px images, 12px asked"):
        ImageStore(path, fp, 12)
    ImageStore(path, fp, 8)  # the matching request still opens
    ImageStore(path)         # and no expectation at all

    with pytest.raises(StoreError, match="no image store"):
        ImageStore(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable"):
        ImageStore(tmp_path / "junk.h5")
    with pytest.raises(StoreError, match="not a readable"):
        build_store(meta, tmp_path / "junk.h5", 8, fp, progress=False)
    # another HDF5 file (say, a teacher cache) is refused, and left as it was
    with h5py.File(tmp_path / "cache.h5", "w") as f:
        f.attrs["schema"] = "gr-kd-cache"
        f.create_dataset("logits", data=np.zeros(3))
    with pytest.raises(StoreError, match="not an image store"):
        ImageStore(tmp_path / "cache.h5")
    with pytest.raises(StoreError, match="not an image store"):
        build_store(meta, tmp_path / "cache.h5", 8, fp, progress=False)
    with h5py.File(tmp_path / "cache.h5", "r") as f:
        assert set(f) == {"logits"} and f.attrs["schema"] == "gr-kd-cache"
    # a store killed while being created: refused with a message, not a KeyError
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.attrs.update(schema="gr-kd-images", schema_version=3, fingerprint=fp, size=8, resize="keep-aspect",
                       side=8, num_rows=len(meta))
        f.create_dataset("pixels", (len(meta) * 3 * 8 * 8,), np.uint8)
    with pytest.raises(StoreError, match="damaged"):
        build_store(meta, tmp_path / "half.h5", 8, fp, progress=False)
    with pytest.raises(StoreError, match="not a readable image store"):
        ImageStore(tmp_path / "half.h5")
    # a version-2 store (L x L canvases) is refused, saying how it is rebuilt
    with h5py.File(tmp_path / "v2.h5", "w") as f:
        f.attrs.update(schema="gr-kd-images", schema_version=2, fingerprint=fp, size=8, resize="keep-aspect",
                       side=8, num_rows=len(meta))
        f.create_dataset("images", (len(meta), 3, 8, 8), np.uint8)
    for open_it in (lambda: ImageStore(tmp_path / "v2.h5"), lambda: build_store(meta, tmp_path / "v2.h5", 8, fp)):
        with pytest.raises(StoreError, match=r"version 2 is not supported.*delete it and `python cli.py precompute`"):
            open_it()


def test_incomplete_store_refused_on_open(synth, tmp_path):
    meta = load_metadata(synth)
    fp = fingerprint(meta)
    path = build_store(meta, tmp_path / "s.h5", 8, fp, workers=1, progress=False)
    with h5py.File(path, "a") as f:
        f["done"][100] = False
    with pytest.raises(StoreError, match=r"incomplete \(118 of 119 rows\)"):
        ImageStore(path, fp, 8)


def _mixed_folder(root: Path, shapes) -> Metadata:
    """A folder of PNGs of (height, width) ``shapes`` (portrait, landscape, square, beyond 2:1)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate(shapes):
        names.append(f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / names[-1])
    n = len(shapes)
    return Metadata(root=root, filenames=np.array(names), y=np.arange(n) % 2, attr=(np.arange(n) // 2) % 2,
                    split=np.arange(n) % 3)


def test_mixed_aspect_store_takes_its_images_bytes(tmp_path):
    """A store of mixed aspect ratios takes the resized images' own bytes (within 10%, on disk and
    in memory), each image at its own size; merged torchrun parts equal the one-pass store; a
    damaged image is caught on load and by verify; store_digest names the content."""
    shapes = [(50, 37), (37, 50), (40, 40), (25, 60), (60, 20)] * 6  # the last two beyond 2:1
    meta = _mixed_folder(tmp_path / "mixed", shapes)
    fp = fingerprint(meta)
    S = 16
    path = build_store(meta, tmp_path / "full.h5", S, fp, workers=2, progress=False)
    store = ImageStore(path, fp, S, "keep-aspect")
    own = int(sum(3 * h * w for h, w in store.hw))
    assert store.nbytes == own and store.side == 2 * S  # the 60 x 20 images are capped at 2:1
    assert set(map(tuple, store.hw[:5].tolist())) == {(int(S * 50 / 37), S), (S, int(S * 50 / 37)), (S, S),
                                                       (S, 2 * S), (2 * S, S)}
    pixels = store.load_all()
    assert pixels.nbytes <= 1.1 * own
    for r in range(len(meta)):
        want = read_image(meta.root / meta.filenames[r], hw=tuple(store.hw[r])).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels.image(r).numpy(), want)
    # on disk: the pixels plus small tables (the digests' 32 bytes an image included)
    assert path.stat().st_size <= own + 40 * len(meta) + 64 * 1024  # HDF5's own headers: a few KiB
    assert store.verify() == [] and len(store.store_digest()) == 64

    # torchrun parts: each file holds its rows' pixels only; merged, they are the same store
    parts = [build_store(meta, tmp_path / f"part{k}.h5", S, fp, workers=1, progress=False, rows=rows)
             for k, rows in enumerate([range(0, 13), range(13, 30)])]
    part0 = ImageStore(parts[0], fp, S, rows=range(0, 13))
    assert part0.nbytes == store.nbytes_of(range(13)) and torch.equal(part0.load([12, 3]).flat, pixels[[12, 3]].flat)
    with pytest.raises(StoreError, match="holds rows 0..12"):
        part0.load([13])
    part0.close()
    with pytest.raises(StoreError, match="holds rows 0..12"):
        build_store(meta, parts[0], S, fp, progress=False, rows=range(10, 20))
    merged = ImageStore(merge_stores(tmp_path / "merged.h5", parts), fp, S)
    assert torch.equal(merged.load_all().flat, pixels.flat) and merged.store_digest() == store.store_digest()
    assert merged.verify() == []

    # one flipped byte in image 7: refused on load (not silently rendered), named by verify
    store.close()
    with h5py.File(path, "r+") as f:
        at = int(f["offset"][7]) + 5
        f["pixels"][at] = f["pixels"][at] ^ 1
    damaged = ImageStore(path, fp, S)
    with pytest.raises(StoreError, match=r"1 image\(s\) do not match their sha256 digest \(rows 7\)"):
        damaged.load([3, 7])
    assert damaged.load([3, 8]).flat.numel() == store.nbytes_of([3, 8])
    assert len(damaged.verify()) == 1 and "rows 7" in damaged.verify()[0]


def test_split_metrics_weights_avg_acc_by_training_groups():
    from data.metrics import split_metrics

    # train: groups 0,0,0,3 (counts 3/0/0/1); test: group 0 right, group 3 wrong twice, right once
    split = np.array([0, 0, 0, 0, 2, 2, 2, 2])
    group = np.array([0, 0, 0, 3, 0, 3, 3, 3])
    y = group // 2
    pred = np.array([0, 0, 0, 1, 0, 0, 0, 1])
    out = split_metrics(pred, y, group, split, {"val": 1, "test": 2}, num_groups=4)
    assert set(out) == {"test"}  # no val rows: no entry
    t = out["test"]
    assert t["wga"] == pytest.approx(1 / 3) and t["mean_acc"] == pytest.approx(2 / 4)
    assert t["avg_acc"] == pytest.approx((3 * 1.0 + 1 * (1 / 3)) / 4)


def test_random_crops_follow_random_resized_crop_on_non_square_images():
    """Views 1..K of a W x H image: area fraction in [0.7, 1] and crop aspect ratio (in pixels) in
    [3/4, 4/3], as torchvision's RandomResizedCrop(scale=(0.7, 1), ratio=(3/4, 4/3)) draws them."""
    hw = np.array([[100, 160], [160, 100], [100, 100], [50, 200]] * 50)  # landscape, portrait, square, 4:1
    box, flip = sample_views(np.arange(len(hw)), ViewSpec(random_views=6, seed=3), hw)
    rel = box[:, 1:]
    area = rel[..., 2] * rel[..., 3]
    aspect = (rel[..., 3] * hw[:, None, 1]) / (rel[..., 2] * hw[:, None, 0])
    regular = np.repeat(hw[:, 1] / hw[:, 0] <= 2, 6).reshape(area.shape)
    assert (area[regular] >= 0.7 - 1e-6).all() and (area[regular] <= 1 + 1e-6).all()
    assert (aspect[regular] >= 0.75 - 1e-5).all() and (aspect[regular] <= 4 / 3 + 1e-5).all()
    assert (rel[..., :2] >= 0).all() and (rel[..., :2] + rel[..., 2:] <= 1 + 1e-6).all()
    assert 0.3 < flip[:, 1:].mean() < 0.7 and not flip[:, 0].any()
    # a 4:1 image rarely fits a crop of aspect <= 4/3 and >= 70% of its area: the fallback
    # (whole height, widest allowed crop) keeps the ratio bound
    wide = rel[hw[:, 1] == 200]
    np.testing.assert_allclose(wide[..., 3] * 200 / (wide[..., 2] * 50), 4 / 3, rtol=1e-5)
