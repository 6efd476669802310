"""Markdown tables for the terminal: readable as is, and pasteable into docs and issues."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def format_cell(value: object, digits: int = 3) -> str:
    """A float to ``digits`` decimals; None and NaN (not measured) as ``-``."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str],
                   label: str = "model", digits: int = 3) -> str:
    """``rows``: ``{row name: {column: value}}``; a missing value prints as ``-``.

    >>> print(markdown_table({"FP": {"ce": 4.4341}, "RTN": {}}, ["ce"]))
    | model | ce |
    |---|---|
    | FP | 4.434 |
    | RTN | - |
    """
    lines = [f"| {label} | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [format_cell(row.get(column), digits) for column in columns]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)
