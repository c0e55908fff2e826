"""Tests for the teachers stage: manifest, checkpoint import, ERM resume, DFR teachers, weights.

CPU only and small: ResNet-18 at 16 px wherever the test is not about ResNet-50, a synthetic data
set of 92 images, 0-2 epochs.
"""
from __future__ import annotations

import csv
import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

import cli
from core.errors import ConfigError
from data.metrics import group_metrics
from data.synth import SynthSpec, generate
from data.views import eval_box, render
from data.folders import fingerprint, load_metadata
from precompute import teachers
from core.manifest import (Manifest, ManifestError, ModelEntry, load_model, make_entry,
                                 read_manifest, verify_files)
from core.files import sha256_file as file_sha256
from core.models import (CheckpointError, FeatureResNet, backbone_id, build_model, load_checkpoint,
                         model_from_state)
from precompute.teachers import TeacherConfig, build_teachers, import_teachers, train_erm

SIZE = 16  # view side for every tiny run


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here: these tiny convolutions gain nothing from a second one, and on a
    shared 2-core machine OpenMP barriers wait for a busy core (a ResNet-18 step measured 10x
    slower with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


KEEP = {"0": (8, 3, 2, 3), "2": (12, 12, 8, 8)}  # rows kept per group: train, test


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Synthetic Waterbirds, 20 px: train 16 rows, val 36, test 40 (all 4 groups in each).

    Generated at 3% of the real counts (val minority groups of 4: the DFR seeds used here put
    some of each group in both tuning halves), then train and test are thinned so that an ERM
    epoch is one or two steps and an evaluation one batch.
    """
    root = generate(tmp_path_factory.mktemp("wb") / "synth", SynthSpec(scale=0.03, size=20))
    with open(root / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, records = reader.fieldnames, list(reader)
    seen = {split: [0] * 4 for split in KEEP}
    kept = []
    for rec in records:
        if rec["split"] in KEEP:
            g = 2 * int(rec["y"]) + int(rec["place"])
            seen[rec["split"]][g] += 1
            if seen[rec["split"]][g] > KEEP[rec["split"]][g]:
                (root / rec["img_filename"]).unlink()
                continue
        kept.append(rec)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    meta = load_metadata(root)
    assert [meta.group_counts(s).tolist() for s in ("train", "val", "test")] == [
        list(KEEP["0"]), [14, 14, 4, 4], list(KEEP["2"])]
    return root


@pytest.fixture(scope="module")
def images(data_root, tmp_path_factory) -> torch.Tensor:
    """The data set through the image store, as train_erm gets it: uint8 [N, 3, S, S]."""
    cfg = TeacherConfig(str(data_root), "", image_size=SIZE, progress=False)
    meta = load_metadata(data_root)
    return teachers._prepare_images(cfg, meta, tmp_path_factory.mktemp("store"), fingerprint(meta))


def tiny_cfg(data_root, out, **kw) -> TeacherConfig:
    base = dict(arch="resnet18", image_size=SIZE, epochs=1, pretrained=False, lr=1e-2, dfr_retrains=2,
                device="cpu", progress=False)
    return TeacherConfig(str(data_root), str(out), **{**base, **kw})


def random_state(arch: str, num_classes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(num_classes=num_classes).state_dict()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A 2-class ResNet-18 state dict and its file (torchvision key names)."""
    state = random_state("resnet18")
    path = tmp_path_factory.mktemp("r18") / "erm_seed0.pt"
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    return random_state("resnet50")


def assert_state_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def invoke(*args):
    """Run the CLI in-process; the result, after checking no exception escaped as a traceback."""
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert "Traceback" not in result.output
    return result


# ---------------------------------------------------------------- manifest


def toy_entry(name, role, file="erm_seed0.pt", **kw):
    return ModelEntry(name=name, role=role, arch="resnet50", num_classes=2, file=file,
                      sha256="0" * 64, backbone_id="b0", **kw)


def toy_manifest(root: Path) -> Manifest:
    models = [toy_entry("teacher_1", "teacher", head_file="teacher_1_head.pt", head_sha256="1" * 64,
                        metrics={"val": {"wga": 0.5, "avg_acc": 0.75,
                                         "group_acc": [1.0, 0.5, float("nan"), 0.5]}}),
              toy_entry("teacher_2", "teacher", file="/abs/erm_seed1.pt"),
              toy_entry("biased", "biased")]
    return Manifest(models, num_classes=2, image_size=224, pretrained=True, root=root)


def test_manifest_round_trip(tmp_path):
    man = toy_manifest(tmp_path)
    path = man.save(tmp_path / "manifest.json")
    for where in (tmp_path, path):  # the folder or the file; teacher_2 is named by an absolute path
        back = read_manifest(where, allow_outside_paths=True)
        assert [m.name for m in back.models] == ["teacher_1", "teacher_2", "biased"]
        assert back.num_classes == 2 and back.image_size == 224 and back.pretrained is True
        assert back.root == tmp_path
        assert [m.name for m in back.teachers] == ["teacher_1", "teacher_2"]
        assert back.biased.name == "biased"
        t1 = back.models[0]
        assert t1.head_file == "teacher_1_head.pt" and t1.head_sha256 == "1" * 64
        assert t1.metrics["val"]["wga"] == 0.5 and math.isnan(t1.metrics["val"]["group_acc"][2])
        for a, b in zip(man.models[1:], back.models[1:]):
            assert a == b
    assert back.path("erm_seed0.pt") == tmp_path / "erm_seed0.pt"
    assert back.path("/abs/erm_seed1.pt") == Path("/abs/erm_seed1.pt")
    assert not (tmp_path / "manifest.json.tmp").exists()


def _as_dict(tmp_path) -> dict:
    toy_manifest(tmp_path).save(tmp_path / "manifest.json")
    return json.loads((tmp_path / "manifest.json").read_text())


def _set_roles(*roles):
    def edit(d):
        d["models"] = [dict(d["models"][0], name=f"m{i}", role=r) for i, r in enumerate(roles)]
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set_roles("teacher", "teacher"), "exactly one 'biased'"),
    (_set_roles("teacher", "biased", "biased"), "exactly one 'biased'"),
    (_set_roles("biased"), "at least one 'teacher'"),
    (_set_roles("teacher", "biased", "student"), "has roles"),
    (lambda d: d["models"][1].update(name="teacher_1"), "not unique"),
    (lambda d: d.update(schema="something-else"), "not a version-1 gr-kd-teachers manifest"),
    (lambda d: d.update(version=2), "not a version-1"),
    (lambda d: d.pop("models"), "malformed"),
    (lambda d: d["models"][0].pop("sha256"), "malformed"),
    (lambda d: d["models"][0].update(colour="red"), "malformed"),
    (lambda d: d.update(models=["teacher_1"]), "malformed"),
    (lambda d: d.update(num_classes="two"), "malformed"),
], ids=["no-biased", "two-biased", "no-teacher", "bad-role", "duplicate-names", "schema", "version",
        "no-models", "entry-missing-field", "entry-unknown-field", "entry-not-object", "bad-number"])
