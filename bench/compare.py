"""``python -m bench.compare DIR_A DIR_B``: per-config ratios B/A, with changes beyond the measured noise flagged.

Noise is measured, not assumed: for each config and each sweep, the relative standard error of the mean
timed step time (the row's own step-time cv / sqrt(timed steps); from steps.csv for a sweep older than that
column). A throughput ratio is flagged when |ln(ratio)| exceeds 3 x the two errors combined (sqrt(se_A^2 +
se_B^2), ``bench.noise``), i.e. a change the step-to-step jitter of these two runs would very rarely produce by
chance. A noisy row that was re-timed is compared by its steadier timing, as the report uses it.
"""
from __future__ import annotations

import math
import os

import pandas as pd

from bench.noise import SIGMAS, beyond_noise, row_se, steadier
from bench.report import load


def step_noise(results: pd.DataFrame, steps: pd.DataFrame) -> pd.Series:
    """Relative standard error of the mean timed step time, per config_id."""
    warm = results.set_index("config_id")["timing_warmup"]
    out = {}
    for cid, g in steps.groupby("config_id"):
        t = g.sort_values("step")["step_time_ms"].iloc[int(warm.get(cid, 0) or 0):]
        if len(t) >= 2 and t.mean() > 0:
            out[cid] = float(t.std(ddof=1) / t.mean() / math.sqrt(len(t)))
    return pd.Series(out, dtype=float)


def compare(dir_a: str, dir_b: str) -> pd.DataFrame:
    ra, sa = load(dir_a)
    rb, sb = load(dir_b)
    na, nb = step_noise(ra, sa), step_noise(rb, sb)  # for rows without their own spread (older sweeps)
    ra, rb = steadier(ra)[0], steadier(rb)[0]
    a = ra[ra.status == "ok"].set_index("config_id", drop=False)
    b = rb[rb.status == "ok"].set_index("config_id", drop=False)
    rows = []
    for cid in sorted(set(a.index) & set(b.index)):
        ratio = b.at[cid, "tokens_per_s"] / a.at[cid, "tokens_per_s"]
        se_a, se_b = row_se(a.loc[cid]) or na.get(cid, 0.0), row_se(b.loc[cid]) or nb.get(cid, 0.0)
        noise = math.sqrt(se_a ** 2 + se_b ** 2)
        flag = beyond_noise(ratio, se_a, se_b) if noise > 0 else False
        rows.append({
            "config_id": cid,
            "tokens_per_s_A": round(a.at[cid, "tokens_per_s"]),
            "tokens_per_s_B": round(b.at[cid, "tokens_per_s"]),
            "speed_ratio_B/A": round(ratio, 3),
            "cv_A": round(a.at[cid, "step_time_cv"], 3), "cv_B": round(b.at[cid, "step_time_cv"], 3),
            "noise_band": f"±{SIGMAS * noise:.1%}",
            "changed": ("faster" if ratio > 1 else "slower") if flag else "",
            "memory_ratio_B/A": round(b.at[cid, "peak_memory_bytes"] / a.at[cid, "peak_memory_bytes"], 3),
            "final_loss_diff": round(b.at[cid, "final_loss"] - a.at[cid, "final_loss"], 6),
        })
    only = sorted(set(ra.config_id) ^ set(rb.config_id))
    df = pd.DataFrame(rows)
    df.attrs["unmatched"] = only
    return df


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m bench.compare", __doc__.split("\n\n")[0])
    p.add_argument("dir_a", help="a sweep's results directory (the before)")
    p.add_argument("dir_b", help="another sweep's results directory (the after: ratios are B over A)")
    args = p.parse_args(argv)

    def body() -> int:
        for d in (args.dir_a, args.dir_b):
            if not os.path.exists(os.path.join(d, "results.csv")):
                raise ValueError(f"{d!r} holds no results.csv; pass two directories written by python -m bench.run")
        df = compare(args.dir_a, args.dir_b)
        if df.empty:
            print("no config finished ok in both sweeps (config_id includes every setting, steps too)")
            return 0
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_columns", None):
            print(df.to_string(index=False))
        flagged = df[df.changed != ""]
        print(f"\n{len(df)} configs compared; {len(flagged)} changed beyond {SIGMAS:g} sigma of the measured "
              f"step-time noise" + (f"; {len(df.attrs['unmatched'])} configs in only one sweep"
                                    if df.attrs["unmatched"] else ""))
        return 0

    return cli.main(body)


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
