"""Fault injection: single-bit flips in a cache file, and how many of them go unnoticed.

A flip is *silent* when reading the whole file back (header, samples, the eval view and every
random slot, through the normal reader with its digest checks, as ``distill`` reads it) succeeds
and gives something other than the original, or when ``cache verify`` passes a file whose
contents changed. Goal: 0 silent
flips. A flip that changes nothing read back (unused bytes, padding) is harmless, whatever
verify says.

    python benchmarks/bitflips.py [--flips 1000] [--seed 0] [--cache PATH]

Without ``--cache`` it builds a small cache (synthetic data, tiny teachers) in a temporary folder.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import open_cache  # noqa: E402
from cache.verify import verify  # noqa: E402
from core.errors import ToolError  # noqa: E402


def read_back(path) -> dict:
    """Everything a user of the file gets from it, through the checked reader."""
    with open_cache(path) as r:
        out = {"identity": r.meta.identity(), "rows": (r.row_start, r.row_stop, r.shard), "root": r.root_digest}
        views = [("eval", r.read_eval(layers=r.meta.layers))]
        views += [(f"slot{k}", r.read_slot(k, layers=r.meta.layers)) for k in range(1, r.meta.random_views + 1)]
        for name, d in views:
            out.update({f"{name}/{k}": v for k, v in d.items() if k != "features"})
            out.update({f"{name}/features/{k}": v for k, v in d["features"].items()})
        return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                return False
        elif x != y:
            return False
    return True


def flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def outcome(path: Path, reference: dict) -> str:
    """"caught" (the reader refuses and verify reports it), "harmless" (nothing read back changed)
    or "silent" (wrong contents read without an error, or a damaged file passing verify)."""
    problems = verify(path)
    try:
        got = read_back(path)
    except ToolError:
        return "caught" if problems else "silent"  # refused on read, but verify must see it too
    if same(got, reference):
        return "harmless"
    return "silent"


def campaign(path: str | Path, flips: int, seed: int = 0, offsets=None, work: Path | None = None) -> dict:
    """Flip one random bit at a time in a copy of ``path``; count the outcomes.

    ``offsets``: byte offsets to flip instead of random ones (e.g. inside index nodes).
    Returns ``{"caught", "harmless", "silent", "silent_offsets"}``.
    """
    path = Path(path)
    reference = read_back(path)
    size = path.stat().st_size
    rng = np.random.default_rng(seed)
    work = Path(work or tempfile.mkdtemp(prefix="bitflips_"))
    counts = {"caught": 0, "harmless": 0, "silent": 0, "silent_offsets": []}
    targets = list(offsets) if offsets is not None else list(rng.integers(0, size, flips))
    for i, offset in enumerate(targets):
        copy = work / f"flip{i % 2}.h5"
        shutil.copyfile(path, copy)
        flip(copy, int(offset), int(rng.integers(0, 8)))
        result = outcome(copy, reference)
        counts[result] += 1
        if result == "silent":
            counts["silent_offsets"].append(int(offset))
    return counts


def index_node_offsets(path: str | Path, per_node: int = 8, seed: int = 0) -> list[int]:
    """Offsets inside HDF5's v1 B-tree nodes (signature ``TREE``): the chunk index."""
    blob = Path(path).read_bytes()
    rng = np.random.default_rng(seed)
    out, start = [], 0
    while (i := blob.find(b"TREE", start)) >= 0:
        out += [int(i + 4 + o) for o in rng.integers(0, 96, per_node)]
        start = i + 4
    return [o for o in out if o < len(blob)]


def _build_small_cache(work: Path) -> Path:
    from data.synth import SynthSpec, generate
    from precompute.run import PrecomputeConfig, run_precompute
    from precompute.teachers import TeacherConfig, build_teachers

    data = generate(work / "data", SynthSpec(scale=0.05, size=16, seed=1))
    build_teachers(TeacherConfig(str(data), str(work / "teachers"), num_teachers=2, epochs=1, image_size=12,
                                 arch="resnet18", pretrained=False, shared_backbone=True, dfr_retrains=1,
                                 device="cpu", progress=False))
    return run_precompute(PrecomputeConfig(str(data), str(work / "teachers"), str(work / "cache.h5"), random_views=1,
                                           layers=("layer4",), batch_size=32, device="cpu", progress=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flips", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="cache file to test (default: build a small one)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bitflips_"))
    path = Path(args.cache) if args.cache else _build_small_cache(work)
    t0 = time.time()
    random = campaign(path, args.flips, args.seed, work=work)
    nodes = campaign(path, 0, args.seed, offsets=index_node_offsets(path), work=work)
    print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    for name, c in (("random single-bit flips", random), ("flips inside chunk-index nodes", nodes)):
        n = c["caught"] + c["harmless"] + c["silent"]
        print(f"{name:<32} {n:5d}: caught {c['caught']}, harmless (nothing read back changed) "
              f"{c['harmless']}, SILENT {c['silent']}" + (f" at {c['silent_offsets'][:10]}" if c["silent"] else ""))
    print(f"({time.time() - t0:.0f} s)")
    return 1 if random["silent"] or nodes["silent"] else 0


if __name__ == "__main__":
    sys.exit(main())
