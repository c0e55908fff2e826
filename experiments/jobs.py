"""Executing the runs of a sweep: one run (skip, train, record a failure), or N at once in processes.

A run is trained by ``fit(cfg)`` into ``cfg.out``; ``distill.train.fit`` holds an OutputLock on
that folder, so two processes never write one run. With ``jobs > 1`` each run trains in its own
process, started with the "spawn" method (never fork a process that has imported torch: CUDA and
torch's thread pools do not survive a fork), at most ``jobs`` at a time. A run that fails, even
by killing its process, records its failure in its ``summary.json`` and the others go on; Ctrl-C
stops them all (each run is resumable from its last finished epoch).
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from pathlib import Path

from core.errors import ConfigError, ToolError
from core.files import atomic_write_json, ensure_dir, read_json_object
from core.provenance import settings_diff
from distill.config import SUMMARY, DistillConfig, identity_of

GiB = 2 ** 30
# Exit codes of a run's process (the run's status is in its summary.json; these only carry it).
_EXIT = {"finished": 0, "failed": 3}

# GPU memory of one run besides its data, for ``jobs="auto"`` (an estimate from the model's sizes,
# not a measurement; benchmarks/bench_sweep.py prints one run's measured peak next to it):
# - per process: CUDA context, cuDNN/cuBLAS workspaces and allocator slack, ~1 GiB; the ResNet-18
#   student's 11.7 M fp32 weights, gradients and SGD momentum, plus the T + 1 = 6 gradient copies
#   agre-batch over all parameters holds within a step: 9 x 47 MB ~ 0.4 GiB. Together 1.5 GiB.
# - per sample at 224 px: ResNet-18 saves ~7 M activation values for backward (conv, BN and ReLU
#   outputs, dominated by the 112- and 56-pixel stages), 14 MB in bf16; with the gradients
#   alive during backward and the T + 1 retained-graph backward passes, ~24 MB a sample:
#   3 GiB at batch 128, scaling with batch x pixels. The batch-512 evaluation passes need less
#   (no saved activations).
# - the online loop (teachers_online) adds five ResNet-50 teachers and the biased head: ~0.5 GiB
#   of weights and their no-grad forward at batch 128 (transient maps up to 128 x 256 x 56 x 56
#   in bf16, 0.2 GB each): ~2.5 GiB together.
# The data fit places on the GPU (the uint8 image store and the cached features of the distilled
# layers, ~5 GiB for Waterbirds with K = 10 views at gamma 0.5) is computed from the cache.
_FIXED_BYTES = 1.5 * GiB
_BYTES_PER_SAMPLE_224 = 3 * GiB / 128
_ONLINE_BYTES = 2.5 * GiB
_FREE_SHARE = 0.9  # of the free memory the jobs may count on (allocator fragmentation)


# ----------------------------------------------------------------------------- one run

def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary.json, or None when absent or unreadable (a crashed run)."""
    return read_json_object(Path(run_dir) / SUMMARY)  # bounded in size and depth, an object or None


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"


def record_failure(run_dir: Path, cfg: DistillConfig, error: str, trace: str = "") -> str:
    """Write ``{"status": "failed", "error", "traceback", "config"}`` to the run's summary.json."""
    atomic_write_json(Path(run_dir) / SUMMARY, {"status": "failed", "error": error,
                                                       "traceback": trace, "config": cfg.to_dict()})
    return error


def check_run(name: str, cfg: DistillConfig, tag: str, cache_id: str | None) -> str | None:
    """"skipped" when the run already finished on this cache with these settings, "failed" when its
    folder holds a finished run made otherwise (left untouched: deleting it is the user's call),
    None when it is to be trained."""
    run_dir = Path(cfg.out)
    done = read_summary(run_dir) or {}
    if is_finished(run_dir) and cache_id is not None:
        diff = [] if done.get("cache_identity") == cache_id else [
            "the cache differs (other data, teachers, views or layers)"]
        diff += settings_diff(identity_of(done.get("config", {})), cfg.identity())
        if diff:
            print(f"{tag} {name}: FAILED: {run_dir} holds a finished run made otherwise "
                  f"({'; '.join(diff)}); move it away or use another --out", file=sys.stderr)
            return "failed"
    if is_finished(run_dir):
        print(f"{tag} {name}: already finished, skipped")
        return "skipped"
    return None