def test_manifest_validation_errors(tmp_path, edit, match):
    d = _as_dict(tmp_path)
    edit(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value)


@pytest.mark.parametrize("text, match", [
    ('{"schema": "gr-kd-teachers", "models": [', "malformed"),
    ("", "malformed"),
    ("[1, 2]", "not a version-1"),
    ('"a string"', "not a version-1"),
], ids=["truncated", "empty", "list", "string"])
def test_manifest_malformed_json(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=match):
        read_manifest(tmp_path / "manifest.json")


def test_manifest_missing(tmp_path):
    with pytest.raises(ManifestError, match="no teacher manifest.*teachers import"):
        read_manifest(tmp_path)


def test_verify_files_missing_and_altered(tmp_path):
    for name, data in (("erm_seed0.pt", b"backbone"), ("head.pt", b"head")):
        (tmp_path / name).write_bytes(data)
    sha = {n: file_sha256(tmp_path / n) for n in ("erm_seed0.pt", "head.pt")}
    entry = lambda name, role, **kw: ModelEntry(name, role, "resnet18", 2, "erm_seed0.pt",
                                                sha["erm_seed0.pt"], "b", **kw)
    man = Manifest([entry("teacher_1", "teacher", head_file="head.pt", head_sha256=sha["head.pt"]),
                    entry("biased", "biased")], 2, SIZE, False, tmp_path)
    verify_files(man)  # all present and unchanged

    (tmp_path / "head.pt").write_bytes(b"head, retrained")
    with pytest.raises(ManifestError, match=r"model teacher_1: checkpoint .*head\.pt was altered"):
        verify_files(man)
    (tmp_path / "head.pt").unlink()
    with pytest.raises(ManifestError, match=r"model teacher_1: checkpoint .*head\.pt is missing"):
        verify_files(man)

    man.models[0].head_file = None
    verify_files(man)
    (tmp_path / "erm_seed0.pt").write_bytes(b"backbonE")  # same size, one byte differs
    with pytest.raises(ManifestError, match=r"erm_seed0\.pt was altered"):
        verify_files(man)
    (tmp_path / "erm_seed0.pt").unlink()
    with pytest.raises(ManifestError, match=r"erm_seed0\.pt is missing"):
        verify_files(man)


