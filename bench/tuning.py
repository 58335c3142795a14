"""Tuning, stated: which learning rate won for each (model, optimizer, batch size, precision), whether it sits
at the edge of its grid, and the follow-up runs a convergence matrix adds (see bench.matrix, "Convergence").

Everything is computed from the rows. "Best" is the tuning run (grid, widen or decay phase: the whole budget,
the tuning seed) with the lowest end-of-budget eval loss, the loss measured after its learning-rate schedule
completed; a run that diverged or failed ranks last. Wen et al. 2025 ("Fantastic pretraining optimizers") show
that an untuned baseline inflates claimed speed-ups about 2x: every optimizer, AdamW included, gets the same
relative grid around a centre measured for it, widened until its best is bracketed, and the same weight decays.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from bench.layouts import BASE_LAYOUTS
from bench.matrix import TARGET_FRACTION, at_budget, rank_budget, waits_for_adamw
from bench.plan import PlanEntry
from bench.results import as_written
from bench.study import Study
from llmopt.core.config import TrainConfig
from llmopt.optimizers import names as optimizer_names
from llmopt.optimizers import spec as optimizer_spec

if TYPE_CHECKING:
    import pandas as pd

GROUP = ("preset", "optimizer", "global_batch", "precision")
TUNING = ("grid", "widen", "decay")  # the phases whose runs tune (the whole budget, the tuning seed)
ADAMW_LR_PHASE = "adamw-lr"  # a finalist with an AdamW part, that part at its own rate (own_rate_runs)
# the phases whose runs can be a point of a finalist's ladder (its tuning run is one only where its seed has
# other budgets too: references made before the tuning seed was kept apart from the evaluation seeds)
LADDER_PHASES = (*TUNING, "ladder", "seeds")


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


def lr_grid(rows: list[dict]) -> list[dict]:
    """A group's learning-rate grid: its runs but the weight-decay follow-ups (phase decay), by learning rate."""
    return [r for r in rows if r.get("phase") != "decay"]


def edge(rows: list[dict]) -> str | None:
    """'low' or 'high' when the best learning rate of the grid is the smallest or largest tried (it is not
    bracketed by two worse neighbours: the grid may be too narrow), else None. A group of one run has no
    interior."""
    rows = lr_grid(rows)
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
    mask = (phase.isin([*LADDER_PHASES, "stable", "precision"])
            | (phase.fillna("").eq("") & has_target(results)))
    return results[mask & (results.status != "skipped")].copy()


def _records(df: "pd.DataFrame") -> list[dict]:
    return df.astype(object).where(df.notna(), None).to_dict("records")


def best_runs(conv: "pd.DataFrame") -> "pd.DataFrame":
    """The best tuning run of each (preset, optimizer, global batch, precision), with its grid's edge status and
    the number of tuning runs and their training seconds (the tuning budget each optimizer had)."""
    import pandas as pd

    tune = conv[conv.phase.isin(TUNING)] if "phase" in conv else conv
    out = []
    for g in groups(_records(tune)).values():
        b = dict(best(g))
        b["edge"] = edge(g)
        b["tuning_runs"] = len(g)
        b["tuning_seconds"] = sum(_num(r.get("wall_s")) or 0.0 for r in g)
        out.append(b)
    return pd.DataFrame(out)


