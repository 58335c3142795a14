"""Tuning, stated: which learning rate won for each (model, optimizer, batch size, precision), whether it sits
at the edge of its grid, and the follow-up runs a convergence matrix adds (see bench.matrix, "Convergence").

Everything is computed from the rows. "Best" is the tuning run (grid or widen phase: the whole budget, seed 0)
with the lowest end-of-budget eval loss, the loss measured after its learning-rate schedule completed; a run
that diverged or failed ranks last. Wen et al. 2025 ("Fantastic pretraining optimizers") show that an
untuned baseline inflates claimed speed-ups about 2x: every optimizer gets the same relative grid around a
centre measured for it, widened once where it was too narrow.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from bench.layouts import BASE_LAYOUTS
from bench.matrix import CONVERGENCE, LADDER, LR_STEP, SEEDS, TARGET_FRACTION, at_budget, rank_budget
from bench.plan import PlanEntry
from llmopt.core.config import TrainConfig

if TYPE_CHECKING:
    import pandas as pd

GROUP = ("preset", "optimizer", "global_batch", "precision")
TUNING = ("grid", "widen")  # the phases whose runs tune the learning rate (the whole budget, seed 0)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def rank_key(row: dict) -> tuple:
    """Smaller is better: a finished run with a lower end-of-budget eval loss; not-ok last."""
    if row.get("status") != "ok":
        return (1, math.inf)
    final = _num(row.get("final_eval_loss"))
    return (0, final if final is not None else math.inf)


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Tuning rows by (preset, optimizer, global batch, precision), each list sorted by learning rate."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "skipped" or _num(r.get("lr")) is None:
            continue
        out.setdefault(tuple(str(r[k]) for k in GROUP), []).append(r)
    return {k: sorted(v, key=lambda r: _num(r["lr"])) for k, v in out.items()}


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: (rank_key(r), _num(r["lr"])))


def edge(rows: list[dict]) -> str | None:
    """'low' or 'high' when the best learning rate is the smallest or largest tried (the grid may be too
    narrow), else None. A group of one run has no interior."""
    if len(rows) < 2:
        return None
    b = best(rows)
    if rank_key(b)[0] == 1:
        return None  # nothing worked: no edge to widen towards
    if b is rows[0]:
        return "low"
    if b is rows[-1]:
        return "high"
    return None


def winners(rows: list[dict], precision: str = "fp32") -> dict[tuple, dict]:
    """Per (preset, global batch as a string): the best tuning run over every optimizer and learning rate. A
    batch where every run diverged or failed has no winner (no follow-up runs for it)."""
    out: dict[tuple, dict] = {}
    for (preset, _, batch, prec), g in groups(rows).items():
        if prec != precision:
            continue
        b, key = best(g), (preset, batch)
        if rank_key(b)[0] == 1:
            continue
        if key not in out or (rank_key(b), _num(b["lr"])) < (rank_key(out[key]), _num(out[key]["lr"])):
            out[key] = b
    return out


# ------------------------------------------------------------------ the ladder's analysis (report and follow-ups)
def has_target(results: "pd.DataFrame") -> "pd.Series":
    """Rows of runs given a target (a loss, or a gap above the entropy floor): convergence runs of sweeps made
    before the ladder, whether they finished or not. A target of 0 means none."""
    import pandas as pd

    given = pd.Series(False, index=results.index)
    for col in ("target_loss", "target_gap"):  # rows made outside a sweep (the follow-ups' own) may lack them
        if col in results:
            given |= pd.to_numeric(results[col], errors="coerce").fillna(0) > 0
    return given


def convergence_rows(results: "pd.DataFrame") -> "pd.DataFrame":
    """Rows of a convergence matrix (tuning, ladder and precision phases), skipped ones left out."""
    import pandas as pd

    phase = results.phase if "phase" in results else pd.Series("", index=results.index)
    mask = phase.isin(["grid", "widen", "ladder", "precision"]) | (phase.fillna("").eq("") & has_target(results))
    return results[mask & (results.status != "skipped")].copy()


def _records(df: "pd.DataFrame") -> list[dict]:
    return df.astype(object).where(df.notna(), None).to_dict("records")


def best_runs(conv: "pd.DataFrame") -> "pd.DataFrame":
    """The best tuning run of each (preset, optimizer, global batch, precision), with its grid's edge status."""
    import pandas as pd

    tune = conv[conv.phase.isin(TUNING)] if "phase" in conv else conv
    out = []
    for g in groups(_records(tune)).values():
        b = dict(best(g))
        b["edge"] = edge(g)
        b["lrs_tried"] = len(g)
        out.append(b)
    return pd.DataFrame(out)


