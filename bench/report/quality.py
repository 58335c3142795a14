"""The report's "Time to quality" section: which optimizer reaches a loss first, answered as careful optimizer
studies answer it (Wen et al. 2025; modded-nanogpt's record rules; AlgoPerf):

* only losses measured at the end of a completed learning-rate schedule count: each finalist (the best
  learning rate of a model, optimizer and batch size) runs at a ladder of budgets, each with its own full
  schedule, and the tokens at which it would reach the target are interpolated between the two budgets whose
  end-of-budget losses bracket it (``bench.report.stats.tokens_to_target``; never extrapolated);
* over seeds (each seed draws the initial weights, the training sequences and the held-out sample, the same
  for every optimizer): mean and standard deviation, and a winner only where a t-test over seeds (paired by
  seed) puts its lead at p < 0.05 against every other optimizer, else a tie;
* the target: AdamW's mean end-of-budget loss at half the largest budget, per model and batch size (so AdamW's
  tokens to target sit near that budget by construction, every speed-up is over AdamW's tokens, and the
  smaller budgets below it leave room to measure optimizers up to 8x faster);
* the old method beside the new for every finalist: the first eval at or below the target during the
  whole-budget run, whose cosine schedule is still high there.

Every sentence is computed from the rows (results.csv, evals.csv); nothing is prewritten.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

import bench.report.stats as stats
from bench.layouts import layout_name
from bench.matrix import TARGET_FRACTION
from bench.report.markdown import fmt, md_table
from bench.results import as_written
from bench.tuning import (
    ADAMW_LR_PHASE,
    CommonTarget,
    adamw_reference,
    at_common_targets,
    best_runs,
    convergence_rows,
    finalist_stats,
    finalists,
    ladder,
    main_precision,
    ranked,
    targets,
)

SIGNIFICANCE = 0.05  # the two-sided p below which a lead counts


def target_source(lad: pd.DataFrame, preset: str, batch) -> str:
    """What a batch's target is, in words, where it is not the usual (AdamW's finalist's mean): its next stable
    rate's (``adamw_reference``), or (no AdamW in the matrix) whose median."""
    opts = sorted(lad[(lad.preset == preset) & (lad.global_batch == batch)].optimizer.unique())
    if "adamw" in opts:
        ref = adamw_reference(lad, preset, batch)
        return ("" if ref.empty or ref.role.iloc[0] == "finalist" else
                f"AdamW's next stable learning rate's mean end-of-budget loss (lr {ref.lr.iloc[0]:.3g}): AdamW's "
                f"finalist diverged on a seed, so its next stable rate is the reference here")
    return (f"no AdamW in this matrix: the median of {', '.join(opts)}'s mean end-of-budget losses, so no "
            f"speed-up over AdamW is stated")


def targets_table(rows: pd.DataFrame) -> list[str]:
    """Runs given a target outside a convergence matrix (a TOML sweep with target_loss, or a sweep made before
    end-of-budget ladders): where each reached its target during the one run, as its evals saw it."""
    cols = {"config_id": "config", "optimizer": "optimizer", "lr": "lr", "target_loss": "target (nats)",
            "status": "status", "steps_to_target": "steps to target", "tokens_to_target": "tokens to target",
            "seconds_to_target": "seconds to target", "best_eval_loss": "best eval loss"}
    t = rows[[c for c in cols if c in rows]].rename(columns=cols).sort_values("config")
    return ["## Targets", "",
            "Each run below was given a target loss and stopped at the first held-out eval at or below it (its "
            "learning-rate schedule still running there, so this is not an end-of-budget comparison: for that, "
            "run `--matrix convergence` or `convergence-text`). Empty: not reached within the run.", "",
            md_table(t), ""]


def verdict(fs: pd.DataFrame) -> str:
    """Who reached the target first at one (model, batch, target): the optimizer with the fewest tokens
    (geometric mean over seeds) among those that reached it on every seed (a finalist there by the smallest
    budget counts at that budget, an upper bound), declared the winner only where a t-test on log tokens over
    seeds (``stats.lead_tests``) puts it ahead of every other such optimizer at p < SIGNIFICANCE after Holm's
    correction for the number of those tests; otherwise the tie, named, with the numbers."""
    ok = ranked(finalists(fs))
    if ok.empty:
        return "no optimizer reached the target on every seed, so none is ranked"
    lead_name, tests, adjusted = stats.lead_tests(dict(zip(ok.optimizer, ok.ranked)))
    lead = ok[ok.optimizer == lead_name].iloc[0]
    tied = [name for (name, _), p in zip(tests, adjusted) if p >= SIGNIFICANCE]
    numbers = "; ".join(f"vs {name}: {w.kind} t = {w.t:.2f}, df = {w.df:.1f}, p = {w.p:.3g}"
                        + (f", Holm p = {p:.3g}" if len(tests) > 1 else "")
                        for (name, w), p in zip(tests, adjusted))
    if tests and getattr(lead, "bounded", False):
        numbers += (f"; {lead.optimizer}'s tokens taken as the smallest budget, {lead.bound:,.0f}, which it had "
                    f"already reached on every seed")
    also = [n for n in tied if bool(ok[ok.optimizer == n].bounded.iloc[0])] if "bounded" in ok else []
    if also:
        numbers += f"; {', '.join(also)} too reached it by the smallest budget, so this ladder cannot order them"
    unstable = sorted(ok[ok.unstable].optimizer) if "unstable" in ok else []
    if unstable:
        numbers += f"; unstable (a ladder run diverged): {', '.join(unstable)}"
    if not tests:
        return f"{lead.optimizer} was the only optimizer to reach the target on every seed"
    test = "t-test on log tokens to target over seeds, paired by seed where both ran the same seeds"
    if tied:
        return (f"tie within noise between {lead.optimizer} and {', '.join(tied)} ({test}, two-sided, Holm-"
                f"corrected p >= {SIGNIFICANCE}: {numbers})")
    return (f"**{lead.optimizer}** reached the target first; the {test} puts its lead at p < {SIGNIFICANCE} "
            f"against every other after Holm's correction ({numbers})")


