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
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from distill.config import DistillConfig

SEEDS = (42, 43, 44)
SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 1

# Fields that say where or how a run executes, not what it computes: kept out of run names.
_PLACEMENT_FIELDS = frozenset({"cache", "out", "device", "num_workers"})
# Fields always spelled in a run name, in this order (the axes of the report's tables).
_CORE_FIELDS = ("weighting", "gamma", "alpha", "layers", "feature_weighting")
_ABBREV = {"gamma": "g", "alpha": "a", "seed": "s", "epochs": "ep", "batch_size": "bs",
           "weight_decay": "wd", "momentum": "mom", "layer_gammas": "lg", "agre_params": "ap",
           "pretrained": "pre", "image_size": "img", "weights_file": "wf", "feat_eps": "eps"}


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
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; "
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


def _defaults() -> dict:
    return DistillConfig().to_dict()


def _normalise(key: str, value, default=None):
    """Canonical value of a config field, so that 0 and 0.0, or a list and a tuple, name alike."""
    if key == "layers":
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if key == "layer_gammas":
        return None if value is None else tuple(float(g) for g in value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, float) and value.is_integer() and isinstance(default, int):
        return int(value)
    return value


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(_fmt(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).stem  # a weights file: its name is enough to tell runs apart
    return str(value)


def resolved_config(overrides: dict) -> dict:
    """DistillConfig defaults updated with ``overrides``, values normalised.

    Raises ValueError on a field DistillConfig does not have (a typo would otherwise be ignored).
    """
    defaults = _defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; "
                         f"DistillConfig has {', '.join(defaults)}")
    merged = {**defaults, **overrides}
    return {k: _normalise(k, v, defaults[k]) for k, v in merged.items()}


def _name(overrides: dict, with_seed: bool) -> str:
    cfg, defaults = resolved_config(overrides), _defaults()
    parts = [cfg["weighting"], "g" + _fmt(cfg["gamma"]), "a" + _fmt(cfg["alpha"]),
             _fmt(cfg["layers"]), cfg["feature_weighting"]]
    for key in sorted(set(cfg) - set(_CORE_FIELDS) - _PLACEMENT_FIELDS - {"seed"}):
        if cfg[key] != _normalise(key, defaults[key], defaults[key]):
            parts.append(_ABBREV.get(key, key.replace("_", "")) + _fmt(cfg[key]))
    if with_seed:
        parts.append("s" + _fmt(cfg["seed"]))
    # "_" only separates fields; anything unsafe inside a field becomes "-".
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", part) for part in parts)


def run_name(overrides: dict) -> str:
    """Folder name of a run, e.g. ``agre_g0.5_a1_layer4_none_s42``.

    Built from the resolved configuration (defaults + overrides), so it is the same for the same
    configuration whatever the dict order or which defaults were spelled out. Always names
    weighting, gamma, alpha, layers, feature weighting and seed; any other field only when it
    differs from its default (``..._none_tau2_ep5_s42``). ``cache``/``out``/``device``/
    ``num_workers`` are not part of it. Only ``[A-Za-z0-9._+-]`` characters.
    """
    return _name(overrides, with_seed=True)


def group_key(config: dict) -> str:
    """:func:`run_name` without the seed: runs with the same key are seeds of one configuration.

    Accepts a full config dict (e.g. a run's config.json); fields unknown to DistillConfig are
    ignored here, since they can come from another version of the tool.
    """
    known = set(_defaults())
    return _name({k: v for k, v in config.items() if k in known and k != "seed"}, with_seed=False)


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
    path.write_text(json.dumps(plan, indent=2, ensure_ascii=False) + "\n")


def _record_failure(run_dir: Path, cfg: DistillConfig, exc: BaseException) -> str:
    error = f"{type(exc).__name__}: {exc}"
    summary = {"status": "failed", "error": error, "traceback": traceback.format_exc(),
               "config": cfg.to_dict()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
            configs[name] = DistillConfig(**{**merged, "cache": str(cache),
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
    cache_fp = _cache_fingerprint(cache)
    for i, (name, cfg) in enumerate(configs.items(), 1):
        counts[_run_one(name, cfg, fit, f"[{i}/{len(configs)}]", cache_fp)] += 1
    print(f"sweep {out}: {counts['finished']} finished, {counts['skipped']} skipped, "
          f"{counts['failed']} failed")
    return counts


def _cache_fingerprint(cache: str) -> str | None:
    """Data fingerprint of the sweep's cache (None when it cannot be read here)."""
    try:
        from precompute.cache import open_cache

        return open_cache(cache).meta.dataset_fingerprint
    except Exception:  # an unreadable cache is reported by fit itself, per run
        return None


def _run_one(name: str, cfg: DistillConfig, fit, tag: str, cache_fp: str | None = None) -> str:
    """Train one run unless finished on this cache; returns "finished", "skipped" or "failed".

    A finished run made from another data set is left untouched and counted as failed, with a
    message: its numbers do not belong to this sweep, and deleting them is the user's call.
    """
    run_dir = Path(cfg.out)
    done_fp = (read_summary(run_dir) or {}).get("cache_fingerprint")
    if is_finished(run_dir) and cache_fp is not None and done_fp not in (None, cache_fp):
        print(f"{tag} {name}: FAILED: {run_dir} holds a run made from another data set "
              f"({done_fp[:12]}, this cache {cache_fp[:12]}); move it away or use another --out", file=sys.stderr)
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
