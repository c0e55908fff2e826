"""A received teacher is untrusted: NaN/inf weights and a head of the wrong class count are refused."""
from __future__ import annotations

import torch
import torchvision
from click.testing import CliRunner

from cli import cli
from data.synth import SynthSpec, generate


def invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def state(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def test_nan_weight_refused_at_import_naming_file_and_parameter(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "nan.pt"
    torch.save(state(), good)
    s = state(seed=1)
    s["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    s["fc.bias"][1] = float("inf")
    torch.save(s, bad)
    out = tmp_path / "teachers"
    r = invoke("teachers", "import", "--out", out, "--teacher", good, "--teacher", bad, "--biased", good,
               "--arch", "resnet18")
    assert r.exit_code == 1, r.output
    assert f"Error: {bad}: parameter layer3.0.conv1.weight holds 1 non-finite value(s)" in r.output
    assert not (out / "manifest.json").exists()


def test_head_class_count_must_match_the_data_set(tmp_path):
    data = generate(tmp_path / "wb", SynthSpec(scale=0.01, size=16))
    three = tmp_path / "three.pt"
    torch.save(state(num_classes=3), three)
    out = tmp_path / "teachers"
    r = invoke("teachers", "import", "--out", out, "--teacher", three, "--biased", three,
               "--arch", "resnet18",
               "--num-classes", 3, "--image-size", 16, "--no-pretrained", "--data-root", data)
    assert r.exit_code == 1, r.output
    assert "--num-classes 3 but the data set" in r.output and "has 2 classes (landbird, waterbird)" in r.output
    assert not (out / "manifest.json").exists()


def test_manifest_paths_stay_in_its_folder(tmp_path, monkeypatch):
    import json

    import pytest

    from core.manifest import ALLOW_OUTSIDE_ENV, ManifestError, read_manifest

    folder = tmp_path / "received"
    folder.mkdir()
    (folder / "inside.pt").write_bytes(b"x")
    (tmp_path / "secret.pt").write_bytes(b"y")
    (folder / "link.pt").symlink_to(tmp_path / "secret.pt")

    def manifest(teacher_file):
        entry = dict(arch="resnet18", num_classes=2, sha256="0" * 64, backbone_id="b")
        d = {"schema": "gr-kd-teachers", "version": 1, "num_classes": 2, "image_size": 16, "pretrained": False,
             "models": [dict(entry, name="t1", role="teacher", file=teacher_file),
                        dict(entry, name="biased", role="biased", file="inside.pt")]}
        (folder / "manifest.json").write_text(json.dumps(d))

    monkeypatch.delenv(ALLOW_OUTSIDE_ENV, raising=False)
    manifest("inside.pt")
    assert read_manifest(folder).path("inside.pt") == folder / "inside.pt"
    for bad in ("../secret.pt", str(tmp_path / "secret.pt"), "link.pt", "sub/../../secret.pt"):
        manifest(bad)
        with pytest.raises(ManifestError, match="lie outside the manifest's folder") as e:
            read_manifest(folder)
        assert f"set {ALLOW_OUTSIDE_ENV}=1" in str(e.value) and bad in str(e.value)
        assert read_manifest(folder, allow_outside_paths=True).models[0].file == bad
    monkeypatch.setenv(ALLOW_OUTSIDE_ENV, "1")
    assert read_manifest(folder).models[0].file == "sub/../../secret.pt"


# ------------------------------------------------------------ checkpoints: sizes, layouts, dtypes

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from core.manifest import Manifest, ManifestError, make_entry, read_manifest, verify_models  # noqa: E402
from core.models import CheckpointError, backbone_id, load_checkpoint, save_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def import_cli(tmp_path, teacher, biased=None):
    """`teachers import` of one teacher (and a good biased model) through the command line."""
    if biased is None:
        biased = tmp_path / "good.pt"
        torch.save(state(), biased)
    r = invoke("teachers", "import", "--out", tmp_path / "teachers", "--teacher", teacher, "--biased", biased,
               "--arch", "resnet18", "--no-pretrained")
    assert "Traceback" not in r.output, r.output
    return r


def stride0(shape):
    return torch.zeros(1).as_strided(shape, (0,) * len(shape))


@pytest.mark.parametrize("kind, match", [
    ("stride0-weight", r"layer1\.0\.conv1\.weight is a view of shape \(64, 64, 3, 3\) with strides "
                       r"\(0, 0, 0, 0\), not a dense layout"),
    ("stride0-extra", r"bomb is a view of shape \(1000000, 1000000\) with strides \(0, 0\), not a dense"),
    ("overlapping", r"layer1\.0\.conv1\.weight is a view .* not a dense layout"),
    ("complex-nan", r"parameter conv1\.weight has dtype torch\.complex64; a model's weights are float16"),
    ("int32", r"parameter conv1\.weight has dtype torch\.int32"),
    ("float-counter", r"bn1\.num_batches_tracked has dtype torch\.float32; a BatchNorm counter is an"),
    ("sparse", r"conv1\.weight is a torch\.sparse_coo cpu Tensor"),
])
def test_checkpoint_layout_and_dtype_refused_naming_file_and_key(tmp_path, kind, match):
    s = state()
    if kind == "stride0-weight":
        s["layer1.0.conv1.weight"] = stride0((64, 64, 3, 3))
    elif kind == "stride0-extra":  # an unexpected key too: the layout is checked first, on any key
        s["bomb"] = stride0((10**6, 10**6))
    elif kind == "overlapping":
        s["layer1.0.conv1.weight"] = torch.zeros(64 * 64 * 3 * 3).as_strided((64, 64, 3, 3), (9, 9, 3, 1))
    elif kind == "complex-nan":
        s["conv1.weight"] = torch.full(s["conv1.weight"].shape, complex(0, float("nan")),
                                       dtype=torch.complex64)
    elif kind == "int32":
        s["conv1.weight"] = s["conv1.weight"].to(torch.int32)
    elif kind == "float-counter":
        s["bn1.num_batches_tracked"] = torch.tensor(1.0)
    elif kind == "sparse":
        s["conv1.weight"] = s["conv1.weight"].to_sparse()
    path = tmp_path / f"{kind}.pt"
    torch.save(s, path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(str(path))
    r = import_cli(tmp_path, path)
    assert r.exit_code == 1 and f"Error: {path}: " in r.output, r.output
    assert not (tmp_path / "teachers" / "manifest.json").exists()


def test_zip_records_that_expand_beyond_the_file_are_refused(tmp_path):
    """torch.save never compresses; torch.load inflates deflated records: a zip bomb."""
    big = tmp_path / "big.pt"
    torch.save({"fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2), "pad": torch.zeros(5_000_000)},
               big)
    bomb = tmp_path / "deflated.pt"
    with zipfile.ZipFile(big) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < big.stat().st_size / 100
    with pytest.raises(CheckpointError, match=r"deflated\.pt: its records declare \d+ bytes uncompressed "
                                              r"in a file of \d+ bytes"):
        load_checkpoint(bomb)


def test_checkpoint_views_that_are_dense_still_load(tmp_path):
    """channels-last weights (dense in another order) and a head sliced whole from a storage."""
    s = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
         for k, v in state().items()}
    path = tmp_path / "cl.pt"
    torch.save(s, path)
    back = load_checkpoint(path)
    assert all(torch.equal(back[k], s[k]) for k in s)
    assert make_entry("t", "teacher", path, "resnet18", 2).backbone_id == backbone_id(state())


def _peak_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh interpreter running ``code`` (which may raise)."""
    script = (f"import resource\ntry:\n    {code}\nexcept Exception as e:\n"
              "    print('ERR', type(e).__name__, e)\n"
              "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    peak = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK")]
    return peak[0], r.stdout


def test_stride0_bomb_costs_no_more_memory_than_an_intact_checkpoint(tmp_path):
    """Issue 27 item 4: a 1.8 kB file declaring (15000, 15000) took 2.6 GB in check_finite."""
    good, bomb = tmp_path / "good.pt", tmp_path / "bomb.pt"
    torch.save(state(), good)
    torch.save({**state(), "layer4.1.conv2.weight": stride0((15000, 15000))}, bomb)
    assert bomb.stat().st_size < good.stat().st_size
    call = "from core.manifest import make_entry; make_entry('t', 'teacher', {!r}, 'resnet18', 2)"
    intact, _ = _peak_mb(call.format(str(good)))
    refused, out = _peak_mb(call.format(str(bomb)))
    assert "ERR CheckpointError" in out and "not a dense layout" in out, out
    assert refused < intact + 200, (refused, intact)


# ------------------------------------------------------------ safetensors

def test_safetensors_import_equals_the_pickle_and_bad_ones_are_refused(tmp_path):
    s = state()
    st = tmp_path / "teacher.safetensors"
    save_safetensors(s, st)
    back = load_checkpoint(st)
    assert set(back) == set(s) and all(torch.equal(back[k], s[k]) for k in s)
    r = import_cli(tmp_path, st)
    assert r.exit_code == 0, r.output
    man = read_manifest(tmp_path / "teachers")
    assert man.teachers[0].file.endswith("teacher.safetensors")
    assert man.teachers[0].backbone_id == backbone_id(s) == man.biased.backbone_id
    verify_models(man)
    # a complex tensor is refused from the header, before it is read
    from safetensors.torch import save_file
    save_file({**s, "conv1.weight": s["conv1.weight"].to(torch.complex64)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match=r"c\.safetensors: parameter conv1\.weight has dtype C64"):
        load_checkpoint(tmp_path / "c.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-100])
    r = import_cli(tmp_path, cut)
    assert r.exit_code == 1 and f"{cut}: not a loadable safetensors file" in r.output, r.output


# ------------------------------------------------------------ identity from bytes, heads at load

def teachers_folder(tmp_path, heads=None) -> Path:
    """teacher_1 and the biased model on good.pt (seed 0), teacher_2 on other.pt (seed 1), with
    head files where ``heads`` gives one by teacher name; every sha256 true. Returns the manifest."""
    folder = tmp_path / "teachers"
    folder.mkdir()
    torch.save(state(seed=0), folder / "good.pt")
    torch.save(state(seed=1), folder / "other.pt")
    heads = heads or {}
    for name, head in heads.items():
        torch.save(head, folder / f"{name}_head.pt")

    def entry(name, role, file):
        head = folder / f"{name}_head.pt" if name in heads else None
        return make_entry(name, role, folder / file, "resnet18", 2, head_file=head, root=folder)
    man = Manifest([entry("teacher_1", "teacher", "good.pt"), entry("teacher_2", "teacher", "other.pt"),
                    entry("biased", "biased", "good.pt")], 2, 16, False, folder)
    return man.save(folder / "manifest.json")


def claim_backbone_of_teacher_1(manifest: Path) -> None:
    d = json.loads(manifest.read_text())
    d["models"][1]["backbone_id"] = d["models"][0]["backbone_id"]
    manifest.write_text(json.dumps(d))


def test_backbone_is_the_files_not_the_manifests(tmp_path):
    """Issue 27 item 5: teacher_2's file is another state dict (its sha256 true) but its entry
    claims teacher_1's backbone_id: Ensemble gave it teacher_1's features and logits."""
    from core.ensemble import Ensemble

    manifest = teachers_folder(tmp_path)
    man = read_manifest(manifest)
    assert len(Ensemble(man).backbones) == 2  # the honest manifest: two backbones
    claim_backbone_of_teacher_1(manifest)
    man = read_manifest(manifest)
    assert len(man.backbone_ids) == 1  # what the manifest says
    for build in (Ensemble, verify_models):
        with pytest.raises(ManifestError, match=r"manifest\.json: model teacher_2: backbone_id "
                                                r"'[0-9a-f]{16}' is not the backbone of its file "
                                                r".*other\.pt \([0-9a-f]{16}\)"):
            build(man)
    from core.manifest import load_model
    with pytest.raises(ManifestError, match="model teacher_2: backbone_id"):
        load_model(man, man.teachers[1])


def test_shared_backbone_only_when_the_bytes_are_equal(tmp_path):
    """Two files whose backbones are equal byte for byte (heads differ) share one backbone; the
    same weights in another dtype are another backbone."""
    from core.ensemble import Ensemble

    folder = tmp_path / "t"
    folder.mkdir()
    s = state()
    torch.save(s, folder / "a.pt")
    torch.save({**s, "fc.bias": s["fc.bias"] + 1}, folder / "b.pt")
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in s.items()}, folder / "c.pt")
    entries = [make_entry(n, r, folder / f, "resnet18", 2, root=folder)
               for n, r, f in (("t1", "teacher", "a.pt"), ("t2", "teacher", "b.pt"),
                               ("t3", "teacher", "c.pt"), ("biased", "biased", "a.pt"))]
    man = read_manifest(Manifest(entries, 2, 16, False, folder).save(folder / "manifest.json"))
    ens = Ensemble(man)
    assert len(ens.backbones) == 2 and ens.teacher_backbone == [0, 0, 1] and ens.biased_backbone == 0


def test_nan_head_on_a_shared_backbone_refused_at_load_naming_the_head_file(tmp_path):
    """Issue 27 item 7: a NaN head of a teacher that shares teacher_1's backbone was refused only
    when the cache was written, blaming "these images"."""
    from core.ensemble import Ensemble

    torch.manual_seed(0)
    good = {"fc.weight": torch.randn(2, 512), "fc.bias": torch.randn(2)}
    manifest = teachers_folder(tmp_path, heads={"teacher_1": good, "biased": dict(good)})
    head = manifest.parent / "biased_head.pt"
    torch.save({"fc.weight": good["fc.weight"], "fc.bias": torch.tensor([0.0, float("nan")])}, head)
    d = json.loads(manifest.read_text())
    d["models"][2]["head_sha256"] = __import__("core.files", fromlist=["x"]).sha256_file(head)
    manifest.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"biased_head\.pt: parameter fc\.bias holds 1 non-finite"):
        Ensemble(read_manifest(manifest))
    torch.save({"fc.weight": torch.randn(3, 512), "fc.bias": torch.randn(3)}, head)
    with pytest.raises(CheckpointError, match=r"biased_head\.pt: not a head for resnet18 with 2 classes "
                                              r"\(fc\.weight: shape \(3, 512\), expected \(2, 512\)\)"):
        Ensemble(read_manifest(manifest))


def test_precompute_and_extend_refuse_a_claimed_backbone(tmp_path, tiny_data, tiny_cache):
    manifest = teachers_folder(tmp_path)
    claim_backbone_of_teacher_1(manifest)
    r = invoke("precompute", "--data-root", tiny_data, "--teachers", manifest, "--out", tmp_path / "c.h5",
               "--device", "cpu")
    assert r.exit_code == 1 and "model teacher_2: backbone_id" in r.output, r.output
    assert "Traceback" not in r.output
    r = invoke("cache", "extend", tiny_cache, "--teachers", manifest, "--out", tmp_path / "x" / "e.h5",
               "--device", "cpu")
    assert r.exit_code == 1 and "model teacher_2: backbone_id" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "x" / "e.h5").exists()


def test_precompute_refuses_a_huge_stride0_teacher_with_a_message(tmp_path, tiny_data):
    """(1e6, 1e6) made precompute die with a raw RuntimeError asking for 4 TB."""
    from core.files import sha256_file

    manifest = teachers_folder(tmp_path)
    torch.save({**state(seed=1), "layer4.1.conv2.weight": stride0((10**6, 10**6))},
               manifest.parent / "other.pt")
    d = json.loads(manifest.read_text())
    d["models"][1]["sha256"] = sha256_file(manifest.parent / "other.pt")
    manifest.write_text(json.dumps(d))
    r = invoke("precompute", "--data-root", tiny_data, "--teachers", manifest, "--out", tmp_path / "c.h5",
               "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "other.pt: layer4.1.conv2.weight is a view of shape (1000000, 1000000)" in r.output
    assert "Traceback" not in r.output


def test_extend_refuses_a_cache_whose_backbone_is_not_the_files():
    """check_backbones: a model the cache holds (same sha256) with another backbone than its file."""
    from types import SimpleNamespace

    from cache.schema import CacheError
    from precompute.extend import check_backbones

    t1 = SimpleNamespace(name="t1", sha256="a" * 64)
    man = SimpleNamespace(teachers=[t1], biased=SimpleNamespace(name="b", sha256="b" * 64))
    digests = {"t1": "1" * 64, "b": "2" * 64}
    meta = SimpleNamespace(teachers=[{"sha256": "a" * 64, "backbone_id": "1" * 16},
                                     {"sha256": "b" * 64, "backbone_id": "2" * 16}])
    check_backbones(meta, man, digests, "m.json")
    meta.teachers[1]["backbone_id"] = "1" * 16
    with pytest.raises(CacheError, match=r"model b's checkpoint .* has backbone '1111111111111111', its "
                                         r"file's weights in m\.json hash to 2222222222222222"):
        check_backbones(meta, man, digests, "m.json")


def test_export_safetensors_keeps_every_backbone_and_output(tmp_path):
    from core.ensemble import Ensemble
    from core.manifest import export_safetensors

    torch.manual_seed(0)
    manifest = teachers_folder(tmp_path, heads={"teacher_1": {"fc.weight": torch.randn(2, 512),
                                                              "fc.bias": torch.randn(2)}})
    man = read_manifest(manifest)
    new = export_safetensors(man, tmp_path / "shared")
    back = read_manifest(tmp_path / "shared")
    assert [m.file for m in back.models] == ["good.safetensors", "other.safetensors", "good.safetensors"]
    assert back.models[0].head_file == "teacher_1_head.safetensors"
    assert [m.backbone_id for m in back.models] == [m.backbone_id for m in man.models] == \
        [m.backbone_id for m in new.models]
    assert not list((tmp_path / "shared").glob("*.pt"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = Ensemble(man).eval()(x), Ensemble(back).eval()(x)
    for u, v in zip(a[:2], b[:2]):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    with pytest.raises(ManifestError, match="the manifest's own folder"):
        export_safetensors(back, tmp_path / "shared")


def test_extend_reads_the_teachers_record_as_untrusted(tmp_path, tiny_cache, tiny_teachers):
    """A teachers_config.json nested deep or not an object is no record (a traceback before)."""
    import shutil

    from cache.reader import open_cache
    from precompute.extend import check_fit

    folder = tmp_path / "t"
    shutil.copytree(tiny_teachers.parent, folder)
    man = read_manifest(folder)
    with open_cache(tiny_cache) as cache:
        for text in ("[" * 100_000 + "]" * 100_000, "[]", '{"dataset_fingerprint": [1]}'):
            (folder / "teachers_config.json").write_text(text)
            check_fit(cache, man, folder / "manifest.json")
