"""Sweeps of distillation runs: the study's tables as presets, their plan, one run folder per configuration.

A sweep folder holds one sub-folder per run, named by :func:`run_name`, and ``sweep.json``, the
plan (every run asked for, with its table and row), so that `report` can list what is missing::

    out_dir/
      sweep.json                      {"version", "cache", "base", "runs": [{"name", "overrides",
                                                                   "preset", "table", "label"}]}
      agre-batch_g0.5_a1_layer4_none_s42/   written by distill.train.fit: config.json,
      ...                             metrics.jsonl, summary.json, teacher_weights.npy

A run's settings are resolved in this order, the later winning: DistillConfig defaults, the preset
row, the ``agre_weighting`` switch (AGRE-KD rows only), the sweep-wide ``base`` (``--set``,
``--epochs``, ``--lr``: these always win, on every row). Runs shared by several tables (AGRE-KD
gamma 0.5 appears in eight of them) have one folder and are trained once. A run whose
``summary.json`` says ``finished`` is never trained again, so an interrupted sweep is resumed by
calling :func:`run_sweep` again.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

from core.constants import STUDY_AGRE, STUDY_BASELINE
from core.errors import ConfigError
from core.files import OutputLock, atomic_write_text, ensure_dir
from distill.config import PLACEMENT_FIELDS, DistillConfig, run_name
from experiments.jobs import check_run, default_fit, read_summary, resolve_jobs, train_in_processes, train_run

SEEDS = (42, 43, 44)
SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 2  # 2: plan entries name their "table" and hold the resolved overrides

# The study's AGRE-KD (core.constants.STUDY_AGRE: one weight per teacher per batch, from the
# gradients of all student parameters) is behind every AGRE-KD number of the study; its baseline
# row is core.constants.STUDY_BASELINE. The study splits a total gamma of 0.5 across layers (its
# notebook 03).
SPLIT_L34 = (0.15, 0.35)
SPLIT_L234 = (0.10, 0.15, 0.25)
TEACHERS = "<teachers manifest>"  # stands in a row for the manifest given to preset_runs


def _core(weighting: str, gamma: float, **axes) -> dict:
    """Overrides that spell every table axis, so presets do not hang on DistillConfig defaults:
    ``alpha``, ``layers`` and ``feature_weighting`` the study's baseline's unless given."""
    baseline = {k: STUDY_BASELINE[k] for k in ("alpha", "layers", "feature_weighting")}
    row = {"weighting": weighting, "gamma": gamma, **baseline, **axes}
    return {**row, "layers": tuple(row["layers"])}


def _agre(gamma: float, **kw) -> dict:
    """A row of the study's AGRE-KD (agre-batch over all parameters, unless ``agre_params``)."""
    return _core(STUDY_AGRE["weighting"], gamma, **{"agre_params": STUDY_AGRE["agre_params"], **kw})


def _preset(title: str, rows: list[tuple[str, dict]], baseline: str, agre_switch: bool = True,
            pairs: tuple[tuple[str, str], ...] = ()) -> dict:
    """``agre_switch``: the ``agre_weighting`` switch applies (False where the rows compare
    weightings: their labels name each one)."""
    labels = [label for label, _ in rows]
    assert baseline in labels and len(set(labels)) == len(labels), baseline
    assert all(a in labels and b in labels and a != b for a, b in pairs), pairs
    return {"title": title, "baseline": baseline, "seeds": list(SEEDS), "agre_switch": agre_switch,
            "rows": [{"label": label, "overrides": ov} for label, ov in rows],
            "pairs": [list(p) for p in pairs]}


def _gamma_label(name: str, gamma: float) -> str:
    return f"{name} γ={gamma:.2f}"


STUDY_WEIGHTING, STUDY_PARAMS = "AGRE-KD batch, all parameters (study)", "All parameters (study)"
_L34 = ("layer3", "layer4")
_L234 = ("layer2", "layer3", "layer4")
_WEIGHTING_ROWS = (("AVER (uniform)", {"weighting": "aver"}),
                   (STUDY_WEIGHTING, STUDY_AGRE),
                   ("AGRE-KD per-sample (paper)", {"weighting": "agre"}),
                   ("Cached bias-disagreement weights (static)", {"weighting": "cached"}))
_PARAM_ROWS = ((STUDY_PARAMS, "all"), ("layer4 + classifier", "layer4"),
               ("Classifier only (closed form)", "last"))

