"""The report's "Time to quality" section: what each optimizer, batch size and precision buys in steps,
tokens and seconds to a target loss, its learning-rate tuning, the batch-size scaling against the measured
gradient noise scale, and, where the same directory holds throughput rows, seconds to target per layout.

Every sentence is computed from the rows (results.csv, evals.csv); nothing is prewritten.
"""
from __future__ import annotations

import os

import pandas as pd

from bench import tuning
from bench.markdown import fmt, md_table
from bench.matrix import layout_name


def has_target(results: pd.DataFrame) -> pd.Series:
    """Rows of runs given a target (a loss, or a gap above the entropy floor): convergence runs, whether they
    finished or not. A target of 0 means none (rows of older sweeps carry it on failed runs)."""
    return (results.target_loss > 0) | (results.target_gap > 0)


def convergence_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of convergence runs, skipped ones left out."""
    return results[has_target(results) & (results.status != "skipped")].copy()


def _records(df: pd.DataFrame) -> list[dict]:
    return df.astype(object).where(df.notna(), None).to_dict("records")


def best_runs(conv: pd.DataFrame) -> pd.DataFrame:
    """The best run of each (optimizer, global batch, precision), with its grid's edge status."""
    out = []
    for g in tuning.groups(_records(conv)).values():
        b = dict(tuning.best(g))
        b["edge"] = tuning.edge(g)
        b["lrs_tried"] = len(g)
        out.append(b)
    return pd.DataFrame(out)


EDGE_NOTE = {"low": " (grid's lowest)", "high": " (grid's highest)"}


def _batch_table(best: pd.DataFrame, batch: int) -> str:
    d = best[(best.global_batch == batch) & (best.precision == "fp32")].copy()
    d["_key"] = [tuning.rank_key(r) for r in _records(d)]
    d = d.sort_values("_key")
    rows = []
    for i, (_, r) in enumerate(d.iterrows()):
        rows.append({"optimizer": r.optimizer + (" **(winner)**" if i == 0 and r.status == "ok" else ""),
                     "best lr": f"{r.lr:.3g}" + EDGE_NOTE.get(r.edge, ""),
                     "steps to target": fmt(r.steps_to_target, ".0f", "not reached"),
                     "tokens to target": fmt(r.tokens_to_target, ",.0f", "—"),
                     "seconds to target": fmt(r.seconds_to_target, ".1f", "—"),
                     "final eval loss": fmt(r.final_eval_loss, ".4f"),
                     "B_simple": fmt(r.gns_b_simple, ".1f"), "status": r.status})
    return md_table(pd.DataFrame(rows))


def scaling_sentences(best: pd.DataFrame) -> list[str]:
    """Per batch size, which optimizer reached the target first; between consecutive batch sizes, how much
    of the perfect (linear) reduction in steps the winner kept."""
    out = []
    wins = tuning.winners(_records(best))
    batches = sorted(wins, key=float)
    for b in batches:
        w = wins[b]
        if w.get("status") != "ok":
            out.append(f"At batch {b} no run finished (the best-ranked ended {w.get('status')}: "
                       f"{w.get('error') or 'no error recorded'}); see \"Not ok\".")
        elif w.get("tokens_to_target") is None:
            out.append(f"At batch {b} no optimizer reached the target within the budget; the lowest final eval "
                       f"loss was {w['optimizer']}'s {float(w['final_eval_loss']):.4f} (lr {float(w['lr']):.3g}).")
        else:
            out.append(f"At batch {b}, {w['optimizer']} reached the target first: {int(w['steps_to_target'])} "
                       f"steps, {int(w['tokens_to_target']):,} tokens, {float(w['seconds_to_target']):.1f} s "
                       f"(lr {float(w['lr']):.3g}).")
    for small, big in zip(batches, batches[1:]):
        s, g = wins[small], wins[big]
        if s.get("steps_to_target") is None or g.get("status") != "ok":
            continue
        factor = float(big) / float(small)
        if g.get("steps_to_target") is None:
            out.append(f"From batch {small} to {big} scaling stopped paying: the larger batch did not reach the "
                       f"target in the same token budget.")
            continue
        fell = float(s["steps_to_target"]) / float(g["steps_to_target"])
        verdict = "scaling still paid" if fell >= 0.5 * factor else "scaling stopped paying"
        out.append(f"From batch {small} to {big} ({factor:g}x) the steps to target fell {fell:.2f}x "
                   f"({fell / factor:.0%} of perfect scaling): {verdict}.")
    gns = pd.to_numeric(best[best.precision == "fp32"].gns_b_simple, errors="coerce").dropna()
    if len(gns):
        out.append(f"The measured gradient noise scale B_simple (McCandlish et al. 2018) of the best runs ranges "
                   f"{gns.min():.1f}–{gns.max():.1f} sequences at their last eval: batches well above it waste "
                   f"samples, well below it waste steps.")
    return out


