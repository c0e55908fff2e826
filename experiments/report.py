"""Sweep folder -> the report's tables (Markdown + CSV) and plots.

Every number is the test metric of the best-validation-WGA checkpoint (``summary["test_best"]``),
in percent; "Mean ± Std" is over the seeds that finished, with the sample std (ddof=1). A run that
was planned (``sweep.json``) but has no finished summary is listed with its reason, never dropped.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.metrics import GROUP_NAMES, NUM_GROUPS
from distill.config import DistillConfig
from experiments.sweep import PRESETS, SWEEP_FILE, group_key, read_summary

RUN_FILES = ("config.json", "summary.json", "metrics.jsonl")
# The reference configuration of the report: AGRE-KD logits only, pure KD, layer4.
BASELINE = {"weighting": "agre", "gamma": 0.0, "alpha": 1.0, "layers": ("layer4",),
            "layer_gammas": None, "feature_weighting": "none"}
WEIGHTING_NAMES = {"agre": "AGRE-KD", "aver": "AVER", "agre-batch": "AGRE-KD (batch)",
                   "cached": "AGRE-KD (cached)"}
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

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def test(self) -> dict:
        """Test metrics of the best-validation-WGA checkpoint (finished runs only)."""
        return self.summary["test_best"]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _count_epochs(path: Path) -> int:
    """Complete lines of metrics.jsonl (a run killed mid-write leaves a partial last line)."""
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
            count += 1
        except ValueError:
            pass
    return count


def _status(path: Path, summary: dict | None, epochs: int, planned_epochs) -> tuple[str, str]:
    if summary is None:
        if (path / "summary.json").exists():
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
    """Read one run folder (config.json, summary.json, metrics.jsonl) into a RunRecord."""
    path = Path(path)
    summary = read_summary(path)
    config = _read_json(path / "config.json") or (summary or {}).get("config") or {}
    epochs = _count_epochs(path / "metrics.jsonl")
    status, reason = _status(path, summary, epochs, config.get("epochs"))
    return RunRecord(path.name, path, status, reason, config, summary, epochs)


def load_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run folder directly under ``runs_dir`` (a folder with any of RUN_FILES), by name."""
    folders = [p for p in sorted(Path(runs_dir).iterdir())
               if p.is_dir() and any((p / f).exists() for f in RUN_FILES)]
    return [load_run(p) for p in folders]


def load_plan(runs_dir: str | Path) -> list[dict] | None:
    """The planned runs of sweep.json (``{"name", "overrides", "preset", "label"}``), or None."""
    plan = _read_json(Path(runs_dir) / SWEEP_FILE)
    return None if plan is None else plan.get("runs", [])


# ----------------------------------------------------------------------------- aggregation

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
    def avg_acc(self) -> float | None:
        vals = [100 * r.test["avg_acc"] for r in self.runs if r.test.get("avg_acc") is not None]
        return statistics.fmean(vals) if vals else None

    @property
    def group_acc(self) -> list[float]:
        """Per-group test accuracy, mean over seeds (NaN for a group empty in every run)."""
        accs = np.array([[np.nan if a is None else a
                          for a in r.test.get("group_acc") or [None] * NUM_GROUPS]
                         for r in self.runs], dtype=float).reshape(-1, NUM_GROUPS)
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

    @property
    def seeds(self) -> list[int]:
        return sorted({s for row in self.rows for s in row.seeds})


def describe(config: dict) -> str:
    """A readable row label for a configuration, e.g. "AGRE-KD γ=0.5, α=0.9, layer3+layer4"."""
    parts = [f"{WEIGHTING_NAMES.get(config.get('weighting'), config.get('weighting'))} "
             f"γ={float(config.get('gamma', 0)):g}"]
    if float(config.get("alpha", 1.0)) != 1.0:
        parts.append(f"α={float(config['alpha']):g}")
    if tuple(config.get("layers", ("layer4",))) != ("layer4",):
        parts.append("+".join(config["layers"]))
    if config.get("feature_weighting", "none") != "none":
        parts.append(f"{config['feature_weighting']}-weighted features")
    extras = group_key(config).split("_")[5:]  # fields that differ from their defaults
    return ", ".join(parts + extras)


def baseline_key(config: dict) -> str:
    """Group key of the paired baseline: the same settings with AGRE-KD, γ=0, α=1, layer4."""
    return group_key({**config, **BASELINE})


