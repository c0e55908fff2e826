"""Sweeps of distillation runs: the user's report as presets, one run folder per configuration.

A sweep folder holds one sub-folder per run, named by :func:`run_name`, and ``sweep.json``, the
plan (every run asked for, with its table and row), so that the report can list what is missing::

    out_dir/
      sweep.json                      {"version", "cache", "base", "runs": [{"name", "overrides",
                                                                             "preset", "label"}]}
      agre_g0.5_a1_layer4_none_s42/   written by distill.train.fit: config.json, metrics.jsonl,
      ...                             summary.json, teacher_weights.npy

Runs shared by several tables (AGRE-KD gamma 0.5 appears in five of them) have one folder and
are trained once. A run whose ``summary.json`` says ``finished`` is never trained again, so an
interrupted sweep is resumed by calling :func:`run_sweep` again.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from core.errors import ConfigError
from core.files import atomic_write_json, atomic_write_text
from core.provenance import settings_diff
from distill.config import DistillConfig, identity_of, run_name

SEEDS = (42, 43, 44)
SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 1

def _core(weighting: str, gamma: float, alpha: float = 1.0, layers=("layer4",),
          feature_weighting: str = "none") -> dict:
    """Overrides that spell every table axis, so presets do not hang on DistillConfig defaults."""
    return {"weighting": weighting, "gamma": gamma, "alpha": alpha, "layers": tuple(layers),
            "feature_weighting": feature_weighting}


def _preset(title: str, rows: list[tuple[str, dict]], baseline: str | None) -> dict:
    labels = [label for label, _ in rows]
    assert baseline is None or baseline in labels, baseline
    return {"title": title, "baseline": baseline, "seeds": list(SEEDS),
            "rows": [{"label": label, "overrides": ov} for label, ov in rows]}


_L34 = ("layer3", "layer4")
_L234 = ("layer2", "layer3", "layer4")

# The user's report, table by table. "baseline" names the row of the "Δ vs Baseline" column:
# AGRE-KD gamma 0 where the report compares against it, otherwise the row the report's own
# finding is measured against (feature-only for labels, layer4 for multi-layer, no weighting
# for disagreement).
PRESETS: dict[str, dict] = {
    "main": _preset("Main Results", [
        ("AGRE-KD + Features", _core("agre", 0.5)),
        ("Disagree-Weight", _core("agre", 0.5, feature_weighting="disagree")),
        ("Multi-Layer (L3+L4)", _core("agre", 0.5, layers=_L34)),
        ("AVER + Features", _core("aver", 0.5)),
        ("AGRE-KD Baseline", _core("agre", 0.0)),
        ("Combined (α=0.9)", _core("agre", 0.25, alpha=0.9)),
        ("AVER Baseline", _core("aver", 0.0)),
    ], baseline="AGRE-KD Baseline"),
    "agre-vs-aver": _preset("AGRE-KD vs AVER across γ", [
        (f"{name} γ={g:.2f}", _core(w, g))
        for g in (0.0, 0.25, 0.5, 1.0) for w, name in (("agre", "AGRE-KD"), ("aver", "AVER"))
    ], baseline="AGRE-KD γ=0.00"),
    "gamma": _preset("Feature weight (γ) sensitivity, AGRE-KD", [
        (f"γ={g:.2f}", _core("agre", g)) for g in (0.0, 0.05, 0.25, 0.5, 0.75, 1.0)
    ], baseline="γ=0.00"),
    "labels": _preset("Class labels (α < 1)", [
        ("Feature only (α=1.0, γ=0.25)", _core("agre", 0.25, alpha=1.0)),
        ("Combined (α=0.9, γ=0.25)", _core("agre", 0.25, alpha=0.9)),
    ], baseline="Feature only (α=1.0, γ=0.25)"),
    "multilayer": _preset("Multi-layer distillation (γ=0.5)", [
        ("L4 only", _core("agre", 0.5)),
        ("L3 + L4", _core("agre", 0.5, layers=_L34)),
        ("L2 + L3 + L4", _core("agre", 0.5, layers=_L234)),
    ], baseline="L4 only"),
    "disagree": _preset("Disagreement-weighted features (γ=0.5)", [
        ("Standard AGRE-KD + Features", _core("agre", 0.5)),
        ("Disagree-Weight Features", _core("agre", 0.5, feature_weighting="disagree")),
    ], baseline="Standard AGRE-KD + Features"),
}


def preset_runs(*names: str, seeds=None) -> list[dict]:
    """Run specs ``{"overrides", "preset", "label"}`` of the named presets, one per row and seed.

    ``seeds`` replaces the presets' seeds (e.g. ``[42]`` for a quick pass). A configuration shared
    by several presets appears once per preset; :func:`run_sweep` trains it once.
    """
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(PRESETS)}")
    specs = []
    for name in names:
        preset = PRESETS[name]
        for row in preset["rows"]:
            for seed in (seeds if seeds is not None else preset["seeds"]):
                specs.append({"overrides": {**row["overrides"], "seed": int(seed)},
                              "preset": name, "label": row["label"]})
    return specs


def expand_grid(**lists) -> list[dict]:
    """Cartesian product of keyword lists, e.g. ``expand_grid(gamma=[0, .5], seed=[42, 43])``.

    Returns a list of override dicts (the last keyword varies fastest). A scalar counts as a
    one-value list.
    """
    keys = list(lists)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in lists.values()]
    # layers=("layer3", "layer4") is one value, not two: write layers=[("layer3", "layer4")].
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _as_spec(run: dict) -> dict:
    """A run is either plain overrides (from expand_grid) or a spec with "overrides"."""
    if "overrides" in run:
        return {"overrides": dict(run["overrides"]), "preset": run.get("preset"),
                "label": run.get("label")}
    return {"overrides": dict(run), "preset": None, "label": None}


def _jsonable(overrides: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary.json, or None when absent or unreadable (a crashed run)."""
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"


