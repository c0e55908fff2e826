"""`cache verify --recompute`: the stored outputs are the teachers' own, whatever the digests say.

Digests and the root digest only say that a file is the one its writer digested; a file whose
teacher outputs were edited and then digested again passes them. Running the teachers again on a
few stored views, rendered from the image store as training renders them, tells.
"""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from cache import integrity
from cache.schema import is_slotted, store_path_for
from cache.verify import _pick_views, recompute, verify

N = 24


def invoke(*args):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output, r.output
    return r


def _copy(src, folder):
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    shutil.copy(store_path_for(src), store_path_for(dst))
    return dst


def _redigest(f: h5py.File) -> None:
    """Every digest table and the root digest written again for the file's current contents, as a
    tamperer would: the file then passes every digest check."""
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("digests/")
                 else None)
    integrity.write_digests(f, names, lambda ds: 1000, is_slotted)


def _tampered(tiny_cache, folder, edit):
    path = _copy(tiny_cache, folder)
    with h5py.File(path, "r+") as f:
        edit(f)
        _redigest(f)
    assert verify(path) == []  # the digests are no help: they were made for these contents
    return path


def _agre_of_stored_logits(f):
    """The cached weights written again from the (edited) logits, as a careful tamperer would."""
    import torch

    from core.weighting import cached_agre_weights

    tau = float(f.attrs["tau_cached"])
    for part in ("eval", "random"):
        if part in f:
            zt, zb = f[f"{part}/logits/teachers"][...], f[f"{part}/logits/biased"][...]
            f[f"{part}/weights/agre_cached"][...] = cached_agre_weights(
                torch.from_numpy(zt), torch.from_numpy(zb), tau).numpy()


def test_intact_cache_passes(tiny_cache, tiny_teachers):
    lines, problems = recompute(tiny_cache, tiny_teachers, N, seed=3)
    assert problems == [], "\n".join(lines + problems)
    assert lines[0].startswith(f"recomputed {N} views (") and "eval" in lines[0] and "random" in lines[0]
    for what in ("teacher logits", "biased logits", "features layer4", "cached weights"):
        assert any(l.strip().startswith(what) for l in lines), lines
    agree = [l for l in lines if "predicted class agrees" in l]
    assert len(agree) == 2 and all(l.split("agrees on ")[1].split("/")[0] == l.split("/")[-1] for l in agree)
    r = invoke("cache", "verify", tiny_cache, "--recompute", N, "--teachers", tiny_teachers, "--seed", 3)
    assert r.exit_code == 0 and "OK (outputs recomputed on 24 views)" in r.output, r.output
    assert "\n".join(lines) in r.output  # the same views and numbers: the seed decides


def test_views_are_drawn_by_the_seed():
    a, b = _pick_views(100, 60, 2, 30, seed=0), _pick_views(100, 60, 2, 30, seed=0)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
    c = _pick_views(100, 60, 2, 30, seed=1)
    assert not np.array_equal(np.concatenate([a[0], *a[1].values()]), np.concatenate([c[0], *c[1].values()]))
    assert len(a[0]) + sum(len(v) for v in a[1].values()) == 30
    ev, slots = _pick_views(5, 3, 2, 100, seed=0)  # more asked than held: every view once
    assert list(ev) == list(range(5)) and all(list(v) == [0, 1, 2] for v in slots.values())


def _scale_teacher(f, k=1):
    """Teacher ``k``'s logits made 1.5 times as confident, on every view (its predictions unchanged)."""
    for part in ("eval", "random"):
        if part in f:
            z = f[f"{part}/logits/teachers"][...]
            z[..., k, :] *= 1.5
            f[f"{part}/logits/teachers"][...] = z


def _uniform_weights(f):
    """The random slots' cached weights set to 1/T (no longer those of the stored logits)."""
    w = f["random/weights/agre_cached"]
    w[...] = np.full(w.shape, 1 / w.shape[-1], w.dtype)


@pytest.mark.parametrize("edit, named", [
    (_scale_teacher, "teacher logits"),
    (lambda f: (_scale_teacher(f), _agre_of_stored_logits(f)), "teacher logits"),
    (lambda f: f["eval/logits/biased"].__setitem__(Ellipsis, f["eval/logits/biased"][...][:, ::-1]),
     "biased logits"),
    (lambda f: f["eval/features/layer4"].__setitem__(Ellipsis, f["eval/features/layer4"][...] * 1.01),
     "features layer4"),
    (_uniform_weights, "cached weights"),
], ids=["teacher-logits", "teacher-logits-and-weights", "biased-logits", "features", "weights"])
def test_tampered_and_redigested_cache_fails(tiny_cache, tiny_teachers, tmp_path, edit, named):
    path = _tampered(tiny_cache, tmp_path, edit)
    r = invoke("cache", "verify", path)
    assert r.exit_code == 0  # digests alone: OK
    r = invoke("cache", "verify", path, "--recompute", 40, "--teachers", tiny_teachers)
    assert r.exit_code == 1 and f"{named}: " in r.output, r.output
    assert "views differ from what the teachers compute" in r.output
    assert "are not the outputs of the manifest's models" in r.output or "not the weights" in r.output
    assert "largest error" in r.output  # what was compared is printed before the verdict


def test_recompute_needs_the_teachers(tiny_cache, tiny_teachers):
    r = invoke("cache", "verify", tiny_cache, "--recompute", 4)
    assert r.exit_code == 1 and "--recompute N and --teachers MANIFEST go together" in r.output


def test_teachers_other_than_the_cache_s_are_named(tiny_cache, tiny_teachers, tmp_path):
    """The same checkpoints in another order: each teacher's logits would be compared with another
    teacher's, so the manifest is refused for not describing the cache."""
    import json

    folder = tmp_path / "teachers"
    shutil.copytree(tiny_teachers.parent, folder)
    d = json.loads((folder / "manifest.json").read_text())
    d["models"][0], d["models"][1] = d["models"][1], d["models"][0]
    (folder / "manifest.json").write_text(json.dumps(d))
    r = invoke("cache", "verify", tiny_cache, "--recompute", 4, "--teachers", folder / "manifest.json")
    assert r.exit_code == 1 and "does not describe" in r.output and "2 differ" in r.output, r.output