def train_run(name: str, cfg: DistillConfig, fit, tag: str) -> str:
    """Train one run with ``fit``; returns "finished" or "failed" (the failure written to its
    summary.json). An exception in ``fit`` never escapes; Ctrl-C (KeyboardInterrupt) does."""
    run_dir = Path(cfg.out)
    # A failed summary from an earlier attempt would mislabel this attempt if it is killed.
    (run_dir / SUMMARY).unlink(missing_ok=True)
    ensure_dir(run_dir, "run folder")
    print(f"{tag} {name}: training", flush=True)
    start = time.time()
    try:
        fit(dataclasses.replace(cfg))
    except Exception as exc:  # one bad run must not stop the sweep
        error = record_failure(run_dir, cfg, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        print(f"{tag} {name}: FAILED: {error}", file=sys.stderr, flush=True)
        return "failed"
    if not is_finished(run_dir):
        summary = read_summary(run_dir) or {}
        print(f"{tag} {name}: FAILED: {summary.get('error', 'no finished summary.json written')}",
              file=sys.stderr, flush=True)
        return "failed"
    wga = ((read_summary(run_dir) or {}).get("test_best") or {}).get("wga")
    result = f", test WGA {100 * wga:.2f}%" if isinstance(wga, (int, float)) else ""
    print(f"{tag} {name}: finished in {(time.time() - start) / 60:.1f} min{result}", flush=True)
    return "finished"


def default_fit(progress: bool = True):
    """``distill.train.fit`` resuming a run killed mid-way (imported here: it brings torch)."""
    from distill.train import fit

    return functools.partial(fit, resume=True, progress=progress)


# ----------------------------------------------------------------------------- how many at once

def run_memory_bytes(cfg: DistillConfig) -> tuple[int, int | None]:
    """Estimated GPU bytes of one run: (compute, data). Data is None when the cache cannot be
    read here (fit will say why, per run). See the comment on ``_FIXED_BYTES``."""
    from cache.info import memory_needed
    from distill.data import open_inputs

    try:
        cache, store = open_inputs(dataclasses.replace(cfg, data_root=None))
        size = cfg.image_size or cache.meta.out_size
        data = memory_needed(cache, store, cfg.needs.layers, cfg.teachers_online is not None)["held"]["total"]
    except (ToolError, OSError):
        size, data = cfg.image_size or 224, None
    compute = _FIXED_BYTES + _BYTES_PER_SAMPLE_224 * cfg.batch_size * (size / 224) ** 2
    return int(compute + (_ONLINE_BYTES if cfg.teachers_online else 0)), data


def resolve_jobs(jobs: int | str, configs: list[DistillConfig]) -> int:
    """The number of runs to train at once: ``jobs`` itself, or for "auto" what fits on the device.

    "auto" on a CPU (or with no run to train) is 1: concurrent runs share the same cores, so two at
    once only slow each other. On a GPU it is the free memory (``torch.cuda.mem_get_info``) over
    the largest per-run estimate (:func:`run_memory_bytes`), capped by the runs and the CPU cores
    (each run's Python loop needs one).
    """
    if jobs != "auto":
        try:
            n = int(jobs)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ConfigError(f"--jobs takes a positive number or auto, got {jobs!r}")
        return n
    if not configs:
        return 1
    import torch

    from core.runtime import pick_device

    device = pick_device(configs[0].device)
    if device.type != "cuda":
        print("jobs auto: 1 (CPU: runs at once would share the same cores and only slow each other)")
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    # Runs that differ only in what does not change memory share one estimate (one cache opening).
    kinds = {(c.cache, c.needs.layers, c.batch_size, c.image_size,
              bool(c.teachers_online)): c for c in configs}
    estimates = [run_memory_bytes(c) for c in kinds.values()]
    per_run = max(compute + (data or 0) for compute, data in estimates)
    n = max(1, min(int(_FREE_SHARE * free // per_run), len(configs), os.cpu_count() or 1))
    unknown = " (data size unknown: cache unreadable here)" if any(d is None for _, d in estimates) else ""
    print(f"jobs auto: {n} ({torch.cuda.get_device_name(device)}: {free / GiB:.1f} GiB free, "
          f"~{per_run / GiB:.1f} GiB per run{unknown})")
    return n


# ----------------------------------------------------------------------------- N at once

def _child(name: str, cfg: DistillConfig, fit, tag: str, threads: int | None) -> None:
    """Entry point of a run's process: train it and exit with its status (``_EXIT``)."""
    if threads:  # before torch is imported here (fit imports it): its thread pools read these
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    status = train_run(name, cfg, fit or default_fit(progress=False), tag)
    sys.stdout.flush()
    sys.exit(_EXIT[status])


def _outcome(proc, name: str, cfg: DistillConfig, tag: str) -> str:
    """Status of a finished process; a process that died (killed for memory, a crash in native
    code) leaves no summary: write its failure there."""
    if proc.exitcode == _EXIT["finished"] and is_finished(cfg.out):
        return "finished"
    if proc.exitcode != _EXIT["failed"] and not is_finished(cfg.out):
        code = proc.exitcode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        error = record_failure(Path(cfg.out), cfg, f"the run's process ended without a result ({why}; "
                               "out of memory?); its last finished epoch is kept, run "
                               "the sweep again to resume")
        print(f"{tag} {name}: FAILED: {error}", file=sys.stderr, flush=True)
    return "failed"


def train_in_processes(runs: list[tuple[str, DistillConfig, str]], jobs: int, fit=None) -> dict:
    """Train ``runs`` (name, config, progress tag) in separate "spawn" processes, ``jobs`` at once.

    ``fit`` must be picklable (a module-level function); None is ``distill.train.fit`` resuming,
    without progress bars (N bars would garble each other; every epoch is in metrics.jsonl). On
    a CPU each process gets ``cores // jobs`` torch threads. Returns ``{"finished", "failed"}``
    counts. Ctrl-C (or any error here) terminates every running process and re-raises.
    """
    from core.runtime import pick_device

    ctx = multiprocessing.get_context("spawn")
    on_cpu = all(pick_device(c.device).type == "cpu" for _, c, _ in runs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if on_cpu else None
    pending, running = list(runs), {}
    counts = {"finished": 0, "failed": 0}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, cfg, tag = pending.pop(0)
                proc = ctx.Process(target=_child, args=(name, cfg, fit, tag, threads), name=f"run {name}")
                proc.start()
                running[proc.sentinel] = (proc, name, cfg, tag)
            for sentinel in multiprocessing.connection.wait(list(running)):
                proc, name, cfg, tag = running.pop(sentinel)
                proc.join()
                counts[_outcome(proc, name, cfg, tag)] += 1
    except BaseException:
        for proc, *_ in running.values():
            proc.terminate()
        for proc, *_ in running.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        raise
    return counts
