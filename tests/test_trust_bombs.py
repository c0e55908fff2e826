"""Received caches and image stores that cost more than they hold, read outside themselves, run foreign
filters or declare sizes out of range (issue 27): each is refused with a message naming the file and the
object, exit code 1 and no traceback; the bombs within a few hundred MB of an intact file's peak memory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.integrity import HEADER_KEY, header_digest
from cache.reader import open_cache, read_checked
from cache.limits import MAX_OUT_SIZE, MAX_STORE_SIZE
from cache.schema import CacheError, store_path_for
from core.errors import ToolError
from core.h5safe import FREE_CHUNKS, open_untrusted
from data import store_checks as store_module
from data.store import ImageStore, StoreError
from test_trust_cache import DISTILL, copy_cache, invoke

REPO = Path(__file__).resolve().parents[1]
SLACK_KB = 300 * 1024  # "a few hundred MB" over the same commands on an intact file


# ----------------------------------------------------------------------------- crafting helpers


def redigest(cache_path, **fields) -> None:
    """Set root attributes (lists and dicts as JSON, as the writer stores them) and write the header
    digest again: only the range and kind checks can tell the file from an intact one."""
    with h5py.File(cache_path, "r+") as f:
        for k, v in fields.items():
            f.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
        f.attrs[HEADER_KEY] = header_digest(f.attrs)


def store_digest_of(store_path) -> str:
    """ImageStore.store_digest without ImageStore's checks (so that a crafted store can be bound)."""
    with h5py.File(store_path, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        h = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode())
        for name in ("offset", "hw", "done", "digest"):
            h.update(name.encode())
            h.update(np.ascontiguousarray(f[name][:]).tobytes())
    return h.hexdigest()


def rebind(cache_path) -> None:
    """Bind the (edited) store beside the cache into its header, header digest recomputed."""
    redigest(cache_path, store_digest=store_digest_of(store_path_for(cache_path)))


def rewrite(f: h5py.File, name: str, data=None, **kw) -> None:
    """Dataset ``name`` again, with ``data`` (default: its own) and creation options ``kw``."""
    old = f[name]
    data = old[...] if data is None else data
    opts = {"chunks": old.chunks, "fletcher32": old.fletcher32} if old.chunks else {}
    del f[name]
    f.create_dataset(name, data=data, **{**opts, **kw})


def every_command(path, tmp_path):
    """The commands that open a cache and its store: info, verify and a one-epoch distill."""
    return (("cache", "info", path), ("cache", "verify", path),
            (*DISTILL, "--cache", path, "--out", tmp_path / "r"))