def aggregate(records: list[RunRecord]) -> list[Row]:
    """Finished runs grouped by configuration minus seed, with Δ against the paired baseline.

    Returns one Row per group (label from :func:`describe`), ordered by label. A group whose
    configuration is the baseline (AGRE-KD, γ=0, α=1, layer4, no feature weighting) is marked
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


def _preset_table(preset: str, entries: list[dict], by_name: dict[str, RunRecord]) -> Table:
    """Rows of one preset in plan order; Δ against the preset's baseline row."""
    meta = PRESETS.get(preset, {})
    rows: dict[str, Row] = {}
    for entry in entries:
        row = rows.setdefault(entry["label"], Row(entry["label"]))
        row.seeds.append(entry["overrides"].get("seed", _seed_of(by_name.get(entry["name"]))))
        rec = by_name.get(entry["name"])
        if rec is not None and rec.finished:
            row.runs.append(rec)
    table = Table(preset, meta.get("title", preset), list(rows.values()), meta.get("baseline"))
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
    """One table per preset found in sweep.json, in the presets' order, plus "Other runs".

    Without sweep.json, one table of every finished run grouped by configuration. Finished
    runs that no preset table shows (ad-hoc grids) go to the "Other runs" table, Δ against
    the paired baseline (:func:`aggregate`).
    """
    records = load_runs(runs_dir) if records is None else records
    by_name = {r.name: r for r in records}
    plan = load_plan(runs_dir) or []
    presets = [p for p in PRESETS if any(e.get("preset") == p for e in plan)]
    presets += sorted({e["preset"] for e in plan if e.get("preset") and e["preset"] not in PRESETS})
    tables = [_preset_table(p, [e for e in plan if e.get("preset") == p], by_name) for p in presets]
    shown = {r.name for t in tables for row in t.rows for r in row.runs}
    # Aggregate everything so that a run's paired baseline counts even when a preset shows it.
    rest = [row for row in aggregate(records) if not shown & {r.name for r in row.runs}]
    if rest:
        title = "Other runs" if tables else "All runs"
        tables.append(Table("runs", title, rest, "paired AGRE-KD γ=0 (same other settings)"))
    return tables


# ----------------------------------------------------------------------------- formatting

def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return NA if value is None else f"{value:+.2f}"


def _mean_std(row: Row) -> str:
    if row.mean is None:
        return DASH
    return f"{row.mean:.2f} ± {NA if row.std is None else f'{row.std:.2f}'}"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in body])


def format_table(table: Table | str | Path, preset: str | None = None) -> str:
    """Markdown of one results table (layout of the user's report).

    ``table`` is a Table, or a sweep folder: then the table of ``preset`` (default "main" if
    planned there, else the first table). Columns: Method, "Seed 42"..., "Mean ± Std",
    "Δ vs Baseline", "Avg Acc"; values are test WGA in percent, 2 decimals.
    """
    if not isinstance(table, Table):
        tables = build_tables(table)
        if not tables:
            return "No finished or planned runs.\n"
        wanted = preset or ("main" if any(t.name == "main" for t in tables) else tables[0].name)
        matches = [t for t in tables if t.name == wanted]
        if not matches:
            raise ValueError(f"no table {wanted!r}; found {', '.join(t.name for t in tables)}")
        table = matches[0]
    seeds = table.seeds
    header = ["Method"] + [f"Seed {s}" for s in seeds] + ["Mean ± Std", "Δ vs Baseline", "Avg Acc"]
    body = []
    for row in table.rows:
        by_seed = row.wga_by_seed
        body.append([row.label] + [_pct(by_seed.get(s)) for s in seeds]
                    + [_mean_std(row), DASH if row.is_baseline else _signed(row.delta),
                       _pct(row.avg_acc)])
    caption = (f"Baseline: {table.baseline}." if table.baseline else "No baseline row.")
    return f"### {table.title}\n\n{caption}\n\n{_md_table(header, body)}\n"


