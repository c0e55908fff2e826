"""The report's results tables as LaTeX (``report --latex``): one ``table`` with a ``tabular`` each.

Cells are mean ± std over seeds (percent, 2 decimals). In each metric column the best row is bold
only when it is beyond seed noise of the second best, by the paired test the verdicts use
(:func:`experiments.stats.paired_difference`, p < 0.05 over the seeds both have); the oracle column
is a diagnostic and never bold. Plain LaTeX: no package beyond the standard ones is needed.
"""
from __future__ import annotations

import statistics

from experiments.runs import Row, Table
from experiments.stats import paired_difference

# (column header, Row metric key, higher is better); "oracle" is the diagnostic column.
COLUMNS = (("WGA", "wga", True), ("Avg Acc", "avg_acc", True), ("Worst-class", "worst_class_acc", True),
           ("Balanced", "balanced_acc", True), ("ECE", "ece", False))
_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
            "γ": r"$\gamma$", "α": r"$\alpha$", "Δ": r"$\Delta$", "ρ": r"$\rho$", "±": r"$\pm$",
            "—": "---", "–": "--", "−": "-", "×": r"$\times$"}


def escape(text: str) -> str:
    """Text as LaTeX source: its special characters escaped, the Greek letters of labels in math."""
    return "".join(_SPECIAL.get(c, c) for c in str(text))


def _cell(stats: tuple[float | None, float | None], bold: bool = False) -> str:
    mean, std = stats
    if mean is None:
        return "---"
    text = f"{mean:.2f}" + (r" $\pm$ " + f"{std:.2f}" if std is not None else "")
    return r"\textbf{" + text + "}" if bold else text


def best_beyond_noise(rows: list[Row], key: str, higher: bool) -> Row | None:
    """The row of the best mean in column ``key`` when a paired test over seeds puts it beyond
    seed noise of the second best (p < 0.05), else None."""
    scored = [(row.metric(key)[0], row) for row in rows if row.metric(key)[0] is not None]
    if len(scored) < 2:
        return None
    scored.sort(key=lambda t: t[0], reverse=higher)
    (_, best), (_, second) = scored[0], scored[1]
    d = paired_difference(best.metric_by_seed(key), second.metric_by_seed(key))
    return best if d.significant and (d.mean > 0) == higher else None


def latex_table(table: Table) -> str:
    """One results table as a LaTeX ``table``: caption (title, baseline, weighting, selection) and
    a ``tabular`` of Method, the COLUMNS, Epoch (rule: chosen epoch per seed) and the oracle."""
    rows = [r for r in table.rows if r.runs]
    bold = {key: best_beyond_noise(rows, key, higher) for _, key, higher in COLUMNS}
    header = ["Method"] + [name + (r" $\downarrow$" if not higher else "") for name, _, higher in COLUMNS] + [
        "Epoch", r"Oracle WGA$^\dagger$"]
    caption = (f"{table.title}. " + (f"Baseline: {table.baseline}. " if table.baseline else "")
               + f"{table.caption} {table.selection_caption}")
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\caption{" + escape(caption) + " Test metrics in percent, "
             r"mean $\pm$ std over seeds; bold: best beyond seed noise of the second (paired $t$-test, "
             r"$p<0.05$); $^\dagger$diagnostic only, never a selection rule.}",
             r"\begin{tabular}{l" + "r" * len(COLUMNS) + "lr}", r"\hline",
             " & ".join(header) + r" \\", r"\hline"]
    for row in rows:
        cells = [escape(row.label)] + [_cell(row.metric(key), bold[key] is row) for _, key, _ in COLUMNS]
        oracle = list(row.oracle_by_seed.values())
        oracle_stats = (statistics.fmean(oracle) if oracle else None,
                        statistics.stdev(oracle) if len(oracle) >= 2 else None)
        cells += [escape(row.selection), _cell(oracle_stats)]
        lines.append(" & ".join(cells) + r" \\")
    if not rows:
        lines.append(r"\multicolumn{" + str(len(header)) + r"}{l}{No finished run.} \\")
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def latex_document(tables: list[Table]) -> str:
    """Every table, in a document that compiles on its own (``pdflatex report.tex``)."""
    body = "\n".join(latex_table(t) for t in tables) or "No finished or planned runs.\n"
    return ("\\documentclass{article}\n\\usepackage[margin=1.5cm,landscape]{geometry}\n"
            "\\usepackage[utf8]{inputenc}\n\\begin{document}\n" + body + "\\end{document}\n")
