"""Markdown tables and cell formatting for the reports."""
from __future__ import annotations

import pandas as pd


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (empty cells for NaN); "_none_" when it has no rows."""
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.values) + " |")
    return "\n".join(lines) + "\n"


def fmt(v, spec: str, none: str = "") -> str:
    """``format(v, spec)``, or ``none`` for a missing value (None or NaN)."""
    return none if v is None or pd.isna(v) else format(v, spec)
