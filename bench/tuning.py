"""Tuning, stated: which learning rate won for each (optimizer, batch size, precision), whether it sits at the
edge of its grid, which optimizer won at each batch size, and the follow-up runs an adaptive matrix adds.

Everything is computed from the rows: "best" is the run that reached the target in the fewest tokens, then
(for runs that did not reach it) the lowest final eval loss; a run that diverged or failed ranks last.
Wen et al. 2025 ("Fantastic pretraining optimizers") show that an untuned baseline inflates claimed
speed-ups about 2x: every optimizer here gets the same relative grid, widened once where it was too narrow.
"""
from __future__ import annotations

import math

from bench.matrix import CONVERGENCE, LR_STEP, plan_entry, rank_budget

GROUP = ("optimizer", "global_batch", "precision")


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def rank_key(row: dict) -> tuple:
    """Smaller is better: reached the target (in fewer tokens), then lower final eval loss; not-ok last."""
    if row.get("status") != "ok":
        return (2, math.inf, math.inf)
    tokens = _num(row.get("tokens_to_target"))
    final = _num(row.get("final_eval_loss"))
    return (0 if tokens is not None else 1, tokens if tokens is not None else math.inf,
            final if final is not None else math.inf)


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Convergence rows by (optimizer, global batch, precision), each list sorted by learning rate."""
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
    if rank_key(b)[0] == 2:
        return None  # nothing worked: no edge to widen towards
    if b is rows[0]:
        return "low"
    if b is rows[-1]:
        return "high"
    return None


def winners(rows: list[dict], precision: str = "fp32") -> dict[str, dict]:
    """Per global batch (as a string): the best run over every optimizer and learning rate."""
    out: dict[str, dict] = {}
    for (_, batch, prec), g in groups(rows).items():
        if prec != precision:
            continue
        b = best(g)
        if batch not in out or (rank_key(b), _num(b["lr"])) < (rank_key(out[batch]), _num(out[batch]["lr"])):
            out[batch] = b
    return out


def followups(matrix: str, plan: list[dict], rows: list[dict]) -> list[dict]:
    """Entries an adaptive matrix adds once every planned entry has its row: first, one more learning rate
    beyond the edge of each fp32 grid whose winner sits there (once per group); then, with every grid
    settled, the winning optimizer at each batch size in bf16 at its best learning rate."""
    if matrix not in CONVERGENCE:
        return []
    phases = {e["config_id"]: e.get("phase") for e in plan}
    by_id = {e["config_id"]: e["config"] for e in plan}
    rows = [r for r in rows if phases.get(r["config_id"]) in ("grid", "widen", "precision")]  # not throughput rows
    device = by_id[plan[0]["config_id"]]["device"]
    budget = rank_budget(device)
    widened = {tuple(str(by_id[cid][k]) for k in GROUP) for cid, ph in phases.items() if ph == "widen"}
    new, ids = [], set(by_id)

    def add(cfg, phase):
        entry = plan_entry(cfg, device, budget, phase=phase)
        if entry["config_id"] not in ids:
            ids.add(entry["config_id"])
            new.append(entry)

    for key, g in groups(rows).items():
        side = edge(g)
        if key[2] != "fp32" or side is None or key in widened:
            continue
        end = g[0] if side == "low" else g[-1]
        lr = _num(end["lr"]) / LR_STEP if side == "low" else _num(end["lr"]) * LR_STEP
        add(dict(by_id[end["config_id"]], lr=lr), "widen")
    if new:
        return new
    wins = winners(rows)
    for win in wins.values():
        add(dict(by_id[win["config_id"]], precision="bf16"), "precision")
    if new or not wins:
        return new
    # Last, the fastest winner's shape as throughput rows on each 2-rank layout (and single-process), so the
    # report can estimate seconds to target per layout: its steps to target x the layout's step time.
    best_win = min(wins.values(), key=lambda r: (rank_key(r)[0], _num(r.get("seconds_to_target")) or math.inf,
                                                 rank_key(r)[2]))
    cfg = dict(by_id[best_win["config_id"]], eval_every=0, target_loss=0.0, target_gap=0.0, gns=False,
               max_tokens=0, steps=LAYOUT_STEPS, lr_warmup=0)
    for layout in LAYOUTS:
        add(dict(cfg, **layout), "layouts")
    return new


LAYOUT_STEPS = 8
LAYOUTS = (dict(), dict(dp=2), dict(dp=2, dp_mode="fsdp"), dict(tp=2), dict(pp=2))