def ladder(conv: "pd.DataFrame", best_rows: "pd.DataFrame") -> "pd.DataFrame":
    """Every fp32 run of each finalist (its best learning rate, ``best_runs``) that finished or diverged, at
    every budget and seed: columns preset, optimizer, global_batch, lr, max_tokens, seed, final_eval_loss (NaN
    where the run diverged: it has no end-of-budget loss), diverged, config_id, task. A diverged budget stays in
    the ladder so that it counts as not reached there (``stats.tokens_to_target``); a failed run (the harness's
    fault, not the optimizer's) is left out."""
    keys = ["preset", "optimizer", "global_batch", "lr"]
    fin = best_rows[(best_rows.precision == "fp32") & (best_rows.status == "ok")][keys]
    runs = conv[(conv.precision == "fp32") & conv.status.isin(["ok", "diverged"])]
    lad = runs.assign(task=task_of(runs)).merge(fin, on=keys)
    lad["diverged"] = lad.status.eq("diverged")
    lad.loc[lad.diverged, "final_eval_loss"] = float("nan")
    return lad[keys + ["max_tokens", "seed", "final_eval_loss", "diverged", "config_id", "task"]]


def task_of(rows: "pd.DataFrame") -> "pd.Series":
    """The task a row's loss measures (its data, tokenizer and sequence length): losses, and so targets, are
    comparable across model sizes and batch sizes within a task, not across tasks."""
    import pandas as pd

    def col(name, default):
        if name not in rows:
            return pd.Series(default, index=rows.index)
        return rows[name].astype(object).fillna("").astype(str).replace("", default)

    return col("data", "generated data") + ", " + col("tokenizer", "bytes") + " tokens, sequence " + col("seq_len", "?")


def targets(lad: "pd.DataFrame") -> dict[tuple, float]:
    """(preset, batch) -> the per-batch target: AdamW's mean end-of-budget loss at the ladder's budget nearest
    TARGET_FRACTION of the largest (without AdamW, the median over the optimizers of their means there). It
    moves with the batch size, so speed-ups at it are not compared across batches (``common_targets`` are)."""
    out = {}
    for (preset, batch), g in lad[~lad.diverged].groupby(["preset", "global_batch"]):
        budgets = sorted(g.max_tokens.unique())
        at = min(budgets, key=lambda b: abs(b - TARGET_FRACTION * budgets[-1]))
        means = g[g.max_tokens == at].groupby("optimizer").final_eval_loss.mean()
        out[(preset, batch)] = float(means["adamw"]) if "adamw" in means else float(means.median())
    return out


def common_targets(lad: "pd.DataFrame") -> dict[str, dict[str, float]]:
    """task -> {"moderate": loss, "hard": loss}: two targets shared by every model and batch size of the task,
    each reached by AdamW's finalist on every seed, at every model and batch size, within the ladder.

    hard: the highest end-of-budget loss at the largest budget over AdamW's seeds, models and batch sizes
    (rounded up to 0.001 nats), so the slowest of them reaches it by its last budget. moderate: halfway from
    hard to the lowest loss AdamW had at its smallest budget, so it is crossed inside the ladder wherever that
    loss is above hard (else, halfway to the highest loss at the smallest budget: some batches then reach it by
    the smallest budget, a bound). A task without AdamW, or where AdamW's finalist diverged at its largest
    budget, gets none (the per-batch targets stand alone)."""
    out = {}
    for task, g in lad.groupby("task"):
        a = g[g.optimizer == "adamw"]
        if a.empty:
            continue
        largest = a[a.max_tokens == a.groupby(["preset", "global_batch"]).max_tokens.transform("max")]
        smallest = a[a.max_tokens == a.groupby(["preset", "global_batch"]).max_tokens.transform("min")]
        if largest.diverged.any():
            continue
        hard = math.ceil(largest.final_eval_loss.max() * 1000) / 1000
        start = smallest.final_eval_loss.dropna()
        easy = start.min() if start.min() > hard else start.max()
        out[task] = {"moderate": round((hard + easy) / 2, 3), "hard": hard}
    return out


