"""Sweep folder -> the report (this tool's `report` command): Markdown tables, CSV and plots.

Every number is the test metric of the checkpoint each run's selection rule chose (``distill --select``,
by default the best validation WGA; every table's caption names the rule), in percent; "Mean ± Std" is
over the seeds that finished (sample std). The oracle (the epoch of the best test WGA) is a separate,
marked diagnostic column, never a selection. A run that was planned (``sweep.json``) but has no
finished summary is listed with its reason, never dropped.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.files import atomic_write_text, ensure_dir
from core.tables import format_table as text_table
from experiments.plots import PLOTS, make_plots, group_counts_of
from experiments.reference import COLUMN as STUDY
from experiments.reference import load_study, preset_of, study_column
from experiments.runs import (DASH, NA, WEIGHTING_CAPTIONS, Row, RunRecord, Table, aggregate, build_tables,
                              gamma_family, group_names_of, load_plan, load_runs, weighting_of)
from experiments.stats import paired_difference

# ----------------------------------------------------------------------------- formatting

def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return NA if value is None else f"{value:+.2f}"


def _minutes(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _mean_std(row: Row) -> str:
    return _pair((row.mean, row.std))


def _pair(stats: tuple[float | None, float | None]) -> str:
    """"mean ± std" (2 decimals), "mean ± n/a" for one seed, a dash for none."""
    mean, std = stats
    if mean is None:
        return DASH
    return f"{mean:.2f} ± {NA if std is None else f'{std:.2f}'}"


def _stats(by_seed: dict) -> tuple[float | None, float | None]:
    vals = list(by_seed.values())
    return (statistics.fmean(vals) if vals else None, statistics.stdev(vals) if len(vals) >= 2 else None)


ORACLE = "Oracle WGA (diagnostic)"
# The standard test metrics of the selected checkpoint (data.metrics), keys and column names.
STANDARD = {"wga": "WGA", "avg_acc": "Avg Acc (train-weighted)", "mean_group_acc": "Mean Group Acc",
            "worst_class_acc": "Worst-class Acc", "balanced_acc": "Balanced Acc", "mean_acc": "Mean Acc",
            "ece": "ECE"}


def format_table(table: Table | str | Path, preset: str | None = None, reference: bool = False) -> str:
    """Markdown of one results table (laid out as the study's tables).

    ``table`` is a Table, or a sweep folder: then the table of ``preset`` (default "main" if
    planned there, else the first table). Columns: Method, "Seed 42"..., "Mean ± Std",
    "Δ vs Baseline", "Avg Acc" (test WGA and average accuracy in percent, 2 decimals), "Min / run"
    (wall minutes of a run's epochs, mean over seeds), "Epoch" (the selection rule and the chosen
    epoch per seed), "Oracle WGA (diagnostic)" (test WGA at the epoch of the best test WGA, mean ±
    std: what an oracle would pick, never a selection). Under the title: the baseline row, the
    teacher weighting(s) of the rows and the model selection, in words. ``reference``: a preset's table also gets the
    column "Study" after "Mean ± Std" (the number the study printed for the row,
    :mod:`experiments.reference`) and footnotes under it naming the study's tables.
    """
    if not isinstance(table, Table):
        tables = build_tables(table)
        if not tables:
            return "No finished or planned runs.\n"
        wanted = preset or ("main" if any(t.name == "main" for t in tables) else tables[0].name)
        matches = [t for t in tables if t.name == wanted]
        if not matches:
            raise ConfigError(f"no table {wanted!r}; found {', '.join(t.name for t in tables)}")
        table = matches[0]
    seeds = table.seeds
    study = study_column(table) if reference else None
    header = (["Method"] + [f"Seed {s}" for s in seeds] + ["Mean ± Std"] + ([STUDY] if study else [])
              + ["Δ vs Baseline", "Avg Acc", "Min / run", "Epoch", ORACLE])
    body = []
    for i, row in enumerate(table.rows):
        by_seed = row.wga_by_seed
        body.append([row.label] + [_pct(by_seed.get(s)) for s in seeds] + [_mean_std(row)]
                    + ([study.cells[i]] if study else [])
                    + [DASH if row.is_baseline else _signed(row.delta), _pct(row.avg_acc),
                       _minutes(row.minutes), row.selection, _pair(_stats(row.oracle_by_seed))])
    caption = (f"Baseline: {table.baseline}." if table.baseline else "No baseline row.")
    caption += f" {table.caption} {table.selection_caption}"
    notes = "".join(f"\n{line}\n" for line in study.footnotes) if study else ""
    return f"### {table.title}\n\n{caption}\n\n{text_table(header, body)}\n{notes}"


def metrics_table(table: Table) -> str:
    """The standard test metrics of each row's selected checkpoint (data.metrics; percent, ECE too),
    mean ± std over seeds, with the selection rule and chosen epochs: "" when no row finished."""
    rows = [r for r in table.rows if r.runs]
    if not rows:
        return ""
    body = [[row.label, row.selection] + [_pair(row.metric(k)) for k in STANDARD] for row in rows]
    return ("Standard metrics (test split, selected checkpoint; mean ± std over seeds, percent; Avg Acc "
            "weights the groups by the training split's sizes, WILDS' convention; ECE over 15 equal-width "
            f"bins; definitions in docs/method.md#metrics). {table.selection_caption}\n\n"
            + text_table(["Method", "Epoch"] + list(STANDARD.values()), body) + "\n")


def group_table(table: Table, group_names: list[str]) -> str:
    """Per-group test accuracy of each row's selected checkpoint, mean ± std over seeds (percent);
    each group's test count in its header: "" when no row finished."""
    rows = [r for r in table.rows if r.runs]
    if not rows:
        return ""
    stats = [row.group_stats() for row in rows]
    width = max(len(s) for s in stats)
    counts = group_counts_of(rows)
    names = [(group_names[g] if g < len(group_names) else f"g{g}")
             + (f" (n={counts[g]})" if g < len(counts) else "") for g in range(width)]
    body = [[row.label] + [_pair(s[g]) if g < len(s) else DASH for g in range(width)]
            for row, s in zip(rows, stats)]
    return ("Per-group test accuracy (selected checkpoint; mean ± std over seeds, percent; n = the group's "
            "test rows).\n\n" + text_table(["Method"] + names, body) + "\n")


def verdicts(table: Table) -> list[str]:
    """What the table shows, in words, computed from its numbers: each row against the baseline (or
    the preset's own pairs, e.g. erased against raw features), paired by seed (mean and sample std
    of the per-seed differences). A difference is claimed only when a two-sided paired t-test puts
    it at p < 0.05 (|mean| > t_0.975(n-1) * std / sqrt(n): with 3 seeds, more than 2.48 std);
    otherwise "no difference beyond seed noise"."""
    by_label = {r.label: r for r in table.rows if r.runs}
    if table.pairs:
        pairs = [(by_label[a], by_label[b]) for a, b in table.pairs if a in by_label and b in by_label]
        if not pairs:
            return ["No pair of this table's comparisons has finished runs: nothing to compare."]
        return [_paired_verdict(row, base) for row, base in pairs]
    base = next((r for r in table.rows if r.is_baseline and r.runs), None)
    if base is None:
        return ["No finished baseline row: nothing to compare."]
    return [_paired_verdict(row, base) for row in table.rows if row is not base and row.runs]


def _paired_verdict(row, base) -> str:
    d = paired_difference(row.wga_by_seed, base.wga_by_seed)
    if d.n < 2:
        return (f"{row.label} vs {base.label}: {d.n} paired seed(s), too few to tell a difference from seed "
                "noise.")
    if d.significant:
        verb = "beats" if d.mean > 0 else "trails"
        return (f"{row.label} {verb} {base.label} by {abs(d.mean):.1f} ± {d.std:.1f} WGA points over "
                f"{d.n} seeds (paired by seed, p < 0.05).")
    return (f"{row.label} vs {base.label}: no difference beyond seed noise ({d.mean:+.1f} ± {d.std:.1f} "
            f"WGA points over {d.n} seeds, paired by seed).")


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
    table = text_table(["Teacher", "Role", "Test WGA", "Avg Acc", "Mean Acc"], body)
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
        where = f"{entry['table']}: {entry['label']}" if entry.get("table") else "ad-hoc grid"
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
    return text_table(["Run", "Planned for", "Status", "Reason"], body) + "\n"


# ----------------------------------------------------------------------------- CSV

def write_csv(tables: list[Table], path: str | Path, group_names: list[str], reference: bool = False) -> Path:
    """All results tables in one CSV, numbers in percent (2 decimals), blank when absent;
    ``min_per_run`` in wall minutes, ``weighting`` the row's teacher weighting in words,
    ``selection`` the rule and the chosen epoch per seed, then mean and std over seeds of each
    standard test metric (STANDARD: ECE in percent too) and of the oracle's test WGA (diagnostic).
    ``reference``: three more columns at the end, the study's ``study_wga_mean``,
    ``study_wga_std`` and ``study_source`` (its table), blank where it has no number."""
    seeds = sorted({s for t in tables for s in t.seeds})
    header = (["table", "row", "weighting", "is_baseline", "n_seeds"] + [f"seed_{s}" for s in seeds]
              + ["wga_mean", "wga_std", "delta_vs_baseline", "avg_acc_mean", "min_per_run", "selection"]
              + [f"{k}_{s}" for k in STANDARD for s in ("mean", "std")]
              + ["oracle_wga_mean", "oracle_wga_std"]
              + [f"acc_{g.replace('/', '_').replace(' ', '_')}" for g in group_names]
              + (["study_wga_mean", "study_wga_std", "study_source"] if reference else []))
    study = load_study() if reference else None

    def num(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(header)
    for t in tables:
        for row in t.rows:
            by_seed = row.wga_by_seed
            weighting = WEIGHTING_CAPTIONS.get(weighting_of(row.runs[0].config), "") if row.runs else ""
            writer.writerow([t.name, row.label, weighting, int(row.is_baseline), row.n]
                            + [num(by_seed.get(s)) for s in seeds]
                            + [num(row.mean), num(row.std), num(row.delta), num(row.avg_acc),
                               num(row.minutes), row.selection if row.runs else ""]
                            + [num(v) for k in STANDARD for v in row.metric(k)]
                            + [num(v) for v in _stats(row.oracle_by_seed)]
                            + [num(a) if row.runs else "" for a in row.group_acc]
                            + (_study_cells(study, t, row) if reference else []))
    return atomic_write_text(path, f.getvalue())  # whole, atomically


def _study_cells(study, table: Table, row: Row) -> list[str]:
    entry = study.row(preset_of(table), row.label)
    if entry is None:
        return ["", "", ""]
    return [f"{entry.mean:.2f}", "" if entry.std is None else f"{entry.std:.2f}", entry.source]


def _pivot_section(rows: list[Row]) -> str:
    """The study's AGRE-KD vs AVER at each γ both have (layout of the study's ablation A2)."""
    family = gamma_family(rows)
    common = sorted(set(family.get("agre-batch/all", {})) & set(family.get("aver", {})))
    if not common:
        return ""
    body = []
    for g in common:
        agre, aver = family["agre-batch/all"][g], family["aver"][g]
        body.append([f"{g:.2f}", _mean_std(agre), _mean_std(aver), _signed(agre.mean - aver.mean)])
    return ("### AGRE-KD vs AVER, paired by γ\n\nΔ = AGRE-KD − AVER (mean test WGA, points). "
            f"{WEIGHTING_CAPTIONS['agre-batch/all']}.\n\n"
            + text_table(["γ", "AGRE-KD", "AVER", "Δ"], body) + "\n")


def favour_section(rows: list[Row]) -> str:
    """Does the weighting favour the better teachers? Per configuration: the Spearman rank
    correlation between each teacher's mean weight (last epoch) and its validation WGA, per seed
    and mean ± std over seeds; n/a where it is undefined (uniform AVER weights, equal WGAs, or a
    run that did not record its teachers' validation metrics)."""
    rows = [r for r in rows if r.runs]
    if not rows:
        return ""
    seeds = sorted({s for r in rows for s in r.spearman_by_seed})

    def rho(v):
        return NA if v is None else f"{v:+.2f}"

    body = []
    for row in rows:
        by_seed = row.spearman_by_seed
        mean, std, n = row.spearman
        summary = NA if mean is None else f"{mean:+.2f} ± {NA if std is None else f'{std:.2f}'}"
        body.append([row.label, WEIGHTING_CAPTIONS.get(weighting_of(row.runs[0].config), "")]
                    + [rho(by_seed[s]) if s in by_seed else DASH for s in seeds] + [summary, str(n)])
    header = ["Method", "Weighting"] + [f"Seed {s}" for s in seeds] + ["Spearman ρ (mean ± std)", "n"]
    return ("### Does the weighting favour the better teachers?\n\nSpearman rank correlation between each "
            "teacher's mean weight in the last epoch and its validation WGA (+1: the better the teacher on "
            "validation, the larger its weight); n/a where it is undefined (uniform weights).\n\n"
            + text_table(header, body) + "\n")


def weights_found(rows: list[Row]) -> list[str]:
    """Does the weighting find the debiased teachers? One line per row whose weights are not uniform:
    each teacher's weight in the last epoch (mean over seeds) beside its test WGA, and the Spearman
    rank correlation of the two per run (mean ± std over seeds; +1: the better the teacher on test,
    the larger its weight)."""
    from experiments.runs import last_teacher_weights, weight_wga_spearman

    lines = []
    for row in rows:
        per_run = [(r, last_teacher_weights(r)) for r in row.runs]
        per_run = [(r, w) for r, w in per_run if w and np.ptp(w) > 1e-6 * max(w)]
        if not per_run:
            continue
        test = per_run[0][0].summary.get("teacher_test") or {}
        names = [t["name"] for t in per_run[0][0].summary.get("teachers", []) if t.get("role") == "teacher"]
        mean_w = np.mean([w for _, w in per_run], axis=0)
        rhos = [v for v in (weight_wga_spearman(r, "test") for r, _ in per_run) if v is not None]
        pairs = ", ".join(f"{n} {w:.2f} (WGA {100 * (test.get(n) or {}).get('wga', float('nan')):.0f})"
                          for n, w in zip(names, mean_w))
        rho = (f"{np.mean(rhos):+.2f} ± {np.std(rhos, ddof=1):.2f}" if len(rhos) > 1 else
               f"{rhos[0]:+.2f}" if rhos else NA)
        lines.append(f"{row.label}: weights {pairs}; Spearman ρ with the teachers' test WGA {rho} "
                     f"over {len(rhos)} run(s)")
    return lines


# ----------------------------------------------------------------------------- the report

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


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, reference: bool = False,
                 latex: bool = False) -> dict[str, Path]:
    """Write report.md, report.csv and the PNG plots for a sweep folder.

    Args:
        runs_dir: folder of run folders (and, optionally, sweep.json).
        out_dir: where to write; default ``<runs_dir>/report``.
        reference: every preset table with the study's number next to each row (the column
            "Study", see :func:`format_table`; in the CSV, ``study_*`` columns).
        latex: also report.tex, the tables as LaTeX (:mod:`experiments.latex`).
    Returns:
        ``{"markdown", "csv", <plot name>..., "latex"}`` -> path, for the files written. A plot whose
        runs are absent is not written; report.md says why.
    """
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    ensure_dir(out, "report folder")
    records = load_runs(runs_dir)
    tables = build_tables(runs_dir, records)
    rows = _labelled_rows(tables, records)
    names = group_names_of(records)
    plots, skipped = make_plots(records, rows, out, names)
    missing = missing_runs(records, load_plan(runs_dir))

    md = ["# Group-robust distillation: results", "",
          "Test worst-group accuracy (%) of the checkpoint each run's model selection chose (every "
          "table's caption names the rule; column Epoch gives the chosen epoch per seed); Mean ± Std over "
          "the seeds that finished (sample std, n/a for one seed); Δ in points vs the baseline "
          f"row; Min / run = wall minutes of a run's epochs (training and validation), mean over "
          f"seeds; {ORACLE} = test WGA at each run's epoch of best TEST WGA, a diagnostic of how much the "
          f"selection costs, never a selection rule; {DASH} = no finished run (see *Missing or failed runs*)."
          + (f" {STUDY} = the test WGA the study printed for the row (experiments/study_tables.json; "
             "the footnotes under each table name the study's table)." if reference else ""), "",
          _provenance(records), "## Results", ""]
    for t in tables:
        md += [format_table(t, reference=reference), "In words: " + " ".join(verdicts(t)) + "\n",
               metrics_table(t), group_table(t, names)]
    if not tables:
        md.append("No finished runs.\n")
    md += [_pivot_section(rows), favour_section(rows), "## Teachers (test set)", "",
           _teacher_section(records),
           "## Missing or failed runs", "", _missing_section(missing), "## Plots", ""]
    for name, fname in PLOTS.items():
        md.append(f"![{name}]({fname})" if name in plots
                  else f"- `{fname}` skipped: {skipped[name]}")
    paths = {"markdown": out / "report.md", "csv": write_csv(tables, out / "report.csv", names, reference)}
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n")
    if latex:
        from experiments.latex import latex_document

        paths["latex"] = atomic_write_text(out / "report.tex", latex_document(tables))
    return {**paths, **plots}
