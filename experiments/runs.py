"""Run folders -> records and results tables: loading, grouping by configuration, aggregation.

Every number is the test metric of the checkpoint the run's selection rule chose
(``summary["test_best"]``; ``distill --select``, by default the best validation WGA), in percent; "Mean ± Std" is over the seeds that finished, with the sample std (ddof=1). Runs are
grouped by the identity values of their ``config.json`` (:func:`distill.config.group_key`), never by
their folder names.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.constants import STUDY_BASELINE
from core.files import JSONFileError, load_json, read_jsonl
from distill.config import (CONFIG, METRICS, SELECT_WORDS, SUMMARY, DistillConfig, group_key, identity_of,
                            non_default_settings, setting_label)
from experiments.run_files import read_run_files
from experiments.sweep import PRESETS, SWEEP_FILE

# A folder holding any of these is a run (distill.config.RUN_FILES lists all a run writes).
RUN_MARKERS = (CONFIG, SUMMARY, METRICS)
# Short names of the teacher weightings in row labels and legends ("AGRE-KD" alone is the
# study's), and what each is, in words, for table captions. The cached weights are never called
# AGRE-KD without saying what they are: static, student-independent bias-disagreement weights.
WEIGHTING_LABELS = {"agre-batch": "AGRE-KD", "agre": "AGRE-KD per-sample (paper)", "aver": "AVER",
                    "cached": "Cached bias-disagreement weights (static)"}
WEIGHTING_CAPTIONS = {
    "agre-batch/all": "AGRE-KD: batch weights from the gradients of all student "
                      "parameters (the study's method)",
    "agre-batch/layer4": "AGRE-KD: batch weights from the gradients of layer4 and the classifier",
    "agre-batch/last": "AGRE-KD: batch weights from the gradients of the classifier (closed form)",
    "agre": "per-sample AGRE-KD (the paper's formula)",
    "cached": "cached static bias-disagreement weights",
    "aver": "AVER"}


def weighting_of(config: dict) -> str:
    """The weighting of a configuration, with its parameter set for agre-batch: "agre-batch/all",
    "agre", "cached", "aver" (the keys of WEIGHTING_CAPTIONS)."""
    weighting = config.get("weighting", DistillConfig.weighting)
    if weighting == "agre-batch":
        return f"agre-batch/{config.get('agre_params', DistillConfig.agre_params)}"
    return str(weighting)


def weighting_label(config: dict) -> str:
    """Short name for labels: "AGRE-KD" (the study's), "AGRE-KD (layer4)", "AVER", ..."""
    key = weighting_of(config)
    if key.startswith("agre-batch/") and key != "agre-batch/all":
        return f"AGRE-KD ({key.split('/')[1]})"
    return WEIGHTING_LABELS.get(config.get("weighting"), str(config.get("weighting")))


DASH, NA = "—", "n/a"


# ----------------------------------------------------------------------------- loading runs

@dataclass
class RunRecord:
    """One run folder. ``status`` is "finished", "failed" or "incomplete" (no summary yet)."""

    name: str
    path: Path
    status: str
    reason: str = ""
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    epochs_logged: int = 0
    epoch_seconds: float | None = None  # sum of the epochs' time_s in metrics.jsonl (train + val)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def test(self) -> dict:
        """Test metrics of the selected checkpoint (finished runs only)."""
        return self.summary["test_best"]

    @property
    def select_rule(self) -> str:
        """The run's model selection rule (runs of earlier versions: val-wga, the only one then)."""
        rule = (self.summary or {}).get("select", {}).get("rule")
        return rule or self.config.get("select", DistillConfig.select)

    @property
    def selected_epoch(self) -> int | None:
        return (self.summary or {}).get("best_epoch")

    @property
    def oracle(self) -> dict | None:
        """The diagnostic oracle (``{"epoch", "test"}``: the epoch of the best test WGA), or None."""
        return (self.summary or {}).get("oracle")

    @property
    def weight_wga_spearman(self) -> float | None:
        """Spearman rank correlation between each teacher's mean weight in the last epoch
        (metrics.jsonl) and its validation WGA (summary ``teacher_val``): does the weighting favour
        the better teachers? None when undefined (uniform weights, equal WGAs, or not recorded)."""
        return weight_wga_spearman(self)


# Summaries written before they recorded group names are Waterbirds runs.
WATERBIRDS_GROUPS = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")


def group_names_of(records: list["RunRecord"]) -> list[str]:
    """Group names of the finished runs (from their summaries), ``g0``.. when none says."""
    for r in records:
        if r.finished and r.summary.get("group_names"):
            return list(r.summary["group_names"])
    width = max((len(r.test.get("group_acc") or []) for r in records if r.finished), default=4)
    return list(WATERBIRDS_GROUPS) if width == 4 else [f"g{g}" for g in range(width)]


def last_teacher_weights(rec: "RunRecord") -> list[float] | None:
    """Each teacher's mean weight in the run's last logged epoch (metrics.jsonl), or None."""
    if not rec.finished:
        return None
    last = [m for m in read_jsonl(rec.path / METRICS) if m.get("teacher_weights")][-1:]
    return [float(w) for w in last[0]["teacher_weights"]] if last else None


def weight_wga_spearman(rec: "RunRecord", split: str = "val") -> float | None:
    """See :attr:`RunRecord.weight_wga_spearman`; ``split``: the teachers' WGA on val or test."""
    key = f"teacher_{split}"
    if not rec.finished or not rec.summary.get(key):
        return None
    weights = last_teacher_weights(rec)
    if not weights:
        return None
    names = [t["name"] for t in rec.summary.get("teachers", []) if t.get("role", "teacher") == "teacher"]
    wgas = [(rec.summary[key].get(n) or {}).get("wga") for n in names]
    if len(names) != len(weights) or any(w is None for w in wgas) or len(weights) < 2:
        return None
    if np.ptp(weights) <= 1e-6 * max(abs(max(weights)), 1e-12) or np.ptp(wgas) == 0:
        return None  # a constant ranks nothing: uniform weights (AVER) or teachers of equal WGA
    from scipy.stats import spearmanr

    rho = float(spearmanr(weights, wgas).statistic)
    return rho if math.isfinite(rho) else None


def _epochs(path: Path) -> tuple[int, float | None]:
    """Complete lines of metrics.jsonl (a run killed mid-write leaves a partial last line) and the
    sum of their ``time_s`` (None when no line has one)."""
    lines = read_jsonl(path)
    times = [e["time_s"] for e in lines if isinstance(e.get("time_s"), (int, float))]
    return len(lines), (float(sum(times)) if times else None)


def _status(path: Path, summary: dict | None, epochs: int, planned_epochs) -> tuple[str, str]:
    if summary is None:
        if (path / SUMMARY).exists():
            return "failed", "summary.json is unreadable"
        return "incomplete", (f"no summary.json (crashed or still running) after "
                              f"{epochs}/{planned_epochs or '?'} epochs")
    status = summary.get("status")
    if status == "failed":
        return "failed", str(summary.get("error") or "failed without an error message")
    if status != "finished":
        return "failed", f"summary.json has status {status!r}"
    wga = (summary.get("test_best") or {}).get("wga")
    if not isinstance(wga, (int, float)) or not math.isfinite(wga):
        return "failed", "summary.json has no finite test_best WGA"
    return "finished", ""


def load_run(path: str | Path) -> RunRecord:
    """Read one run folder (config.json, summary.json, metrics.jsonl) into a RunRecord. A file
    that cannot be used makes the run "failed", with the file and the field as its reason."""
    path = Path(path)
    summary, config, why = read_run_files(path)
    epochs, seconds = _epochs(path / METRICS)
    status, reason = _status(path, summary, epochs, config.get("epochs"))
    if why:
        status, reason = "failed", why
    return RunRecord(path.name, path, status, reason, config, summary, epochs, seconds)


def load_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run folder directly under ``runs_dir`` (a folder with any of RUN_MARKERS), by name."""
    folders = [p for p in sorted(Path(runs_dir).iterdir())
               if p.is_dir() and any((p / f).exists() for f in RUN_MARKERS)]
    return [load_run(p) for p in folders]


def load_plan(runs_dir: str | Path) -> list[dict] | None:
    """The planned runs of sweep.json (``{"name", "overrides", "preset", "table", "label"}``), or
    None. Entries of version 1 (no "table") belong to their preset's table."""
    path = Path(runs_dir) / SWEEP_FILE
    if not path.exists():
        return None
    plan = load_json(path, SWEEP_FILE, kind=dict)  # a JSONFileError (a message) when unusable
    runs = plan.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(e, dict) for e in runs):
        raise JSONFileError(f"{SWEEP_FILE} {path}: field runs is not a list of objects")
    for i, e in enumerate(runs):
        if not isinstance(e.get("name"), str) or not isinstance(e.get("overrides", {}), dict) or any(
                e.get(k) is not None and not isinstance(e[k], str) for k in ("preset", "table", "label")):
            raise JSONFileError(f"{SWEEP_FILE} {path}: field runs[{i}] needs a name, an overrides object and "
                                f"strings (or null) as preset, table and label")
    return [{**e, "table": e.get("table") or e.get("preset")} for e in runs]