def run_measured(commands) -> tuple[list[tuple[int, str]], int]:
    """Run CLI commands in one fresh interpreter; (exit code, output) of each and its peak RSS (KB)."""
    code = (f"import json, resource, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from click.testing import CliRunner\nfrom cli import cli\nout = []\n"
            f"for args in {[[str(a) for a in c] for c in commands]!r}:\n"
            "    r = CliRunner().invoke(cli, args)\n"
            "    out.append((r.exit_code, r.output + ('' if r.exception is None or isinstance(r.exception, "
            "SystemExit) else 'Traceback ' + repr(r.exception))))\n"
            "print(json.dumps([out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    results, rss = json.loads(p.stdout.strip().splitlines()[-1])
    return [tuple(r) for r in results], int(rss)


# ----------------------------------------------------------------------------- 1. chunk bombs


def chunk_bomb(src, path, n=500_000, written=500) -> Path:
    """The issue's 32 KB cache: root attributes copied from a real one, /samples/split declared as
    ``n`` one-byte chunks of which ``written`` hold data."""
    with h5py.File(src, "r") as s, h5py.File(path, "w") as d:
        for k, v in s.attrs.items():
            d.attrs[k] = v
        d.create_dataset("samples/split", (n,), "u1", chunks=(1,))[:written] = 0
    return path


def store_done_bomb(tiny_cache, folder) -> Path:
    """An intact cache beside a store whose /done is declared as 500,000 one-byte chunks."""
    path = copy_cache(tiny_cache, folder)
    with h5py.File(store_path_for(path), "r+") as f:
        del f["done"]
        f.create_dataset("done", (500_000,), bool, chunks=(1,))[:500] = True
    return path


def test_chunk_bombs_cost_what_an_intact_cache_costs(tiny_cache, tmp_path):
    (tmp_path / "bomb").mkdir()
    bomb = chunk_bomb(tiny_cache, tmp_path / "bomb" / "cache.h5")
    assert bomb.stat().st_size < 64 * 1024
    store_bomb = store_done_bomb(tiny_cache, tmp_path / "store_bomb")
    got, rss = run_measured([("cache", "info", bomb), ("cache", "verify", bomb),
                             ("cache", "verify", store_bomb),
                             (*DISTILL, "--cache", store_bomb, "--out", tmp_path / "r")])
    intact, rss_intact = run_measured([("cache", "info", tiny_cache), ("cache", "verify", tiny_cache)])
    assert [code for code, _ in intact] == [0, 0], intact
    for code, out in got:
        assert code == 1 and "Traceback" not in out, out
    for code, out in got[:2]:
        message = f"{bomb}: dataset /samples/split declares 500,000 chunks (shape (500000,), chunks (1,))"
        assert message in out, out
    for code, out in got[2:]:
        assert f"{store_path_for(store_bomb)}: dataset /done declares 500,000 chunks" in out, out
    assert rss <= rss_intact + SLACK_KB, (rss, rss_intact)  # before the bound: 2.6 GB against 0.67 GB


def test_a_resumed_file_gets_no_sparse_samples(tiny_cache, tmp_path):
    """The writer's check of a file it resumes waives the size bounds for the views it has not
    written yet, never for the samples and progress flags it wrote when it made the file."""
    bomb = chunk_bomb(tiny_cache, tmp_path / "cache.h5")
    with h5py.File(bomb, "r") as f:
        with pytest.raises(CacheError, match="/samples/split declares 500,000 chunks"):
            read_checked(f, bomb, require_complete=False, resuming=True)


def test_chunks_finer_than_the_writers_are_refused(tiny_cache, tmp_path):
    """Within the file-size budget, a dataset split finer than the writer splits it is refused by the
    schema before it is read (digests unchanged: the values are the same)."""
    path = copy_cache(tiny_cache, tmp_path)
    with h5py.File(path, "r+") as f:
        rewrite(f, "eval/flip", chunks=(1,))
        R = f["eval/flip"].shape[0]
    with pytest.raises(CacheError, match=rf"/eval/flip is split into {R:,} chunks \(1,\), the writer makes"):
        open_cache(path)
    r = invoke("cache", "info", path)
    assert r.exit_code == 1 and "/eval/flip is split into" in r.output, r.output


# ----------------------------------------------------------------------------- 2. filters


@pytest.mark.parametrize("kind, message", [
    ("lzf", "dataset /x is stored through HDF5 filter(s) 32000 (lzf)"),
    ("unregistered", "dataset /x is stored through HDF5 filter(s) 32099 (unnamed)"),
    ("scaleoffset", "dataset /x is stored through HDF5 filter(s) 6 (scaleoffset)"),
])
def test_filters_the_tool_does_not_write_are_refused(tmp_path, kind, message):
    path = tmp_path / f"{kind}.h5"
    options = {"lzf": {"compression": "lzf"}, "scaleoffset": {"scaleoffset": 0},
               "unregistered": {"compression": 32099, "allow_unknown_filter": True}}[kind]
    with h5py.File(path, "w") as f:
        f.create_dataset("ok", data=np.arange(100), chunks=(10,), compression="gzip", shuffle=True,
                         fletcher32=True)
        f.create_dataset("x", data=np.arange(100), chunks=(10,), **options)
    with pytest.raises(ToolError) as e:
        open_untrusted(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert h5py.h5pl.size() == 0  # and HDF5 would find no plugin to run on it anyway


def test_a_cache_dataset_under_a_foreign_filter_is_refused_by_every_command(tiny_cache, tmp_path):
    path = copy_cache(tiny_cache, tmp_path)
    with h5py.File(path, "r+") as f:
        rewrite(f, "eval/logits/biased", compression="lzf")
    message = "dataset /eval/logits/biased is stored through HDF5 filter(s) 32000 (lzf)"
    for args in every_command(path, tmp_path):
        r = invoke(*args)
        assert r.exit_code == 1 and message in r.output, r.output


# ----------------------------------------------------------------------------- 4. the store's sizes


def _store_variants():
    def negate(f):  # the issue's case: products unchanged, digests made again
        f["hw"][...] = -f["hw"][...]

    def wrap(f):  # (2^32, 2^32) in an int64 table: 3hw wraps to 0
        hw = f["hw"][...].astype(np.int64)
        hw[0] = (1 << 32, 1 << 32)
        rewrite(f, "hw", data=hw)

    def long_side(f):
        hw = f["hw"][...]
        hw[3] = (hw[3].min(), 1 << 20)
        f["hw"][...] = hw

    def rows(f):
        f.attrs["row_stop"] = 10 ** 9

    def big(f):
        f.attrs["size"] = 30000
    return {"negated": (negate, "image 0 has size (-"), "wrapped": (wrap, "/hw is int64 (590, 2)"),
            "long side": (long_side, "image 3 has size"),
            "rows": (rows, "attribute row_stop is 1000000000, not an integer in 0..590"),
            "size": (big, f"attribute size is 30000, not an integer in 1..{store_module.MAX_SIZE}")}


@pytest.mark.parametrize("kind", list(_store_variants()))
def test_store_sizes_are_range_checked(tiny_cache, tmp_path, kind):
    edit, message = _store_variants()[kind]
    path = copy_cache(tiny_cache, tmp_path)
    store = store_path_for(path)
    with h5py.File(store, "r+") as f:
        edit(f)
    rebind(path)  # the store's digest in the header made again: only the range checks can tell
    with pytest.raises(StoreError) as e:
        ImageStore(store)
    assert message in str(e.value) and str(store) in str(e.value), str(e.value)
    r = invoke("cache", "verify", path)
    assert r.exit_code == 1 and message in r.output and str(store) in r.output, r.output
    if kind in ("negated", "rows"):  # the issue's: trained on wrong pixels; blamed on cache.h5
        r = invoke(*DISTILL, "--cache", path, "--out", tmp_path / "run")
        assert r.exit_code == 1 and message in r.output and f"{store}:" in r.output, r.output


def test_store_and_header_size_limits_agree():
    assert MAX_STORE_SIZE == store_module.MAX_SIZE


# ----------------------------------------------------------------------------- 4. the header's fields


@pytest.mark.parametrize("fields, message", [
    ({"teachers": "[1, 2]"}, "field 'teachers' entry 0 must be an object with string name, role"),
    ({"view_spec": "[]"}, "field 'view_spec' must be a JSON dict, got list"),
    ({"num_classes": "2"}, "field 'num_classes' must be int, got str 2"),
    ({"layers": '["layer2", 3]'}, "field 'layers' must list str values, got 3"),
    ({"view_spec": None}, f"field 'view_spec' out_size is 30000, not an integer in 1..{MAX_OUT_SIZE}"),
    ({"feature_dims": None}, "field 'feature_dims' gives layer 'layer4' width 1000000000, not an integer in"),
])
def test_header_fields_of_the_wrong_kind_or_size_are_named(tiny_cache, tmp_path, fields, message):
    path = copy_cache(tiny_cache, tmp_path)
    with open_cache(path) as r:
        meta = r.meta
    if fields.get("view_spec", "") is None:
        fields = {"view_spec": {**meta.view_spec, "out_size": 30000}}
    if fields.get("feature_dims", "") is None:
        fields = {"feature_dims": {**meta.feature_dims, "layer4": 10 ** 9}}
    redigest(path, **fields)
    with pytest.raises(CacheError, match="inconsistent header") as e:
        open_cache(path)
    assert message in str(e.value), str(e.value)
    for args in every_command(path, tmp_path):
        r = invoke(*args)
        assert r.exit_code == 1 and message in r.output, r.output


# ----------------------------------------------------------------------------- 3. merge, and OUT.h5.tmp


@pytest.fixture(scope="module")
def shards(tiny_data, tiny_teachers, tmp_path_factory) -> list[Path]:
    from precompute.run import PrecomputeConfig, run_precompute

    folder = tmp_path_factory.mktemp("shards")
    return [run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(folder / f"s{i}.h5"),
                                            random_views=1, batch_size=64, device="cpu", progress=False,
                                            shard=f"{i}/2")) for i in range(2)]