# The study, table by table, then the checks of what produced it. "baseline" names the
# row of the "Δ vs Baseline" column: AGRE-KD gamma 0 where the study compares against it,
# otherwise the row the study's own finding is measured against (feature-only for labels,
# layer4 for multi-layer, no weighting for disagreement, the cache for the online loop).
PRESETS: dict[str, dict] = {
    "main": _preset("Main Results", [
        ("AGRE-KD + Features", _agre(0.5)),
        ("Disagree-Weight", _agre(0.5, feature_weighting="disagree")),
        ("Multi-Layer (L3+L4)", _agre(0.5, layers=_L34, layer_gammas=SPLIT_L34)),
        ("AVER + Features", _core("aver", 0.5)),
        ("AGRE-KD Baseline", _agre(0.0)),
        ("Combined (α=0.9)", _agre(0.25, alpha=0.9)),
        ("AVER Baseline", _core("aver", 0.0)),
    ], baseline="AGRE-KD Baseline"),
    "agre-vs-aver": _preset("AGRE-KD vs AVER across γ", [
        (_gamma_label(name, g), _agre(g) if w == "agre" else _core("aver", g))
        for g in (0.0, 0.25, 0.5, 1.0) for w, name in (("agre", "AGRE-KD"), ("aver", "AVER"))
    ], baseline=_gamma_label("AGRE-KD", 0.0)),
    "gamma": _preset("Feature weight (γ) sensitivity, AGRE-KD", [
        (f"γ={g:.2f}", _agre(g)) for g in (0.0, 0.05, 0.25, 0.5, 0.75, 1.0)
    ], baseline="γ=0.00"),
    "labels": _preset("Class labels (α < 1)", [
        ("Feature only (α=1.0, γ=0.25)", _agre(0.25, alpha=1.0)),
        ("Combined (α=0.9, γ=0.25)", _agre(0.25, alpha=0.9)),
    ], baseline="Feature only (α=1.0, γ=0.25)"),
    "multilayer": _preset("Multi-layer distillation (γ=0.5)", [
        ("L4 only", _agre(0.5)),
        ("L3 + L4", _agre(0.5, layers=_L34, layer_gammas=SPLIT_L34)),
        ("L2 + L3 + L4", _agre(0.5, layers=_L234, layer_gammas=SPLIT_L234)),
    ], baseline="L4 only"),
    "disagree": _preset("Disagreement-weighted features (γ=0.5)", [
        ("Standard AGRE-KD + Features", _agre(0.5)),
        ("Disagree-Weight Features", _agre(0.5, feature_weighting="disagree")),
    ], baseline="Standard AGRE-KD + Features"),
    "weighting": _preset("Teacher weighting: the study's, the paper's and the cached weights", [
        (_gamma_label(name, g),
         _core(ov["weighting"], g, **{k: v for k, v in ov.items() if k != "weighting"}))
        for name, ov in _WEIGHTING_ROWS for g in (0.0, 0.5)
    ], baseline=_gamma_label(STUDY_WEIGHTING, 0.0), agre_switch=False),
    "agre-params": _preset("AGRE-KD batch weights: gradients of which student parameters", [
        (_gamma_label(name, g), _agre(g, agre_params=p)) for name, p in _PARAM_ROWS for g in (0.0, 0.5)
    ], baseline=_gamma_label(STUDY_PARAMS, 0.0), agre_switch=False),
    "demo": _preset("Does AGRE-KD (+ features) beat AVER? The embedded synthetic default", [
        ("AVER γ=0", _core("aver", 0.0)),
        ("AGRE-KD batch (study) γ=0", _agre(0.0)),
        ("AGRE-KD batch (study) γ=0.5", _agre(0.5)),
        ("AGRE-KD per-sample (paper) γ=0", _core("agre", 0.0)),
    ], baseline="AVER γ=0", agre_switch=False),
    # The study's explanation of the small feature gain: DFR debiases the head only, the backbone
    # features the student matches still carry the spurious attribute, earlier layers more. Erased:
    # the attribute removed from the teachers' features (LEACE fit on validation) before the loss.
    "hypothesis": _preset("Do the teachers' biased features hold the student back? (raw vs erased)", [
        ("AGRE-KD γ=0", _agre(0.0)),
        ("AGRE-KD γ=0.5, raw L4", _agre(0.5)),
        ("AGRE-KD γ=0.5, erased L4", _agre(0.5, feature_target="erased")),
        ("L2+L3+L4, raw", _agre(0.5, layers=_L234, layer_gammas=SPLIT_L234)),
        ("L2+L3+L4, erased", _agre(0.5, layers=_L234, layer_gammas=SPLIT_L234, feature_target="erased")),
    ], baseline="AGRE-KD γ=0", pairs=(
        ("AGRE-KD γ=0.5, raw L4", "AGRE-KD γ=0"),
        ("AGRE-KD γ=0.5, erased L4", "AGRE-KD γ=0.5, raw L4"),
        ("L2+L3+L4, raw", "AGRE-KD γ=0.5, raw L4"),
        ("L2+L3+L4, erased", "L2+L3+L4, raw"),
        ("AGRE-KD γ=0.5, erased L4", "AGRE-KD γ=0"),
    )),
    "cache-vs-online": _preset("Cached teachers vs the online loop (AGRE-KD, γ=0.5)", [
        ("Cached teachers (stored views)", _agre(0.5)),
        ("Online teachers (fresh crop every step)", _agre(0.5, teachers_online=TEACHERS)),
    ], baseline="Cached teachers (stored views)"),
}
AGRE_SWITCH = ("agre-batch", "agre", "cached")  # what --agre-weighting may replace agre-batch with


