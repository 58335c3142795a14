"""Fit this CPU's optimizer-update constants on the committed optimizers sweep and commit them beside it.

Why: the cost model prices an optimizer's update from its counted operations and bytes
(``bench.advisor.update``) at a dispatch cost per operation (plain tensors, DTensor calls, DTensors in a call),
a memory bandwidth and a matmul rate. Those five are fitted once on a measured sweep with every optimizer and
layout (``results/reference/cpu-optimizers``) and committed as ``update-fit.json`` there, with the gloo link and
per-call overhead the fit priced the collectives with; the sweeps' ``predicted_optimizer_ms`` and the advisor
read that file. Re-run this after re-making that reference (``python -m bench.run --matrix optimizers --steps 20
--out results/reference/cpu-optimizers``) or when the counting changes: it refits, rewrites the reference's
``predicted_optimizer_ms`` columns with the new fit (in-sample there, and its report says the figures are
the fit's own) and those of every other sweep directory named (``results/reference/cpu-update-check``, the
held-out check), and re-renders their reports.

Usage: python scripts/fit_update_costs.py [SWEEP_DIR ...]
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from bench.advisor.probe import (
        REFERENCES,
        UPDATE_FIT,
        UPDATE_REFERENCE,
        cached_link,
        cpu_update_constants,
        fill_predicted_updates,
        fit_update_reference,
    )
    from bench.report import write_report
    from bench.results import ResultFiles
    from llmopt.safe_files import replace_text

    fit = fit_update_reference(cached_link())
    path = REFERENCES / UPDATE_REFERENCE / UPDATE_FIT
    replace_text(str(path), json.dumps(fit, indent=1, sort_keys=True) + "\n")
    print(f"{path}: {fit}")
    cpu_update_constants.cache_clear()
    for out in [str(REFERENCES / UPDATE_REFERENCE), *argv]:
        fill_predicted_updates(ResultFiles(out))
        print(f"re-predicted: {write_report(out)}")
    return 0


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main(sys.argv[1:]))