# ----------------------------------------------------------------------------- aggregation

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(values) if values else None,
            statistics.stdev(values) if len(values) >= 2 else None)


@dataclass
class Row:
    """One configuration over seeds. Percent values; ``delta`` in points vs the baseline row."""

    label: str
    runs: list[RunRecord] = field(default_factory=list)  # finished runs only
    seeds: list[int] = field(default_factory=list)       # seeds planned (or found)
    is_baseline: bool = False
    delta: float | None = None

    @property
    def key(self) -> str | None:
        return group_key(self.runs[0].config) if self.runs else None

    @property
    def wga_by_seed(self) -> dict[int, float]:
        return {r.seed: 100 * r.test["wga"] for r in self.runs}

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.wga_by_seed.values()) if self.runs else None

    @property
    def std(self) -> float | None:
        """Sample std (ddof=1); None for fewer than two seeds."""
        return statistics.stdev(self.wga_by_seed.values()) if self.n >= 2 else None

    @property
    def minutes(self) -> float | None:
        """Wall minutes per run (sum of its epochs' time_s), mean over the finished seeds."""
        vals = [r.epoch_seconds / 60 for r in self.runs if r.epoch_seconds is not None]
        return statistics.fmean(vals) if vals else None

    @property
    def val_spread(self) -> float | None:
        """Max - min of the validation WGA over each run's last 5 epochs (points), mean over seeds:
        how far the best-validation pick could swing (small when training has settled)."""
        spreads = []
        for r in self.runs:
            wgas = [100 * m["val"]["wga"] for m in read_jsonl(r.path / METRICS) if "val" in m][-5:]
            if wgas:
                spreads.append(max(wgas) - min(wgas))
        return statistics.fmean(spreads) if spreads else None

    @property
    def spearman_by_seed(self) -> dict[int, float | None]:
        """Each run's rank correlation of teacher weights with teacher validation WGA."""
        return {r.seed: r.weight_wga_spearman for r in self.runs}

    @property
    def spearman(self) -> tuple[float | None, float | None, int]:
        """(mean, sample std or None, n) of the defined per-seed correlations."""
        vals = [v for v in self.spearman_by_seed.values() if v is not None]
        return (statistics.fmean(vals) if vals else None,
                statistics.stdev(vals) if len(vals) >= 2 else None, len(vals))

    @property
    def avg_acc(self) -> float | None:
        vals = [100 * r.test["avg_acc"] for r in self.runs if r.test.get("avg_acc") is not None]
        return statistics.fmean(vals) if vals else None

    def metric_by_seed(self, key: str) -> dict[int, float]:
        """A test metric of the selected checkpoint per seed, in percent (``wga``, ``avg_acc``,
        ``balanced_acc``, ``ece``...); seeds whose run did not record it are left out."""
        return {r.seed: 100 * r.test[key] for r in self.runs if _finite(r.test.get(key))}

    def metric(self, key: str) -> tuple[float | None, float | None]:
        """(mean, sample std or None) over seeds of :meth:`metric_by_seed`."""
        return _mean_std(list(self.metric_by_seed(key).values()))

    @property
    def oracle_by_seed(self) -> dict[int, float]:
        """Test WGA at each run's oracle epoch (a diagnostic, never a selection), percent."""
        return {r.seed: 100 * r.oracle["test"]["wga"] for r in self.runs
                if r.oracle and _finite((r.oracle.get("test") or {}).get("wga"))}

    @property
    def selection(self) -> str:
        """The rule(s) and the chosen epoch per seed, e.g. "val-wga: 7/9/10" (seeds in order)."""
        rules = sorted({r.select_rule for r in self.runs})
        epochs = "/".join(str(r.selected_epoch) for r in sorted(self.runs, key=lambda r: r.seed or 0))
        return f"{', '.join(rules)}: {epochs}" if self.runs else DASH

    def group_stats(self) -> list[tuple[float | None, float | None]]:
        """Per-group test accuracy (percent), (mean, sample std or None) over seeds per group."""
        width = max((len(r.test.get("group_acc") or []) for r in self.runs), default=0)
        return [_mean_std([100 * a for r in self.runs for a in (r.test.get("group_acc") or [])[g:g + 1]
                           if _finite(a)]) for g in range(width)]

    @property
    def group_acc(self) -> list[float]:
        """Per-group test accuracy, mean over seeds (NaN for a group empty in every run)."""
        width = max((len(r.test.get("group_acc") or []) for r in self.runs), default=0)
        accs = np.array([[np.nan if a is None else a for a in (r.test.get("group_acc") or [])]
                         + [np.nan] * (width - len(r.test.get("group_acc") or [])) for r in self.runs],
                        dtype=float).reshape(-1, width)
        present = ~np.isnan(accs)
        count = present.sum(0)
        total = np.where(present, accs, 0.0).sum(0)
        return [100 * t / c if c else math.nan for t, c in zip(total, count)]