def _switch(overrides: dict, agre_weighting: str) -> dict:
    """An AGRE-KD row with ``agre_weighting`` instead of agre-batch; agre_params back to its
    default, since only agre-batch reads it (equal computations keep one folder)."""
    if overrides.get("weighting") != "agre-batch" or agre_weighting == "agre-batch":
        return dict(overrides)
    out = {**overrides, "weighting": agre_weighting}
    out.pop("agre_params", None)
    return out


def preset_runs(*names: str, seeds=None, agre_weighting: str | None = None,
                teachers_manifest: str | None = None) -> list[dict]:
    """Run specs ``{"overrides", "preset", "label", "table"}`` of the named presets, one per row and seed.

    Args:
        seeds: replace the presets' seeds (e.g. ``[42]`` for a quick pass).
        agre_weighting: "agre" (the paper's per-sample formula), "cached" (the static weights of
            the cache) or "agre-batch" (no change): the weighting of every row that uses the
            study's AGRE-KD (agre-batch); AVER rows stay AVER, and the presets that compare
            weightings ("weighting", "agre-params") are left as they are. The tables of a switched
            preset are named ``<preset> [agre_weighting=...]``, apart from the preset's own.
            (``--set weighting=...`` is another thing: it sets every row, AVER ones too.)
        teachers_manifest: the teacher manifest of the online rows ("cache-vs-online"); required
            by that preset only.
    A configuration shared by several presets appears once per preset; :func:`run_sweep` trains it
    once. Raises ConfigError on an unknown preset or switch, or a missing manifest.
    """
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if agre_weighting is not None and agre_weighting not in AGRE_SWITCH:
        raise ConfigError(f"--agre-weighting must be one of {', '.join(AGRE_SWITCH)}, got {agre_weighting!r}")
    switch = None if agre_weighting in (None, "agre-batch") else agre_weighting
    specs = []
    for name in names:
        preset = PRESETS[name]
        applies = switch is not None and preset["agre_switch"]
        table = f"{name} [agre_weighting={switch}]" if applies else name
        for row in preset["rows"]:
            overrides = _switch(row["overrides"], switch) if applies else dict(row["overrides"])
            if overrides.get("teachers_online") == TEACHERS:
                if not teachers_manifest:
                    raise ConfigError(f"preset {name!r} runs the teachers online: give their manifest "
                                      "(--teachers PATH, the manifest the cache was made from)")
                overrides["teachers_online"] = str(teachers_manifest)
            for seed in (seeds if seeds is not None else preset["seeds"]):
                specs.append({"overrides": {**overrides, "seed": int(seed)}, "preset": name,
                              "label": row["label"], "table": table})
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


def resolve(overrides: dict, base: dict) -> dict:
    """A row's overrides with the sweep-wide ``base`` on top: every value of ``base`` wins.

    A row's ``layer_gammas`` is a split of its gamma over its layers; it follows what ``base``
    changes: a sweep-wide gamma G rescales the split to sum to G (the study's L3+L4 split
    0.15/0.35 of 0.5 becomes 0.3/0.7 for G = 1), sweep-wide layers other than the row's drop it
    (each layer then gets gamma). A ``layer_gammas`` in ``base`` wins as given.
    """
    merged = {**overrides, **base}
    split = overrides.get("layer_gammas")
    if split is None or "layer_gammas" in base:
        return merged
    layers = lambda v: tuple(v.split(",") if isinstance(v, str) else v)  # noqa: E731
    if "layers" in base and layers(base["layers"]) != layers(overrides.get("layers", ())):
        merged["layer_gammas"] = None
    elif "gamma" in base and sum(split) > 0:
        merged["layer_gammas"] = tuple(float(f"{g * float(base['gamma']) / sum(split):.12g}") for g in split)
    return merged