def finalist_stats(lad: "pd.DataFrame", target: dict) -> "pd.DataFrame":
    """Per finalist: its end-of-budget loss at the largest budget and its tokens to target, each seed's.
    ``by_seed`` (and ``tokens``, the same figures in seed order) holds a figure per seed where the target was
    crossed: interpolated, or the budget that reached it after a diverged one (an upper bound, those seeds in
    ``after_diverged``). A finalist at or below the target already at the smallest budget on every seed is
    ``bounded`` (its tokens are at most ``bound``). ``unstable``: a run of its ladder diverged (``diverged_runs``
    of ``runs``)."""
    import pandas as pd

    import bench.report.stats as stats

    rows = []
    for (preset, opt, batch, lr), g in lad.groupby(["preset", "optimizer", "global_batch", "lr"]):
        top = g.max_tokens.max()
        end = g[(g.max_tokens == top) & ~g.diverged].sort_values("seed")
        crossings = {}
        for seed, s in g.groupby("seed"):
            crossings[seed] = stats.tokens_to_target(list(s.max_tokens), list(s.final_eval_loss),
                                                     target[(preset, batch)])
        status = [c.status for c in crossings.values()]
        counted = (stats.REACHED, stats.AFTER_DIVERGED)
        rows.append({"preset": preset, "optimizer": opt, "global_batch": batch, "lr": lr, "budget": top,
                     "budgets": sorted(g.max_tokens.unique()), "seeds": len(crossings),
                     "seed_list": sorted(int(sd) for sd in crossings),
                     "end_losses": list(end.final_eval_loss),
                     "tokens": [c.tokens for c in crossings.values() if c.status in counted],
                     "by_seed": {int(sd): c.tokens for sd, c in crossings.items() if c.status in counted},
                     "after_diverged": sorted(int(sd) for sd, c in crossings.items()
                                              if c.status == stats.AFTER_DIVERGED),
                     "statuses": sorted(set(status)), "bound": float(g.max_tokens.min()),
                     "all_reached": all(st in counted for st in status),
                     "bounded": status.count(stats.AT_FIRST) == len(status),
                     "runs": len(g), "diverged_runs": int(g.diverged.sum()), "unstable": bool(g.diverged.any())})
    return pd.DataFrame(rows)