def ladder(conv: "pd.DataFrame", best_rows: "pd.DataFrame") -> "pd.DataFrame":
    """Every run in the study's own precision of each finalist (its best learning rate and weight decay,
    ``best_runs``; role "finalist") and of each unstable finalist's next stable learning rate (phase stable; role
    "stable") that finished or diverged, at every budget and seed where that seed ran two budgets or more:
    columns preset, optimizer, global_batch, lr, weight_decay, role, max_tokens, seed, final_eval_loss (NaN where
    the run diverged: it has no end-of-budget loss), diverged, config_id, tuning_id (the config_id of the whole-budget
    tuning run it repeats), task, floor (the data's entropy floor in nats where it is known, else 0). A
    diverged budget stays so that it counts as not reached there (``stats.tokens_to_target``); a failed run (the
    harness's fault, not the optimizer's) is left out; the tuning run alone (the tuning seed at the whole
    budget) selected the finalist and is not evidence for it."""
    import pandas as pd

    keys = ["preset", "optimizer", "global_batch", "lr", "weight_decay"]
    main = main_precision(conv)
    runs = conv[(conv.precision == main) & conv.status.isin(["ok", "diverged"])]
    # the keys as results.csv writes them: a resumed sweep's tuning rows come from the file, its ladder's from
    # memory, and a learning rate of 0.1 / 3 must match itself
    runs = runs.assign(task=task_of(runs), weight_decay=_column(runs, "weight_decay", 0.0).map(as_written),
                       lr=runs.lr.map(as_written), phase=_column(runs, "phase", ""),
                       floor=_column(runs, "entropy_floor_nats", 0.0))
    fin = best_rows[(best_rows.precision == main) & (best_rows.status == "ok")]
    fin = fin.assign(weight_decay=_column(fin, "weight_decay", 0.0).map(as_written),
                     lr=fin.lr.map(as_written))[keys + ["config_id"]]
    alt = runs[runs.phase == "stable"]
    tuned = runs[runs.phase.isin(TUNING) | runs.phase.eq("")].drop_duplicates(keys)[keys + ["config_id"]]
    lad = pd.concat([runs[runs.phase.isin(LADDER_PHASES) | runs.phase.eq("")]
                     .merge(fin.rename(columns={"config_id": "tuning_id"}), on=keys).assign(role="finalist"),
                     alt.merge(tuned.rename(columns={"config_id": "tuning_id"}), on=keys, how="left")
                     .assign(role="stable")], ignore_index=True)
    columns = keys + ["role", "max_tokens", "seed", "final_eval_loss", "diverged", "config_id", "tuning_id", "task",
                      "floor"]
    if lad.empty:  # no finalist yet (every tuning run failed, or none has finished)
        return pd.DataFrame(columns=columns)
    budgets = lad.groupby(keys + ["role", "seed"]).max_tokens.transform("nunique")
    lad = lad[budgets >= 2].copy()
    lad["diverged"] = lad.status.eq("diverged")
    lad.loc[lad.diverged, "final_eval_loss"] = float("nan")
    return lad[columns]


def _column(df: "pd.DataFrame", name: str, default) -> "pd.Series":
    """``df[name]`` with its gaps filled, or ``default`` everywhere where rows made before it lack it."""
    import pandas as pd

    return df[name].fillna(default) if name in df else pd.Series(default, index=df.index)


def ranked(fs: "pd.DataFrame") -> "pd.DataFrame":
    """The rows of ``fs`` a verdict ranks, with column ``ranked`` (seed -> tokens): those that reached the target
    on every seed of two or more, at their crossings, and those there by the smallest budget on every seed, at
    that budget (an upper bound, so a lead computed from it understates theirs)."""
    bounded = fs.bounded if "bounded" in fs else False
    seeds = fs.seeds if "seeds" in fs else fs.tokens.map(len)
    ok = fs[(fs.all_reached & (fs.tokens.map(len) >= 2)) | (bounded & (seeds >= 2))]
    return ok.assign(ranked=[dict(r.by_seed) if r.all_reached else {s: r.bound for s in r.seed_list}
                             for r in ok.itertuples()])


def main_precision(conv: "pd.DataFrame") -> str:
    """The precision a study tunes and ladders in: its grid's (the [base] precision; fp32 unless set). The
    precision phase runs each batch's winner in the other one (bf16 beside fp32, fp32 beside any other)."""
    grid = conv[conv.phase == "grid"] if "phase" in conv else conv
    return str(grid.precision.mode().iloc[0]) if len(grid) else "fp32"


def finalists(fs: "pd.DataFrame") -> "pd.DataFrame":
    """The finalists' rows of ``finalist_stats`` (not the stable alternatives reported beside them)."""
    return fs[fs.role == "finalist"] if "role" in fs else fs


def task_of(rows: "pd.DataFrame") -> "pd.Series":
    """The task a row's loss measures (its data, tokenizer and sequence length): losses, and so targets, are
    comparable across model sizes and batch sizes within a task, not across tasks."""
    import pandas as pd

    def col(name, default):
        if name not in rows:
            return pd.Series(default, index=rows.index)
        return rows[name].astype(object).fillna("").astype(str).replace("", default)

    return col("data", "generated data") + ", " + col("tokenizer", "bytes") + " tokens, sequence " + col("seq_len", "?")