def _pm(xs: list[float], spec: str) -> str:
    if not xs:
        return "—"
    m, s = stats.mean_std(xs)
    return f"{m:{spec}} ± {s:{spec}}" + (f" (n={len(xs)})" if len(xs) != 3 else "")


def speedup(row, adamw) -> stats.Speedup | None:
    """AdamW's tokens over the optimizer's, paired by seed (``stats.paired_speedup``); None where either did not
    reach the target on every seed or shares no seed with the other."""
    if adamw is None or not adamw.all_reached or not row.all_reached:
        return None
    return stats.paired_speedup(adamw.by_seed, row.by_seed)


def speedup_cell(row, adamw) -> str:
    """A table's speed-up over AdamW: the paired ratio [95% CI], a lower bound where ``row`` was there by the
    smallest budget, which seeds are bounds, or — where there is none."""
    if row.optimizer == "adamw" and adamw is not None and _name(row) == _name(adamw):
        return "1 (the reference)"
    if adamw is None or not adamw.all_reached:
        return "—"
    if getattr(row, "bounded", False):  # its tokens are at most the bound: the speed-up is at least this
        return f"≥ {stats.geomean(adamw.by_seed) / row.bound:.2f} (reached by the smallest budget)"
    sp = speedup(row, adamw)
    if sp is None:
        return "—"
    cell = f"{sp.ratio:.2f}" + (f" [{sp.low:.2f}, {sp.high:.2f}]" if sp.seeds > 1 else " (one seed)")
    return cell + "".join(f" ({name} {note})" for name, r in ((row.optimizer, row), ("adamw", adamw))
                          if (note := _bounds_note(r)))


def _bounds_note(r) -> str:
    """Which seeds' tokens are upper bounds, and why: '' where none are."""
    parts = [f"seed {', '.join(map(str, seeds))}: tokens at most, {why}"
             for seeds, why in ((list(getattr(r, "at_first", [])), "by the smallest budget"),
                                (list(getattr(r, "after_diverged", [])), "reached after a diverged budget")) if seeds]
    return "; ".join(parts)


def measured(r) -> bool:
    """A finalist whose tokens to target are a crossing on every seed, none an upper bound: what a trend is
    drawn from."""
    return (r.all_reached and not getattr(r, "bounded", False) and not len(getattr(r, "at_first", []))
            and not len(getattr(r, "after_diverged", [])))


def measured_speedup(fs: pd.DataFrame, r) -> stats.Speedup | None:
    """``r``'s speed-up over its model and batch's AdamW reference in ``fs`` (``reference_row``) where both are
    ``measured`` (no seed a bound): what trends, the plot and the advisor read; else None."""
    adamw = reference_row(fs, r.preset, r.global_batch)
    return speedup(r, adamw) if measured(r) and adamw is not None and measured(adamw) else None


def _name(r) -> str:
    """An optimizer's row label: its name, or for an unstable finalist's next stable rate, says so."""
    return r.optimizer if getattr(r, "role", "finalist") == "finalist" else f"{r.optimizer} (next stable lr)"


def _tokens_cell(r) -> str:
    if getattr(r, "bounded", False):
        return f"≤ {r.bound:,.0f} (by the smallest budget, every seed)"
    note = f" ({n})" if (n := _bounds_note(r)) else ""
    return _pm(r.tokens, ",.0f") + note + ("" if r.all_reached else f" ({', '.join(r.statuses)})")


def first_crossing(conv: pd.DataFrame, evals: pd.DataFrame, row, target: float) -> str:
    """The old method: the first eval at or below the target during the finalist's whole-budget tuning run
    (the tuning seed), whose schedule had not finished there."""
    run = conv[conv.config_id == row.tuning_id] if hasattr(row, "tuning_id") else conv.iloc[:0]
    if run.empty or evals.empty:
        return "—"
    e = evals[evals.config_id == run.config_id.iloc[0]].sort_values("step")
    hit = e[(e.loss <= target) & (e.step > 0)]
    return "not reached" if hit.empty else f"{int(hit.tokens.iloc[0]):,}"