@dataclass
class Table:
    """A results table: rows in display order; ``baseline`` is the label of the Δ reference."""

    name: str
    title: str
    rows: list[Row]
    baseline: str | None = None
    weightings: list[str] = field(default_factory=list)  # WEIGHTING_CAPTIONS keys, in row order
    # (row, against) verdicts; [] = all vs baseline
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def caption(self) -> str:
        """What weighted the teachers in this table's rows, in words."""
        if not self.weightings:
            return "Teacher weighting: unknown (no run configuration found)."
        return "Teacher weighting: " + "; ".join(WEIGHTING_CAPTIONS.get(w, w) for w in self.weightings) + "."

    @property
    def seeds(self) -> list[int]:
        return sorted({s for row in self.rows for s in row.seeds})

    @property
    def selection_caption(self) -> str:
        """The model selection of the rows' numbers, in words (every table says it)."""
        rules = list(dict.fromkeys(r.select_rule for row in self.rows for r in row.runs))
        if not rules:
            return "Model selection: none yet (no finished run)."
        return ("Model selection: test metrics at the epoch of " + "; ".join(
            f"{SELECT_WORDS.get(rule, rule)} ({rule})" for rule in rules) + ", the chosen epoch per seed "
            "in column Epoch; Oracle WGA (diagnostic) = test WGA at the epoch of the best test WGA, never a "
            "selection.")