def adamw_reference(df: "pd.DataFrame", preset, batch) -> "pd.DataFrame":
    """AdamW's rows at one model and batch (of a ``ladder``, or of its ``finalist_stats``) that targets are read
    off and speed-ups are taken over: its finalist's, or where a run of the finalist's ladder diverged and its next
    stable learning rate ran beside it (role "stable"), that rate's. A baseline that diverged on a seed is no
    yardstick: a target read off it leaves that seed out, and a speed-up over it counts a budget it did not
    finish."""
    import pandas as pd

    a = df[(df.preset == preset) & (df.global_batch == batch) & (df.optimizer == "adamw")]
    role = a.role if "role" in a else pd.Series("finalist", index=a.index)
    fin, stable = a[role == "finalist"], a[role == "stable"]
    unstable = bool(fin.diverged.any() if "diverged" in fin else fin.unstable.any())
    return stable if unstable and len(stable) else fin


def targets(lad: "pd.DataFrame") -> dict[tuple, float]:
    """(preset, batch) -> the per-batch target: AdamW's mean end-of-budget loss (``adamw_reference``'s) at the
    ladder's budget nearest TARGET_FRACTION of the largest (without AdamW, the median over the optimizers of their
    means there). It moves with the batch size, so speed-ups at it are not compared across batches
    (``common_targets`` are)."""
    out = {}
    for (preset, batch), g in lad.groupby(["preset", "global_batch"]):
        fin = g[~g.diverged & g.role.eq("finalist")]
        if fin.empty:
            continue
        budgets = sorted(fin.max_tokens.unique())
        at = min(budgets, key=lambda b: abs(b - TARGET_FRACTION * budgets[-1]))
        ref = adamw_reference(g, preset, batch)
        ref = ref[~ref.diverged & (ref.max_tokens == at)]
        means = fin[fin.max_tokens == at].groupby("optimizer").final_eval_loss.mean()
        out[(preset, batch)] = float(ref.final_eval_loss.mean()) if len(ref) else float(means.median())
    return out


def common_targets(lad: "pd.DataFrame", given: tuple = ()) -> dict[str, dict[str, float]]:
    """task -> {"moderate": loss, "hard": loss}: two targets shared by every model and batch size of the task,
    each reached by AdamW's reference (``adamw_reference``: its finalist, or that finalist's next stable rate where
    the finalist diverged on a seed) on every seed, at every model and batch size, within the ladder.

    hard: the highest end-of-budget loss at the largest budget over AdamW's seeds, models and batch sizes
    (rounded up to 0.001 nats), so the slowest of them reaches it by its last budget. moderate: halfway, on a
    log scale of the loss above the data's entropy floor (0 where unknown), from hard to the lowest loss AdamW
    had at its smallest budget, so it is crossed inside the ladder wherever that loss is above hard (else,
    halfway to the highest loss at the smallest budget: some batches then reach it by the smallest budget, a
    bound). A loss's distance from the floor falls about geometrically with training, so a log-scale midpoint
    sits mid-ladder. A task without AdamW, or where AdamW's reference diverged at its largest budget, gets none
    (the per-batch targets stand alone). ``given``: the study's own target losses instead, for every task."""
    import pandas as pd

    if given:
        return {task: {f"given #{i + 1}": float(loss) for i, loss in enumerate(given)} for task in lad.task.unique()}
    out = {}
    for task, g in lad.groupby("task"):
        a = pd.concat([adamw_reference(g, *k) for k in sorted(set(zip(g.preset, g.global_batch)))])
        if a.empty:
            continue
        largest = a[a.max_tokens == a.groupby(["preset", "global_batch"]).max_tokens.transform("max")]
        smallest = a[a.max_tokens == a.groupby(["preset", "global_batch"]).max_tokens.transform("min")]
        if largest.diverged.any():
            continue
        hard = math.ceil(largest.final_eval_loss.max() * 1000) / 1000
        start = smallest.final_eval_loss.dropna()
        easy = start.min() if start.min() > hard else start.max()
        floor = float(g.floor.max())
        out[task] = {"moderate": round(floor + math.sqrt((hard - floor) * (easy - floor)), 3), "hard": hard}
    return out