# ---------------------------------------------------------------- import of existing checkpoints


def test_import_torchvision_formats_resnet50(tmp_path, r50):
    """Bare state dict, {"model_state_dict": ...} and DataParallel files; backbone ids by content."""
    other_head = dict(r50, **{"fc.weight": torch.randn(2, 2048), "fc.bias": torch.randn(2)})
    other_backbone = dict(r50, **{"conv1.weight": r50["conv1.weight"] + 1e-3})
    src = tmp_path / "from_elsewhere"
    src.mkdir()
    torch.save(r50, src / "erm_seed0.pt")
    torch.save({"model_state_dict": other_head, "epoch": 100, "best_wga": 0.9}, src / "teacher_1_debiased.pt")
    torch.save({"module." + k: v for k, v in other_backbone.items()}, src / "teacher_2_debiased.pt")

    out = tmp_path / "teachers"
    man = import_teachers(out, [src / "teacher_1_debiased.pt", src / "teacher_2_debiased.pt"],
                          src / "erm_seed0.pt", arch="resnet50", num_classes=2, progress=False)
    back = read_manifest(out)  # the checkpoints were brought into the teachers folder
    assert [(m.name, m.role) for m in back.models] == [("teacher_1", "teacher"), ("teacher_2", "teacher"),
                                                        ("biased", "biased")]
    t1, t2, biased = back.models
    assert all(m.arch == "resnet50" and m.num_classes == 2 and m.head_file is None for m in back.models)
    assert t1.file.startswith("checkpoints/") and t1.file.endswith("-teacher_1_debiased.pt")
    assert (out / t1.file).read_bytes() == (src / "teacher_1_debiased.pt").read_bytes()
    for m in back.models:
        assert m.sha256 == file_sha256(back.path(m.file))
    assert t1.backbone_id == biased.backbone_id == backbone_id(r50)  # same backbone, other fc
    assert t2.backbone_id != biased.backbone_id
    assert len({m.sha256 for m in back.models}) == 3
    assert [m.backbone_id for m in man.models] == [m.backbone_id for m in back.models]
    verify_files(back)

    assert_state_equal(load_checkpoint(back.path(t1.file)), other_head)
    assert_state_equal(load_checkpoint(back.path(t2.file)), other_backbone)  # module. prefix stripped


def test_import_checkpoint_without_bn_counters(tmp_path, r18):
    """Files saved before PyTorch 0.4.1 (torchvision's 2017 ImageNet files) lack num_batches_tracked."""
    state, path = r18
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    entry = make_entry("biased", "biased", tmp_path / "old.pt", "resnet18", 2)
    assert entry.backbone_id == backbone_id(state)
    man = Manifest([entry], 2, SIZE, False, tmp_path)
    assert_state_equal({k: v for k, v in load_model(man, entry).net.state_dict().items() if k in old}, old)


def test_model_from_state_equals_a_copying_load(r18):
    """Built on the meta device and filled by assignment: same model as construct + load, float32
    even from a half-precision file, counters filled in, nothing left on the meta device."""
    state, _ = r18
    reference = FeatureResNet("resnet18", 2)
    reference.net.load_state_dict(state)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items() if "num_batches" not in k}
    model = model_from_state("resnet18", 2, half, "half.pt")
    got = model.net.state_dict()
    assert not any(t.is_meta for t in got.values())
    assert all(got[k].dtype == state[k].dtype for k in state)
    assert_state_equal({k: v for k, v in got.items() if "num_batches" in k},
                       {k: torch.zeros((), dtype=torch.long) for k in state if "num_batches" in k})
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref_logits = FeatureResNet("resnet18", 2).eval()
        ref_logits.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()},
                                       strict=False)
        torch.testing.assert_close(model.eval()(x)[0], ref_logits(x)[0])
        torch.testing.assert_close(model_from_state("resnet18", 2, state, "f.pt").eval()(x)[0],
                                   reference.eval()(x)[0], rtol=0, atol=0)
    mine = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():  # the model owns its tensors: writing into it leaves the state alone
        model_from_state("resnet18", 2, mine, "f.pt").fc.weight.zero_()
    assert_state_equal(mine, state)
    with pytest.raises(CheckpointError, match=r"f\.pt: does not fit resnet50"):
        model_from_state("resnet50", 2, state, "f.pt")


