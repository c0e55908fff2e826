"""Distillation from the cache: the training step, the epoch loop and ``fit``.

``fit(cfg)`` reads like the algorithm box: for each epoch, for each batch, rebuild the sampled
view of each image from the image store, read the matching cached teacher outputs, weight the
teachers, take one SGD step on ``(1 - alpha) CE + alpha L_wKD + gamma L_feat``. No teacher runs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.info import memory_needed
from cache.reader import CacheReader
from core.distributed import Dist, context, global_batch_norm
from core.files import (OutputLock, atomic_save_npy, atomic_write_json, ensure_dir, read_json_object,
                        read_jsonl)
from core.provenance import provenance
from core.runtime import autocast, memory_format_for, pick_device
from data.folders import SPLIT_CODES
from data.metrics import group_metrics, split_metrics
from data.views import render
from distill.checkpoint import (SELECT_KEY, check_same_run, load_for_resume, oracle, save_best, save_last,
                                selection_epochs, selection_score, trim_checkpoints, truncate_metrics)
from distill.config import BEST, CONFIG, LAST, METRICS, RUN_FILES, SUMMARY, WEIGHTS, DistillConfig
from distill.data import Batches, DistillError, InMemorySplit, Slots, load_split, open_inputs, data_device
from distill.stream import StreamedSplit, should_stream
from distill.student import Student
from distill.task import DistillTask
from distill.teachers import teacher_source
from distill.tracking import open_tracker


@torch.no_grad()
def evaluate(model: Student, split, image_size: int, device, train_counts, batch_size: int = 512) -> dict:
    """Group metrics of the student on view 0 of a split (in memory or streamed), ECE included:
    the softmax of the logits in float32, the prediction its argmax."""
    model.eval()
    probs = []
    for data in split.chunks():
        for s in range(0, len(data.y), batch_size):
            x = render(data.images[s:s + batch_size].to(device), data.view.box[s:s + batch_size],
                       data.view.flip[s:s + batch_size], image_size)
            with autocast(device):
                logits, _, _ = model(x.contiguous(memory_format=memory_format_for(device)))
            probs.append(torch.softmax(logits.float(), 1).cpu())
    p = torch.cat(probs)
    return group_metrics(p.argmax(1), split.y, split.group, train_counts, probs=p)


def train_one_epoch(model, step, batches: Batches, epoch: int, dist: Dist = Dist(),
                    weights_out: torch.Tensor | None = None, progress: bool = False) -> dict:
    """One epoch: ``out = step(batch)`` on every batch of ``batches.epoch(epoch)`` (``step``: one
    optimiser step, :meth:`distill.task.DistillTask.step` on the model). Returns the mean loss
    parts and mean teacher weights, and ``"non_finite"``: None, or (the first step whose loss was
    not finite, whether that batch's teacher outputs were not); ``weights_out`` [N, T], when
    given, receives each row's weights.

    Under torchrun every process walks the same global batches and trains on its share of each
    (every ``world``-th row); the sums are gathered at the end of the epoch."""
    model.train()
    device, n = batches.device, len(batches.split)
    sums = {k: torch.zeros((), device=device) for k in ("loss", "ce", "kd", "feat")}
    agree = {}  # {parameter set: {measure: float64 sum}}, with agre_compare
    zero64 = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
    wsum = torch.zeros(batches.num_teachers, device=device)
    first_bad = torch.full((), -1, device=device)
    bad_inputs = torch.zeros((), dtype=torch.bool, device=device)
    for i, batch in enumerate(tqdm(batches.epoch(epoch), total=len(batches), leave=False,
                                   desc=f"epoch {epoch + 1}/{batches.epochs}", disable=not progress)):
        out = step(batch)
        bad = ~torch.isfinite(out["loss"].detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        bad_inputs |= bad & ~(torch.isfinite(batch.teacher_logits).all()
                              & torch.isfinite(batch.biased_logits).all())
        for k in sums:
            sums[k] += out[k].detach().float() * len(batch.y)
        w = out["weights"].float()
        wsum += w.sum(0)
        for name, parts in out.get("agre_compare", {}).items():
            acc = agree.setdefault(name, {k: zero64() for k in parts})
            for k, value in parts.items():
                acc[k] += value
        if weights_out is not None:
            weights_out[batch.positions.to(weights_out.device)] = w.to(weights_out.device)
    bad_anywhere = (first_bad >= 0).to(wsum.dtype).reshape(1)
    dist.all_sum([*sums.values(), wsum, bad_anywhere])  # per-step agreement is already global
    # one host sync per epoch
    non_finite = (int(first_bad), bool(bad_inputs)) if int(bad_anywhere) > 0 else None
    result = {**{k: float(v) / n for k, v in sums.items()}, "teacher_weights": (wsum / n).tolist(),
              "non_finite": non_finite}
    if agree:  # per-step means: how a cheaper parameter set's weights agree with this run's
        result["agre_agreement"] = {name: {k: float(v) / len(batches) for k, v in parts.items()}
                                    for name, parts in agree.items()}
    return result


def _non_finite_message(cfg: DistillConfig, epoch: int, first_bad: int, bad_inputs: bool) -> str:
    """What a user reads when a loss turned NaN or inf: where, what was kept, the likely cause."""
    kept = f"the last good checkpoint (epoch {epoch}) is kept in {cfg.out}" if epoch else "no epoch finished"
    where = f", step {first_bad + 1}" if first_bad >= 0 else ""
    if bad_inputs:
        source = f"the teachers of {cfg.teachers_online}" if cfg.teachers_online else f"the cache {cfg.cache}"
        cause = (f"the teacher outputs of that batch are not finite: {source} produce NaN or inf "
                 "(check the teachers' weights, or run `python cli.py cache verify` on the cache)")
    else:
        cause = ("the teacher outputs were finite, so the optimisation diverged: "
                 f"try a lower --lr (now {cfg.lr:g})")
    return f"non-finite loss at epoch {epoch + 1}{where}; stopped: {kept}. Cause: {cause}"


def schedule(opt, cfg: DistillConfig):
    """Cosine decay over the epochs (the study's schedule), after ``warmup_epochs`` epochs of
    linear warm-up (lr x 1/(W+1), ..., W/(W+1)) when asked; stepped once per epoch."""
    if not cfg.warmup_epochs:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    W, E = cfg.warmup_epochs, cfg.epochs

    def factor(e: int) -> float:
        return (e + 1) / (W + 1) if e < W else 0.5 * (1 + math.cos(math.pi * (e - W) / (E - W)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(cfg: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train one run into ``cfg.out``; returns the summary (also written to summary.json).

    ``resume``: continue the run in ``cfg.out`` from its last finished epoch (a finished run is
    returned as it is); ``overwrite``: delete the run there first. Either way the folder's run
    must have been made with the same settings from the same cache, or it is refused.
    """
    out = Path(cfg.out)
    dist = context(pick_device(cfg.device).type)
    existing = [f for f in RUN_FILES if (out / f).exists()]  # seen alike by every process
    # A finished run of these settings is a result, not an obstacle (as make treats a built target):
    # _fit checks that it is this run and returns its summary. An unfinished one needs a decision.
    finished = (SUMMARY in existing
                and (read_json_object(out / SUMMARY) or {}).get("status") == "finished")
    if existing and not (resume or overwrite or finished):
        raise DistillError(f"{out} already holds an unfinished run; pass --resume to continue it, "
                           "--overwrite to start it again, or choose another --out")
    dist.barrier()
    ensure_dir(out, "run folder")
    with OutputLock(out, "the run folder") if dist.is_main else contextlib.nullcontext():
        if existing and overwrite and dist.is_main:
            for f in existing:
                (out / f).unlink()
        dist.barrier()
        return _fit(cfg, out, progress and dist.is_main, dist)


def _fit(cfg: DistillConfig, out: Path, progress: bool, dist: Dist) -> dict:
    last_path, best_path = out / LAST, out / BEST
    cache, store = open_inputs(cfg)
    meta = cache.meta
    cache_id = meta.identity_digest()
    say = tqdm.write if progress else (lambda *_: None)
    done = read_json_object(out / SUMMARY)
    if done and done.get("status") == "finished":
        check_same_run(out, done.get("config", {}), done.get("cache_identity"), cfg, cache_id)
        say(f"{out} already holds this run, finished (same settings, same cache): its result")
        return done
    device = pick_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input size: autotune once
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    image_size = cfg.image_size or meta.out_size
    pretrained = cfg.pretrained if cfg.pretrained is not None else meta.teachers_pretrained

    footprint = memory_needed(cache, store, cfg.needs.layers, cfg.teachers_online is not None)
    nbytes = footprint["held"]["total"]
    if should_stream(cfg, nbytes):
        say(f"streaming the images from {store.path} "
            f"({nbytes / 2**30:.1f} GiB would not fit comfortably in memory)")
        place = data_device(device, footprint["held"]["teacher_outputs"])
        train, val, test = (StreamedSplit(cache, store, s, device) for s in ("train", "val", "test"))
    else:
        place = data_device(device, nbytes)
        train, val, test = (InMemorySplit(load_split(cache, store, s, place))
                            for s in ("train", "val", "test"))
    train_counts = torch.bincount(train.group.cpu(), minlength=meta.num_groups).numpy()
    teachers = teacher_source(meta, cfg, image_size, device)
    slots = Slots(cache, cfg.needs, place, sample_views=cfg.sample_views, epochs=cfg.epochs)
    batches = Batches(train, slots, teachers, image_size, device, seed=cfg.seed, batch_size=cfg.batch_size,
                      epochs=cfg.epochs, dist=dist)
    task = DistillTask(cfg, teachers, device, dist)

    model = Student(meta.num_classes, {l: teachers.feature_dims[l] for l in cfg.active_layers}, pretrained,
                    cfg.weights_file, arch=cfg.student_arch)
    if dist.active:  # statistics of the global batch, as one process holding it would compute
        model = global_batch_norm(model)
    model = model.to(device).to(memory_format=memory_format_for(device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = schedule(opt, cfg)
    start, best = 0, (-math.inf, -1)  # the selection rule's best score and its epoch
    if last_path.is_file():
        ck = load_for_resume(last_path, cfg, cache_id, device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        score = ck.get("best_score", ck.get("best_wga"))  # best_wga: checkpoints of earlier versions
        start, best = int(ck["epoch"]), (float(score), int(ck["best_epoch"]))
        say(f"resuming {out} after epoch {start}")
    if dist.is_main:
        cfg.save(out / CONFIG)
        truncate_metrics(out / METRICS, start)

    teacher_names = [t["name"] for t in teachers.names if t["role"] != "biased"]
    names = {"group_acc": meta.group_names, "group_count": meta.group_names, "teacher_weights": teacher_names}
    tracker = open_tracker(cfg, out, dist.is_main, names, start)  # TensorBoard / W&B when asked, rank 0 only
    try:
        weights_out = torch.zeros(len(train.y), batches.num_teachers, device=device)
        step = functools.partial(task.step, model, opt)
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            lr = opt.param_groups[0]["lr"]
            last = epoch == cfg.epochs - 1
            tr = train_one_epoch(model, step, batches, epoch, dist, weights_out if last else None, progress)
            if tr["non_finite"] is not None:
                raise DistillError(_non_finite_message(cfg, epoch, *tr["non_finite"]))
            if last:
                dist.all_sum([weights_out])  # each process filled the rows it trained on
            sched.step()
            if not dist.is_main:  # one process evaluates and writes; the models are the same everywhere
                continue
            vm = evaluate(model, val, image_size, device, train_counts)
            score = selection_score(cfg.select, vm, epoch + 1)
            if score > best[0]:
                best = (score, epoch + 1)
                save_best(best_path, model, epoch + 1, cfg)
            if last:  # before the checkpoint that makes a resume skip this epoch
                atomic_save_npy(out / WEIGHTS, weights_out.cpu().numpy())
            save_last(last_path, model, opt, sched, epoch + 1, best, cfg, cache_id)
            time_s = round(time.time() - t0, 3)  # training and validation, as before the oracle's test pass
            # every epoch's test metrics: the oracle diagnostic (summary "oracle"), never a selection
            rec = {"epoch": epoch + 1, "lr": lr, "time_s": time_s,
                   "train": {k: tr[k] for k in ("loss", "ce", "kd", "feat")},
                   "teacher_weights": tr["teacher_weights"], "val": vm,
                   "test": evaluate(model, test, image_size, device, train_counts),
                   **({"agre_agreement": tr["agre_agreement"]} if "agre_agreement" in tr else {})}
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(rec) + "\n")
            tracker.log_epoch(rec)  # the same numbers as the metrics.jsonl line
            say(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {tr['loss']:.4f}  val WGA {100 * vm['wga']:.2f}  "
                f"avg {_avg(vm)}  ({rec['time_s']:.1f}s)")

        batches.close()
        if not dist.is_main:
            dist.barrier()
            return dist.broadcast_object(None)
        history = read_jsonl(out / METRICS)
        last_line = history[-1] if history else {}
        # the last epoch's test metrics, as its line holds them (evaluated again only when a kill
        # between its checkpoint and its line left the line out)
        test_last = last_line["test"] if last_line.get("epoch") == cfg.epochs and "test" in last_line \
            else evaluate(model, test, image_size, device, train_counts)
        teachers_own = teacher_metrics(cache, ("val", "test"))
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
        summary = {
            "status": "finished", "config": cfg.to_dict(), "cache_fingerprint": meta.dataset_fingerprint,
            "cache_identity": cache_id, "cache": str(cfg.cache), "git_commit": provenance()["git_commit"],
            "group_names": meta.group_names,
            "teachers": teachers.names,
            "best_epoch": best[1],
            "select": {"rule": cfg.select, "epoch": best[1], "metric": SELECT_KEY[cfg.select],
                       "value": best[0]},
            "selection_epochs": selection_epochs(history), "oracle": oracle(history),
            "val_best": evaluate(model, val, image_size, device, train_counts),
            "test_best": evaluate(model, test, image_size, device, train_counts),
            "test_last": test_last, "teacher_test": teachers_own["test"], "teacher_val": teachers_own["val"],
        }
        if teachers.erase is not None:  # how much of the attribute is left (the run's own erasers)
            from distill.erasure import probe_attribute
            summary["attribute_probe"] = probe_attribute(cache, cfg.active_layers,
                                                         erasers=teachers.erase.erasers)
        atomic_write_json(out / SUMMARY, summary)
    except BaseException:
        tracker.close()
        raise
    tracker.finish(summary)
    trim_checkpoints(out, cfg.keep_checkpoints)
    dist.barrier()
    return dist.broadcast_object(summary)


def _avg(metrics: dict) -> str:
    return "n/a" if metrics["avg_acc"] is None else f"{100 * metrics['avg_acc']:.2f}"


def teacher_metrics(cache: CacheReader, splits=("test",)) -> dict:
    """Each teacher's (and the biased model's) own metrics on each of ``splits`` (``{split:
    {model: metrics}}``), from cached view-0 logits, read once."""
    # every row: avg acc weights by the training split's groups
    rows = cache.read_eval(fields=("logits", "biased"))
    names = [t["name"] for t in cache.meta.teacher_entries] + [cache.meta.biased_entry["name"]]
    logits = [np.asarray(rows["logits"])[:, t] for t in range(len(names) - 1)] + [np.asarray(rows["biased"])]
    wanted = {split: SPLIT_CODES[split] for split in splits}
    out = {split: {} for split in splits}
    for n, z in zip(names, logits):
        p = _softmax(z)
        per_split = split_metrics(p.argmax(-1), rows["y"], rows["group"], rows["split"], wanted,
                                  cache.meta.num_groups, probs=p)
        for split in splits:
            out[split][n] = per_split[split]
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