@dataclass(frozen=True)
class CommonTarget:
    """One loss shared by every model and batch size of a task (``common_targets``), and every finalist's
    tokens to it."""
    task: str
    name: str           # "moderate" or "hard" (the rule's), or "given #1", ... (the study's own)
    loss: float
    fs: "pd.DataFrame"  # finalist_stats at this loss


def at_common_targets(lad: "pd.DataFrame", given: tuple = ()) -> list[CommonTarget]:
    """Each task's common targets (``common_targets``) with every finalist's statistics at them: what the
    report's tables and verdicts read, and what decides where a study adds seeds."""
    out = []
    for task, named in common_targets(lad, given).items():
        sub = lad[lad.task == task]
        keys = set(zip(sub.preset, sub.global_batch))
        out += [CommonTarget(task, name, loss, finalist_stats(sub, dict.fromkeys(keys, loss)))
                for name, loss in named.items()]
    return out


def finalist_stats(lad: "pd.DataFrame", target: dict) -> "pd.DataFrame":
    """Per finalist: its end-of-budget loss at the largest budget and its tokens to target, each seed's.
    ``by_seed`` (and ``tokens``, the same figures in seed order) holds a figure per seed where the target was
    crossed: interpolated, or an upper bound: the budget that reached it after a diverged one (those seeds in
    ``after_diverged``) or the smallest budget, already at or below it (``at_first``). A finalist there by the
    smallest budget on every seed is ``bounded`` (its tokens are at most ``bound``). ``unstable``: a run of its
    ladder diverged (``diverged_runs`` of ``runs``)."""
    import pandas as pd

    import bench.report.stats as stats

    rows = []
    for (preset, opt, batch, lr, wd, role), g in lad.groupby(["preset", "optimizer", "global_batch", "lr",
                                                             "weight_decay", "role"]):
        top = g.max_tokens.max()
        end = g[(g.max_tokens == top) & ~g.diverged].sort_values("seed")
        crossings = {}
        for seed, s in g.groupby("seed"):
            crossings[seed] = stats.tokens_to_target(list(s.max_tokens), list(s.final_eval_loss),
                                                     target[(preset, batch)])
        status = [c.status for c in crossings.values()]
        counted = (stats.REACHED, stats.AFTER_DIVERGED, stats.AT_FIRST)
        rows.append({"preset": preset, "optimizer": opt, "global_batch": batch, "lr": lr, "weight_decay": wd,
                     "role": role, "tuning_id": g.tuning_id.iloc[0], "budget": top,
                     "budgets": sorted(g.max_tokens.unique()), "seeds": len(crossings),
                     "seed_list": sorted(int(sd) for sd in crossings),
                     "end_losses": list(end.final_eval_loss),
                     "tokens": [c.tokens for c in crossings.values() if c.status in counted],
                     "by_seed": {int(sd): c.tokens for sd, c in crossings.items() if c.status in counted},
                     "after_diverged": sorted(int(sd) for sd, c in crossings.items()
                                              if c.status == stats.AFTER_DIVERGED),
                     "at_first": sorted(int(sd) for sd, c in crossings.items() if c.status == stats.AT_FIRST),
                     "statuses": sorted(set(status)), "bound": float(g.max_tokens.min()),
                     "all_reached": all(st in counted for st in status),
                     "bounded": status.count(stats.AT_FIRST) == len(status),
                     "runs": len(g), "diverged_runs": int(g.diverged.sum()), "unstable": bool(g.diverged.any())})
    return pd.DataFrame(rows)