def _as_spec(run: dict) -> dict:
    """A run is either plain overrides (from expand_grid) or a spec with "overrides"."""
    if "overrides" in run:
        return {"overrides": dict(run["overrides"]), "preset": run.get("preset"),
                "label": run.get("label"), "table": run.get("table", run.get("preset"))}
    return {"overrides": dict(run), "preset": None, "label": None, "table": None}


def _jsonable(overrides: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def _tag(table: str, base: dict) -> str:
    """``main [epochs=5, lr=0.01]``: a preset's table tagged with the sweep-wide settings that change
    what its runs compute (placement fields, such as the device, do not)."""
    wide = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                     for k, v in sorted(_jsonable(base).items()) if k not in PLACEMENT_FIELDS)
    if not wide:
        return table
    return f"{table[:-1]}, {wide}]" if table.endswith("]") else f"{table} [{wide}]"


def _plan(runs: list[dict], base: dict, cache: str, out_dir: Path):
    """Specs with resolved overrides, names and tables, and one validated DistillConfig per name.

    Every config is built before anything trains, so a bad value fails the sweep at once. A
    preset's table whose runs the sweep-wide settings change is tagged with them (``main
    [epochs=5]``), so that runs of one preset made otherwise into the same folder never share a
    table row.
    """
    specs, configs, changed = [], {}, set()
    for run in runs:
        spec = _as_spec(run)
        own, spec["overrides"] = spec["overrides"], resolve(spec["overrides"], base)
        try:
            spec["name"] = name = run_name(spec["overrides"])
            if name not in configs:
                configs[name] = DistillConfig.from_settings({**spec["overrides"], "cache": str(cache),
                                                             "out": str(out_dir / name)})
            if spec["table"] is not None and run_name(own) != name:
                changed.add(spec["table"])
        except ConfigError as e:
            where = f"{spec['table']}, row {spec['label']!r}" if spec["label"] else f"run {spec['overrides']}"
            raise ConfigError(f"{where}: {e}") from None
        specs.append(spec)
    for spec in specs:
        if spec["table"] in changed:
            spec["table"] = _tag(spec["table"], base)
    return specs, configs


def _write_plan(out_dir: Path, cache: str, base: dict, specs: list[dict]) -> None:
    """Add this call's runs to sweep.json (earlier calls into the same folder are kept), under a
    lock (two sweeps into one folder add their runs one after the other) and atomically."""
    path = out_dir / SWEEP_FILE
    with OutputLock(path, "the sweep plan"):
        _update_plan(path, cache, base, specs)


def _update_plan(path: Path, cache: str, base: dict, specs: list[dict]) -> None:
    from experiments.runs import load_plan

    # the existing plan as load_plan checks it (bounded, typed), re-keyed as written
    plan = {"runs": load_plan(path.parent) or []} if path.exists() else {"runs": []}
    # one entry per (run, table): a preset whose row was relabelled since keeps one row, the new label
    entries = {(e["name"], e.get("table") or e.get("preset")): e for e in plan["runs"]}
    for spec in specs:
        entries[(spec["name"], spec["table"])] = {"name": spec["name"],
                                                  "overrides": _jsonable(spec["overrides"]),
                                                  "preset": spec["preset"], "table": spec["table"],
                                                  "label": spec["label"]}
    plan["runs"] = list(entries.values())
    plan.update(version=SWEEP_VERSION, cache=str(cache), base=_jsonable(base))
    atomic_write_text(path, json.dumps(plan, indent=2, ensure_ascii=False) + "\n")


def _status(run_dir: Path) -> str:
    summary = read_summary(run_dir)
    if summary is not None:
        return str(summary.get("status", "unknown"))
    return "incomplete" if run_dir.exists() else "not started"


