"""Study: which DFR protocol ("reference", "study", formerly "report", "tool") should the teachers use by default?

For each of two synthetic data sets (``data.synth``), train ONE small from-scratch ERM backbone
with the tool's own ``precompute.teachers.train_erm``, extract eval-view penultimate embeddings of
every split with ``precompute.teachers.embed``, then fit a DFR head with each variant of
``precompute.dfr.fit_dfr`` on the validation embeddings for several seeds and score it on the test
split. Prints, per data set and variant: test worst-group accuracy (WGA) and mean accuracy as
mean +- std over the seeds, the C values chosen, and seconds per fit; plus the ERM head as the
biased baseline. The backbone is fixed per data set, so the spread is the DFR seeds' alone; the
backbone itself changes with --threads (float summation order), and the tables with it.

    python benchmarks/study_dfr.py [--seeds 5] [--epochs 3] [--image-size 32] [--scale 0.25]
                                   [--threads 1] [--workdir DIR]

About 3-4 minutes on 2 shared CPU cores with the defaults (a --workdir is reused: data and
ERM checkpoints found there are not rebuilt).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models import build_model  # noqa: E402
from core.runtime import cpu_model, pick_device  # noqa: E402
from core.tables import format_table  # noqa: E402
from data.folders import fingerprint, load_metadata  # noqa: E402
from data.metrics import group_metrics  # noqa: E402
from data.store import ImageStore, build_store, store_size_for  # noqa: E402
from data.synth import SynthSpec, generate  # noqa: E402
from data.views import ViewSpec, sample_views  # noqa: E402
from precompute.dfr import DEFAULT_NUM_RETRAINS, DFR_VARIANTS, apply_head, fit_dfr  # noqa: E402
from precompute.teachers import TeacherConfig, embed, train_erm  # noqa: E402

DATASETS = {
    "synth-default": SynthSpec(),
    "synth-noisy-core": SynthSpec(seed=1, core_noise=0.05),
}


def split_embeddings(data_root: Path, work: Path, cfg: TeacherConfig) -> tuple[dict, dict, dict]:
    """ERM backbone (seed 0) on ``data_root``.

    Returns ({split: (emb, y, group)}, ERM test metrics, {phase: seconds}).
    """
    secs, t0 = {}, time.perf_counter()
    meta = load_metadata(data_root)
    fp = fingerprint(meta)
    size = store_size_for(cfg.image_size)
    store = build_store(meta, work / f"images_{size}px.h5", size, fp, progress=False)
    images = torch.from_numpy(ImageStore(store, fp, size).load_all())
    secs["store"], t0 = time.perf_counter() - t0, time.perf_counter()
    state = train_erm(cfg, 0, images, meta, work / "erm_seed0.pt", meta.num_classes)
    secs["ERM"], t0 = time.perf_counter() - t0, time.perf_counter()
    model = build_model(cfg.arch, meta.num_classes)
    model.net.load_state_dict(state)
    box, flip = sample_views(np.arange(len(meta)), ViewSpec(random_views=0))
    logits, emb = embed(model, images, box[:, 0], flip[:, 0], cfg.image_size, pick_device(cfg.device))
    secs["embed"] = time.perf_counter() - t0
    emb, group = emb.numpy(), meta.group
    splits = {s: (emb[meta.rows(s)], meta.y[meta.rows(s)], group[meta.rows(s)]) for s in ("train", "val", "test")}
    test = meta.rows("test")
    erm = group_metrics(logits[test].argmax(1).numpy(), meta.y[test], group[test], num_groups=meta.num_groups)
    return splits, erm, secs


def score_variants(splits: dict, seeds: int, retrains: int) -> list[dict]:
    """Fit every variant with seeds 0..seeds-1; one dict per variant.

    Keys: "wga"/"acc" (test, one per seed), "C", "sec" (per fit), "unconverged" (fits that raised
    scikit-learn's ConvergenceWarning, e.g. the study's lbfgs stopping at max_iter=100).
    """
    (train_emb, _, _), val, (test_emb, test_y, test_g) = splits["train"], splits["val"], splits["test"]
    results = []
    for variant in DFR_VARIANTS:
        r = {"variant": variant, "wga": [], "acc": [], "C": [], "sec": [], "unconverged": 0}
        for seed in range(seeds):
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                head = fit_dfr(*val, variant=variant, train_emb=train_emb, seed=seed, num_retrains=retrains)
            r["sec"].append(time.perf_counter() - t0)
            r["unconverged"] += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            m = group_metrics(apply_head(test_emb, head).argmax(1), test_y, test_g)
            r["wga"].append(m["wga"])
            r["acc"].append(m["mean_acc"])
            r["C"].append(head.C)
        results.append(r)
    return results


def pm(values) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="DFR seeds per variant")
    ap.add_argument("--epochs", type=int, default=3, help="ERM epochs of the backbone")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--scale", type=float, default=SynthSpec.scale, help="synthetic data size (fraction of Waterbirds)")
    ap.add_argument("--retrains", type=int, default=DEFAULT_NUM_RETRAINS, help="DFR num_retrains")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (on 2 cores shared with other jobs, 2 OpenMP threads ran a "
                         "ResNet-50 training step 10x slower than 1)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="study_dfr_"))
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads; device {pick_device(args.device)}; "
          f"torch {torch.__version__}, scikit-learn {sklearn.__version__}")
    print(f"ERM: resnet50 from scratch, image_size {args.image_size}, {args.epochs} epochs, lr 1e-2, seed 0; "
          f"DFR: {args.seeds} seeds, num_retrains {args.retrains}; workdir {work}\n")
    t_start = time.perf_counter()
    for name, spec in DATASETS.items():
        spec = dataclasses.replace(spec, scale=args.scale)
        t0 = time.perf_counter()
        root = work / f"{name}-scale{args.scale:g}" / "data"
        if not (root / "metadata.csv").is_file():
            generate(root, spec)
        t_gen = time.perf_counter() - t0
        erm_dir = root.parent / f"erm-{args.epochs}ep-{args.image_size}px"  # a reused workdir: never a stale ERM
        cfg = TeacherConfig(str(root), str(erm_dir), arch="resnet50", pretrained=False,
                            image_size=args.image_size, epochs=args.epochs, lr=1e-2, shared_backbone=True,
                            device=args.device, progress=False)
        splits, erm, secs = split_embeddings(root, erm_dir, cfg)
        results = score_variants(splits, args.seeds, args.retrains)
        counts = {s: np.bincount(g, minlength=4).tolist() for s, (_, _, g) in splits.items()}
        print(f"## {name}: {spec}\ngroup counts {counts}; D = {splits['val'][0].shape[1]}; seconds: "
              f"generate {t_gen:.0f}, " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
        rows = [["ERM head (biased)", f"{100 * erm['wga']:.1f}", f"{100 * erm['mean_acc']:.1f}", "-", "-", "-"]]
        for r in results:
            chosen = ", ".join(f"{c:g} x{n}" for c, n in sorted(Counter(r["C"]).items(), reverse=True))
            rows.append([r["variant"], pm(r["wga"]), pm(r["acc"]), chosen, f"{np.mean(r['sec']):.2f}",
                         f"{r['unconverged']}/{args.seeds}"])
        print(format_table(["variant", "test WGA %", "test acc %", "chosen C (x seeds)", "s / fit",
                            "not converged"], rows))
        print()
    print(f"total wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