# ------------------------------------------------------------------------------------------- follow-ups
def followups(study: Study | None, plan: list[PlanEntry], rows: list[dict]) -> list[PlanEntry]:
    """Entries a convergence study adds once every planned entry has its row, one phase at a time (the phases:
    bench.study): widen, decay, ladder, stable, seeds (repeated until no verdict is close or the study's
    max_seeds), precision, layouts, to-target. Each entry is a pure function of the rows before it, so a
    resumed sweep adds the same ones. None: a sweep that is not a study adds nothing."""
    if study is None:
        return []
    phases = {e.config_id: e.phase for e in plan}
    by_id = {e.config_id: e.config for e in plan}
    tuning_rows = [dict(r, phase=phases.get(r["config_id"])) for r in rows if phases.get(r["config_id"]) in TUNING]
    device = plan[0].config.device
    budget = rank_budget(device)
    new: list[PlanEntry] = []
    ids = set(by_id)

    def add(cfg: TrainConfig, phase: str):
        entry = PlanEntry.of(cfg, device, budget, phase=phase)
        if entry.config_id not in ids:
            ids.add(entry.config_id)
            new.append(entry)

    def key_of(cid: str) -> tuple:
        return tuple(str(getattr(by_id[cid], k)) for k in GROUP)

    main = next((e.config.precision for e in plan if e.phase == "grid"), "fp32")
    tuned = {k: g for k, g in groups(tuning_rows).items() if k[3] == main}  # in the study's own precision
    widenings = [key_of(cid) for cid, ph in phases.items() if ph == "widen"]
    settled = {}  # the groups no widening is added for: bracketed, or out of widenings
    for key, g in tuned.items():
        side = edge(g)
        if side is None or widenings.count(key) >= study.max_widenings:
            settled[key] = g
            continue
        grid = lr_grid(g)
        end = grid[0] if side == "low" else grid[-1]
        lr = _num(end["lr"]) / study.lr_step if side == "low" else _num(end["lr"]) * study.lr_step
        add(replace(by_id[end["config_id"]], lr=lr), "widen")
    gridded = {key_of(cid) for cid, ph in phases.items() if ph == "grid" and by_id[cid].adamw_lr}
    for cfg in adamw_part_grids(study, settled, by_id, gridded):
        add(cfg, "grid")
    if new:
        return new
    for cfg in equal_budgets(tuned, by_id, study.lr_step):
        add(cfg, "widen")
    if new:
        return new
    for g in tuned.values():  # the grid's best at every other weight decay
        b = best(lr_grid(g))
        if rank_key(b)[0] == 0 and _num(b.get("weight_decay")) in (None, study.weight_decays[0]):
            for wd in study.weight_decays[1:]:
                add(replace(by_id[b["config_id"]], weight_decay=wd), "decay")
    if new:
        return new
    for g in tuned.values():
        b = best(g)
        if rank_key(b)[0] == 0:
            for cfg in _ladder_configs(by_id[b["config_id"]], study.seeds, study.ladder):
                add(cfg, "ladder")
    if new:
        return new
    lad, fs = _ladder_analysis(rows, phases)
    for cfg in stable_alternatives(tuned, fs, by_id, study.ladder):
        add(cfg, "stable")
    for cfg in own_rate_runs(tuned, by_id, study.seeds):
        add(cfg, ADAMW_LR_PHASE)
    if new:
        return new
    for cid, seeds in more_seeds(lad, fs, study).items():
        for cfg in _ladder_configs(by_id[cid], seeds, study.ladder):
            add(cfg, "seeds")
    if new:
        return new
    wins = winners(tuning_rows, main)
    for win in wins.values():
        add(replace(by_id[win["config_id"]], precision="bf16" if main == "fp32" else "fp32"), "precision")
    if new or not wins or not study.wall_clock:
        return new
    # Then every finalist's shape as throughput rows on single, ddp2, fsdp2 and tp2 (no evals), so that the
    # report can state seconds to target per optimizer and layout: its tokens to target over its tokens/s there
    for g in tuned.values():
        b = best(g)
        if rank_key(b)[0] == 0:
            cfg = replace(by_id[b["config_id"]], eval_every=0, target_loss=0.0, target_gap=0.0, gns=False,
                          max_tokens=0, steps=LAYOUT_STEPS, lr_warmup=0)
            for layout in THROUGHPUT_LAYOUTS:
                add(replace(cfg, **layout), "layouts")
    if new:
        return new
    # Last, the check of that estimate: each finalist that reached the target on every seed, trained under
    # fsdp2 for its mean tokens to target (its own full schedule, the tuning seed); the report sets its measured
    # seconds beside the estimate
    for cfg in to_target_runs(fs, by_id):
        add(cfg, "to-target")
    return new