def _bad_file(kind: str, tmp_path: Path, r18_state) -> tuple[Path, str, int]:
    """A checkpoint that must be refused: (path, arch declared, num_classes declared)."""
    path = tmp_path / f"{kind}.pt"
    if kind == "wrong-arch":
        torch.save(r18_state, path)
        return path, "resnet50", 2
    if kind == "wrong-classes":
        torch.save(random_state("resnet18", num_classes=3), path)
    elif kind == "missing-keys":
        torch.save({k: v for k, v in r18_state.items() if k != "layer3.1.conv2.weight"}, path)
    elif kind == "unexpected-keys":
        torch.save({**r18_state, "projector.weight": torch.zeros(4, 512)}, path)
    elif kind == "truncated":
        torch.save(r18_state, tmp_path / "full.pt")
        path.write_bytes((tmp_path / "full.pt").read_bytes()[:100_000])
    elif kind == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 94371951\n")
    elif kind == "not-a-state-dict":
        torch.save([1, 2, 3], path)
    elif kind == "not-found":
        path = tmp_path / "no_such_file.pt"
    return path, "resnet18", 2


BAD_FILES = {
    "wrong-arch": r"does not fit resnet50 \(is it a resnet18\?\)",
    "wrong-classes": r"fc\.weight has shape \(3, 512\).*\(wrong number of classes\)",
    "missing-keys": r"1 missing key\(s\) \['layer3\.1\.conv2\.weight'\], 0 unexpected",
    "unexpected-keys": r"0 missing key\(s\) \[\], 1 unexpected key\(s\) \['projector\.weight'\]",
    "truncated": "not a loadable checkpoint",
    "text": "not a loadable checkpoint",
    "not-a-state-dict": "no state dict of tensors",
    "not-found": "file not found",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_import_refuses_bad_checkpoint(tmp_path, r18, kind):
    path, arch, num_classes = _bad_file(kind, tmp_path, r18[0])
    out = tmp_path / "teachers"
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]) as e:
        import_teachers(out, [path], r18[1], arch=arch, num_classes=num_classes, progress=False)
    assert str(e.value).startswith(str(path))
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["wrong-arch", "wrong-classes", "truncated", "text"])
def test_cli_import_errors(tmp_path, r18, kind):
    path, arch, num_classes = _bad_file(kind, tmp_path, r18[0])
    out = tmp_path / "teachers"
    # The bad file as the biased model (checked after the teachers), except where the good
    # ResNet-18 file would not fit the declared architecture either.
    teacher, biased = (path, r18[1]) if kind == "wrong-arch" else (r18[1], path)
    r = invoke("teachers", "import", "--out", out, "--teacher", teacher, "--biased", biased,
               "--arch", arch, "--num-classes", num_classes)
    assert r.exit_code != 0
    assert f"Error: {path}" in r.output
    assert not (out / "manifest.json").exists()


def test_cli_import_evaluates_on_data_folder(tmp_path, data_root, r18):
    state, path = r18
    torch.save({"model_state_dict": random_state("resnet18", seed=1)}, tmp_path / "teacher_1_debiased.pt")
    out = tmp_path / "teachers"
    r = invoke("teachers", "import", "--out", out, "--teacher", tmp_path / "teacher_1_debiased.pt",
               "--biased", path, "--arch", "resnet18", "--image-size", SIZE, "--no-pretrained",
               "--data-root", data_root)
    assert r.exit_code == 0, r.output
    assert "WGA" in r.output and "1 teachers + biased" in r.output
    man = read_manifest(out)  # its checkpoints were linked into --out: the folder is self-contained
    assert man.image_size == SIZE and man.pretrained is False
    for m in man.models:
        assert set(m.metrics) == {"val", "test"}
        for split, res in m.metrics.items():
            assert {"group_acc", "wga", "avg_acc", "mean_acc"} <= set(res)
            assert res["wga"] == min(res["group_acc"])
    assert (out / "eval.md").is_file()


