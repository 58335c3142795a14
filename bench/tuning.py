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

from bench.layouts import BASE_LAYOUTS
from bench.matrix import CONVERGENCE, LADDER, LR_STEP, SEEDS, at_budget, rank_budget
from bench.plan import PlanEntry
from llmopt.core.config import TrainConfig

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


def followups(matrix: str, plan: list[PlanEntry], rows: list[dict]) -> list[PlanEntry]:
    """Entries a convergence matrix adds once every planned entry has its row, one phase at a time: a learning
    rate beyond the edge of each fp32 grid whose best sits there (once per group); then the ladder: every
    finalist (the best learning rate of each model, optimizer and batch) at every budget and seed; then each
    batch's winner in bf16; then the overall winner's shape as throughput rows on each layout. Each entry is a
    pure function of the rows before it, so a resumed sweep adds the same ones."""
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
    # Last, the best winner's shape as throughput rows on each 2-rank layout (and single-process), so the
    # report can estimate seconds to target per layout: its steps to target x the layout's step time.
    best_win = min(wins.values(), key=rank_key)
    cfg = replace(by_id[best_win["config_id"]], eval_every=0, target_loss=0.0, target_gap=0.0, gns=False,
                  max_tokens=0, steps=LAYOUT_STEPS, lr_warmup=0)
    for layout in BASE_LAYOUTS:
        add(replace(cfg, **layout), "layouts")
    return new


LAYOUT_STEPS = 8
