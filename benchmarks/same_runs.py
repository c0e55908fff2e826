"""Did a refactor move any number? Twelve small distillation runs, each reduced to one digest.

Builds a tiny synthetic cache (or takes --cache and --manifest), trains twelve configurations for
two epochs on the CPU with one thread (every weighting, parameter set, feature option, the
online teachers, streaming), and digests what each run leaves: metrics.jsonl without its times,
the final epoch's per-row teacher weights and the best and last checkpoints' tensors. Run it before and
after a change and compare:

    OMP_NUM_THREADS=1 python benchmarks/same_runs.py --write before.json      # on the old commit
    OMP_NUM_THREADS=1 python benchmarks/same_runs.py --compare before.json    # on the new one

Exit status 1 when any digest differs (the differing runs are named).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "aver": dict(weighting="aver"),
    "aver-g0.5-l3l4-disagree": dict(weighting="aver", gamma=0.5, layers=("layer3", "layer4"),
                                    feature_weighting="disagree"),
    "agre-g0.5": dict(weighting="agre", gamma=0.5),
    "batch-all": dict(weighting="agre-batch"),
    "batch-all-g0.5-a0.9": dict(weighting="agre-batch", gamma=0.5, alpha=0.9),
    "batch-layer4-g0.5": dict(weighting="agre-batch", agre_params="layer4", gamma=0.5),
    "batch-last": dict(weighting="agre-batch", agre_params="last"),
    "cached-g0.5": dict(weighting="cached", gamma=0.5),
    "batch-all-compare-eval-view": dict(weighting="agre-batch", gamma=0.5, agre_compare=("last",),
                                        sample_views=False),
    "batch-all-g0.5-stream": dict(weighting="agre-batch", gamma=0.5, data_mode="stream"),
    "batch-all-g0.5-online": dict(weighting="agre-batch", gamma=0.5, online=True),
    "aver-g0.5-warmup-select": dict(weighting="aver", gamma=0.5, warmup_epochs=1, select="val-avg"),
}


def digest_run(folder: Path) -> str:
    """sha256 of a run's metrics (times dropped), per-row weights and best and last weights."""
    import numpy as np
    import torch

    h = hashlib.sha256()
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time_s", None)
        h.update(json.dumps(rec, sort_keys=True).encode())
    from distill.config import BEST, LAST, WEIGHTS

    h.update(np.load(folder / WEIGHTS).tobytes())
    for checkpoint in (BEST, LAST):
        state = torch.load(folder / checkpoint, map_location="cpu", weights_only=True)["model"]
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].numpy().tobytes())
    return h.hexdigest()


def run_all(cache: Path, manifest: Path, out: Path, configs: dict = CONFIGS, **common) -> dict[str, str]:
    """The digest of each run of ``configs`` ({name: DistillConfig settings, ``online`` for the
    live teachers of ``manifest``}) on ``cache``, trained in ``out``; ``common``: settings of all."""
    from distill.config import DistillConfig
    from distill.train import fit

    digests = {}
    for name, kw in configs.items():
        kw = {**common, **kw}
        online = kw.pop("online", False)
        kw = {"epochs": 2, "batch_size": 32, "lr": 1e-2, **kw}
        cfg = DistillConfig(cache=str(cache), out=str(out / name), device="cpu", pretrained=False,
                            keep_checkpoints="last", teachers_online=str(manifest) if online else None, **kw)
        fit(cfg, progress=False)
        digests[name] = digest_run(out / name)
        print(f"{name:<30} {digests[name][:16]}", flush=True)
    return digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="a cache with 2+ random views and layer3/layer4 (default: a tiny one)")
    ap.add_argument("--manifest", help="the cache's teacher manifest (for the online run)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="write the digests to this JSON file")
    group.add_argument("--compare", help="compare with the digests in this JSON file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            cache, manifest = Path(args.cache), Path(args.manifest)
        else:
            from trace_step import tiny_cache  # noqa: E402 (benchmarks/ is on sys.path when run)
            cache, manifest = tiny_cache(Path(tmp))
        digests = run_all(cache, manifest, Path(tmp) / "runs")
    if args.write:
        Path(args.write).write_text(json.dumps(digests, indent=1) + "\n")
        return
    before = json.loads(Path(args.compare).read_text())
    moved = [k for k in CONFIGS if before.get(k) != digests[k]]
    said = f"; moved: {', '.join(moved)}" if moved else ""
    print(f"{len(CONFIGS) - len(moved)} of {len(CONFIGS)} runs bit-identical{said}")
    sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