def adamw_part_grids(study: Study, settled: dict, by_id: dict, gridded: set) -> list[TrainConfig]:
    """The grid of each optimizer that ``waits_for_adamw`` (Muon), once AdamW's grid at the same model, batch
    and precision is settled (``settled``: bracketed, or out of widenings): its learning-rate multiples at the
    tuning seed and the grid's weight decay, with its AdamW part at AdamW's best rate there (at its own rate
    where every AdamW run failed). Muon's best rate was 3-10x AdamW's in the first studies, so one rate for both
    parts ran its embeddings, head and gains far above AdamW's optimum. Once planned (``gridded``: its group's
    keys), a grid keeps its rate: AdamW's later equal-budget widenings may move AdamW's best, not Muon's part."""
    out = []
    for (preset, opt, batch, prec), g in settled.items():
        if opt != "adamw":
            continue
        b = best(lr_grid(g))
        rate = _num(b["lr"]) if rank_key(b)[0] == 0 else 0.0
        adamw = by_id[b["config_id"]]
        for o in study.optimizers or optimizer_names():
            if waits_for_adamw(study, o) and (preset, o, batch, prec) not in gridded:
                out += [replace(adamw, optimizer=o, lr=optimizer_spec(o).lr_centre * m, adamw_lr=rate)
                        for m in study.lr_multiples]
    return out


def equal_budgets(tuned: dict, by_id: dict, step: float) -> list[TrainConfig]:
    """The same number of tuning runs for every optimizer of a model, batch and precision (AlgoPerf's rule):
    once every grid is bracketed or out of widenings, each with fewer learning rates than the most any of them
    needed is widened further to that count, alternately on both sides, starting on the side of its best's
    better neighbour (where the optimum more likely lies), never beyond an edge whose run diverged or failed
    (a larger rate would too). A grid whose every run failed gets none."""
    out = []
    most: dict[tuple, int] = {}
    for (preset, _, batch, prec), g in tuned.items():
        most[(preset, batch, prec)] = max(most.get((preset, batch, prec), 0), len(lr_grid(g)))
    for (preset, _, batch, prec), g in tuned.items():
        grid = lr_grid(g)
        b = best(grid)
        missing = most[(preset, batch, prec)] - len(grid)
        if missing <= 0 or rank_key(b)[0] == 1:
            continue
        i = grid.index(b)
        sides = [side for side, edge_run in (("low", grid[0]), ("high", grid[-1])) if rank_key(edge_run)[0] == 0]
        if i == len(grid) - 1 or (0 < i and rank_key(grid[i + 1]) < rank_key(grid[i - 1])):
            sides.reverse()  # the high side first: the best is there, or its higher neighbour is the better
        lrs = {"low": _num(grid[0]["lr"]), "high": _num(grid[-1]["lr"])}
        for k in range(missing if sides else 0):
            side = sides[k % len(sides)]
            lrs[side] = lrs[side] / step if side == "low" else lrs[side] * step
            out.append(replace(by_id[grid[0 if side == "low" else -1]["config_id"]], lr=lrs[side]))
    return out


def own_rate_runs(tuned: dict, by_id: dict, seeds) -> list[TrainConfig]:
    """What running the AdamW part at AdamW's rate changed, measured: each finalist whose AdamW part ran at
    AdamW's tuned rate, again at the whole budget on every evaluation seed with that part at its own rate
    (``--adamw-lr`` 0, as before), paired with its ladder's whole-budget runs by seed (phase adamw-lr)."""
    out = []
    for g in tuned.values():
        b = best(g)
        whole = by_id[b["config_id"]]
        if rank_key(b)[0] == 0 and whole.adamw_lr:
            out += [replace(c, adamw_lr=0.0) for c in _ladder_configs(whole, seeds, (1,))]
    return out


def _ladder_configs(whole: TrainConfig, seeds, ladder: tuple) -> list[TrainConfig]:
    """A whole-budget run's ladder: every budget of ``ladder`` (fractions of its own) at every one of ``seeds``."""
    return [TrainConfig(**at_budget(asdict(whole), fraction, seed)) for fraction in ladder for seed in seeds]


def _frame(rows: list[dict], phases: dict) -> "pd.DataFrame":
    """The rows as the report reads them (the plan's phases; resumed rows' numbers back from text)."""
    import pandas as pd

    frame = pd.DataFrame([dict(r, phase=phases.get(r["config_id"], r.get("phase"))) for r in rows])
    for col in frame.columns:  # resumed rows come back as text: a column whose every value is a number is one
        numeric = pd.to_numeric(frame[col], errors="coerce")
        present = frame[col].notna() & (frame[col] != "")
        if numeric.notna().sum() == present.sum():
            frame[col] = numeric
    return frame


