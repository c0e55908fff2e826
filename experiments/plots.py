"""The report's plots (this tool's `report` command): WGA against gamma, per-group accuracy, teacher-weight histograms."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from core.constants import STUDY_BASELINE
from distill.config import WEIGHTS, group_key
from experiments.runs import Row, RunRecord, gamma_family, weighting_label, weighting_of

# ----------------------------------------------------------------------------- plots

def _new_figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas (no global backend switch, works headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_wga_vs_gamma(rows: list[Row], path: Path) -> str | None:
    """Test WGA (mean ± std over seeds, seeds as dots) against γ, one line per weighting.

    Returns None when written, else why it was skipped.
    """
    family = gamma_family(rows)
    if not any(len(by_gamma) >= 2 for by_gamma in family.values()):
        return "needs finished runs of one weighting (α=1, layer4) at two or more γ values"
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    for weighting in sorted(family):
        gammas = sorted(family[weighting])
        pts = [family[weighting][g] for g in gammas]
        line = ax.errorbar(gammas, [r.mean for r in pts], yerr=[r.std or 0.0 for r in pts],
                           marker="o", capsize=4, label=weighting_label(pts[0].runs[0].config))
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


def group_counts_of(rows: list[Row]) -> list[int]:
    """Each group's test rows, from the first finished run that recorded them ([] when none)."""
    return next((r.test["group_count"] for row in rows for r in row.runs if r.test.get("group_count")), [])


def plot_group_accuracy(rows: list[Row], path: Path, group_names: list[str]) -> str | None:
    """Per-group test accuracy of the selected checkpoint per configuration: grouped bars of the
    mean over seeds, error bars of the sample std, each seed's value as a dot, the worst group's
    mean (WGA is the minimum per run, so it can lie below it) as a dash; the selection rule(s) in
    the title, each group's test count in the legend."""
    rows = [r for r in rows if r.runs]
    if not rows:
        return "no finished runs"
    stats = [r.group_stats() for r in rows]
    G = max(len(s) for s in stats)
    mean = np.array([[(s[g][0] if g < len(s) and s[g][0] is not None else np.nan) for g in range(G)]
                     for s in stats])
    std = np.array([[(s[g][1] or 0.0) if g < len(s) else 0.0 for g in range(G)] for s in stats])
    counts = group_counts_of(rows)
    fig = _new_figure(max(8.0, 1.3 * len(rows) + 4.5), 4.8)
    ax = fig.add_subplot()
    x, width = np.arange(len(rows)), 0.8 / max(G, 1)
    for g in range(G):
        name = group_names[g] if g < len(group_names) else f"g{g}"
        label = f"{name} (n={counts[g]})" if g < len(counts) else name
        pos = x + (g - (G - 1) / 2) * width
        ax.bar(pos, np.nan_to_num(mean[:, g]), width, yerr=std[:, g], capsize=2, label=label,
                      error_kw={"elinewidth": 0.8, "alpha": 0.7})
        for i, row in enumerate(rows):
            seeds = [100 * r.test["group_acc"][g] for r in row.runs
                     if len(r.test.get("group_acc") or []) > g and np.isfinite(r.test["group_acc"][g])]
            ax.scatter([pos[i]] * len(seeds), seeds, s=7, color="black", alpha=0.5, zorder=3,
                       linewidths=0)
    wga = [row.metric("wga")[0] for row in rows]
    ax.scatter(x, [np.nan if w is None else w for w in wga], marker="_", s=900, color="crimson", zorder=4,
               label="WGA (mean over seeds)")
    # wrapped, not rotated: a long label (settings spelled out) would run off the figure's edge
    ax.set_xticks(x, [textwrap.fill(r.label, 24, break_on_hyphens=False) for r in rows], fontsize=7)
    finite = mean[np.isfinite(mean)]
    low = float(np.min(finite - std[np.isfinite(mean)])) if finite.size else 0.0
    ax.set(ylabel="test accuracy (%)", ylim=(max(0.0, low - 10), 101))
    rules = sorted({r.select_rule for row in rows for r in row.runs})
    ax.set_title(f"Per-group test accuracy, checkpoint selected by {', '.join(rules)}\n"
                 "bars: mean over seeds, whiskers: sample std, dots: seeds", fontsize=9)
    # Beside the axes: bars reach 100%, a legend inside would hide them.
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=0.4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return None


def _load_weights(rec: RunRecord) -> np.ndarray | None:
    try:
        w = np.load(rec.path / WEIGHTS, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return w if w.ndim == 2 and w.shape[0] > 0 else None


def _teacher_names(rec: RunRecord, count: int) -> list[str]:
    names = [t["name"] for t in rec.summary.get("teachers", []) if t.get("role") != "biased"]
    return names if len(names) == count else [f"teacher {t}" for t in range(count)]


def plot_teacher_weights(records: list[RunRecord], path: Path) -> str | None:
    """Histogram of per-sample teacher weights (last epoch), per teacher, one panel per weighting.

    Per weighting (:func:`weighting_of`: the study's AGRE-KD and AVER first), one finished run
    that saved teacher_weights.npy, preferring the logits-only baseline settings (γ=0, α=1,
    layer4), then the lowest seed.
    """
    def preference(rec):
        plain = {**rec.config, **STUDY_BASELINE, "weighting": rec.config["weighting"],
                 "agre_params": rec.config.get("agre_params", STUDY_BASELINE["agre_params"])}
        return group_key(rec.config) != group_key(plain), rec.seed or 0, rec.name

    first = ("agre-batch/all", "aver", "agre", "cached")
    found = {weighting_of(r.config) for r in records if r.finished}
    chosen = []
    for weighting in [w for w in first if w in found] + sorted(found - set(first)):
        candidates = [r for r in records if r.finished and weighting_of(r.config) == weighting]
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
        # the weighting, then the run folder wrapped to the panel (run names are long)
        run = "\n".join(textwrap.wrap(rec.name, 48, break_on_hyphens=False))
        ax.set(xlabel="per-sample teacher weight", ylabel="training samples",
               title=f"{weighting_label(rec.config)}\n{run}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return None


PLOTS = {"wga_vs_gamma": "wga_vs_gamma.png", "group_accuracy": "group_accuracy.png",
         "teacher_weights": "teacher_weights.png"}


def make_plots(records: list[RunRecord], rows: list[Row], out: Path, group_names: list[str]) -> tuple[dict, dict]:
    """Writes the plots; returns (written paths, skip reasons) keyed by plot name."""
    makers = {"wga_vs_gamma": lambda p: plot_wga_vs_gamma(rows, p),
              "group_accuracy": lambda p: plot_group_accuracy(rows, p, group_names),
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