def batch_table(fs: pd.DataFrame, conv: pd.DataFrame, evals: pd.DataFrame, best: pd.DataFrame,
                target: float) -> str:
    adamw = reference_row(fs, fs.preset.iloc[0], fs.global_batch.iloc[0])
    rows = []
    for _, r in fs.sort_values(["optimizer", "lr"], ascending=[True, False]).iterrows():
        b = best[(best.preset == r.preset) & (best.optimizer == r.optimizer) & (best.global_batch == r.global_batch)
                 & (best.precision == main_precision(conv))]
        edge = b.edge.iloc[0] if len(b) else None
        unstable = (f", unstable: {r.diverged_runs} of {r.runs} ladder runs diverged"
                    if getattr(r, "unstable", False) else "")
        rows.append({"optimizer": _name(r),
                     "best lr": f"{r.lr:.3g}" + {"low": " (grid's lowest)", "high": " (grid's highest)"}.get(edge, "")
                     + unstable,
                     f"end-of-budget loss at {int(r.budget):,} tokens": _pm(r.end_losses, ".4f"),
                     "tokens to target": _tokens_cell(r),
                     "speed-up over AdamW": speedup_cell(r, adamw),
                     "old method: first crossing (seed 0)": first_crossing(conv, evals, r, target)})
    return md_table(pd.DataFrame(rows))


def scaling_sentences(fs: pd.DataFrame, preset: str) -> list[str]:
    """Across batch sizes, at the same token budget: the lowest mean end-of-budget loss of each batch size and
    whose it was (a fixed budget is a common yardstick too: fewer steps at a bigger batch)."""
    g = fs[(fs.preset == preset) & fs.end_losses.map(len).gt(0)]
    if g.global_batch.nunique() < 2:
        return []
    parts = []
    for batch, x in sorted(g.groupby("global_batch"), key=lambda kv: kv[0]):
        means = x.end_losses.map(lambda v: stats.mean_std(v)[0])
        top = x.loc[means.idxmin()]
        parts.append(f"batch {int(batch)} {means.min():.4f} ({top.optimizer})")
    budget = int(g.budget.max())
    return [f"At {budget:,} tokens the lowest mean end-of-budget loss by global batch: " + ", ".join(parts) + "."]


def _settings(fs: pd.DataFrame, sizes: dict) -> list[tuple]:
    """(preset, batch) pairs, smallest model first, then smallest batch."""
    return sorted(set(zip(fs.preset, fs.global_batch)), key=lambda k: (sizes[k[0]][1], k[1]))


def reference_row(fs: pd.DataFrame, preset, batch):
    """AdamW's row of ``finalist_stats`` that speed-ups at this model and batch are over (``adamw_reference``:
    its finalist, or that finalist's next stable rate where the finalist diverged on a seed), or None."""
    a = adamw_reference(fs, preset, batch)
    return None if a.empty else a.iloc[0]


def common_table(ct: CommonTarget, sizes: dict) -> str:
    """Optimizers x (model, batch): the speed-up over AdamW at one common target, paired geometric mean [95%
    confidence interval]."""
    cols = _settings(ct.fs, sizes)
    rows = []
    fs = ct.fs
    for (opt, role), mine in fs.groupby(["optimizer", "role"]):  # sorted by name
        if opt == "adamw" and all(_name(r) == _name(reference_row(fs, r.preset, r.global_batch))
                                  for r in mine.itertuples()):
            continue  # AdamW's rows are listed only where one is not the reference (an unstable finalist's)
        row = {"optimizer": _name(mine.iloc[0])}
        for preset, batch in cols:
            r = mine[(mine.preset == preset) & (mine.global_batch == batch)]
            cell = "—" if r.empty else speedup_cell(r.iloc[0], reference_row(fs, preset, batch))
            if not r.empty and r.iloc[0].unstable:
                cell += " (unstable)"
            if not r.empty and role != "finalist":
                cell += f" (lr {r.iloc[0].lr:.3g})"
            row[f"{preset}, batch {int(batch)}"] = cell
        rows.append(row)
    return md_table(pd.DataFrame(rows))


def speedup_points(cts: list[CommonTarget], sizes: dict) -> pd.DataFrame:
    """Every measured speed-up over AdamW at the common targets (any with a bound, and single seeds, left out), for
    the plot: columns panel (the index in ``cts``), optimizer, preset, batch, params, speedup, low, high."""
    rows = []
    for i, ct in enumerate(cts):
        for _, r in finalists(ct.fs)[finalists(ct.fs).optimizer != "adamw"].iterrows():
            sp = measured_speedup(ct.fs, r)
            if sp is not None and sp.seeds > 1:
                rows.append({"panel": i, "optimizer": r.optimizer, "preset": r.preset, "batch": int(r.global_batch),
                             "params": sizes[r.preset][1], "speedup": sp.ratio, "low": sp.low, "high": sp.high})
    return pd.DataFrame(rows)


def _trend(points: list[tuple[str, stats.Speedup]], over: str) -> str:
    """A trend in words, only as strong as the points: three or more, monotone, and the first and last
    intervals apart, else said to be within noise or absent; two points are listed, not called a trend."""
    listed = ", ".join(f"{sp.ratio:.2f}x at {x}" for x, sp in points)
    if len(points) < 3:
        return f"{listed} (fewer than three {over}: no trend claimed)"
    r = [sp.ratio for _, sp in points]
    steps = [b - a for a, b in zip(r, r[1:])]
    first, last = points[0][1], points[-1][1]
    apart = first.high < last.low or last.high < first.low
    if all(d > 0 for d in steps) or all(d < 0 for d in steps):
        way = "rises" if steps[0] > 0 else "falls"
        sure = ("the first and last intervals do not overlap" if apart
                else "but the first and last intervals overlap: within noise")
        return f"{listed}: {way} with every step in {over}, {sure}"
    return f"{listed}: no monotone trend over {over}"