def plan_sweep(cache: str, out_dir: str, runs: list[dict], base: dict | None = None) -> dict:
    """What :func:`run_sweep` would train, with every setting resolved; trains and writes nothing.

    Returns ``{"cache", "out", "base", "distinct_runs", "tables": [{"table", "preset", "title",
    "baseline", "rows": [{"label", "settings", "runs": [{"seed", "name", "folder", "status"}]}]}]}``.
    ``settings`` are the run's identity (every DistillConfig field but the placement ones) without
    the seed; ``status`` is the run folder's now (finished, failed, incomplete, not started). Runs
    of no preset go to a table "ad-hoc grid", one row per configuration. Raises ConfigError on a
    run whose configuration is invalid.
    """
    base, out = dict(base or {}), Path(out_dir)
    specs, configs = _plan(runs, base, cache, out)
    tables: dict[str, dict] = {}
    for spec in specs:
        cfg = configs[spec["name"]]
        settings = cfg.identity()
        seed = settings.pop("seed")
        preset = PRESETS.get(spec["preset"], {})
        table = tables.setdefault(spec["table"] or "ad-hoc grid", {
            "table": spec["table"] or "ad-hoc grid", "preset": spec["preset"],
            "title": preset.get("title",
                                "Runs of no preset") + (spec["table"] or "")[len(spec["preset"] or ""):],
            "baseline": preset.get("baseline"), "rows": {}})
        label = spec["label"] or run_name(cfg, with_seed=False)
        row = table["rows"].setdefault(label, {"label": label, "settings": settings, "runs": []})
        row["runs"].append({"seed": seed, "name": spec["name"], "folder": cfg.out,
                            "status": _status(Path(cfg.out))})
    for table in tables.values():
        table["rows"] = list(table["rows"].values())
    return {"cache": str(cache), "out": str(out), "base": _jsonable(base),
            "distinct_runs": len(configs), "tables": list(tables.values())}


def plan_json(cache: str, out_dir: str, runs: list[dict], base: dict | None = None) -> str:
    """:func:`plan_sweep` as indented JSON text (what ``cli.py sweep --plan`` prints)."""
    return json.dumps(plan_sweep(cache, out_dir, runs, base), indent=2, ensure_ascii=False)


def run_sweep(cache: str, out_dir: str, runs: list[dict], base: dict | None = None,
              fit: Callable[[DistillConfig], dict] | None = None, jobs: int | str = 1) -> dict:
    """Train every run of a sweep into ``out_dir/<run_name>``, resuming where it stopped.

    Args:
        cache: the teacher cache (cache.h5) every run reads.
        out_dir: sweep folder; ``sweep.json`` there accumulates the plan of every call.
        runs: override dicts (:func:`expand_grid`) or specs ``{"overrides", "preset", "label"}``
            (:func:`preset_runs`). Runs that resolve to the same configuration run once.
        base: sweep-wide settings (e.g. ``{"epochs": 5}``, from ``--set``, ``--epochs``,
            ``--lr``): they win over every run's own value (:func:`resolve`); part of the names.
        fit: ``fit(cfg) -> dict`` that trains one run and writes its folder; default
            ``distill.train.fit`` (resuming). With ``jobs > 1`` it must be picklable.
        jobs: runs trained at once, each in its own process (:mod:`experiments.jobs`); 1 trains
            them one after the other in this process; "auto" picks from the free GPU memory
            (1 on a CPU, where runs at once only slow each other).
    Returns:
        ``{"finished", "skipped", "failed"}`` counts over distinct runs. A run whose summary
        says finished is skipped; an exception in one run is written to its summary.json as
        ``{"status": "failed", "error", "traceback"}`` and the sweep goes on. Raises ConfigError
        (a ValueError) before training anything if a run's configuration is invalid.
    """
    base, out = dict(base or {}), Path(out_dir)
    specs, configs = _plan(runs, base, cache, out)
    ensure_dir(out, "sweep folder")
    _write_plan(out, cache, base, specs)
    counts = {"finished": 0, "skipped": 0, "failed": 0}
    cache_id = _cache_identity(cache)
    todo = []
    for i, (name, cfg) in enumerate(configs.items(), 1):
        tag = f"[{i}/{len(configs)}]"
        status = check_run(name, cfg, tag, cache_id)
        if status is None:
            todo.append((name, cfg, tag))
        else:
            counts[status] += 1
    n = resolve_jobs(jobs, [cfg for _, cfg, _ in todo])
    if n > 1 and len(todo) > 1:
        for status, count in train_in_processes(todo, min(n, len(todo)), fit).items():
            counts[status] += count
    else:
        fit = fit or default_fit()
        for name, cfg, tag in todo:
            counts[train_run(name, cfg, fit, tag)] += 1
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

