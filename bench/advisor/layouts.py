"""Every layout llmopt supports on a world size, predicted (memory: ``llmopt.memory`` with the band the
references showed; time: ``bench.advisor.costmodel``), ranked, put in one paragraph, plotted, and, on this machine,
measured through the harness."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.advisor import AdviseError
from bench.advisor.costmodel import GIB, Hardware, predict_step
from bench.advisor.probe import memory_band
from bench.layouts import layout_label
from llmopt.core.config import TrainConfig
from llmopt.safe_files import open_file

if TYPE_CHECKING:
    import pandas as pd

LAYOUT_FIELDS = ("dp", "dp_mode", "tp", "pp", "pp_schedule", "pp_microbatches", "precision", "grad_accum",
                 "activation_checkpointing")
MAX_GRAD_ACCUM = 64


# ------------------------------------------------------------------------------------------ candidates
def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, by trial division up to sqrt(n) (a global batch of 10^12 once
    took minutes, counting to n)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def candidates(base: dict, world: int, precisions, allow_ac: bool = True) -> tuple[list, int]:
    """Every valid layout on ``world`` ranks: (list of resolved configs, number refused by validation)."""
    from llmopt.core.config import TrainConfig, validate

    out, refused = [], 0
    for dp, tp in itertools.product(_divisors(world), repeat=2):
        if world % (dp * tp):
            continue
        pp = world // (dp * tp)
        for mode, sched, prec, ga, ac in itertools.product(
                ("ddp", "fsdp") if dp > 1 else ("ddp",), ("gpipe", "1f1b") if pp > 1 else ("1f1b",), precisions,
                [g for g in _divisors(base["global_batch"]) if g <= MAX_GRAD_ACCUM],
                (False, True) if allow_ac else (False,)):
            micro = base["global_batch"] // ga
            if micro % dp:
                continue
            for chunks in sorted({pp, 2 * pp, 4 * pp}) if pp > 1 else [0]:
                try:
                    out.append(validate(TrainConfig(**base, dp=dp, dp_mode=mode, tp=tp, pp=pp, pp_schedule=sched,
                                                    pp_microbatches=chunks, precision=prec, grad_accum=ga,
                                                    activation_checkpointing=ac)))
                except ValueError:
                    refused += 1
    return out, refused


def layout_memory(cfg: TrainConfig) -> tuple[int, float, float]:
    """(predicted peak bytes per rank, low, high): the harness's own prediction (``llmopt.memory``) and the
    range the measured peak fell in around it on the committed references."""
    from llmopt.memory import predict_memory

    lo, hi, _ = memory_band()
    total = predict_memory(cfg).total
    return total, total / (1 + hi), total / (1 + lo)


def update_profile(cfg: TrainConfig):
    """The counted step of ``cfg``'s optimizer on plain or sharded tensors as its layout has them
    (``bench.advisor.update``; counted once, cached). An optimizer whose step cannot be counted cannot be
    priced: an AdviseError names why, rather than a table that leaves its update out."""
    from bench.advisor.update import profiles, sharded

    on_shards = sharded(cfg)
    try:
        p = profiles(cfg.model_config, cfg.optimizer_impl, on_shards, [cfg.optimizer])[cfg.optimizer]
    except RuntimeError as e:
        raise AdviseError(f"--optimizer {cfg.optimizer}: {e}") from None
    if isinstance(p, str):
        raise AdviseError(f"--optimizer {cfg.optimizer}: its step could not be run on a stand-in of the model "
                          f"({'sharded' if on_shards else 'plain'} tensors: {p}), so its update cannot be priced; "
                          f"fix its build, or advise another optimizer")
    return p


def advise_table(cands, hw: Hardware) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for cfg in cands:
        mem, lower, upper = layout_memory(cfg)
        fits = "yes" if upper <= hw.memory_bytes else ("marginal" if mem <= hw.memory_bytes else "no")
        p = predict_step(cfg, hw, update_profile(cfg))
        rows.append({"layout": layout_label(cfg), **{f: getattr(cfg, f) for f in LAYOUT_FIELDS},
                     "micro_batch": cfg.micro_batch,
                     "pred_memory_gib": mem / GIB, "pred_memory_low_gib": lower / GIB,
                     "pred_memory_high_gib": upper / GIB, "fits": fits,
                     "pred_tokens_per_s": p.tokens_per_s, "pred_step_ms": p.step_s * 1e3, "pred_mfu": p.mfu,
                     "pred_compute_ms": p.compute_s * 1e3, "pred_comm_ms": p.comm_s * 1e3,
                     "pred_bubble_ms": p.bubble_s * 1e3, "pred_update_ms": p.update_s * 1e3,
                     "bottleneck": p.bottleneck if fits != "no" else "memory"})
    t = pd.DataFrame(rows)
    order = t.fits.map({"yes": 0, "marginal": 1, "no": 2})
    # ties (the model does not price accumulation or checkpointing beyond their FLOPs and calls): prefer fewer
    # micro-batches, no recomputation, then less memory
    return (t.assign(_o=order, _t=t.pred_tokens_per_s.round(-1))
            .sort_values(["_o", "_t", "grad_accum", "activation_checkpointing", "pred_memory_gib"],
                         ascending=[True, False, True, True, True]).drop(columns=["_o", "_t"]))


def best_distinct(t, k: int):
    """The k best rows with different parallel layouts or precisions (the best accumulation and
    checkpointing choice of each): measuring five accumulation variants of one layout teaches little."""
    return t.drop_duplicates(["dp", "dp_mode", "tp", "pp", "pp_schedule", "precision"]).head(k)


def advice(t, hw: Hardware, preset: str, batch: int, seq: int) -> str:
    """One paragraph computed from the table."""
    where = (f"on {hw.nodes} node{'s' * (hw.nodes > 1)} of {hw.devices_per_node} {hw.name}"
             f" ({hw.memory_bytes / GIB:.0f} GiB usable each)")
    fit = t[t.fits == "yes"]
    if fit.empty:
        smallest = t.loc[t.pred_memory_gib.idxmin()]
        return (f"{where}, {preset} at {batch} x {seq} tokens fits in no layout: the leanest, {smallest.layout}, "
                f"needs about {smallest.pred_memory_gib:.3g} GiB per rank; add devices or memory.")
    best = fit.iloc[0]
    s = (f"{where}, {preset} at a global batch of {batch} x {seq} tokens fits in {len(fit)} of {len(t)} layouts; "
         f"the fastest predicted is {best.layout} ({best.pred_tokens_per_s:,.0f} tokens/s, MFU {best.pred_mfu:.0%}, "
         f"{best.pred_memory_gib:.3g} GiB per rank, bound by {best.bottleneck}).")
    no_pp, with_pp = fit[fit.pp == 1], fit[fit.pp > 1]
    if no_pp.empty and not with_pp.empty:
        s += " Pipeline parallelism is needed here: no layout without it fits."
    elif not with_pp.empty:
        r = no_pp.pred_tokens_per_s.max() / with_pp.pred_tokens_per_s.max()
        s += (f" Pipeline parallelism does not pay: the best layout without it is {r:.2f}x the best with it "
              "(it pays only when a model does not fit otherwise, or the data-parallel gradient traffic crosses "
              "a slow link)." if r >= 1 else
              f" Pipeline parallelism pays here: the best layout with it is {1 / r:.2f}x the best without.")
    no_ac = fit[~fit.activation_checkpointing]
    if no_ac.empty:
        s += " Activation checkpointing is required to fit."
    return s


def plot(t, hw: Hardware, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(8, 5))
    sns.scatterplot(data=t, x="pred_memory_gib", y="pred_tokens_per_s", hue="precision", style="fits", ax=ax)
    ax.axvline(hw.memory_bytes / GIB, color="k", ls="--", lw=1, label="usable device memory")
    ax.set_xlabel("predicted memory per rank (GiB)")
    ax.set_ylabel("predicted tokens/s")
    ax.set_title(f"Predicted, not measured: every layout on {hw.world} x {hw.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with open_file(str(path), "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------- measurement and matrices
def emit_matrix(top, base: dict, path: str, steps: int) -> None:
    """Write ``top``'s layouts as a matrix file for ``bench.run --matrix``."""
    def value(v):
        return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else str(v))

    lines = [f"# {len(top)} layouts predicted fastest by python -m bench.advise; run with",
             f"#   python -m bench.run --matrix {path}", "[base]"]
    lines += [f"{k} = {value(v)}" for k, v in {**base, "steps": steps}.items()]
    for _, r in top.iterrows():
        lines += ["", "[[config]]"] + [f"{f} = {value(r[f].item() if hasattr(r[f], 'item') else r[f])}"
                                      for f in LAYOUT_FIELDS]
    with open_file(str(path)) as f:
        f.write("\n".join(lines) + "\n")