# ---------------------------------------------------------------- load_model with a DFR head


def test_load_model_applies_head_file(tmp_path, r18):
    state, path = r18
    torch.manual_seed(3)
    head = {"fc.weight": torch.randn(2, 512), "fc.bias": torch.randn(2)}
    torch.save(head, tmp_path / "teacher_1_dfr_head.pt")
    models = [make_entry("teacher_1", "teacher", path, "resnet18", 2,
                         head_file=tmp_path / "teacher_1_dfr_head.pt", root=tmp_path),
              make_entry("biased", "biased", path, "resnet18", 2, root=tmp_path)]
    man = Manifest(models, 2, SIZE, False, tmp_path)
    assert man.teachers[0].head_file == "teacher_1_dfr_head.pt"  # relative to the manifest folder
    assert man.teachers[0].head_sha256 == file_sha256(tmp_path / "teacher_1_dfr_head.pt")
    assert man.teachers[0].backbone_id == man.biased.backbone_id
    verify_files(man)

    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        teacher_logits, feats = load_model(man, man.teachers[0])(x)
        biased_logits, biased_feats = load_model(man, man.biased)(x)
    emb = feats["layer4"]
    torch.testing.assert_close(biased_feats["layer4"], emb, rtol=0, atol=0)  # same backbone
    torch.testing.assert_close(teacher_logits, emb @ head["fc.weight"].T + head["fc.bias"])
    torch.testing.assert_close(biased_logits, emb @ state["fc.weight"].T + state["fc.bias"])
    assert not torch.allclose(teacher_logits, biased_logits)

    torch.save({"fc.weight": torch.randn(3, 512), "fc.bias": torch.randn(3)},
               tmp_path / "teacher_1_dfr_head.pt")
    with pytest.raises(CheckpointError,
                       match=r"teacher_1_dfr_head\.pt: not a head for resnet18 with 2 classes"):
        load_model(man, man.teachers[0])


# ---------------------------------------------------------------- ERM resume


class Killed(Exception):
    """Stands in for a kill right after an epoch checkpoint is on disk."""