def _ladder_analysis(rows: list[dict], phases: dict) -> tuple:
    """(the ladder, its finalist_stats at the per-batch targets) from the rows, or two empty frames."""
    import pandas as pd

    conv = convergence_rows(_frame(rows, phases))
    lad = ladder(conv, best_runs(conv)) if len(conv) else pd.DataFrame()
    if lad.empty:
        return lad, pd.DataFrame()
    return lad, finalist_stats(lad, targets(lad))


def stable_alternatives(tuned: dict, fs: "pd.DataFrame", by_id: dict, ladder: tuple) -> list[TrainConfig]:
    """For each unstable finalist (a run of its ladder diverged): the largest smaller learning rate of its grid,
    at its weight decay, whose tuning run finished, at every budget and evaluation seed."""
    out = []
    if fs.empty:
        return out
    for r in finalists(fs)[finalists(fs).unstable].itertuples():
        g = tuned.get(next((k for k in tuned if k[:3] == (str(r.preset), str(r.optimizer), str(r.global_batch))),
                           None), [])
        below = [x for x in g if rank_key(x)[0] == 0 and _num(x["lr"]) < r.lr
                 and as_written(_num(x.get("weight_decay")) or 0.0) == r.weight_decay]
        if below:
            out += _ladder_configs(by_id[max(below, key=lambda x: _num(x["lr"]))["config_id"]], r.seed_list, ladder)
    return out


def more_seeds(lad: "pd.DataFrame", fs: "pd.DataFrame", study: Study) -> dict[str, list[int]]:
    """config_id of a finalist's tuning run -> the seeds its ladder should have: where a verdict's test (at the
    per-batch target or a common one) has p in the study's more_seeds_band, the lead and the other optimizer
    both get seed_step more seeds (the same ones), up to max_seeds: a verdict that close is not called on three
    seeds."""
    import bench.report.stats as stats

    out: dict[str, list[int]] = {}
    if fs.empty:
        return out
    for at in [fs] + [ct.fs for ct in at_common_targets(lad, study.targets)]:
        for _, g in finalists(at).groupby(["preset", "global_batch"]):
            ok = ranked(g)
            if len(ok) < 2:
                continue
            lead, tests, _ = stats.lead_tests(dict(zip(ok.optimizer, ok.ranked)))
            for other, w in tests:
                if not study.more_seeds_band[0] <= w.p < study.more_seeds_band[1]:
                    continue
                pair = g[g.optimizer.isin([lead, other])]
                have = sorted(set().union(*pair.seed_list))
                if len(have) >= study.max_seeds:
                    continue
                more = min(study.seed_step, study.max_seeds - len(have))
                want = have + list(range(max(have) + 1, max(have) + 1 + more))
                for cid in pair.tuning_id:
                    out[cid] = sorted(set(out.get(cid, [])) | set(want))
    return out


def to_target_runs(fs: "pd.DataFrame", by_id: dict) -> list[TrainConfig]:
    """The to-target check's configs (``followups``' last phase), from the finalists' statistics at their
    per-batch targets (``_ladder_analysis``, as the report reads them)."""
    out = []
    for r in (finalists(fs).itertuples() if len(fs) else []):
        if not r.all_reached:
            continue
        whole = asdict(by_id[r.tuning_id])
        tokens = math.ceil(sum(r.tokens) / len(r.tokens))
        # no noise-scale instrument (it needs DDP, and the throughput rows run without it)
        out.append(replace(TrainConfig(**at_budget(whole, tokens / whole["max_tokens"], whole["seed"])), gns=False,
                           **CHECK_LAYOUT))
    return out


# Steps of a throughput row: its first 8 steps run 8-15% slower than the steps after 20 (allocator, caches; the
# fsdp2 to-target runs of cpu-convergence-b8), so 8-step rows overstated seconds to target by up to 20%
LAYOUT_STEPS = 24
# The layouts seconds to target are stated for (issue 38: single, ddp2, fsdp2, tp2), and the one it is checked on
THROUGHPUT_LAYOUTS = tuple(layout for layout in BASE_LAYOUTS if not layout.get("pp"))
CHECK_LAYOUT = dict(dp=2, dp_mode="fsdp")