def measure(top, base: dict, out: Path, steps: int, log=print):
    """Run ``top`` through the harness on this machine; the table with measured tokens/s beside each prediction."""
    import pandas as pd

    matrix = out / "measure.toml"
    emit_matrix(top, base, str(matrix), steps)
    log(f"advise: measuring {len(top)} layouts through bench.run -> {out / 'measure'}")
    r = subprocess.run([sys.executable, "-m", "bench.run", "--matrix", str(matrix), "--out", str(out / "measure"),
                        "--device", base["device"], "--no-report"], cwd=Path(__file__).resolve().parent.parent)
    results = out / "measure" / "results.csv"
    if not results.exists():
        raise AdviseError(f"--measure: the harness wrote no results (exit {r.returncode}); see its output above")
    got = pd.read_csv(results)
    got = got[got.added_as_baseline.astype(str) != "True"]
    keys = list(LAYOUT_FIELDS)
    merged = top.merge(got[keys + ["status", "tokens_per_s", "peak_memory_bytes", "parity_verdict"]], on=keys,
                       how="left")
    merged = merged.rename(columns={"tokens_per_s": "measured_tokens_per_s", "status": "measured_status",
                                    "parity_verdict": "measured_parity"})
    merged["measured_memory_gib"] = merged.pop("peak_memory_bytes") / GIB
    merged["measured_rank"] = merged.measured_tokens_per_s.rank(ascending=False)
    return merged.sort_values("measured_tokens_per_s", ascending=False)