def precision_table(best: pd.DataFrame) -> str:
    rows = []
    for (opt, batch), g in best.groupby(["optimizer", "global_batch"]):
        if set(g.precision) >= {"fp32", "bf16"}:
            f32, b16 = g[g.precision == "fp32"].iloc[0], g[g.precision == "bf16"].iloc[0]
            rows.append({"optimizer": opt, "batch": batch, "lr": f"{b16.lr:.3g}",
                         "fp32 tokens to target": fmt(f32.tokens_to_target, ",.0f", "not reached"),
                         "bf16 tokens to target": fmt(b16.tokens_to_target, ",.0f", "not reached"),
                         "fp32 s to target": fmt(f32.seconds_to_target, ".1f", "—"),
                         "bf16 s to target": fmt(b16.seconds_to_target, ".1f", "—"),
                         "fp32 final eval": fmt(f32.final_eval_loss, ".4f"),
                         "bf16 final eval": fmt(b16.final_eval_loss, ".4f")})
    return md_table(pd.DataFrame(rows))


def layout_estimates(results: pd.DataFrame, best: pd.DataFrame) -> str | None:
    """Seconds to target with layout L = the winner's steps to target x L's p50 step time, for throughput
    rows of the same model, data, batch and sequence length as the winner."""
    thr = results[(results.status == "ok") & ~has_target(results)]
    rows = []
    for b, w in tuning.winners(_records(best)).items():
        if w.get("steps_to_target") is None:
            continue
        same = thr[(thr.preset == w["preset"]) & (thr.global_batch == float(b)) & (thr.seq_len == float(w["seq_len"]))]
        for _, r in same.iterrows():
            rows.append({"batch": b, "layout": layout_name(r), "config_id": r.config_id,
                         "p50 ms": f"{r.step_time_ms_p50:.1f}",
                         "est. seconds to target": float(w["steps_to_target"]) * r.step_time_ms_p50 / 1e3})
    if not rows:
        return None
    d = pd.DataFrame(rows).sort_values(["batch", "est. seconds to target"])
    d["est. seconds to target"] = d["est. seconds to target"].map(lambda v: f"{v:.1f}")
    return md_table(d)


def section(results: pd.DataFrame, evals: pd.DataFrame, plot_dir: str) -> list[str]:
    conv = convergence_rows(results)
    if conv.empty:
        return []
    best = best_runs(conv)
    floor = conv.entropy_floor_nats.dropna()
    L = ["## Time to quality", ""]
    targets = conv.target_loss.dropna()
    if targets.empty:  # no run got far enough to resolve its target
        target_text = "none resolved (no run finished)"
    else:
        target = targets.iloc[0]
        target_text = (f"eval loss ≤ {target:.4f} nats"
                       + (f" (the data's entropy floor {floor.iloc[0]:.4f} + {target - floor.iloc[0]:.2f})"
                          if len(floor) else " (no entropy floor is known for this data)"))
    L.append(f"Target: {target_text}"
             + f"; token budget {int(conv.max_tokens.max()):,} per run; learning rate warm-up then "
             f"{conv.lr_schedule.iloc[0]} decay. Best learning rate per optimizer and batch size: first by tokens to "
             "target, then by final eval loss. Seconds are training steps only (evals excluded).")
    L.append("")
    for b in sorted(best.global_batch.unique()):
        L.append(f"### Global batch {int(b)} sequences")
        L.append(_batch_table(best, b))
    L.append("### What the runs say")
    L += [f"- {s}" for s in scaling_sentences(best)]
    edges = best[best.edge.notna() & (best.precision == "fp32")]
    if not edges.empty:
        L.append("- Grids whose best learning rate sits at an edge (widened once automatically; still at the "
                 "edge means the grid may still be too narrow): "
                 + ", ".join(f"{r.optimizer} at batch {int(r.global_batch)} ({r.edge}, lr {r.lr:.3g})"
                             for _, r in edges.iterrows()) + ".")
    if len(floor) and conv.best_eval_loss.notna().any():
        gap = conv.best_eval_loss.min() - floor.iloc[0]
        L.append(f"- The best eval loss of any run is {conv.best_eval_loss.min():.4f}, {gap:.3f} nats above the "
                 f"entropy floor.")
    div = conv[conv.status == "diverged"]
    if not div.empty:
        L.append(f"- {len(div)} runs diverged (kept as rows): "
                 + ", ".join(f"{r.optimizer} b{int(r.global_batch)} lr {r.lr:.3g}" for _, r in div.iterrows()) + ".")
    L.append("")
    prec = precision_table(best)
    if not prec.startswith("_none_"):
        L.append("### Precision as a convergence axis (the winner at each batch size)")
        L.append(prec)
    est = layout_estimates(results, best)
    if est is not None:
        L.append("### Seconds to target per layout (estimate: winner's steps to target × the layout's p50 step)")
        L.append(est)
    from bench.plots import quality_plots

    for title, path in quality_plots(conv, best, evals, plot_dir).items():
        L.append(f"### {title}")
        L.append(f"![{title}](plots/{os.path.basename(path)})")
        L.append("")
    return L