def test_train_erm_resume_is_exact(tmp_path, monkeypatch, data_root, images):
    meta = load_metadata(data_root)
    cfg = tiny_cfg(data_root, tmp_path, epochs=2, batch_size=8)  # 2 steps per epoch

    full = train_erm(cfg, 0, *images, meta, tmp_path / "straight" / "erm_seed0.pt")
    assert not (tmp_path / "straight" / "erm_seed0.pt.ckpt").exists()

    path = tmp_path / "killed" / "erm_seed0.pt"
    ckpt = path.with_name("erm_seed0.pt.ckpt")
    real_save = teachers.save_checkpoint

    def save_then_die(obj, p):
        real_save(obj, p)
        if Path(p) == ckpt and obj["epoch"] == 1:
            raise Killed

    monkeypatch.setattr(teachers, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_erm(cfg, 0, *images, meta, path)
    monkeypatch.setattr(teachers, "save_checkpoint", real_save)
    assert ckpt.is_file() and not path.exists()
    after_one = torch.load(ckpt, weights_only=True)
    assert after_one["epoch"] == 1 and after_one["config"]["lr"] == cfg.lr

    # A resume under other settings would silently train a different model: refused.
    with pytest.raises(CheckpointError, match=r"erm_seed0\.pt\.ckpt: .*lr: was 0\.01, now 0\.1"):
        train_erm(tiny_cfg(data_root, tmp_path, epochs=2, batch_size=8, lr=0.1), 0, *images, meta, path)

    epochs_run = []
    real_views = teachers._epoch_views

    def record_epoch(rows, hw, seed, epoch):
        epochs_run.append(epoch)
        return real_views(rows, hw, seed, epoch)

    monkeypatch.setattr(teachers, "_epoch_views", record_epoch)
    resumed = train_erm(cfg, 0, *images, meta, path)
    assert epochs_run == [1]  # only the epoch the kill lost
    assert path.is_file() and not ckpt.exists()

    assert_state_equal(resumed, full)
    assert_state_equal(load_checkpoint(path), full)
    assert any(not torch.equal(after_one["model"][k], full[k]) for k in full)  # epoch 2 did train
    # A finished file is reused as it is.
    assert_state_equal(train_erm(cfg, 0, *images, meta, path), full)


def test_float64_erm_trains_in_double_and_leaves_a_float32_checkpoint(tmp_path, monkeypatch,
                                                                      data_root, images):
    """--precision float64: ERM steps in double precision (its resume checkpoints hold float64
    parameters), the finished backbone is a float32 checkpoint like any other, and two builds
    whose only difference is the thread count (another reduction order) agree to float32 rounding:
    |a - b| <= 2^-23 max|a| per tensor, one unit in the last place of a float32 at the tensor's scale."""
    meta = load_metadata(data_root)
    cfg = tiny_cfg(data_root, tmp_path, epochs=2, batch_size=8, precision="float64")
    saved = []
    real_save = teachers.save_checkpoint
    monkeypatch.setattr(teachers, "save_checkpoint", lambda obj, p: (saved.append(obj), real_save(obj, p)))
    threads = torch.get_num_threads()
    states = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            states.append(train_erm(cfg, 0, *images, meta, tmp_path / f"t{n}" / "erm_seed0.pt"))
    finally:
        torch.set_num_threads(threads)
    resume = [o for o in saved if "optimizer" in o]
    assert resume and all(v.dtype == torch.float64 for o in resume for v in o["model"].values() if v.is_floating_point())
    a, b = states
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    float32_run = train_erm(tiny_cfg(data_root, tmp_path, epochs=2, batch_size=8), 0, *images, meta,
                            tmp_path / "f32" / "erm_seed0.pt")
    assert any(not torch.equal(float32_run[k], a[k]) for k in a if a[k].is_floating_point())
    for k in a:
        if a[k].is_floating_point():
            scale = float(a[k].abs().max())
            assert float((a[k].double() - b[k].double()).abs().max()) <= 2.0 ** -23 * scale, k
    with pytest.raises(ConfigError, match="--precision must be one of float32, float64"):
        tiny_cfg(data_root, tmp_path, precision="float16")


# ---------------------------------------------------------------- build_teachers


@pytest.fixture(scope="module")
def shared(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared")
    build_teachers(tiny_cfg(data_root, out, shared_backbone=True, num_teachers=2))
    return out


def test_build_teachers_shared_backbone_manifest(shared):
    man = read_manifest(shared)
    assert [(m.name, m.role) for m in man.models] == [("teacher_1", "teacher"), ("teacher_2", "teacher"),
                                                       ("biased", "biased")]
    t1, t2, biased = man.models
    assert t1.file == t2.file == biased.file == "erm_seed0.pt"
    assert t1.backbone_id == t2.backbone_id == biased.backbone_id
    assert biased.head_file is None
    assert (t1.head_file, t2.head_file) == ("teacher_1_dfr_head.pt", "teacher_2_dfr_head.pt")
    assert t1.head_sha256 != t2.head_sha256
    h1, h2 = (load_checkpoint(man.path(m.head_file)) for m in (t1, t2))
    assert sorted(h1) == ["fc.bias", "fc.weight"] and h1["fc.weight"].shape == (2, 512)
    assert not torch.equal(h1["fc.weight"], h2["fc.weight"])  # different balanced subsamples
    assert man.num_classes == 2 and man.image_size == SIZE and man.pretrained is False
    assert all(m.arch == "resnet18" and m.num_classes == 2 for m in man.models)
    verify_files(man)
    assert json.loads((shared / "teachers_config.json").read_text())["config"]["shared_backbone"] is True
    assert "| teacher_2 | teacher | test |" in (shared / "eval.md").read_text()
    assert not list(shared.glob("*.ckpt")) and not list(shared.glob("*.tmp"))


def test_build_teachers_metrics_match_recomputation(shared, data_root, images):
    """Recorded metrics == load_model + eval-view forward + group_metrics, done here independently."""
    man = read_manifest(shared)
    meta = load_metadata(data_root)
    n = len(meta)
    x = render(images[0], torch.tensor([eval_box()] * n), torch.zeros(n, dtype=torch.bool), SIZE, images[1])
    preds = {}
    for m in man.models:
        with torch.no_grad():
            preds[m.name] = load_model(man, m)(x)[0].argmax(1).numpy()
        for split in ("val", "test"):
            rows = meta.rows(split)
            expected = group_metrics(preds[m.name][rows], meta.y[rows], meta.group[rows],
                                     meta.group_counts("train"))
            got = m.metrics[split]
            assert got["group_count"] == expected["group_count"]
            assert got["group_acc"] == pytest.approx(expected["group_acc"], abs=1e-12, nan_ok=True), (m.name, split)
            for key in ("wga", "avg_acc", "mean_acc"):
                assert got[key] == pytest.approx(expected[key], abs=1e-12), (m.name, split, key)
    assert not np.array_equal(preds["teacher_1"], preds["biased"])  # the DFR head is in use


def test_build_teachers_separate_backbones(tmp_path, data_root):
    man = build_teachers(tiny_cfg(data_root, tmp_path, shared_backbone=False, num_teachers=2, dfr_retrains=1))
    t1, t2, biased = man.models
    assert (t1.file, t2.file, biased.file) == ("erm_seed0.pt", "erm_seed1.pt", "erm_seed0.pt")
    assert t1.backbone_id == biased.backbone_id != t2.backbone_id
    verify_files(read_manifest(tmp_path))


# ---------------------------------------------------------------- ImageNet weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no cached downloads: every connection attempt fails at once."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_pretrained_without_network_fails_fast(offline):
    t0 = time.time()
    with pytest.raises(CheckpointError, match=r"could not download ImageNet weights ResNet18_Weights") as e:
        build_model("resnet18", 2, pretrained=True)
    assert "--weights-file" in str(e.value) and "--no-pretrained" in str(e.value)
    assert time.time() - t0 < 30


def test_cli_teachers_pretrained_without_network(offline, tmp_path, data_root):
    out = tmp_path / "teachers"
    t0 = time.time()
    r = invoke("teachers", "--data-root", data_root, "--out", out, "--epochs", 1, "--image-size", SIZE,
               "--num-teachers", 1, "--shared-backbone")
    assert time.time() - t0 < 30
    assert r.exit_code != 0
    assert "Error: could not download ImageNet weights ResNet50_Weights.IMAGENET1K_V1" in r.output
    assert "--weights-file" in r.output and "--no-pretrained" in r.output
    assert not list(out.glob("images_*")) and not (out / "manifest.json").exists()  # stopped before any work


@pytest.fixture(scope="module")
def imagenet_r50_file(r50, tmp_path_factory) -> Path:
    """A local file shaped like torchvision's ImageNet ResNet-50 weights (1000-way fc)."""
    path = tmp_path_factory.mktemp("weights") / "resnet50-0676ba61.pth"
    torch.save({**r50, "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}, path)
    return path


def test_build_model_from_weights_file(imagenet_r50_file, r50):
    model = build_model("resnet50", 2, weights_file=str(imagenet_r50_file))
    got = model.net.state_dict()
    assert got["fc.weight"].shape == (2, 2048)  # the 1000-way head is replaced
    assert_state_equal({k: v for k, v in got.items() if not k.startswith("fc.")},
                       {k: v for k, v in r50.items() if not k.startswith("fc.")})


def test_cli_teachers_with_weights_file(offline, tmp_path, data_root, imagenet_r50_file, r50):
    """Offline, the local weights are used; 0 ERM epochs (DFR on the ImageNet features) keeps it fast
    and makes the backbone checkable: it must be the file's, tensor for tensor."""
    out = tmp_path / "teachers"
    r = invoke("teachers", "--data-root", data_root, "--out", out, "--epochs", 0, "--image-size", SIZE,
               "--num-teachers", 1, "--shared-backbone", "--weights-file", imagenet_r50_file,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    man = read_manifest(out)
    assert man.pretrained is True and [m.arch for m in man.models] == ["resnet50", "resnet50"]
    assert man.teachers[0].backbone_id == man.biased.backbone_id == backbone_id(r50)
    erm = load_checkpoint(out / "erm_seed0.pt")
    assert erm["fc.weight"].shape == (2, 2048)
    assert_state_equal({k: v for k, v in erm.items() if not k.startswith("fc.")},
                       {k: v for k, v in r50.items() if not k.startswith("fc.")})
    # the weights, not where the file lies, are part of the teachers' identity
    assert json.loads((out / "teachers_config.json").read_text())["config"]["weights_file"] == file_sha256(imagenet_r50_file)


def test_cli_teachers_weights_file_of_wrong_arch(offline, tmp_path, data_root, r18):
    out = tmp_path / "teachers"
    r = invoke("teachers", "--data-root", data_root, "--out", out, "--image-size", SIZE,
               "--weights-file", r18[1])
    assert r.exit_code != 0
    assert f"Error: {r18[1]}: does not fit resnet50 (is it a resnet18?)" in r.output
    assert not list(out.glob("images_*"))


def test_dfr_protocol_and_bias_reach_the_heads(data_root, tmp_path, monkeypatch):
    """--dfr picks the protocol (reference gets the training split's embeddings for its scaler);
    --dfr-bias skews a teacher's DFR data towards the training split's group proportions."""
    meta = load_metadata(data_root)
    assert teachers.dfr_proportions(meta, 0.0) is None
    train = meta.group_counts("train") / meta.group_counts("train").sum()
    np.testing.assert_allclose(teachers.dfr_proportions(meta, 1.0), train)
    np.testing.assert_allclose(teachers.dfr_proportions(meta, 0.5), 0.5 * train + 0.125)
    calls = []
    real = teachers.fit_dfr
    monkeypatch.setattr(teachers, "fit_dfr", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    out = tmp_path / "t"
    build_teachers(tiny_cfg(data_root, out, shared_backbone=True, num_teachers=2, dfr="reference"))
    assert [c["variant"] for c in calls] == ["reference"] * 2
    assert calls[0]["train_emb"].shape == (len(meta.rows("train")), 512)
    calls.clear()
    build_teachers(tiny_cfg(data_root, out, shared_backbone=True, num_teachers=2, dfr="study",
                            dfr_bias=(0.0, 0.8), overwrite=True))
    assert [c["variant"] for c in calls] == ["study"] * 2
    assert calls[0]["proportions"] is None and calls[0]["train_emb"] is None
    np.testing.assert_allclose(calls[1]["proportions"], teachers.dfr_proportions(meta, 0.8))
    from core.errors import ToolError

    with pytest.raises(ToolError, match="--dfr-bias takes one value in \\[0, 1\\] per teacher"):
        tiny_cfg(data_root, out, num_teachers=2, dfr_bias=(0.5,))


def test_dfr_report_is_the_study_protocol_under_its_old_name(data_root, tmp_path, monkeypatch):
    """--dfr report (older versions' name) is --dfr study: in TeacherConfig, on the command line
    with a one-line note, and its identity is the study's."""
    old, new = tiny_cfg(data_root, tmp_path, dfr="report"), tiny_cfg(data_root, tmp_path, dfr="study")
    assert old.dfr == "study" and old.identity() == new.identity()
    got = {}

    def build(data_root, out, **opts):
        got.update(opts)
        raise ConfigError("stop here")
    monkeypatch.setattr("experiments.pipeline.build_teachers_for", build)
    result = CliRunner().invoke(cli.cli, ["teachers", "--data-root", str(data_root), "--out", str(tmp_path),
                                          "--dfr", "report"])
    assert got["dfr"] == "study" and "stop here" in result.output
    assert "--dfr report is deprecated, write --dfr study" in result.output


def test_teachers_recorded_with_dfr_report_are_still_the_same_teachers(shared, data_root, tmp_path):
    """A folder whose teachers_config.json an older version wrote ("dfr": "report") is reused by
    the same settings today, not refused as teachers built otherwise; another protocol still is."""
    import shutil

    from core.errors import ToolError

    folder = tmp_path / "teachers"
    shutil.copytree(shared, folder)
    record = folder / "teachers_config.json"
    written = json.loads(record.read_text())
    assert written["config"]["dfr"] == "study"
    erm = (folder / "erm_seed0.pt").read_bytes()
    record.write_text(json.dumps({**written, "config": {**written["config"], "dfr": "report"}}))
    build_teachers(tiny_cfg(data_root, folder, shared_backbone=True, num_teachers=2))
    assert (folder / "erm_seed0.pt").read_bytes() == erm  # reused, not rebuilt
    assert json.loads(record.read_text())["config"]["dfr"] == "study"
    record.write_text(json.dumps({**written, "config": {**written["config"], "dfr": "reference"}}))
    with pytest.raises(ToolError, match=r"dfr: was \"reference\", now \"study\""):
        build_teachers(tiny_cfg(data_root, folder, shared_backbone=True, num_teachers=2))