def _write_plan(out_dir: Path, cache: str, base: dict, specs: list[dict]) -> None:
    """Add this call's runs to sweep.json (earlier calls into the same folder are kept)."""
    path = out_dir / SWEEP_FILE
    plan = {"version": SWEEP_VERSION, "runs": []}
    if path.exists():
        plan = json.loads(path.read_text())
    seen = {(r["name"], r.get("preset"), r.get("label")) for r in plan["runs"]}
    for spec in specs:
        entry = {"name": spec["name"], "overrides": _jsonable(spec["overrides"]),
                 "preset": spec["preset"], "label": spec["label"]}
        if (entry["name"], entry["preset"], entry["label"]) not in seen:
            seen.add((entry["name"], entry["preset"], entry["label"]))
            plan["runs"].append(entry)
    plan.update(cache=str(cache), base=_jsonable(base))
    atomic_write_text(path, json.dumps(plan, indent=2, ensure_ascii=False) + "\n")


def _record_failure(run_dir: Path, cfg: DistillConfig, exc: BaseException) -> str:
    error = f"{type(exc).__name__}: {exc}"
    summary = {"status": "failed", "error": error, "traceback": traceback.format_exc(),
               "config": cfg.to_dict()}
    atomic_write_json(run_dir / "summary.json", summary)
    return error


def _plan(runs: list[dict], base: dict, cache: str, out_dir: Path):
    """Specs with names, and one validated DistillConfig per distinct run name.

    Every config is built before anything trains, so a bad value fails the sweep at once.
    """
    specs, configs = [], {}
    for run in runs:
        spec = _as_spec(run)
        merged = {**base, **spec["overrides"]}
        spec["name"] = name = run_name(merged)
        specs.append(spec)
        if name not in configs:
            configs[name] = DistillConfig.from_settings({**merged, "cache": str(cache),
                                                         "out": str(out_dir / name)})
    return specs, configs