def trend_sentences(cts: list[CommonTarget], sizes: dict) -> list[str]:
    """Each optimizer's speed-up over AdamW across batch sizes (per model) and across model sizes (per batch),
    at each common target: the only place this report speaks of a trend."""
    out = []
    for ct in cts:
        fs = finalists(ct.fs)
        for opt in sorted(set(fs.optimizer) - {"adamw"}):
            mine = fs[fs.optimizer == opt]
            for axis, fixed, moving in (("batch sizes", "preset", "global_batch"), ("model sizes", "global_batch",
                                                                                     "preset")):
                for key, g in mine.groupby(fixed):
                    order = sorted(g[moving], key=lambda v: sizes[v][1] if moving == "preset" else v)
                    pts = []
                    for v in order:
                        r = g[g[moving] == v].iloc[0]
                        sp = measured_speedup(ct.fs, r)
                        if sp is not None:
                            pts.append((f"batch {int(v)}" if moving == "global_batch" else str(v), sp))
                    if len(order) < 2 or len(pts) < 2:
                        continue
                    where = f"{key}" if fixed == "preset" else f"batch {int(key)}"
                    out.append(f"{opt} over AdamW at the {ct.name} target ({ct.loss:.3f} nats), {where}, across "
                               f"{axis}: {_trend(pts, axis)}"
                               + ("" if len(pts) == len(order) else f" ({len(order) - len(pts)} without a "
                                                                     f"measured speed-up left out)") + ".")
    return out


