"""Distillation from the cache: ResNet-18 student, AGRE-KD / AVER weighting, feature losses.

``fit(cfg)`` reads like the algorithm box: for each epoch, for each batch, rebuild the sampled
view of each image from the image store, read the matching cached teacher outputs, weight the
teachers, take one SGD step on ``(1 - alpha) CE + alpha L_wKD + gamma L_feat``. No teacher runs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.metrics import group_metrics, split_metrics
from data.store import ImageStore, StoreError
from data.views import render
from data.waterbirds import SPLIT_CODES, fingerprint, load_metadata
from distill.config import DistillConfig
from distill.losses import distillation_loss
from distill.student import Student
from distill.weighting import kd_per_teacher, teacher_weights
from precompute.cache import CacheError, open_cache, provenance
from precompute.models import save_checkpoint
from precompute.run import store_path_for
from runtime import autocast, pick_device


class DistillError(Exception):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class SplitData:
    """Everything one split needs, as tensors on one device (rows in cache order)."""

    images: torch.Tensor      # [N, 3, S, S] uint8
    y: torch.Tensor           # [N]
    group: torch.Tensor       # [N]
    box: torch.Tensor         # [N, V, 4]
    flip: torch.Tensor        # [N, V]
    logits: torch.Tensor | None = None    # [N, V, T, C]
    biased: torch.Tensor | None = None    # [N, V, C]
    cached: torch.Tensor | None = None    # [N, V, T]
    feats: dict | None = None             # {layer: [N, V, B, D] float16}


def _open_inputs(cfg: DistillConfig):
    if not Path(cfg.cache).is_file():
        raise DistillError(f"no cache at {cfg.cache}; make one with `python cli.py precompute`")
    try:
        cache = open_cache(cfg.cache)
    except CacheError as e:
        raise DistillError(str(e)) from None
    meta = cache.meta
    if cache.shard:
        raise DistillError(f"{cfg.cache} is shard {cache.shard} of a cache; merge the shards first with "
                           "`python cli.py cache merge CACHE.h5 SHARD...`")
    empty = [name for name in ("train", "val", "test") if len(cache.split_rows(name)) == 0]
    if empty:
        raise DistillError(f"{cfg.cache} has no {' or '.join(empty)} samples; distillation needs all three splits")
    if cfg.uses_features:
        missing = [l for l, g in cfg.gammas.items() if g > 0 and l not in meta.layers]
        if missing:
            raise DistillError(f"gamma > 0 for {', '.join(missing)} but {cfg.cache} holds features of "
                               f"{', '.join(meta.layers) or 'no layer'}; precompute with --layers "
                               f"{','.join(sorted(set(meta.layers) | set(missing)))} or set gamma 0")
    if cfg.views and meta.num_views < 2:
        raise DistillError(f"--views on, but {cfg.cache} holds only the eval view; precompute with "
                           "--views K (K > 0) or pass --views off")
    if cfg.data_root is not None:
        folder_fp = fingerprint(load_metadata(cfg.data_root))
        if folder_fp != meta.dataset_fingerprint:
            raise DistillError(f"{cfg.cache} was made from another data set than {cfg.data_root} "
                               f"(fingerprints {meta.dataset_fingerprint[:12]} vs {folder_fp[:12]})")
    try:
        store = ImageStore(store_path_for(cfg.cache), meta.dataset_fingerprint, int(meta.view_spec["store_size"]))
    except StoreError as e:
        raise DistillError(f"the image store of {cfg.cache} does not match it: {e}") from None
    return cache, store


def _load_split(cache, store: ImageStore, split: str, cfg: DistillConfig, device, train: bool) -> SplitData:
    layers = [l for l, g in cfg.gammas.items() if g > 0] if train else []
    d = cache.load_all(split=split, views=None if train else 0, layers=layers)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    box, flip = d["box"], d["flip"]
    if not train:  # one view: keep the [N, V] layout with V = 1
        box, flip = box.reshape(len(box), 1, 4), flip.reshape(len(flip), 1)
    data = SplitData(images=t(store.load(d["rows"] + cache.row_start)), y=t(d["y"]), group=t(d["group"]),
                     box=t(box), flip=t(flip))
    if train:
        data.logits, data.biased, data.cached = t(d["logits"]), t(d["biased"]), t(d["weights"])
        data.feats = {l: t(v) for l, v in d["features"].items()}
    return data


def _placement(device: torch.device, nbytes: int) -> torch.device:
    """Keep the data on the GPU when it fits comfortably, else in host memory."""
    if device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: Student, data: SplitData, image_size: int, device, train_counts, batch_size: int = 512) -> dict:
    """Group metrics of the student on view 0 of a split."""
    model.eval()
    preds = []
    for s in range(0, len(data.y), batch_size):
        x = render(data.images[s:s + batch_size].to(device), data.box[s:s + batch_size, 0],
                   data.flip[s:s + batch_size, 0], image_size)
        with autocast(device):
            logits, _, _ = model(x.contiguous(memory_format=torch.channels_last))
        preds.append(logits.argmax(1))
    return group_metrics(torch.cat(preds), data.y, data.group, train_counts)


def train_step(model, opt, data: SplitData, idx: torch.Tensor, view: torch.Tensor, cfg: DistillConfig,
               image_size: int, teacher_backbone: torch.Tensor, device) -> tuple[dict, torch.Tensor]:
    """One SGD step on the samples ``idx`` seen through views ``view``.

    Rebuilds each sampled view from the stored pixels, reads the matching cached teacher outputs,
    weights the teachers, and steps on ``(1 - alpha) CE + alpha L_wKD + sum_l gamma_l L_feat``.
    Returns the loss parts (device tensors, no host sync) and the weights [b, T].
    """
    x = render(data.images[idx].to(device, non_blocking=True), data.box[idx, view].to(device),
               data.flip[idx, view].to(device), image_size)
    y = data.y[idx].to(device)
    zt, zb = data.logits[idx, view].to(device), data.biased[idx, view].to(device)
    with autocast(device):
        logits, h, projected = model(x.contiguous(memory_format=torch.channels_last))
    logits = logits.float()
    gammas = {l: g for l, g in cfg.gammas.items() if g > 0}
    extra = {}
    if cfg.weighting == "agre-batch" and cfg.agre_params == "all":
        extra = dict(teacher_losses=list(kd_per_teacher(logits, zt, cfg.tau).mean(0)),
                     biased_loss=kd_per_teacher(logits, zb[:, None], cfg.tau).mean(),
                     params=[p for p in model.backbone.parameters() if p.requires_grad])
    cached = data.cached[idx, view].to(device) if cfg.weighting == "cached" else None
    w = teacher_weights(cfg.weighting, student_logits=logits, teacher_logits=zt, biased_logits=zb,
                        tau=cfg.tau, cached=cached, penultimate=h.float(), agre_params=cfg.agre_params, **extra)
    tfeats = {l: data.feats[l][idx, view].to(device).index_select(1, teacher_backbone) for l in gammas}
    out = distillation_loss(logits, y, zt, w, cfg.tau, cfg.alpha, projected=projected, teacher_feats=tfeats,
                            gammas=gammas, disagree=cfg.feature_weighting == "disagree", eps=cfg.feat_eps)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out, w


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch (start, stop) pairs; a last batch of one sample joins the previous one (BatchNorm
    cannot normalise a single sample when layer4 is 1x1)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def train_one_epoch(model, opt, data: SplitData, cfg: DistillConfig, epoch: int, image_size: int,
                    teacher_backbone: torch.Tensor, device, weights_out: torch.Tensor | None = None,
                    progress: bool = True) -> dict:
    """One pass over the training split. Returns mean loss parts and mean teacher weights."""
    model.train()
    n, num_views = len(data.y), data.box.shape[1]
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)   # replayable: exact resume
    order = torch.randperm(n, generator=gen)
    use_views = num_views > 1 if cfg.views is None else cfg.views   # None: whatever the cache holds
    view = (torch.randint(1, num_views, (n,), generator=gen) if use_views else torch.zeros(n, dtype=torch.long))
    order, view = order.to(data.y.device), view.to(data.y.device)   # once per epoch, not per step
    sums = {k: torch.zeros((), device=device) for k in ("loss", "ce", "kd", "feat")}
    wsum = torch.zeros(data.logits.shape[2], device=device)
    first_bad = torch.full((), -1, device=device)
    for step, (s, e) in enumerate(tqdm(batch_bounds(n, cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                       leave=False, disable=not progress)):
        idx = order[s:e]
        out, w = train_step(model, opt, data, idx, view[s:e], cfg, image_size, teacher_backbone, device)
        bad = ~torch.isfinite(out["loss"].detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        for k in sums:
            sums[k] += out[k].detach().float() * len(idx)
        wsum += w.detach().float().sum(0)
        if weights_out is not None:
            weights_out[idx.to(weights_out.device)] = w.detach().float().to(weights_out.device)
    if int(first_bad) >= 0:  # one host sync per epoch
        kept = f"the last good checkpoint (epoch {epoch}) is kept in {cfg.out}" if epoch else "no epoch finished"
        raise DistillError(f"non-finite loss at epoch {epoch + 1}, step {int(first_bad) + 1}; stopped: "
                           f"{kept}. Try a lower --lr")
    return {**{k: float(v) / n for k, v in sums.items()}, "teacher_weights": (wsum / n).tolist()}


def _checkpoint(model, opt, sched, epoch, best, cfg, cache_fp) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "best_wga": best[0], "best_epoch": best[1], "config": cfg.to_dict(),
            "cache_fingerprint": cache_fp}


# Settings that may change between a run and its resumption without changing what it computes.
RESUME_FREE = ("out", "device", "cache", "data_root")


def _load_resume(path: Path, cfg: DistillConfig, cache_fp: str, device) -> dict:
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise DistillError(f"{path} cannot be read ({type(e).__name__}); delete the run folder to start again") from None
    saved = ck.get("config", {})
    now = cfg.to_dict()
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
            if k not in RESUME_FREE and _norm(saved.get(k)) != _norm(now[k])]
    if ck.get("cache_fingerprint", cache_fp) != cache_fp:
        diff.append("the cache was made from another data set")
    if diff:
        raise DistillError(f"cannot resume {path.parent} with other settings ({'; '.join(diff)}); "
                           "use the same options or another --out")
    return ck


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def fit(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train one run into ``cfg.out``; returns the summary (also written to summary.json)."""
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if out.exists() and any(out.iterdir()) and not resume:
        if (out / "summary.json").is_file() or last_path.is_file():
            raise DistillError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cache, store = _open_inputs(cfg)
    meta = cache.meta
    device = pick_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: autotune once
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    image_size = cfg.image_size or int(meta.view_spec["out_size"])
    pretrained = cfg.pretrained if cfg.pretrained is not None else bool(meta.view_spec.get("teachers_pretrained", False))
    say = tqdm.write if progress else (lambda *_: None)

    nbytes = store.size ** 2 * 3 * cache.num_rows + sum(
        meta.num_views * meta.num_backbones * d * 2 * cache.num_rows for l, d in meta.feature_dims.items() if cfg.gammas.get(l, 0) > 0)
    place = _placement(device, nbytes)
    train = _load_split(cache, store, "train", cfg, place, train=True)
    val = _load_split(cache, store, "val", cfg, place, train=False)
    test = _load_split(cache, store, "test", cfg, place, train=False)
    train_counts = torch.bincount(train.group.cpu(), minlength=4).numpy()
    teacher_backbone = torch.tensor(meta.backbone_of_teacher, device=device)

    dims = {l: meta.feature_dims[l] for l, g in cfg.gammas.items() if g > 0}
    model = Student(meta.num_classes, dims, pretrained, cfg.weights_file).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    start, best = 0, (-1.0, -1)
    if resume and last_path.is_file():
        ck = _load_resume(last_path, cfg, meta.dataset_fingerprint, device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, best = int(ck["epoch"]), (float(ck["best_wga"]), int(ck["best_epoch"]))
        say(f"resuming {out} after epoch {start}")
    cfg.save(out / "config.json")
    _truncate_metrics(out / "metrics.jsonl", start)

    weights_out = torch.zeros(len(train.y), train.logits.shape[2], device=place)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]
        tr = train_one_epoch(model, opt, train, cfg, epoch, image_size, teacher_backbone, device,
                             weights_out if epoch == cfg.epochs - 1 else None, progress)
        sched.step()
        vm = evaluate(model, val, image_size, device, train_counts)
        if vm["wga"] > best[0]:
            best = (vm["wga"], epoch + 1)
            save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict()}, best_path)
        save_checkpoint(_checkpoint(model, opt, sched, epoch + 1, best, cfg, meta.dataset_fingerprint), last_path)
        rec = {"epoch": epoch + 1, "lr": lr, "time_s": round(time.time() - t0, 3),
               "train": {k: tr[k] for k in ("loss", "ce", "kd", "feat")},
               "teacher_weights": tr["teacher_weights"], "val": vm}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        say(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {tr['loss']:.4f}  val WGA {100 * vm['wga']:.2f}  "
            f"avg {100 * vm['avg_acc']:.2f}  ({rec['time_s']:.1f}s)")

    if start < cfg.epochs:  # the last epoch ran in this process (else the saved file stands)
        np.save(out / "teacher_weights.npy", weights_out.cpu().numpy())
    test_last = evaluate(model, test, image_size, device, train_counts)
    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
    summary = {
        "status": "finished", "config": cfg.to_dict(), "cache_fingerprint": meta.dataset_fingerprint,
        "cache": str(cfg.cache), "git_commit": provenance()["git_commit"],
        "teachers": [{"name": t["name"], "role": t["role"]} for t in meta.teachers],
        "best_epoch": best[1], "val_best": None, "test_best": evaluate(model, test, image_size, device, train_counts),
        "test_last": test_last, "teacher_test": teacher_test_metrics(cache),
    }
    summary["val_best"] = evaluate(model, val, image_size, device, train_counts)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    return summary


def teacher_test_metrics(cache) -> dict:
    """Each teacher's (and the biased model's) own test metrics, from cached view-0 logits."""
    rows = np.arange(cache.num_rows)
    views = np.zeros(len(rows), dtype=np.int64)
    zt, zb = cache.logits(rows, views), cache.biased(rows, views)
    names = [t["name"] for t in cache.meta.teacher_entries] + [cache.meta.biased_entry["name"]]
    preds = list(zt.argmax(-1).T) + [zb.argmax(-1)]
    test = {"test": SPLIT_CODES["test"]}
    return {n: split_metrics(p, cache.y, cache.group, cache.split, test)["test"] for n, p in zip(names, preds)}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    # A kill between the checkpoint and the metrics line (or after it) must not duplicate epochs.
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    path.write_text("".join(l + "\n" for l in keep))
