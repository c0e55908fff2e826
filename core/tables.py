"""Text tables: the one helper every printed or written table goes through.

``format_table(header, rows)`` gives a Markdown table (readable as plain text too);
``style="text"`` gives aligned columns without pipes, for terminal blocks.
"""
from __future__ import annotations


def format_table(header: list, rows: list[list], style: str = "md", align: str | None = None) -> str:
    """Format ``rows`` under ``header``.

    Args:
        header: column titles; rows: lists of cells (anything with ``str``).
        style: ``"md"`` (pipes, ``---`` rule, ``|`` in cells escaped) or ``"text"`` (space-aligned).
        align: one letter per column, ``l`` or ``r`` (``"text"`` only); default: first column left,
            the others right.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if style == "md":
        def line(r):
            return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
        return "\n".join([line(cells[0]), line(["---"] * len(header))] + [line(r) for r in cells[1:]])
    if style != "text":
        raise ValueError(f"style must be 'md' or 'text', got {style!r}")
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def pad(c, i):
        return c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i])
    return "\n".join("  ".join(pad(c, i) for i, c in enumerate(r)).rstrip() for r in cells)