def model_params(conv: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """preset -> (parameters, non-embedding parameters) of the model its rows trained (its data's vocabulary)."""
    from bench.results import row_config
    from llmopt.core.shapes import param_count

    out = {}
    for preset, g in conv.groupby("preset"):
        m = row_config(g.iloc[0]).model_config
        out[preset] = (param_count(m), param_count(m, non_embedding=True))
    return out


def size_sentences(fs: pd.DataFrame, sizes: dict) -> list[str]:
    """Across model sizes (smallest first): whether the ranking by mean end-of-budget loss at the largest
    budget (a budget every size shares) holds from the smaller model to the larger."""
    presets = sorted(fs.preset.unique(), key=lambda p: sizes[p][1])
    if len(presets) < 2:
        return []
    orders = {}
    for p in presets:
        g = fs[(fs.preset == p) & fs.end_losses.map(len).gt(0)]
        orders[p] = list(g.assign(m=g.end_losses.map(lambda x: stats.mean_std(x)[0])).sort_values("m").optimizer)
    same = len({tuple(o) for o in orders.values()}) == 1
    return ["Ranking by mean end-of-budget loss at the largest budget (best first): "
            + "; ".join(f"{p} ({sizes[p][1]:,} non-embedding parameters): {' < '.join(orders[p])}" for p in presets)
            + (". The same at every size." if same else ". It changes with the model size.")]


def _method(conv: pd.DataFrame, lad: pd.DataFrame) -> str:
    """The protocol as these rows ran it (references made before the protocol changed say so themselves)."""
    budgets = sorted(lad.max_tokens.unique())
    tune = conv[conv.phase.isin(["grid", "widen", "decay"])]
    decays = list(dict.fromkeys(tune.sort_values("phase", key=lambda p: p.ne("grid")).weight_decay.dropna())
                  ) if "weight_decay" in tune else []  # the grid's first
    reused = bool((lad.config_id == lad.tuning_id).any())
    whole = tune[tune.max_tokens == tune.max_tokens.max()]
    def span(col):
        lo, hi = int(whole[col].min()), int(whole[col].max())
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    warm = (f"warm-up {span('lr_warmup')} of {span('steps')} steps at the largest budget"
            if "lr_warmup" in whole and len(whole) else "")
    return (f"Method: every loss compared is an eval loss measured at the end of a completed "
            f"{conv.lr_schedule.iloc[0]} schedule ({warm}). Each optimizer's learning rate is tuned at the largest "
            f"budget on seed {int(tune.seed.min()) if len(tune) else 0}, AdamW's too, on a grid of the same "
            f"multiples of a centre measured for each optimizer, widened where its best sat at an edge; weight "
            f"decay {' and '.join(f'{d:g}' for d in decays) or 'as configured'}"
            + (" (the grid at the first, its best learning rate at the other)" if len(decays) > 1 else "")
            + f". The best (the finalist) then runs at budgets {', '.join(f'{int(b):,}' for b in budgets)} tokens, "
            f"each with its own full schedule, with seeds {', '.join(str(int(s)) for s in sorted(lad.seed.unique()))}"
            + (" (the tuning run counts as its seed's largest budget: this reference was made before selection and "
               "evaluation used separate seeds)" if reused else " (not the tuning seed: the run that selected a "
               "finalist is not evidence for it)")
            + ". A seed draws the initial weights, the training sequences and the held-out sample, the same for "
            f"every optimizer. Tokens to target are interpolated log-linearly between the two budgets whose "
            f"end-of-budget losses bracket the target, never extrapolated, and never across or from a budget whose "
            f"run diverged: that budget did not reach the target, and a target first reached just after it counts "
            f"at the budget that reached it (an upper bound). Speed-ups are read at two targets common to every "
            f"model and batch size of a task (\"Common targets\"); each batch's own target (AdamW's mean "
            f"end-of-budget loss at {TARGET_FRACTION:g} of the largest budget; without AdamW, the median over the "
            f"optimizers, said in the batch's heading) is kept as a labelled extra. A "
            f"speed-up over AdamW is the geometric mean over seeds of AdamW's tokens over the optimizer's, paired by "
            f"seed, with its 95% confidence interval (Student's t on the log ratios). A winner is declared only "
            f"where a t-test on log tokens to target over seeds, paired by seed (Welch's where two finalists share "
            f"fewer than two seeds), gives p < {SIGNIFICANCE} against every other optimizer after Holm's correction "
            f"for the number of those tests.")


def stable_references(fs: pd.DataFrame) -> dict[tuple, pd.Series]:
    """(preset, batch) -> AdamW's reference row (``reference_row``) where it is its next stable rate rather than
    its finalist, in (preset, batch) order: the settings a report must say so for."""
    out = {}
    for p, b in sorted(set(zip(fs.preset, fs.global_batch))):
        r = reference_row(fs, p, b)
        if r is not None and r.role != "finalist":
            out[p, b] = r
    return out


def _where(refs: dict[tuple, pd.Series]) -> str:
    return ", ".join(f"{p}, batch {int(b)} (lr {r.lr:.3g})" for (p, b), r in refs.items())


def _reference_note(cts: list[CommonTarget]) -> str:
    """Where AdamW's reference is its next stable rate rather than its finalist, which and why; '' where nowhere."""
    where = _where(stable_references(pd.concat([ct.fs for ct in cts])))
    return (" Where AdamW's finalist diverged on a seed, its next stable learning rate is the reference for the "
            "targets and the speed-ups: " + where + "." if where else "")


def _common_lines(cts: list[CommonTarget], sizes: dict, floor: pd.Series, given: bool) -> list[str]:
    if not cts:
        return ["### Common targets", "", "No task has an AdamW reference (its finalist, or that finalist's next "
                "stable learning rate where it diverged on a seed) whose largest budget finished on every seed, so "
                "no target common to its models and batch sizes is set (they are read off AdamW's runs); only the "
                "per-batch targets below.", ""]
    rule = ("The losses the study was given (its [convergence] targets), shared by every model and batch size."
            if given else
            "Per task, two losses shared by every model and batch size: hard, the highest end-of-budget loss "
            "AdamW's finalists had at the largest budget over every model, batch size and seed (so each reaches it "
            "within the ladder), and moderate, halfway from there (on a log scale of the loss above the entropy "
            "floor, where the data has one) to AdamW's lowest loss at the smallest budget." + _reference_note(cts))
    L = ["### Common targets", "", rule + " Speed-up over AdamW: geometric mean over seeds of the paired ratios [95% "
         "confidence interval].", ""]
    for ct in cts:
        gap = f", {ct.loss - floor.iloc[0]:.3f} above the entropy floor" if len(floor) else ""
        L += [f"#### {ct.task}: the {ct.name} target, {ct.loss:.3f} nats{gap}", "", common_table(ct, sizes), ""]
        for preset, batch in _settings(ct.fs, sizes):
            g = ct.fs[(ct.fs.preset == preset) & (ct.fs.global_batch == batch)]
            L.append(f"- {preset}, batch {int(batch)}: {verdict(g)}.")
        L.append("")
    return L


def section(results: pd.DataFrame, evals: pd.DataFrame, plot_dir: str, given: tuple | None = ()) -> list[str]:
    """The section; ``given``: the study's own common target losses (``bench.report.study_targets``; None: its
    plan.json could not be read, so the rule's are used and the section says so)."""
    conv = convergence_rows(results)
    if conv.empty:
        return []
    if "phase" not in conv or conv.phase.fillna("").eq("").all():
        return targets_table(conv)
    best = best_runs(conv)
    lad = ladder(conv, best)
    L = ["## Time to quality", ""]
    if lad.empty:
        return L + ["No finalist finished its ladder of budgets; see \"Not ok\".", ""]
    target = targets(lad)
    fs = finalist_stats(lad, target)
    sizes = model_params(conv)
    cts = at_common_targets(lad, given or ())
    floor = conv.entropy_floor_nats.dropna()
    L += [_method(conv, lad), ""]
    if given is None:
        L += ["plan.json could not be read, so any targets the study was given are not known here: the common "
              "targets below are the report's own rule's.", ""]
    L += _common_lines(cts, sizes, floor, bool(given))
    L += ["### Per-batch targets (an extra: each batch's own target moves with the batch size, so these speed-ups "
          "are not compared across batches)", ""]
    for (preset, batch), g in fs.groupby(["preset", "global_batch"]):
        t = target[(preset, batch)]
        L.append(f"#### {preset}, global batch {int(batch)} sequences: target {t:.4f} nats"
                 + (f" ({t - floor.iloc[0]:.3f} above the entropy floor)" if len(floor) else "")
                 + (f" ({src})" if (src := target_source(lad, preset, batch)) else ""))
        L.append(batch_table(g, conv, evals, best, t))
        L.append(f"Verdict: {verdict(g)}.")
        L.append("")
    done = set(zip(fs.preset, fs.global_batch))
    for (preset, batch), _ in conv.groupby(["preset", "global_batch"]):
        if (preset, batch) not in done:
            L += [f"#### {preset}, global batch {int(batch)} sequences",
                  f"At batch {int(batch)} no run finished its ladder of budgets ({preset}); see \"Not ok\".", ""]
    L.append("### What the runs say")
    L += [f"- {s}" for s in trend_sentences(cts, sizes)]
    for preset in sorted(fs.preset.unique()):
        L += [f"- {preset}: {s}" for s in scaling_sentences(finalists(fs), preset)]
    L += [f"- {s}" for s in size_sentences(finalists(fs), sizes)]
    budgets = sorted(lad.max_tokens.unique())
    for preset in sorted(fs.preset.unique()):
        n, non_embedding = sizes[preset]
        L.append(f"- {preset} ({n:,} parameters, {non_embedding:,} without embeddings): the budgets are "
                 + ", ".join(f"{b / n:.2g}" for b in budgets) + " tokens per parameter.")
    main = main_precision(conv)
    edges = best[best.edge.notna() & (best.precision == main)]
    if not edges.empty:
        where = [f"{r.preset} {r.optimizer} at batch {int(r.global_batch)} ({r.edge}, lr {r.lr:.3g})"
                 for _, r in edges.iterrows()]
        L.append("- Grids whose best learning rate still sits at an edge after their widenings (the grid may still "
                 "be too narrow: read those figures as bounds): " + ", ".join(where) + ".")
    div = conv[conv.status == "diverged"]
    if not div.empty:
        L.append(f"- {len(div)} runs diverged (kept as rows; a diverged ladder budget counts as not reached): "
                 + ", ".join(f"{r.optimizer} b{int(r.global_batch)} lr {r.lr:.3g}" for _, r in div.iterrows()) + ".")
    L.append("")
    L += tuning_budget(best[best.precision == main])
    L += adamw_part_lines(results, best[best.precision == main], lad)
    prec = precision_table(conv, best, main)
    if prec is not None:
        L.append("### Precision (each batch's winner in the other precision, the largest budget, the tuning seed)")
        L.append(prec)
    L += layout_estimates(results, fs)
    from bench.report.plots import quality_plots

    for title, path in quality_plots(conv, lad, target, cts, speedup_points(cts, sizes), plot_dir).items():
        L.append(f"### {title}")
        L.append(f"![{title}](plots/{os.path.basename(path)})")
        L.append("")
    return L


@dataclass(frozen=True)
class TokenSpeedup:
    """An optimizer's speed-up in tokens to target over AdamW's, as a convergence reference measured it."""
    optimizer: str
    batch: int
    speedup: float           # AdamW's tokens to target over the optimizer's: geometric mean of the seeds' ratios
    preset: str
    params: int              # the reference's model
    tokens_per_param: float  # AdamW's tokens to target per parameter (geometric mean): the horizon it is read at
    target: float            # the loss (nats): the task's hard common target
    seeds: int
    low: float = math.nan    # the speed-up's 95% confidence interval
    high: float = math.nan

    def caveat(self) -> str:
        where = (f"a {self.params / 1e6:.2g}M-parameter model ({self.preset}) at batch {self.batch}, to a loss of "
                 f"{self.target:.3f} nats reached at {self.tokens_per_param:.2g} tokens per parameter "
                 f"({self.seeds} seeds" + ("" if math.isnan(self.low) else
                                           f"; 95% interval {self.low:.2f}-{self.high:.2f}x") + ")")
        bound = ", so at a larger model it is an optimistic bound" if self.speedup > 1 else ""
        return (f"{self.optimizer}'s token speed-up over AdamW, {self.speedup:.2f}x, is from {where}; published "
                f"speed-ups shrink with scale and change with the horizon (Wen et al. 2025: matrix optimizers at "
                f"most ~1.4x at 0.1B, less beyond){bound}")


def token_speedup(results: pd.DataFrame, optimizer: str, batch: int | None = None) -> TokenSpeedup:
    """``optimizer``'s token speed-up over AdamW in a convergence sweep's rows, as "Time to quality" reads it at
    the task's hardest common target (paired by seed), on the largest model, at ``batch`` (default: the batch where
    AdamW needed the most tokens, the longest horizon). A ValueError names what the reference lacks."""
    conv = convergence_rows(results)
    if conv.empty or "phase" not in conv or not conv.phase.isin(["ladder"]).any():
        raise ValueError("holds no convergence ladder (run python -m bench.run --matrix convergence)")
    lad = ladder(conv, best_runs(conv))
    cts = at_common_targets(lad)
    if not cts:
        raise ValueError("has no common target (AdamW did not finish every budget of its ladder)")
    hard = min(cts, key=lambda ct: ct.loss)
    sizes = model_params(conv)
    largest = max(hard.fs.preset.unique(), key=lambda p: sizes[p][0])
    at = hard.fs[hard.fs.preset == largest]  # AdamW's reference may be its next stable rate's row
    fs = finalists(at)
    for name in (optimizer, "adamw"):
        if name not in set(fs.optimizer):
            raise ValueError(f"has no finalist of {name} (optimizers: {', '.join(sorted(set(fs.optimizer)))})")
    found = {}
    for b in sorted(set(fs.global_batch)):
        mine = fs[(fs.global_batch == b) & (fs.optimizer == optimizer)]
        sp = None if mine.empty else measured_speedup(at, mine.iloc[0])
        if sp is not None:
            found[b] = (sp, reference_row(at, largest, b))
    batches = sorted(set(fs.global_batch))
    if batch is not None and batch not in batches:
        raise ValueError(f"has no batch {batch} (batches: {', '.join(str(int(b)) for b in batches)})")
    if batch is not None and batch not in found:
        raise ValueError(f"at batch {batch}, {optimizer} or AdamW did not reach the target on every seed: no "
                         f"speed-up to apply (batches where both did: "
                         f"{', '.join(str(int(b)) for b in found) or 'none'})")
    if not found:
        raise ValueError(f"{optimizer} and AdamW reached the target together at no batch: no speed-up to apply")
    if batch is None:
        batch = max(found, key=lambda b: stats.geomean(found[b][1].by_seed))
    sp, adamw = found[batch]
    params = sizes[adamw.preset][0]
    return TokenSpeedup(optimizer, int(batch), sp.ratio, adamw.preset, params, stats.geomean(adamw.by_seed) / params,
                        hard.loss, sp.seeds, sp.low, sp.high)


def tuning_budget(best: pd.DataFrame) -> list[str]:
    """What each optimizer's tuning cost (AlgoPerf states it): its tuning runs (the learning-rate grid, its
    widenings, the other weight decays) over every model and batch size, and their seconds."""
    b = best
    if "tuning_runs" not in b or b.empty:
        return []
    t = b.groupby("optimizer").agg(runs=("tuning_runs", "sum"), seconds=("tuning_seconds", "sum"),
                                   settings=("tuning_runs", "size")).reset_index()
    t["seconds"] = t.seconds.map(lambda v: f"{v:,.0f}")
    return ["### Tuning budget", "",
            "Tuning runs per optimizer (every model and batch size; each at the whole budget on the tuning seed) "
            "and their wall seconds (a sweep run with --jobs N ran N at once, each on its own cores): the same "
            "protocol for every optimizer, and since issue 34 the same number of learning rates for every optimizer "
            "of a model and batch size (a grid bracketed early is widened to the count of the one that needed the "
            "most widenings); references made before differ by those widenings.", "",
            md_table(t.rename(columns={"settings": "models x batch sizes"})), ""]


def adamw_part_lines(results: pd.DataFrame, best: pd.DataFrame, lad: pd.DataFrame) -> list[str]:
    """What running an optimizer's AdamW part (Muon's embeddings, head and gains) at AdamW's tuned rate changed:
    its finalist's whole-budget loss on each evaluation seed (the ladder's) beside the same run with that part at
    the optimizer's own rate (phase adamw-lr), paired by seed."""
    if "phase" not in results or "adamw_lr" not in best:
        return []
    own = results[(results.phase == ADAMW_LR_PHASE) & results.status.isin(["ok", "diverged"])]
    rows = []
    for r in best[pd.to_numeric(best.adamw_lr, errors="coerce").fillna(0) > 0].itertuples():
        mine = own[(own.preset == r.preset) & (own.optimizer == r.optimizer) & (own.global_batch == r.global_batch)
                   & (own.lr.map(as_written) == as_written(r.lr))]
        at = lad[(lad.role == "finalist") & (lad.preset == r.preset) & (lad.optimizer == r.optimizer)
                 & (lad.global_batch == r.global_batch) & (lad.tuning_id == r.config_id)]
        at = at[at.max_tokens == at.max_tokens.max()]
        pairs = [(a, float(o.final_eval_loss) if o.status == "ok" else math.nan)
                 for s, a in zip(at.seed, at.final_eval_loss) for o in mine[mine.seed == s].itertuples()]
        if not pairs:
            continue
        diffs = [o - a for a, o in pairs]
        m, lo, hi = stats.mean_ci(diffs) if all(math.isfinite(d) for d in diffs) else (math.nan,) * 3
        rows.append({"preset": r.preset, "optimizer": r.optimizer, "batch": int(r.global_batch), "lr": f"{r.lr:.3g}",
                     "AdamW part's rate": f"{r.adamw_lr:.3g}",
                     "loss, part at AdamW's rate": _pm([a for a, _ in pairs], ".4f"),
                     "loss, part at lr": _pm([o for _, o in pairs], ".4f"),
                     "difference [95% CI]": "diverged" if not math.isfinite(m) else
                     f"{m:+.4f}" + ("" if math.isnan(lo) else f" [{lo:+.4f}, {hi:+.4f}]"),
                     "seeds": len(pairs)})
    if not rows:
        return []
    return ["### The AdamW part's learning rate", "",
            "An optimizer with an AdamW part (Muon: embeddings, head, LayerNorm gains and biases) is tuned with that "
            "part at AdamW's tuned rate for the same model and batch size. Its finalist's end-of-budget loss at the "
            "largest budget on each evaluation seed, beside the same run with that part at the optimizer's own "
            "rate (as before): the difference is own rate minus AdamW's, paired by seed (positive: AdamW's rate "
            "was better).", "", md_table(pd.DataFrame(rows)), ""]


def precision_table(conv: pd.DataFrame, best: pd.DataFrame, main: str) -> str | None:
    """Each batch's winner in the other precision (phase precision) beside its run in the study's own."""
    other = conv[(conv.phase == "precision") & (conv.status == "ok")] if "phase" in conv else conv.iloc[:0]
    rows = []
    for _, r in other.iterrows():
        same = best[(best.preset == r.preset) & (best.optimizer == r.optimizer)
                    & (best.global_batch == r.global_batch) & (best.precision == main)]
        if same.empty:
            continue
        f, p = same.iloc[0], r.precision
        rows.append({"preset": r.preset, "optimizer": r.optimizer, "batch": int(r.global_batch), "lr": f"{r.lr:.3g}",
                     f"{main} end-of-budget loss": fmt(f.final_eval_loss, ".4f"),
                     f"{p} end-of-budget loss": fmt(r.final_eval_loss, ".4f"),
                     f"{main} training s": fmt(f.train_seconds, ".1f"), f"{p} training s": fmt(r.train_seconds, ".1f")})
    return md_table(pd.DataFrame(rows)) if rows else None


def layout_estimates(results: pd.DataFrame, fs: pd.DataFrame) -> list[str]:
    """Seconds to target per optimizer and layout: its finalist's mean tokens to target over the tokens/s its
    throughput row measured on that layout (the update included), with the wall-clock speed-up over AdamW beside
    the token speed-up; then the check, each finalist trained to its tokens to target under fsdp2 (phase
    to-target): its measured training seconds against that estimate."""
    if "phase" not in results:
        return []
    ok = results[results.status == "ok"]
    thr, done = ok[ok.phase == "layouts"], finalists(fs)[finalists(fs).all_reached]
    if thr.empty or done.empty:
        return []
    thr = thr.assign(layout=thr.apply(layout_name, axis=1))
    rate = {(r.preset, r.global_batch, r.optimizer, r.layout): r.tokens_per_s for r in thr.itertuples()}
    tokens = {(r.preset, r.global_batch, r.optimizer): stats.mean_std(r.tokens)[0] for r in done.itertuples()}
    settings = set(zip(done.preset, done.global_batch))
    fallback = {k: r for k, r in stable_references(fs).items() if k in settings and r.all_reached}
    for (preset, batch), ref in fallback.items():  # AdamW's tokens: its next stable rate's, not its finalist's
        tokens[preset, batch, "adamw"] = stats.mean_std(ref.tokens)[0]
    layouts = sorted(thr.layout.unique(), key=lambda l: (l != "single", l))
    L = ["### Seconds to target per layout", "",
         "Each finalist's mean tokens to target over the tokens/s its own throughput row measured on the layout "
         f"({int(thr.steps_run.median())} steps, the optimizer's update included); in brackets, AdamW's seconds "
         "over the optimizer's on that layout: the token speed-up net of the step's cost. Empty: no throughput "
         "row (references made before every finalist had them) or not reached on every seed."
         + (" AdamW's tokens are its next stable rate's, its finalist having diverged on a seed (its throughput "
            "row is the finalist's shape): " + _where(fallback) + "." if fallback else ""), ""]
    for (preset, batch), g in done.groupby(["preset", "global_batch"]):
        rows = []
        for opt in sorted(g.optimizer, key=lambda o: (o != "adamw", o)):
            row = {"optimizer": opt, "token speed-up": ""}
            base = tokens.get((preset, batch, "adamw"))
            if base is not None:
                row["token speed-up"] = f"{base / tokens[preset, batch, opt]:.2f}x"
            for lay in layouts:
                tps = rate.get((preset, batch, opt, lay))
                if tps is None:
                    row[lay] = ""
                    continue
                sec = tokens[preset, batch, opt] / tps
                ref = rate.get((preset, batch, "adamw", lay))
                wall = f" ({base / ref / sec:.2f}x)" if base is not None and ref is not None else ""
                row[lay] = f"{sec:.1f} s{wall}"
            rows.append(row)
        if any(row[lay] for row in rows for lay in layouts):
            L += [f"{preset}, batch {int(batch)}:", md_table(pd.DataFrame(rows)), ""]
    check = ok[ok.phase == "to-target"]
    if not check.empty:
        out = []
        for _, r in check.iterrows():
            tps = rate.get((r.preset, r.global_batch, r.optimizer, layout_name(r)))
            predicted = r.tokens_seen / tps if tps else float("nan")
            out.append({"optimizer": r.optimizer, "batch": int(r.global_batch), "layout": layout_name(r),
                        "tokens": f"{int(r.tokens_seen):,}", "estimated s": fmt(predicted, ".1f"),
                        "measured s": fmt(r.train_seconds, ".1f"),
                        "error": fmt(predicted / r.train_seconds - 1, "+.0%")})
        t = pd.DataFrame(out)
        err = pd.to_numeric(t.error.str.rstrip("%"), errors="coerce").abs().dropna() / 100
        within = (f"within 15% for {int((err <= 0.15).sum())} of the {len(err)} with an estimate, median error "
                  f"{err.median():.0%}" if len(err) else "none has an fsdp2 throughput row to estimate from")
        L += ["The estimate checked: each finalist trained for its mean tokens to target under fsdp2 (its own full "
              "schedule, seed 0); its training seconds (the steps, evals excluded) against the estimate above "
              f"(tokens over the fsdp2 row's tokens/s): {within}.", md_table(t), ""]
    return L