def _teacher_section(records: list[RunRecord]) -> str:
    """Teachers' own test metrics, from the first finished run that recorded them."""
    source = next((r for r in records if r.finished and r.summary.get("teacher_test")), None)
    if source is None:
        return "No finished run recorded the teachers' test metrics.\n"
    roles = {t.get("name"): t.get("role", "") for t in source.summary.get("teachers", [])}
    def pct(m, key):
        return _pct(None if m.get(key) is None else 100 * m[key])

    body = [[name, roles.get(name, ""), pct(m, "wga"), pct(m, "avg_acc"), pct(m, "mean_acc")]
            for name, m in source.summary["teacher_test"].items()]
    table = _md_table(["Teacher", "Role", "Test WGA", "Avg Acc", "Mean Acc"], body)
    return f"From run `{source.name}`.\n\n{table}\n"


def _provenance(records: list[RunRecord]) -> str:
    """Caches and code versions behind the finished runs (mixing them is worth a warning)."""
    done = [r for r in records if r.finished]
    caches = sorted({str(r.summary.get("cache_fingerprint", "?")) for r in done})
    commits = sorted({str(r.summary.get("git_commit", "?")) for r in done})
    text = (f"{len(done)} finished run(s) of {len(records)} run folder(s); "
            f"cache fingerprint(s): {', '.join(c[:12] for c in caches) or NA}; "
            f"git commit(s): {', '.join(c[:12] for c in commits) or NA}.")
    if len(caches) > 1:
        text += " **Warning: the runs come from different teacher caches.**"
    return text + "\n"


def missing_runs(records: list[RunRecord], plan: list[dict] | None) -> list[dict]:
    """Planned runs without a finished summary, and failed or incomplete run folders.

    Returns ``[{"name", "planned_for", "status", "reason"}]``; a planned run with no folder has
    status "missing".
    """
    by_name = {r.name: r for r in records}
    planned: dict[str, list[str]] = {}
    for entry in plan or []:
        where = f"{entry['preset']}: {entry['label']}" if entry.get("preset") else "ad-hoc grid"
        planned.setdefault(entry["name"], []).append(where)
    names = list(planned) + [r.name for r in records if r.name not in planned]
    out = []
    for name in names:
        rec = by_name.get(name)
        if rec is not None and rec.finished:
            continue
        status, reason = ("missing", "not run (no run folder)") if rec is None else (
            rec.status, rec.reason)
        out.append({"name": name, "planned_for": "; ".join(planned.get(name, ["not planned"])),
                    "status": status, "reason": reason})
    return out


def _missing_section(missing: list[dict]) -> str:
    if not missing:
        return "None: every planned run finished.\n"
    # Tracebacks are in summary.json; the table keeps the last line, the actual error.
    body = [[f"`{m['name']}`", m["planned_for"], m["status"],
             (m["reason"].strip().splitlines() or [""])[-1][:300]] for m in missing]
    return _md_table(["Run", "Planned for", "Status", "Reason"], body) + "\n"


# ----------------------------------------------------------------------------- CSV