def describe(config: dict) -> str:
    """A readable row label for a configuration, e.g. "AGRE-KD γ=0.5, α=0.9, layer3+layer4"."""
    parts = [f"{weighting_label(config)} γ={float(config.get('gamma', 0)):g}"]
    if float(config.get("alpha", 1.0)) != 1.0:
        parts.append(f"α={float(config['alpha']):g}")
    if tuple(config.get("layers", ("layer4",))) != ("layer4",):
        parts.append("+".join(config["layers"]))
    if config.get("feature_weighting", "none") != "none":
        parts.append(f"{config['feature_weighting']}-weighted features")
    extras = non_default_settings(identity_of(config))
    if config.get("weighting", DistillConfig.weighting) == "agre-batch":
        extras.pop("agre_params", None)  # in the weighting's label
    return ", ".join(parts + [setting_label(k, v) for k, v in extras.items()])


def baseline_key(config: dict) -> str:
    """Group key of the paired baseline: the same settings with the study's AGRE-KD, γ=0, α=1,
    layer4."""
    return group_key({**config, **STUDY_BASELINE})


def aggregate(records: list[RunRecord]) -> list[Row]:
    """Finished runs grouped by configuration minus seed, with Δ against the paired baseline.

    Returns one Row per group (label from :func:`describe`), ordered by label. A group whose
    configuration is the baseline (the study's AGRE-KD, γ=0, α=1, layer4, no feature weighting) is marked
    ``is_baseline``; the others get ``delta`` = their mean minus the baseline's mean when that
    baseline group has finished runs.
    """
    groups: dict[str, Row] = {}
    for rec in (r for r in records if r.finished):
        row = groups.setdefault(group_key(rec.config), Row(describe(rec.config)))
        row.runs.append(rec)
        row.seeds.append(rec.seed)
    for row in groups.values():
        base = groups.get(baseline_key(row.runs[0].config))
        row.is_baseline = base is row
        if base is not None and not row.is_baseline:
            row.delta = row.mean - base.mean
    return sorted(groups.values(), key=lambda r: r.label)


