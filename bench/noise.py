"""How steady a row's timing was, and which comparisons its spread lets the report make.

Every ok row carries its timed steps' coefficient of variation (``step_time_cv``) and p90/p50, as
pytest-benchmark reports a benchmark's spread. A row beyond ``NOISY_CV`` or ``NOISY_P90_P50`` is *noisy*: its
steps were spread out (a cold machine, a neighbour, a stall), so its tokens/s may say more about the moment than
about the config. On the local executor such a row is timed once more at the end of the sweep (a ``retime``
entry of the plan, its own row and steps in the CSVs) and the report uses the steadier of the two, saying so.

A comparison of two rows is stated only beyond their noise: the relative standard error of each row's mean
step time (cv / sqrt(timed steps)) combined in quadrature, ``SIGMAS`` of it (``bench.compare``'s rule); within
it, the report says "within noise".
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas only where a report is made: bench.run's own start-up stays light
    import pandas as pd

# Flag thresholds: above what most rows of the committed CPU references show, below what a stalled row shows
# (results/README.md, "The figures", has both)
NOISY_CV = 0.15
NOISY_P90_P50 = 1.25
SIGMAS = 3.0  # a difference beyond 3 combined standard errors: the step-to-step jitter rarely makes one
RETIME = "retime"  # the plan phase of a noisy row's second timing; its id is the row's id + RETIME_SUFFIX
RETIME_SUFFIX = "-retime"
# A row's timing figures: what the steadier of a row and its re-time contributes to the report
TIMING_COLUMNS = ("tokens_per_s", "step_time_ms_p50", "step_time_ms_p90", "step_time_cv", "step_time_p90_p50",
                  "noisy", "optimizer_ms_p50", "optimizer_ms_cv", "mfu", "energy_j_per_token", "gpu_util_mean",
                  "gpu_power_w_mean")


def is_noisy(cv: float | None, p90_p50: float | None) -> bool:
    return (cv is not None and cv > NOISY_CV) or (p90_p50 is not None and p90_p50 > NOISY_P90_P50)


def relative_se(cv, timed_steps) -> float:
    """The relative standard error of a row's mean step time (0 when unknown: one timed step, an old row)."""
    try:
        cv, n = float(cv), float(timed_steps)
    except (TypeError, ValueError):
        return 0.0
    return cv / math.sqrt(n) if math.isfinite(cv) and n >= 2 else 0.0


def row_se(row) -> float:
    """``relative_se`` of a results row (a dict or a pandas row)."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    try:
        timed = float(get("steps_run")) - float(get("timing_warmup") or 0)
    except (TypeError, ValueError):
        timed = 0.0
    return relative_se(get("step_time_cv"), timed)


def beyond_noise(ratio: float, se_a: float, se_b: float) -> bool:
    """Whether a ratio of two rows' throughputs differs from 1 by more than their noise allows. Rows without a
    measured spread (one timed step, a reference older than the spread columns) count as exact, as before."""
    noise = math.sqrt(se_a ** 2 + se_b ** 2)
    return abs(math.log(ratio)) > SIGMAS * noise if ratio > 0 else True


def steadier(results: "pd.DataFrame") -> tuple["pd.DataFrame", int, int]:
    """The rows without their re-times, each noisy row's timing columns taken from its re-time where that was
    steadier (lower cv); ``timing`` says which ("first"; for a re-timed row "re-timed: second used" or "re-timed:
    first kept"). Returns (rows, re-timed rows, rows whose re-time was used)."""
    if "phase" not in results or not (results.phase == RETIME).any():
        return results.assign(timing="first"), 0, 0
    retimes = results[results.phase == RETIME]
    rows = results[results.phase != RETIME].copy()
    import pandas as pd

    rows["timing"] = "first"
    used = 0
    for _, r in retimes.iterrows():
        original = r.config_id.removesuffix(RETIME_SUFFIX)
        match = rows.index[(rows.config_id == original) & (rows.status == "ok")]
        if r.status != "ok" or not len(match):
            continue
        i = match[0]
        first, second = rows.at[i, "step_time_cv"], r.step_time_cv
        if pd.notna(second) and (pd.isna(first) or second < first):
            for col in TIMING_COLUMNS:
                if col in rows:
                    rows.at[i, col] = r[col]
            rows.at[i, "timing"] = "re-timed: second used"
            used += 1
        else:
            rows.at[i, "timing"] = "re-timed: first kept"
    return rows, len(retimes), used