def run_sweep(cache: str, out_dir: str, runs: list[dict], base: dict | None = None,
              fit: Callable[[DistillConfig], dict] | None = None) -> dict:
    """Train every run of a sweep into ``out_dir/<run_name>``, resuming where it stopped.

    Args:
        cache: the teacher cache (cache.h5) every run reads.
        out_dir: sweep folder; ``sweep.json`` there accumulates the plan of every call.
        runs: override dicts (:func:`expand_grid`) or specs ``{"overrides", "preset", "label"}``
            (:func:`preset_runs`). Runs that resolve to the same configuration run once.
        base: overrides applied under every run (e.g. ``{"epochs": 5}``); part of the run names.
        fit: ``fit(cfg) -> dict`` that trains one run and writes its folder; default
            ``distill.train.fit``.
    Returns:
        ``{"finished", "skipped", "failed"}`` counts over distinct runs. A run whose summary
        says finished is skipped; an exception in one run is written to its summary.json as
        ``{"status": "failed", "error", "traceback"}`` and the sweep goes on. Raises ValueError
        before training anything if a run's configuration is invalid.
    """
    if fit is None:
        from distill.train import fit as train  # heavy (torch); only a real sweep needs it

        fit = functools.partial(train, resume=True)  # a run killed mid-way continues
    base, out = dict(base or {}), Path(out_dir)
    specs, configs = _plan(runs, base, cache, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, cache, base, specs)
    counts = {"finished": 0, "skipped": 0, "failed": 0}
    cache_id = _cache_identity(cache)
    for i, (name, cfg) in enumerate(configs.items(), 1):
        counts[_run_one(name, cfg, fit, f"[{i}/{len(configs)}]", cache_id)] += 1
    print(f"sweep {out}: {counts['finished']} finished, {counts['skipped']} skipped, "
          f"{counts['failed']} failed")
    return counts


def _cache_identity(cache: str) -> str | None:
    """Identity digest of the sweep's cache (None when it cannot be read here)."""
    from core.errors import ToolError

    try:
        from cache.reader import open_cache

        return open_cache(cache).meta.identity_digest()
    except ToolError:  # an unreadable cache is reported by fit itself, per run
        return None


def _run_one(name: str, cfg: DistillConfig, fit, tag: str, cache_id: str | None = None) -> str:
    """Train one run unless finished on this cache; returns "finished", "skipped" or "failed".

    A finished run made with other settings or from a cache with other contents (data,
    teachers, views, layers) is left untouched and counted as failed, with a message: its
    numbers do not belong to this sweep, and deleting them is the user's call.
    """
    run_dir = Path(cfg.out)
    done = read_summary(run_dir) or {}
    if is_finished(run_dir) and cache_id is not None:
        diff = [] if done.get("cache_identity") == cache_id else ["the cache differs (other data, teachers, views or layers)"]
        diff += settings_diff(identity_of(done.get("config", {})), cfg.identity())
        if diff:
            print(f"{tag} {name}: FAILED: {run_dir} holds a finished run made otherwise ({'; '.join(diff)}); "
                  "move it away or use another --out", file=sys.stderr)
            return "failed"
    if is_finished(run_dir):
        print(f"{tag} {name}: already finished, skipped")
        return "skipped"
    # A failed summary from an earlier attempt would mislabel this attempt if it is killed.
    (run_dir / "summary.json").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{tag} {name}: training")
    start = time.time()
    try:
        fit(dataclasses.replace(cfg))
    except Exception as exc:  # one bad run must not stop the sweep; Ctrl-C still does
        error = _record_failure(run_dir, cfg, exc)
        print(f"{tag} {name}: FAILED: {error}", file=sys.stderr)
        return "failed"
    if not is_finished(run_dir):
        summary = read_summary(run_dir) or {}
        print(f"{tag} {name}: FAILED: {summary.get('error', 'no finished summary.json written')}",
              file=sys.stderr)
        return "failed"
    print(f"{tag} {name}: finished in {(time.time() - start) / 60:.1f} min")
    return "finished"