def write_csv(tables: list[Table], path: str | Path) -> Path:
    """All results tables in one CSV, numbers in percent (2 decimals), blank when absent."""
    seeds = sorted({s for t in tables for s in t.seeds})
    header = (["table", "row", "is_baseline", "n_seeds"] + [f"seed_{s}" for s in seeds]
              + ["wga_mean", "wga_std", "delta_vs_baseline", "avg_acc_mean"]
              + [f"acc_{g.replace('/', '_')}" for g in GROUP_NAMES])

    def num(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in tables:
            for row in t.rows:
                by_seed = row.wga_by_seed
                writer.writerow([t.name, row.label, int(row.is_baseline), row.n]
                                + [num(by_seed.get(s)) for s in seeds]
                                + [num(row.mean), num(row.std), num(row.delta), num(row.avg_acc)]
                                + [num(a) if row.runs else "" for a in row.group_acc])
    return Path(path)


# ----------------------------------------------------------------------------- plots

def _new_figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas (no global backend switch, works headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def gamma_family(rows: list[Row]) -> dict[str, dict[float, Row]]:
    """``{weighting: {gamma: Row}}`` for AGRE-KD and AVER at α=1, layer4, no feature weighting.

    When runs differ in other settings (e.g. epochs), the most common setting is used so that
    one γ never has two points.
    """
    fixed = {"alpha": 1.0, "layers": ("layer4",), "layer_gammas": None, "feature_weighting": "none"}
    cands = [r for r in rows if r.runs and r.runs[0].config.get("weighting") in ("agre", "aver")
             and group_key(r.runs[0].config) == group_key({**r.runs[0].config, **fixed})]
    if not cands:
        return {}
    sig = [baseline_key(r.runs[0].config) for r in cands]
    common = max(set(sig), key=sig.count)
    family: dict[str, dict[float, Row]] = {}
    for row, s in zip(cands, sig):
        if s == common:
            cfg = row.runs[0].config
            family.setdefault(cfg["weighting"], {})[float(cfg["gamma"])] = row
    return family


def plot_wga_vs_gamma(rows: list[Row], path: Path) -> str | None:
    """Test WGA (mean ± std over seeds, seeds as dots) against γ, one line per weighting.

    Returns None when written, else why it was skipped.
    """
    family = gamma_family(rows)
    if not any(len(by_gamma) >= 2 for by_gamma in family.values()):
        return "needs finished AGRE-KD or AVER runs (α=1, layer4) at two or more γ values"
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    for weighting in sorted(family):
        gammas = sorted(family[weighting])
        pts = [family[weighting][g] for g in gammas]
        line = ax.errorbar(gammas, [r.mean for r in pts], yerr=[r.std or 0.0 for r in pts],
                           marker="o", capsize=4, label=WEIGHTING_NAMES[weighting])
        for g, r in zip(gammas, pts):
            ax.scatter([g] * r.n, list(r.wga_by_seed.values()), s=10, alpha=0.4,
                       color=line[0].get_color())
    ax.set(xlabel="γ (feature loss weight)", ylabel="test WGA (%)",
           title="Worst-group accuracy vs γ (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return None


def plot_group_accuracy(rows: list[Row], path: Path) -> str | None:
    """Per-group test accuracy (mean over seeds) per configuration, grouped bars."""
    rows = [r for r in rows if r.runs]
    if not rows:
        return "no finished runs"
    accs = np.array([r.group_acc for r in rows])  # [configs, 4]
    fig = _new_figure(max(6.0, 1.1 * len(rows) + 2), 4.5)
    ax = fig.add_subplot()
    x, width = np.arange(len(rows)), 0.8 / NUM_GROUPS
    for g, name in enumerate(GROUP_NAMES):
        ax.bar(x + (g - (NUM_GROUPS - 1) / 2) * width, np.nan_to_num(accs[:, g]), width, label=name)
    ax.set_xticks(x, [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    low = np.nanmin(accs) if np.isfinite(accs).any() else 0.0
    ax.set(ylabel="test accuracy (%)", ylim=(max(0.0, low - 10), 100))
    ax.set_title("Per-group test accuracy (best-val-WGA checkpoint; mean over seeds)", pad=24, fontsize=10)
    # Above the axes: bars reach 100%, a legend inside would hide them.
    ax.legend(fontsize=8, ncol=NUM_GROUPS, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return None


def _load_weights(rec: RunRecord) -> np.ndarray | None:
    try:
        w = np.load(rec.path / "teacher_weights.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return w if w.ndim == 2 and w.shape[0] > 0 else None


def _teacher_names(rec: RunRecord, count: int) -> list[str]:
    names = [t["name"] for t in rec.summary.get("teachers", []) if t.get("role") != "biased"]
    return names if len(names) == count else [f"teacher {t}" for t in range(count)]


def plot_teacher_weights(records: list[RunRecord], path: Path) -> str | None:
    """Histogram of per-sample teacher weights (last epoch), per teacher, one panel per weighting.

    Per weighting (AGRE-KD and AVER first), one finished run that saved teacher_weights.npy,
    preferring the logits-only baseline settings (γ=0, α=1, layer4), then the lowest seed.
    """
    def preference(rec):
        plain = {**rec.config, **BASELINE, "weighting": rec.config["weighting"]}
        return group_key(rec.config) != group_key(plain), rec.seed or 0, rec.name

    chosen = []
    for weighting in ("agre", "aver", "agre-batch", "cached"):
        candidates = [r for r in records if r.finished and r.config.get("weighting") == weighting]
        for rec in sorted(candidates, key=preference):
            weights = _load_weights(rec)
            if weights is not None:
                chosen.append((weighting, rec, weights))
                break
    if not chosen:
        return "no finished run saved a readable teacher_weights.npy"
    fig = _new_figure(5 * len(chosen), 4)
    bins = np.linspace(0, 1, 21)
    for i, (weighting, rec, weights) in enumerate(chosen):
        ax = fig.add_subplot(1, len(chosen), i + 1)
        for t, name in enumerate(_teacher_names(rec, weights.shape[1])):
            ax.hist(weights[:, t], bins=bins, histtype="step", linewidth=1.5,
                    label=f"{name} (mean {weights[:, t].mean():.2f})")
        ax.set(xlabel="per-sample teacher weight", ylabel="training samples",
               title=f"{WEIGHTING_NAMES.get(weighting, weighting)}: {rec.name}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return None


def _pivot_section(rows: list[Row]) -> str:
    """AGRE-KD vs AVER at each γ both have (layout of the report's ablation A2)."""
    family = gamma_family(rows)
    common = sorted(set(family.get("agre", {})) & set(family.get("aver", {})))
    if not common:
        return ""
    body = []
    for g in common:
        agre, aver = family["agre"][g], family["aver"][g]
        body.append([f"{g:.2f}", _mean_std(agre), _mean_std(aver), _signed(agre.mean - aver.mean)])
    return ("### AGRE-KD vs AVER, paired by γ\n\nΔ = AGRE-KD − AVER (mean test WGA, points).\n\n"
            + _md_table(["γ", "AGRE-KD", "AVER", "Δ"], body) + "\n")


# ----------------------------------------------------------------------------- the report

PLOTS = {"wga_vs_gamma": "wga_vs_gamma.png", "group_accuracy": "group_accuracy.png",
         "teacher_weights": "teacher_weights.png"}


def _make_plots(records: list[RunRecord], rows: list[Row], out: Path) -> tuple[dict, dict]:
    """Writes the plots; returns (written paths, skip reasons) keyed by plot name."""
    makers = {"wga_vs_gamma": lambda p: plot_wga_vs_gamma(rows, p),
              "group_accuracy": lambda p: plot_group_accuracy(rows, p),
              "teacher_weights": lambda p: plot_teacher_weights(records, p)}
    written, skipped = {}, {}
    for name, make in makers.items():
        path = out / PLOTS[name]
        path.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
        reason = make(path)
        if reason is None:
            written[name] = path
        else:
            skipped[name] = reason
    return written, skipped


def _labelled_rows(tables: list[Table], records: list[RunRecord]) -> list[Row]:
    """One Row per configuration for the plots, labelled and ordered as in the first table
    that shows it (configurations in no table come last, by label)."""
    rows = aggregate(records)
    labels = {}
    for table in tables:
        for row in table.rows:
            if row.runs:
                labels.setdefault(row.key, row.label)
    order = {key: i for i, key in enumerate(labels)}
    for row in rows:
        row.label = labels.get(row.key, row.label)
    return sorted(rows, key=lambda r: (order.get(r.key, len(order)), r.label))


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv and the PNG plots for a sweep folder.

    Args:
        runs_dir: folder of run folders (and, optionally, sweep.json).
        out_dir: where to write; default ``<runs_dir>/report``.
    Returns:
        ``{"markdown", "csv", <plot name>...}`` -> path, for the files written. A plot whose
        runs are absent is not written; report.md says why.
    """
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = load_runs(runs_dir)
    tables = build_tables(runs_dir, records)
    rows = _labelled_rows(tables, records)
    plots, skipped = _make_plots(records, rows, out)
    missing = missing_runs(records, load_plan(runs_dir))

    md = ["# Group-robust distillation: results", "",
          "Test worst-group accuracy (%) of the best-validation-WGA checkpoint; Mean ± Std over "
          "the seeds that finished (sample std, n/a for one seed); Δ in points vs the baseline "
          f"row; {DASH} = no finished run (see *Missing or failed runs*).", "",
          _provenance(records), "## Results", ""]
    md += [format_table(t) for t in tables] or ["No finished runs.\n"]
    md += [_pivot_section(rows), "## Teachers (test set)", "", _teacher_section(records),
           "## Missing or failed runs", "", _missing_section(missing), "## Plots", ""]
    for name, fname in PLOTS.items():
        md.append(f"![{name}]({fname})" if name in plots
                  else f"- `{fname}` skipped: {skipped[name]}")
    paths = {"markdown": out / "report.md", "csv": write_csv(tables, out / "report.csv")}
    paths["markdown"].write_text("\n".join(md) + "\n")
    return {**paths, **plots}