def copy_shards(shards, folder) -> list[Path]:
    return [copy_cache(s, folder) for s in shards]


def test_merge_reads_no_byte_outside_the_shards(shards, tmp_path):
    parts = copy_shards(shards, tmp_path / "ext")
    private = tmp_path / "private.bin"
    store = store_path_for(parts[1])
    with h5py.File(store, "r+") as f:
        n = f["pixels"].shape[0]
        private.write_bytes(bytes(range(256)) * (n // 256 + 1))
        del f["pixels"]
        f.create_dataset("pixels", (n,), np.uint8, external=[(str(private), 0, n)])
    rebind(parts[1])  # the store digest covers the tables, not the pixels: the binding still holds
    out = tmp_path / "merged.h5"
    r = invoke("cache", "merge", out, *parts)
    message = f"{store}: dataset /pixels keeps its data in external file(s) {private}"
    assert r.exit_code == 1 and message in r.output, r.output
    assert not out.exists() and not store_path_for(out).exists()


def test_a_shard_that_binds_no_store_is_not_merged_with_one(shards, tmp_path):
    parts = copy_shards(shards, tmp_path / "unbound")
    redigest(parts[0], store_digest="")
    r = invoke("cache", "merge", tmp_path / "merged.h5", *parts)
    assert r.exit_code == 1 and f"{parts[0]}: its header records no image store digest" in r.output, r.output


def test_a_link_planted_at_the_merge_temporary_is_not_followed(shards, tmp_path):
    parts = copy_shards(shards, tmp_path / "parts")
    out = tmp_path / "merged.h5"
    victim = tmp_path / "elsewhere" / "victim.h5"
    Path(str(out) + ".tmp").symlink_to(victim)  # dangling: h5py's exclusive create would refuse it
    r = invoke("cache", "merge", out, *parts)
    assert r.exit_code == 0, r.output
    assert not victim.exists() and not os.path.lexists(str(out) + ".tmp")
    r = invoke("cache", "verify", out)
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_writer_refuses_a_link_planted_at_its_output(tiny_cache, tmp_path):
    from cache.writer import create_file

    with open_cache(tiny_cache) as r:
        meta, samples = r.meta, {k: r.sample(k) for k in ("id", "y", "attr", "group", "split")}
    out = tmp_path / "out.h5"
    out.symlink_to(tmp_path / "nowhere" / "x.h5")
    with pytest.raises(CacheError, match="exists as a symbolic link .* neither followed nor replaced"):
        create_file(str(out), meta, samples, 0, len(samples["y"]), "", None)
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_the_free_chunk_allowance_is_small():
    assert FREE_CHUNKS * 5 * 1024 <= 32 << 20  # what HDF5 may spend on it: ~5 KB a chunk
