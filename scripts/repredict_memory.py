"""Recompute a committed reference's memory predictions with the current ``llmopt.memory``, keep its measurements.

Why: a reference measured on hardware this machine lacks (a lent GPU) cannot be re-run when the memory model
changes, yet its ``predicted_*`` columns must be the model's current answer for the advisor's calibration and the
15% check to mean anything. Only the derived columns change (``predicted_memory_bytes``, ``predicted_<category>
_bytes``, ``memory_prediction_error``); every measured figure stays as recorded. The report is re-rendered.
Say in results/README.md which references were re-predicted, and re-run them when the hardware is back.

Usage: python scripts/repredict_memory.py results/reference/h200-peers
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmopt.core.cli import parser  # noqa: E402


def repredict(out: str) -> int:
    """Rewrite ``out``'s results.csv predictions in place; return how many rows changed."""
    import pandas as pd

    from bench.results import _fmt, prediction_columns, row_config
    from llmopt.memory import predict_memory

    path = os.path.join(out, "results.csv")
    rows = pd.read_csv(path, dtype=object, keep_default_na=False)  # written back as read, but for the predictions
    typed = pd.read_csv(path)
    changed = 0
    for i, r in rows.iterrows():
        if r["status"] != "ok" or not r["predicted_memory_bytes"]:
            continue
        pred = predict_memory(row_config(typed.iloc[i])).to_dict()
        peak = float(r["peak_memory_bytes"])
        new = {k: _fmt(v) for k, v in prediction_columns(pred, peak).items()}
        if any(rows.at[i, k] != str(v) for k, v in new.items()):
            changed += 1
        for k, v in new.items():
            rows.at[i, k] = v
    rows.to_csv(path, index=False, lineterminator="\r\n")  # as bench.results writes it (the csv module)
    return changed


def main(argv=None) -> int:
    p = parser("scripts/repredict_memory.py", __doc__.split("\n\n")[0])
    p.add_argument("out", help="a sweep directory with results.csv (a committed reference)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.out, "results.csv")):
        p.error(f"{args.out}: no results.csv; pass a sweep directory")
    n = repredict(args.out)
    from bench.report import main as report

    print(f"{args.out}: {n} row(s) re-predicted")
    return report([args.out])


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