def _preset_table(table_name: str, entries: list[dict], by_name: dict[str, RunRecord]) -> Table:
    """Rows of one preset table in plan order; Δ against the preset's baseline row. A table of a
    preset run with sweep-wide settings (``main [epochs=5]``) says them in its title."""
    preset = entries[0].get("preset") or table_name
    meta = PRESETS.get(preset, {})
    rows: dict[str, Row] = {}
    weightings: list[str] = []
    for entry in entries:
        row = rows.setdefault(entry["label"], Row(entry["label"]))
        row.seeds.append(entry["overrides"].get("seed", _seed_of(by_name.get(entry["name"]))))
        rec = by_name.get(entry["name"])
        if rec is not None and rec.finished:
            row.runs.append(rec)
        config = rec.config if rec is not None and rec.config else entry["overrides"]
        if weighting_of(config) not in weightings:
            weightings.append(weighting_of(config))
    title = meta.get("title", preset) + table_name[len(preset):]
    table = Table(table_name, title, list(rows.values()), meta.get("baseline"), weightings,
                  [tuple(p) for p in meta.get("pairs", [])])
    _set_deltas(table)
    return table


def _seed_of(rec: RunRecord | None) -> int:
    return rec.seed if rec is not None and rec.seed is not None else DistillConfig.seed


def _set_deltas(table: Table) -> None:
    base = next((r for r in table.rows if r.label == table.baseline), None)
    for row in table.rows:
        row.is_baseline = row is base
        has_both = base is not None and base.runs and row.runs
        row.delta = row.mean - base.mean if has_both and row is not base else None


def build_tables(runs_dir: str | Path, records: list[RunRecord] | None = None) -> list[Table]:
    """One table per preset table found in sweep.json, in the presets' order, plus "Other runs".

    Without sweep.json, one table of every finished run grouped by configuration. Finished
    runs that no preset table shows (ad-hoc grids) go to the "Other runs" table, Δ against
    the paired baseline (:func:`aggregate`).
    """
    records = load_runs(runs_dir) if records is None else records
    by_name = {r.name: r for r in records}
    plan = [e for e in load_plan(runs_dir) or [] if e.get("table")]
    order = {p: i for i, p in enumerate(PRESETS)}
    names = sorted(dict.fromkeys(e["table"] for e in plan),
                   key=lambda t: (order.get(_preset_of(t, plan), len(order)), _preset_of(t, plan), t))
    tables = [_preset_table(t, [e for e in plan if e["table"] == t], by_name) for t in names]
    shown = {r.name for t in tables for row in t.rows for r in row.runs}
    # Aggregate everything so that a run's paired baseline counts even when a preset shows it.
    rest = [row for row in aggregate(records) if not shown & {r.name for r in row.runs}]
    if rest:
        title = "Other runs" if tables else "All runs"
        weightings = list(dict.fromkeys(weighting_of(row.runs[0].config) for row in rest))
        tables.append(Table("runs", title, rest, "paired AGRE-KD γ=0 (same other settings)", weightings))
    return tables


def _preset_of(table: str, plan: list[dict]) -> str:
    return next(e.get("preset") or table for e in plan if e["table"] == table)


def gamma_family(rows: list[Row]) -> dict[str, dict[float, Row]]:
    """``{weighting: {gamma: Row}}`` at α=1, layer4, no feature weighting, keyed by
    :func:`weighting_of` ("agre-batch/all" is the study's AGRE-KD, "aver" AVER, ...).

    When runs differ in other settings (e.g. epochs), the most common setting is used so that
    one γ never has two points.
    """
    fixed = {"alpha": 1.0, "layers": ("layer4",), "layer_gammas": None, "feature_weighting": "none"}
    cands = [r for r in rows if r.runs
             and group_key(r.runs[0].config) == group_key({**r.runs[0].config, **fixed})]
    if not cands:
        return {}
    sig = [baseline_key(r.runs[0].config) for r in cands]
    common = max(set(sig), key=sig.count)
    family: dict[str, dict[float, Row]] = {}
    for row, s in zip(cands, sig):
        if s == common:
            cfg = row.runs[0].config
            family.setdefault(weighting_of(cfg), {})[float(cfg["gamma"])] = row
    return family
