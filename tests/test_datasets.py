"""CelebA (Kaggle csv and original txt files) and generic metadata.csv folders, on tiny written folders.

Each folder is a handful of small images and metadata files in the exact official formats; the
group counts below are worked by hand from the row tables.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError
from data import celeba, csv_folder
from data.folders import DataError, check_folder, fingerprint, load_metadata

CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
assert len(CELEBA_ATTRS) == 40


# (partition, Blond_Hair, Male, Smiling, Young) per image 000001.jpg ... 000018.jpg; the other 36
# attributes are random -1/1. Rows 15-18 (val, val, train, test) put every group of the attribute
# pairs used below (Blond_Hair/Male, Smiling/Young, Blond_Hair/Young) in every split: the data check
# refuses a split with an empty group.
CELEBA_ROWS = [(0, 1, -1, 1, 1), (0, -1, -1, -1, 1), (0, -1, 1, 1, -1), (0, 1, -1, -1, 1), (0, -1, 1, -1, 1),
               (0, 1, 1, 1, -1), (0, -1, -1, 1, 1), (1, 1, -1, -1, -1), (1, -1, 1, 1, 1), (1, -1, -1, -1, 1),
               (2, 1, 1, -1, 1), (2, -1, -1, 1, -1), (2, -1, 1, 1, 1), (2, 1, -1, 1, -1),
               (1, 1, 1, 1, 1), (1, -1, -1, 1, -1), (0, -1, 1, -1, -1), (2, 1, -1, -1, -1)]
N_CELEBA = len(CELEBA_ROWS)
# group = 2 * Blond_Hair + Male: train rows 1-7 -> 2,0,1,2,1,3,0; val 8-10 -> 2,1,0; test 11-14 -> 3,0,1,2;
# rows 15-18 -> 3 (val), 0 (val), 1 (train), 2 (test)
BLOND_MALE = {"train": [2, 3, 2, 1], "val": [2, 1, 1, 1], "test": [1, 1, 2, 1]}
# group = 2 * Smiling + Young: train -> 3,1,2,1,1,2,3; val -> 0,3,1; test -> 1,2,3,2; rows 15-18 -> 3,2,0,0
SMILING_YOUNG = {"train": [1, 3, 2, 2], "val": [1, 1, 1, 2], "test": [1, 1, 2, 1]}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (10, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def celeba_table(rows=CELEBA_ROWS) -> list[tuple[str, list[int], int]]:
    """(image id, 40 values in -1/1, partition) per row."""
    rng = np.random.default_rng(0)
    out = []
    for i, (part, blond, male, smiling, young) in enumerate(rows):
        values = rng.choice([-1, 1], size=40).tolist()
        for name, v in (("Blond_Hair", blond), ("Male", male), ("Smiling", smiling), ("Young", young)):
            values[CELEBA_ATTRS.index(name)] = v
        out.append((f"{i + 1:06d}.jpg", values, part))
    return out


def make_celeba(folder: Path, layout: str, images: str | None = None, table=None, attrs=CELEBA_ATTRS) -> Path:
    """A CelebA folder: layout "kaggle" (csv files) or "original" (txt files); images in ``images``
    (default: Kaggle's nested img_align_celeba/img_align_celeba, the original's img_align_celeba)."""
    table = celeba_table() if table is None else table
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "kaggle":
        images = images or "img_align_celeba/img_align_celeba"
        with open(folder / "list_attr_celeba.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image_id", *attrs])
            w.writerows([name, *values] for name, values, _ in table)
        # partition rows in reverse order: the parser joins by image id, not by position
        with open(folder / "list_eval_partition.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image_id", "partition"])
            w.writerows([name, part] for name, _, part in reversed(table))
    else:
        images = images or "img_align_celeba"
        lines = [str(len(table)), " ".join(attrs) + " "]
        # "000001.jpg -1  1 ..."
        lines += [name + "".join(f" {v:2d}" for v in values) for name, values, _ in table]
        (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (folder / "list_eval_partition.txt").write_text("".join(f"{name} {part}\n" for name, _, part in table))
    for i, (name, _, _) in enumerate(table):
        write_image(folder / images / name, i)
    return folder


def counts(meta) -> dict[str, list[int]]:
    return {s: meta.group_counts(s).tolist() for s in ("train", "val", "test")}


def problems_of(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


# ----- CelebA -----

def test_celeba_kaggle_default_groups(tmp_path):
    root = make_celeba(tmp_path / "kaggle", "kaggle")
    meta = load_metadata(root, "celeba")
    assert counts(meta) == BLOND_MALE
    assert meta.class_names == ("not Blond_Hair", "Blond_Hair")
    assert meta.attr_names == ("not Male", "Male")
    assert meta.group_names == ("not Blond_Hair/not Male", "not Blond_Hair/Male", "Blond_Hair/not Male",
                                "Blond_Hair/Male")
    assert meta.root == root / "img_align_celeba" / "img_align_celeba"
    assert meta.dataset == "celeba" and meta.options == {"target": "Blond_Hair", "spurious": "Male"}
    # the attribute file's order
    assert list(meta.filenames) == [f"{i:06d}.jpg" for i in range(1, N_CELEBA + 1)]
    assert meta.y.dtype == meta.attr.dtype == meta.split.dtype == np.int64
    assert meta.y.tolist() == [int(r[1] == 1) for r in CELEBA_ROWS]
    assert meta.split.tolist() == [r[0] for r in CELEBA_ROWS]
    assert check_folder(root, "celeba", progress=False)[1] == []


def test_celeba_target_and_spurious_choice(tmp_path):
    root = make_celeba(tmp_path / "kaggle", "kaggle")
    meta = load_metadata(root, "celeba", target="Smiling", spurious="Young")
    assert counts(meta) == SMILING_YOUNG
    assert meta.group_names == ("not Smiling/not Young", "not Smiling/Young",
                                "Smiling/not Young", "Smiling/Young")
    assert meta.options == {"target": "Smiling", "spurious": "Young"}
    # swapped roles: group = 2 * Male + Blond_Hair
    swapped = load_metadata(root, "celeba", target="Male", spurious="Blond_Hair")
    assert np.array_equal(swapped.y, load_metadata(root, "celeba").attr)
    # None means the default (what a command line passes when the option is not given)
    assert counts(load_metadata(root, "celeba", target=None, spurious=None)) == BLOND_MALE


def test_celeba_original_txt_in_celeba_subfolder(tmp_path):
    make_celeba(tmp_path / "data" / "celeba", "original")
    meta = load_metadata(tmp_path / "data", "celeba")
    assert counts(meta) == BLOND_MALE
    assert meta.root == tmp_path / "data" / "celeba" / "img_align_celeba"
    assert counts(load_metadata(tmp_path / "data" / "celeba", "celeba", target="Smiling", spurious="Young")) \
        == SMILING_YOUNG
    assert celeba.row_offset(tmp_path / "data" / "celeba") == 3  # count on line 1, names on line 2
    assert check_folder(tmp_path / "data", "celeba", progress=False)[1] == []


def test_celeba_layouts_agree_and_fingerprint(tmp_path):
    kaggle = load_metadata(make_celeba(tmp_path / "k", "kaggle"), "celeba")
    original = load_metadata(make_celeba(tmp_path / "o", "original"), "celeba")
    flat = load_metadata(make_celeba(tmp_path / "f", "kaggle", images="img_align_celeba"), "celeba")
    assert flat.root == tmp_path / "f" / "img_align_celeba"
    for m in (original, flat):
        for field in ("filenames", "y", "attr", "split"):
            assert np.array_equal(getattr(m, field), getattr(kaggle, field))
    fp = fingerprint(kaggle, workers=2)
    assert len(fp) == 64 and fp == fingerprint(original, workers=2) == fingerprint(flat, workers=2)
    other = load_metadata(tmp_path / "k", "celeba", target="Smiling", spurious="Young")
    assert fingerprint(other, workers=2) != fp


def test_celeba_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_metadata(tmp_path / "nowhere", "celeba")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_metadata(tmp_path / "empty", "celeba")
    for name in ("list_attr_celeba.csv", "list_attr_celeba.txt", "list_eval_partition.csv", "celeba"):
        assert name in str(e.value)

    root = make_celeba(tmp_path / "k", "kaggle")
    (root / "list_eval_partition.csv").unlink()
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert problems_of(e) == ("missing partition file (the official splits): looked for "
                              f"list_eval_partition.csv and list_eval_partition.txt in {root}")
    # the images are still checked
    (root / "img_align_celeba" / "img_align_celeba" / "000003.jpg").unlink()
    meta, problems = check_folder(root, "celeba", progress=False)
    assert meta is None
    assert problems[0].startswith("missing partition file") and problems[1] == "row 4: 000003.jpg: missing image file"

    # the partition file in the folder, the attribute file in celeba/ below it: the latter is found
    make_celeba(tmp_path / "split" / "celeba", "original")
    (tmp_path / "split" / "celeba" / "list_eval_partition.txt").rename(tmp_path / "split" / "list_eval_partition.txt")
    with pytest.raises(DataError, match=r"missing partition file .* in .*split/celeba$"):
        load_metadata(tmp_path / "split", "celeba")

    root = make_celeba(tmp_path / "o", "original")
    (root / "list_attr_celeba.txt").unlink()
    with pytest.raises(DataError, match="missing attribute file: looked for list_attr_celeba.csv and "
                                        "list_attr_celeba.txt"):
        load_metadata(root, "celeba")


def test_celeba_attribute_names(tmp_path):
    root = make_celeba(tmp_path / "k", "kaggle")
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba", target="Blonde_Hair")
    msg = problems_of(e)
    assert "no attribute 'Blonde_Hair' for --target (did you mean Blond_Hair?)" in msg
    assert "5_o_Clock_Shadow, Arched_Eyebrows" in msg and "(40 in all)" in msg
    with pytest.raises(DataError, match="for --spurious"):
        load_metadata(root, "celeba", spurious="male")
    with pytest.raises(DataError, match="--target and --spurious are both 'Male': pick two different"):
        load_metadata(root, "celeba", target="Male", spurious="Male")
    with pytest.raises(ConfigError, match="target and spurious, not colour"):
        load_metadata(root, "celeba", colour="red")

    # an attribute file without the Male column
    attrs = [a for a in CELEBA_ATTRS if a != "Male"]
    table = [(name, [v for a, v in zip(CELEBA_ATTRS, values) if a != "Male"], part)
             for name, values, part in celeba_table()]
    root = make_celeba(tmp_path / "nomale", "original", table=table, attrs=attrs)
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert problems_of(e).startswith("list_attr_celeba.txt: no attribute 'Male' for --spurious")
    # group = 2 * Blond_Hair + Young: train -> 3,1,0,3,1,2,1; val -> 2,1,1; test -> 3,0,1,2; rows 15-18 ->
    # 3,0,0,2
    assert counts(load_metadata(root, "celeba", spurious="Young")) == {
        "train": [2, 3, 1, 2], "val": [1, 2, 1, 1], "test": [1, 1, 2, 1]}


def test_celeba_bad_values_rows_and_ids(tmp_path):
    table = celeba_table()
    b, m = CELEBA_ATTRS.index("Blond_Hair"), CELEBA_ATTRS.index("Male")
    table[1][1][b] = 0            # 000002.jpg: value not in {-1, 1}
    table[4] = (table[4][0], table[4][1], 3)  # 000005.jpg: unknown partition
    table[6][1].pop()             # 000007.jpg: 39 values
    table[9] = (table[8][0], table[9][1], table[9][2])  # 000009.jpg again on the 10th image row
    root = make_celeba(tmp_path / "k", "kaggle", table=table)
    with open(root / "list_eval_partition.csv", "a") as f:
        f.write("999999.jpg,0\n")  # in the partition file only
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert sorted(e.value.problems) == sorted([
        "row 3: 000002.jpg: Blond_Hair='0' is not -1 or 1",
        f"row 6: 000005.jpg: partition '3' (list_eval_partition.csv row {N_CELEBA - 5 + 2}) is not 0 (train), "
        "1 (val) or 2 (test)",
        "row 8: 000007.jpg: 39 attribute value(s), expected 40",
        "row 11: 000009.jpg: duplicate image id (first at row 10)",
        f"list_eval_partition.csv row {N_CELEBA - 9 + 2}: 000009.jpg: listed again (first at "
        f"row {N_CELEBA - 10 + 2})",
        "list_eval_partition.csv: 1 image(s) not in list_attr_celeba.csv, e.g. "
        f"999999.jpg (row {N_CELEBA + 2})",
    ])
    # the Male column was fine everywhere: only the Blond_Hair value is named
    assert table[1][1][m] in (-1, 1)


def test_celeba_original_row_numbers_and_count(tmp_path):
    table = celeba_table()
    table[2][1][CELEBA_ATTRS.index("Male")] = 2
    root = make_celeba(tmp_path / "o", "original", table=table)
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert e.value.problems == ["row 5: 000003.jpg: Male='2' is not -1 or 1"]  # line 5 of the txt file
    # a truncated attribute file: line 1 still announces 18 images; the partition file lists the rest
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(lines[:4] + lines[5:12]) + "\n")
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert e.value.problems == [
        f"list_attr_celeba.txt: line 1 announces {N_CELEBA} images but 9 are listed (a "
        "truncated or edited file?)",
        f"list_eval_partition.txt: {N_CELEBA - 9} image(s) not in list_attr_celeba.txt, "
        "e.g. 000003.jpg (row 3), 000011.jpg (row 11), 000012.jpg (row 12)"]


def test_celeba_original_missing_image(tmp_path):
    root = make_celeba(tmp_path / "o", "original")
    (root / "img_align_celeba" / "000003.jpg").unlink()
    meta, problems = check_folder(root, "celeba", progress=False)
    assert meta is not None and len(problems) == 1
    assert problems[0].endswith(": 000003.jpg: missing image file")


def test_celeba_original_missing_image_row_number(tmp_path):
    root = make_celeba(tmp_path / "o", "original")
    (root / "img_align_celeba" / "000003.jpg").unlink()
    assert check_folder(root, "celeba", progress=False)[1] == ["row 5: 000003.jpg: missing image file"]


def test_celeba_image_in_attributes_only_and_missing_image(tmp_path):
    root = make_celeba(tmp_path / "k", "kaggle")
    lines = (root / "list_eval_partition.csv").read_text().splitlines()
    (root / "list_eval_partition.csv").write_text("\n".join(l for l in lines if not l.startswith("000004")) + "\n")
    (root / "img_align_celeba" / "img_align_celeba" / "000012.jpg").unlink()
    meta, problems = check_folder(root, "celeba", progress=False)
    assert meta is None
    assert problems == ["row 5: 000004.jpg: not in list_eval_partition.csv",
                        "row 13: 000012.jpg: missing image file"]


def test_celeba_empty_split(tmp_path):
    rows = [r if r[0] != 1 else (0, *r[1:]) for r in CELEBA_ROWS]
    root = make_celeba(tmp_path / "k", "kaggle", table=celeba_table(rows))
    with pytest.raises(DataError,
                       match=r"no image in split val \(partition 1\); the official files have 19867"):
        load_metadata(root, "celeba")


# ----- generic metadata.csv -----

# (image, label, attribute, split) rows, deliberately not sorted by split or group; every group in
# every split (the data check refuses an empty one)
CSV_INT_ROWS = [("img/a0.png", 0, 0, "train"), ("img/a1.png", 1, 1, "train"), ("img/a2.png", 0, 1, "val"),
                ("img/b/a3.png", 1, 0, "train"), ("img/a4.png", 0, 0, "test"), ("img/a5.png", 1, 1, "test"),
                ("img/a6.png", 0, 0, "train"), ("img/a7.png", 1, 0, "val"), ("img/a8.png", 0, 1, "test"),
                ("img/a9.png", 1, 1, "train"), ("img/a10.png", 0, 0, "val"), ("img/a11.png", 1, 0, "test"),
                ("img/a12.png", 0, 1, "train"), ("img/a13.png", 1, 1, "val")]
# group = 2 * label + attribute: train a0 0, a1 3, a3 2, a6 0, a9 3, a12 1; val a2 1, a7 2, a10 0, a13 3;
# test a4 0, a5 3, a8 1, a11 2
CSV_INT_COUNTS = {"train": [2, 1, 1, 2], "val": [1, 1, 1, 1], "test": [1, 1, 1, 1]}

# string labels, first row "landbird"; three attribute values. Sorted: classes (landbird, waterbird),
# attributes (forest, ocean, street); group = 3 * y + a
CSV_STR_ROWS = [("x/1.jpg", "waterbird", "ocean", "0"), ("x/2.jpg", "landbird", "forest", "0"),
                ("x/3.jpg", "landbird", "street", "1"), ("x/4.jpg", "waterbird", "forest", "2"),
                ("x/5.jpg", "landbird", "forest", "0"), ("x/6.jpg", "waterbird", "street", "0"),
                ("x/7.jpg", "landbird", "ocean", "2"), ("x/8.jpg", "waterbird", "ocean", "1"),
                # the rest fill every (split, group) left empty above (the data check refuses an empty one)
                ("x/9.jpg", "landbird", "ocean", "0"), ("x/10.jpg", "waterbird", "street", "1"),
                ("x/11.jpg", "landbird", "street", "2"), ("x/12.jpg", "landbird", "street", "0"),
                ("x/13.jpg", "landbird", "forest", "1"), ("x/14.jpg", "waterbird", "ocean", "2"),
                ("x/15.jpg", "waterbird", "forest", "0"), ("x/16.jpg", "landbird", "ocean", "1"),
                ("x/17.jpg", "landbird", "forest", "2"), ("x/18.jpg", "waterbird", "forest", "1"),
                ("x/19.jpg", "waterbird", "street", "2")]
# train 1 -> 4, 2 -> 0, 5 -> 0, 6 -> 5, 9 -> 1, 12 -> 2, 15 -> 3; val 3 -> 2, 8 -> 4, 10 -> 5, 13 -> 0,
# 16 -> 1, 18 -> 3; test 4 -> 3, 7 -> 1, 11 -> 2, 14 -> 4, 17 -> 0, 19 -> 5
CSV_STR_COUNTS = {"train": [2, 1, 1, 1, 1, 1], "val": [1, 1, 1, 1, 1, 1], "test": [1, 1, 1, 1, 1, 1]}


def make_csv(folder: Path, rows, columns=("image", "label", "attribute", "split")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    for i, r in enumerate(rows):
        if r[0]:
            write_image(folder / r[0], 100 + i)
    return folder


def csv_problems(folder: Path) -> list[str]:
    with pytest.raises(DataError) as e:
        load_metadata(folder, "csv")
    return e.value.problems


def test_csv_int_labels(tmp_path):
    root = make_csv(tmp_path / "ints", CSV_INT_ROWS)
    meta = load_metadata(root, "csv")
    assert counts(meta) == CSV_INT_COUNTS
    assert meta.class_names == ("0", "1") and meta.attr_names == ("0", "1")
    assert meta.group_names == ("0/0", "0/1", "1/0", "1/1")
    assert meta.root == root and meta.dataset == "csv" and meta.filenames[3] == "img/b/a3.png"
    assert meta.y.dtype == meta.attr.dtype == meta.split.dtype == np.int64
    assert check_folder(root, "csv", progress=False)[1] == []
    assert len(fingerprint(meta, workers=2)) == 64
    # numeric splits and pandas-style "1.0" integers read the same
    codes = {"train": 0, "val": 1, "test": 2}
    same = make_csv(tmp_path / "ints2", [(f, f"{y}.0", a, codes[s]) for f, y, a, s in CSV_INT_ROWS])
    assert counts(load_metadata(same, "csv")) == CSV_INT_COUNTS


def test_csv_string_labels_sorted(tmp_path):
    root = make_csv(tmp_path / "names", CSV_STR_ROWS)
    meta = load_metadata(root, "csv")
    assert meta.class_names == ("landbird", "waterbird")
    assert meta.attr_names == ("forest", "ocean", "street")
    assert meta.group_names[:3] == ("landbird/forest", "landbird/ocean", "landbird/street")
    assert counts(meta) == CSV_STR_COUNTS
    assert meta.y.tolist() == [1, 0, 0, 1, 0, 1, 0, 1] + [0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1]
    assert len(fingerprint(meta, workers=2)) == 64


def test_csv_missing_and_unexpected_columns(tmp_path):
    rows = [(f, y, s) for f, y, _, s in CSV_INT_ROWS]
    assert csv_problems(make_csv(tmp_path / "a", rows, ("image", "label", "split"))) == [
        "metadata.csv: missing column(s) attribute (expected image,label,attribute,split)"]
    rows = [(f, y, a, s, "x") for f, y, a, s in CSV_INT_ROWS]
    assert csv_problems(make_csv(tmp_path / "b", rows, ("image", "label", "attribute", "split", "group"))) == [
        "metadata.csv: unexpected column(s) group (expected only image,label,attribute,split)"]
    wb = make_csv(tmp_path / "wb", [(f, 0) for f, *_ in CSV_INT_ROWS], ("img_filename", "y"))
    assert "use --dataset waterbirds" in csv_problems(wb)[0]


def test_csv_bad_values(tmp_path):
    rows = [list(r) for r in CSV_INT_ROWS]
    rows[1][3] = "validation"   # row 3
    rows[4][0] = ""             # row 6
    rows[6][0] = "img/a0.png"   # row 8: listed again
    rows[8] = rows[8][:3]       # row 10: no split field
    root = make_csv(tmp_path / "bad", rows)
    assert csv_problems(root) == [
        "row 3: img/a1.png: split='validation' is not one of train, val, test (or 0, 1, 2)",
        "row 6: empty image path",
        "row 8: img/a0.png: image listed again (first at row 2)",
        "row 10: 3 field(s), expected 4 (image,label,attribute,split)",
        "row 10: img/a8.png: split='' is not one of train, val, test (or 0, 1, 2)"]


def test_csv_label_kinds_classes_and_splits(tmp_path):
    rows = [list(r) for r in CSV_INT_ROWS]
    rows[5][1] = "cat"
    assert csv_problems(make_csv(tmp_path / "mixed", rows)) == [
        "metadata.csv: column label mixes integers (e.g. '0' at row 2) and names (e.g. 'cat' "
        "at row 7); use one kind"]
    one_class = [(f, 0, a, s) for f, _, a, s in CSV_INT_ROWS]
    assert csv_problems(make_csv(tmp_path / "one", one_class)) == [
        "metadata.csv: column label has only 1 distinct value ('0'); at least 2 are needed"]
    gap = [(f, 2 * y, a, s) for f, y, a, s in CSV_INT_ROWS]  # labels 0 and 2: class 1 empty
    assert "column label has no row with value(s) 1" in csv_problems(make_csv(tmp_path / "gap", gap))[0]
    no_val = [(f, y, a, "train" if s == "val" else s) for f, y, a, s in CSV_INT_ROWS]
    assert csv_problems(make_csv(tmp_path / "noval", no_val)) == [
        "metadata.csv: no row in split val; each of train, val and test needs at least one"]
    rows = [list(r) for r in CSV_STR_ROWS]
    rows[2][2] = ""
    assert csv_problems(make_csv(tmp_path / "empty_attr", rows)) == ["row 4: x/3.jpg: empty attribute"]
    # one attribute value is allowed: the groups are the classes
    meta = load_metadata(make_csv(tmp_path / "one_attr", [(f, y, "any", s) for f, y, _, s in CSV_STR_ROWS]),
                         "csv")
    assert meta.attr_names == ("any",) and meta.group_counts("train").tolist() == [4, 3]


def test_csv_missing_image_and_folders(tmp_path):
    root = make_csv(tmp_path / "ok", CSV_INT_ROWS)
    (root / "img" / "a5.png").unlink()
    write_image(root / "img" / "stray.png", 7)
    meta, problems = check_folder(root, "csv", progress=False)
    assert meta is not None and len(meta) == len(CSV_INT_ROWS)
    assert problems == ["row 7: img/a5.png: missing image file",
                        "1 image file(s) not listed in the metadata, e.g. img/stray.png"]
    # bad metadata and a missing image: both listed in one pass
    rows = [list(r) for r in CSV_INT_ROWS]
    rows[0][3] = "dev"
    root = make_csv(tmp_path / "both", rows)
    (root / "img" / "a9.png").unlink()
    meta, problems = check_folder(root, "csv", progress=False)
    assert meta is None and problems == ["row 2: img/a0.png: split='dev' is not one of "
                                         "train, val, test (or 0, 1, 2)",
                                         "row 11: img/a9.png: missing image file"]
    with pytest.raises(DataError, match="does not exist"):
        load_metadata(tmp_path / "nowhere", "csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.csv in .* columns image,label,attribute,split"):
        load_metadata(tmp_path / "empty", "csv")
    with pytest.raises(ConfigError, match="takes no options"):
        load_metadata(tmp_path / "ok", "csv", target="Smiling")
    assert csv_folder.row_offset(tmp_path / "ok") == 2 and csv_folder.image_root(tmp_path / "ok") == tmp_path / "ok"


def test_celeba_attribute_file_without_names_line(tmp_path):
    root = make_celeba(tmp_path / "k", "kaggle")
    lines = (root / "list_attr_celeba.csv").read_text().splitlines()
    (root / "list_attr_celeba.csv").write_text("\n".join(lines[1:]) + "\n")  # header row dropped
    with pytest.raises(DataError) as e:
        load_metadata(root, "celeba")
    assert e.value.problems[0] == ("list_attr_celeba.csv: the line naming the "
                                   "attributes is missing (expected "
                                   "image_id,5_o_Clock_Shadow,Arched_Eyebrows,... before the first image)")