# ------------------------------------------------------------------------------------------- follow-ups
def followups(matrix: str, plan: list[PlanEntry], rows: list[dict]) -> list[PlanEntry]:
    """Entries a convergence matrix adds once every planned entry has its row, one phase at a time: a learning
    rate beyond the edge of each fp32 grid whose best sits there (once per group); then the ladder: every
    finalist (the best learning rate of each model, optimizer and batch) at every budget and seed; then each
    batch's winner in bf16; then every finalist's shape as throughput rows on single, ddp2, fsdp2 and tp2; then
    each finalist that reached the target trained to it under fsdp2 (the check of seconds to target). Each entry
    is a pure function of the rows before it, so a resumed sweep adds the same ones."""
    if matrix not in CONVERGENCE:
        return []
    phases = {e.config_id: e.phase for e in plan}
    by_id = {e.config_id: e.config for e in plan}
    tuning_rows = [r for r in rows if phases.get(r["config_id"]) in TUNING]
    device = plan[0].config.device
    budget = rank_budget(device)
    widened = {tuple(str(getattr(by_id[cid], k)) for k in GROUP) for cid, ph in phases.items() if ph == "widen"}
    new: list[PlanEntry] = []
    ids = set(by_id)

    def add(cfg: TrainConfig, phase: str):
        entry = PlanEntry.of(cfg, device, budget, phase=phase)
        if entry.config_id not in ids:
            ids.add(entry.config_id)
            new.append(entry)

    fp32 = {k: g for k, g in groups(tuning_rows).items() if k[3] == "fp32"}
    for key, g in fp32.items():
        side = edge(g)
        if side is None or key in widened:
            continue
        end = g[0] if side == "low" else g[-1]
        lr = _num(end["lr"]) / LR_STEP if side == "low" else _num(end["lr"]) * LR_STEP
        add(replace(by_id[end["config_id"]], lr=lr), "widen")
    if new:
        return new
    for g in fp32.values():
        b = best(g)
        if rank_key(b)[0] == 0:
            for fraction in LADDER:
                for seed in SEEDS:
                    if (fraction, seed) != (1, 0):  # the tuning run itself
                        add(TrainConfig(**at_budget(asdict(by_id[b["config_id"]]), fraction, seed)), "ladder")
    if new:
        return new
    wins = winners(tuning_rows)
    for win in wins.values():
        add(replace(by_id[win["config_id"]], precision="bf16"), "precision")
    if new or not wins:
        return new
    # Then every finalist's shape as throughput rows on single, ddp2, fsdp2 and tp2 (no evals), so that the
    # report can state seconds to target per optimizer and layout: its tokens to target over its tokens/s there
    for g in fp32.values():
        b = best(g)
        if rank_key(b)[0] == 0:
            cfg = replace(by_id[b["config_id"]], eval_every=0, target_loss=0.0, target_gap=0.0, gns=False,
                          max_tokens=0, steps=LAYOUT_STEPS, lr_warmup=0)
            for layout in THROUGHPUT_LAYOUTS:
                add(replace(cfg, **layout), "layouts")
    if new:
        return new
    # Last, the check of that estimate: each finalist that reached the target on every seed, trained under
    # fsdp2 for its mean tokens to target (its own full schedule, seed 0); the report sets its measured seconds
    # beside the estimate
    for cfg in to_target_runs(rows, phases, by_id):
        add(cfg, "to-target")
    return new


def to_target_runs(rows: list[dict], phases: dict, by_id: dict) -> list[TrainConfig]:
    """The to-target check's configs (``followups``' last phase), from the rows as the report reads them."""
    import pandas as pd

    frame = pd.DataFrame([dict(r, phase=phases.get(r["config_id"], r.get("phase"))) for r in rows])
    for col in frame.columns:  # resumed rows come back as text: a column whose every value is a number is one
        numeric = pd.to_numeric(frame[col], errors="coerce")
        present = frame[col].notna() & (frame[col] != "")
        if numeric.notna().sum() == present.sum():
            frame[col] = numeric
    conv = convergence_rows(frame)
    best_rows = best_runs(conv)
    lad = ladder(conv, best_rows)
    if lad.empty:
        return []
    out = []
    for r in finalist_stats(lad, targets(lad)).itertuples():
        if not r.all_reached:
            continue
        run = best_rows[(best_rows.preset == r.preset) & (best_rows.optimizer == r.optimizer)
                        & (best_rows.global_batch == r.global_batch) & (best_rows.precision == "fp32")].iloc[0]
        whole = asdict(by_id[run.config_id])
        tokens = math.ceil(sum(r.tokens) / len(r.tokens))
        # no noise-scale instrument (it needs DDP, and the throughput rows run without it)
        out.append(replace(TrainConfig(**at_budget(whole, tokens / whole["max_tokens"], 0)), gns=False,
                           **CHECK_LAYOUT))
    return out


# Steps of a throughput row: its first 8 steps run 8-15% slower than the steps after 20 (allocator, caches; the
# fsdp2 to-target runs of cpu-convergence-b8), so 8-step rows overstated seconds to target by up to 20%
LAYOUT_STEPS = 24
# The layouts seconds to target are stated for (issue 38: single, ddp2, fsdp2, tp2), and the one it is checked on
THROUGHPUT_LAYOUTS = tuple(layout for layout in BASE_LAYOUTS if not layout.get("pp"))
CHECK_LAYOUT = dict(dp=2, dp_mode="fsdp")
