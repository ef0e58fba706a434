"""Plain-text tables for the terminal and for markdown-free reports."""

from __future__ import annotations


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def table(header: list[str], rows: list[list[str]]) -> str:
    """A left-aligned text table with a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    return "\n".join(_row(r, widths) for r in [header, rule, *rows])
