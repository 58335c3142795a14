"""``python -m bench.report DIR``: (re)write DIR/report.md and DIR/plots/ from DIR's CSVs alone."""
from __future__ import annotations

import os
import sys

import pandas as pd

from bench.hardware import NATIVE_BF16_FLAGS
from bench.noise import NOISY_CV, NOISY_P90_P50, RETIME, RETIME_SUFFIX, beyond_noise, relative_se, row_se, steadier
from bench.report.markdown import fmt, md_table
from bench.results import DETAILS, RESULT_COLUMNS, TEXT_COLUMNS, read_env
from llmopt.optimizers import in_order, registry
from llmopt.safe_files import one_line, open_file, refuse_links

MIB = 2**20


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    d = pd.DataFrame(rows, columns=columns)
    for col in d.columns:
        if col not in TEXT_COLUMNS:
            d[col] = pd.to_numeric(d[col], errors="coerce")
    return d


def load_all(out_dir: str, unreadable: dict | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """results.csv and the detail files (steps, evals) as data frames, read-only. Lines that cannot be read
    are left out; ``unreadable`` (if given) receives their count per file."""
    from bench.results import ResultFiles

    files = ResultFiles(out_dir)
    results, details = files.load()
    if unreadable is not None:
        unreadable.update({os.path.basename(k): v for k, v in files.unreadable.items() if v})
    return _frame(results, RESULT_COLUMNS), {k: _frame(v, DETAILS[k][0]) for k, v in details.items()}


def load(out_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    r, d = load_all(out_dir)
    return r, d["steps"]


def fastest_under(ok: pd.DataFrame, budget_bytes: float) -> pd.Series | None:
    fit = ok[ok.peak_memory_bytes <= budget_bytes]
    return None if fit.empty else fit.loc[fit.tokens_per_s.idxmax()]


def tied_with(ok: pd.DataFrame, best: pd.Series, budget_bytes: float, most: int = 3) -> list[str]:
    """The other configs within the budget whose tokens/s is within noise of the fastest's: "fastest" is then a
    tie, said as one (the first ``most`` by tokens/s, and how many more)."""
    fit = ok[(ok.peak_memory_bytes <= budget_bytes) & (ok.config_id != best.config_id)]
    fit = fit.sort_values("tokens_per_s", ascending=False)
    tied = [r.config_id for _, r in fit.iterrows()
            if not beyond_noise(best.tokens_per_s / r.tokens_per_s, row_se(best), row_se(r))]
    return [f"`{c}`" for c in tied[:most]] + ([f"{len(tied) - most} more"] if len(tied) > most else [])


def amp_speed(ok: pd.DataFrame, cpu_flags: str = "") -> list[str]:
    """One sentence per AMP precision: its median tokens/s over fp32's, over the pairs of ok configs that
    differ only in precision, and plainly whether AMP is slower than fp32 on this machine."""
    from dataclasses import fields

    from llmopt.core.config import TrainConfig

    keys = [f.name for f in fields(TrainConfig) if f.name not in ("precision", "lr") and f.name in ok.columns]
    key = ok[keys].apply(lambda col: col.map(str)).agg("|".join, axis=1)  # NaN-safe: "nan" == "nan"
    se = ok.apply(row_se, axis=1)
    fastest = ok.tokens_per_s.groupby([key, ok.precision]).idxmax()  # each config's fastest row per precision
    lines = []
    for prec in sorted(set(ok.precision) - {"fp32"}):
        pairs = [(fastest[k, prec], fastest[k, "fp32"]) for k in key.unique()
                 if (k, prec) in fastest.index and (k, "fp32") in fastest.index]
        if not pairs:
            continue
        ratio = pd.Series([ok.tokens_per_s[a] / ok.tokens_per_s[b] for a, b in pairs])
        beyond = [beyond_noise(ok.tokens_per_s[a] / ok.tokens_per_s[b], se[a], se[b]) for a, b in pairs]
        r = ratio.median()
        # a verdict only where most pairs differ beyond their own rows' noise, in the median's direction
        clear = sum(b and (x < 1) == (r < 1) for b, x in zip(beyond, ratio)) > len(pairs) / 2
        verdict = ("within noise of fp32 on this machine" if not clear else
                   "slower than fp32 on this machine" if r < 1 else "faster than fp32 on this machine")
        lines.append(f"{prec} is {verdict}: median {r:.2f}x fp32's tokens/s over {len(ratio)} configs that "
                     f"differ only in precision (range {ratio.min():.2f}x to {ratio.max():.2f}x; "
                     f"{sum(beyond)} of {len(pairs)} beyond their rows' noise)"
                     + (f"; CPU bf16 features: {cpu_flags}" if cpu_flags else "") + ".")
    return lines


def peers_section(ok: pd.DataFrame) -> list[str]:
    """Each engine/model pair: its eager baseline (fp32, no compile) and its best config; the ratio of
    llmopt's best to the best of any row training HF's model."""
    L = ["## Peers: llmopt, transformers' model, Accelerate", ""]
    rows = []
    for (engine, impl), g in ok.groupby(["engine", "model_impl"]):
        eager = g[(g.precision == "fp32") & (g.compile.astype(str) != "True")]
        best = g.loc[g.tokens_per_s.idxmax()]
        rows.append({"engine": engine, "model_impl": impl,
                     "eager tokens/s": "" if eager.empty else f"{eager.tokens_per_s.max():,.0f}",
                     "best tokens/s": f"{best.tokens_per_s:,.0f}", "best config": best.config_id,
                     "best parity verdict": best.parity_verdict})
    L.append(md_table(pd.DataFrame(rows)))
    ours, hf = ok[ok.model_impl == "llmopt"], ok[ok.model_impl == "hf"]
    if not ours.empty and not hf.empty:
        a, b = ours.loc[ours.tokens_per_s.idxmax()], hf.loc[hf.tokens_per_s.idxmax()]
        r = a.tokens_per_s / b.tokens_per_s
        noise = "" if beyond_noise(r, row_se(a), row_se(b)) else ", within noise of each other"
        L.append(f"llmopt's best / HF's best (any engine): **{r:.2f}x** "
                 f"(target 1.3x: {'met' if r >= 1.3 else 'not met'}{noise}).")
        L.append("")
    return L


def optimizer_section(ok: pd.DataFrame) -> list[str]:
    """What each optimizer's update costs per layout: its own time (optimizer_ms_p50, the update alone) and its
    share of the step, the median over the sweep's configs of that optimizer and layout; then each optimizer's
    update time over AdamW's, per layout, where both ran."""
    from bench.layouts import layout_name

    d = ok[ok.optimizer_ms_p50.notna()].copy()
    if d.empty or d.optimizer.nunique() < 2:
        return []
    d["layout"] = d.apply(layout_name, axis=1)
    d["share"] = d.optimizer_ms_p50 / d.step_time_ms_p50
    d["se"] = [relative_se(cv, float(r.steps_run) - float(r.timing_warmup or 0))
               for cv, r in zip(d.optimizer_ms_cv if "optimizer_ms_cv" in d else [None] * len(d), d.itertuples())]
    g = d.groupby(["optimizer", "layout"]).agg(ms=("optimizer_ms_p50", "median"), share=("share", "median"),
                                                n=("config_id", "size"), se=("se", "max")).reset_index()
    layouts = sorted(d.layout.unique(), key=lambda l: (l != "single", l))
    order = in_order(g.optimizer)
    cell = {(r.optimizer, r.layout): r for r in g.itertuples()}
    rows = [{"optimizer": o, **{l: (f"{cell[o, l].ms:.2f} ms ({cell[o, l].share:.0%})" if (o, l) in cell else "")
                                for l in layouts}} for o in order]
    L = ["## The optimizer's step", "",
         "The update alone (`optimizer_ms_p50`: CUDA events on GPU, the clock on CPU), and its share of the p50 "
         "step, median over this sweep's configs of each optimizer and layout:", md_table(pd.DataFrame(rows))]
    if "adamw" in order:
        def over(o, l):
            if (o, l) not in cell or ("adamw", l) not in cell:
                return ""
            r = cell[o, l].ms / cell["adamw", l].ms
            return f"{r:.2f}x" + ("" if beyond_noise(r, cell[o, l].se, cell["adamw", l].se) else " (within noise)")

        ratio = [{"optimizer": o, **{l: over(o, l) for l in layouts}} for o in order if o != "adamw"]
        L += ["Update time over AdamW's, per layout (within noise: not beyond 3 standard errors of the two "
              "updates' step-to-step spread):", md_table(pd.DataFrame(ratio))]
    return L + update_prediction(d, layouts, order) + [""]


def update_prediction(d: pd.DataFrame, layouts: list[str], order: list[str]) -> list[str]:
    """The cost model's update time beside the measured one, per optimizer and layout, and its median absolute
    error over the rows (``predicted_optimizer_ms``: ``bench.advisor.update``)."""
    err = d.optimizer_ms_prediction_error  # empty in references made before it existed
    if err.isna().all():
        return []
    g = d.groupby(["optimizer", "layout"]).agg(pred=("predicted_optimizer_ms", "median"),
                                                err=("optimizer_ms_prediction_error", "median"))
    cell = {k: r for k, r in zip(g.index, g.itertuples())}
    rows = [{"optimizer": o, **{l: (f"{cell[o, l].pred:.2f} ms ({cell[o, l].err:+.0%})"
                                    if (o, l) in cell and pd.notna(cell[o, l].pred) else "") for l in layouts}}
            for o in order]
    return ["Predicted by the cost model (its counted operations and bytes at this CPU's fitted costs, "
            "`bench.advisor.update`; error against the measured update), median over the configs:",
            md_table(pd.DataFrame(rows)),
            f"Median absolute error of the predicted update over {int(err.notna().sum())} rows: "
            f"**{err.abs().median():.0%}** (the goal: at most 25%)."]


def summary_sections(ok: pd.DataFrame, env: dict, memory_budget_mib: float | None) -> list[str]:
    """The summary table, the parity verdicts and the fastest config per memory budget, of the ok rows."""
    from bench.report.plots import pareto_front

    L = []
    L.append("## Summary")
    t = pd.DataFrame({
        "config_id": ok.config_id,
        "tokens/s": ok.tokens_per_s.map(lambda v: fmt(v, ",.0f")),
        "p50 ms": ok.step_time_ms_p50.map(lambda v: fmt(v, ".1f")),
        "p90 ms": ok.step_time_ms_p90.map(lambda v: fmt(v, ".1f")),
        "cv": ok.step_time_cv.map(lambda v: fmt(v, ".2f")),
        "p90/p50": ok.step_time_p90_p50.map(lambda v: fmt(v, ".2f")),
        "timing": [", ".join((["noisy"] if str(n) == "True" else []) + ([t] if t != "first" else []))
                   for n, t in zip(ok.noisy, ok.timing)],
        "peak MiB": (ok.peak_memory_bytes / MIB).map(lambda v: fmt(v, ".1f")),
        "pred MiB": (ok.predicted_memory_bytes / MIB).map(lambda v: fmt(v, ".1f")),
        "pred err": ok.memory_prediction_error.map(lambda v: fmt(v, "+.1%")),
        "update ms": ok.optimizer_ms_p50.map(lambda v: fmt(v, ".2f")),
        "pred update ms": ok.predicted_optimizer_ms.map(lambda v: fmt(v, ".2f")),
        "update err": ok.optimizer_ms_prediction_error.map(lambda v: fmt(v, "+.0%")),
        "MFU": ok.mfu.map(lambda v: fmt(v, ".2%")),
        "final loss": ok.final_loss.map(lambda v: fmt(v, ".4f")),
        "parity |Δ|max": ok.loss_parity_max_abs.map(lambda v: fmt(v, ".1e")),
        "verdict": ok.parity_verdict,
        "J/token": ok.energy_j_per_token.map(lambda v: fmt(v, ".3g")),
    }).sort_values("config_id")
    L.append(md_table(t))
    src = ok.peak_flops_source.dropna().unique()
    L.append(f"Peak FLOP/s used for MFU: {', '.join(src) if len(src) else 'none'} "
             "(on CPU, measured once per sweep per dtype with all cores: the ranks of a config share them).")
    flags = " ".join(env.get("cpu_flags") or []) or ("none of " + ", ".join(NATIVE_BF16_FLAGS)
                                                       if "cpu_flags" in env else "")
    L.extend(amp_speed(ok, flags))
    kinds = ok.peak_memory_kind.dropna().unique()
    L.append(f"Peak memory kind: {', '.join(kinds)} (`tracked_tensors`: torch's MemTracker over one extra "
             "untimed step, plus DDP's gradient buckets; `cuda_allocator`: the caching allocator's peak).")
    if ok.energy_j_per_token.isna().all():
        L.append("Energy per token: not available on this machine (no NVML energy counter, no readable RAPL).")
    L.append("")
    L.append("## Loss parity verdicts")
    v = ok.parity_verdict.value_counts().to_dict()
    L.append("Exact: |Δ| ≤ 1e-4 nats at every step; within AMP tolerance: bf16/fp16 with |Δ| ≤ 0.05 nats; "
             "drifted: anything else. " + ", ".join(f"{k}: {n}" for k, n in sorted(v.items()) if k))
    drifted = ok[ok.parity_verdict == "drifted"]
    if not drifted.empty:
        L.append("")
        L.append("Drifted configs: " + ", ".join(f"`{c}` ({d:.2g})" for c, d in
                                                  zip(drifted.config_id, drifted.loss_parity_max_abs)))
        noisy = [o for o in in_order(drifted.optimizer) if o in registry() and not registry()[o].reproducible]
        if noisy:
            L.append("")
            L.append(f"{', '.join(noisy)}: a loss curve that does not keep to rounding even in one process when only "
                     "the gradients' summation order changes (README, \"Parity\"), so its drift here is its own noise "
                     "and says nothing about the layout; that its update under each layout is the whole tensor's is "
                     "tested on the same gradients (tests/test_parity.py).")
    L.append("")
    L.append("## Fastest config that fits a memory budget")
    budgets = [memory_budget_mib * MIB] if memory_budget_mib else \
        sorted(set(ok.peak_memory_bytes.quantile([0.25, 0.5, 1.0]).round()))
    rows = []
    for b in budgets:
        best = fastest_under(ok, b)
        rows.append({"budget MiB": f"{b / MIB:.1f}", "fastest config": "" if best is None else best.config_id,
                     "tokens/s": "" if best is None else f"{best.tokens_per_s:,.0f}",
                     "peak MiB": "" if best is None else f"{best.peak_memory_bytes / MIB:.1f}",
                     "within noise of it": "" if best is None else ", ".join(tied_with(ok, best, b))})
    L.append(md_table(pd.DataFrame(rows)))
    front = pareto_front(ok)
    L.append("Pareto front (no other config is both faster and smaller): "
             + ", ".join(f"`{c}`" for c in front.sort_values("peak_memory_bytes").config_id))
    L.append("")
    return L


def study_targets(out_dir: str) -> tuple | None:
    """The common target losses a convergence study was given (its plan.json), () where none were, None where
    plan.json cannot be read (the report then says so and uses its own rule)."""
    from bench.plan import PlanError, SweepPlan

    path = os.path.join(out_dir, "plan.json")
    if not os.path.exists(path):
        return ()
    try:
        study = SweepPlan.load(path).study
    except PlanError:
        return None
    return study.targets if study is not None else ()


def write_report(out_dir: str, memory_budget_mib: float | None = None) -> str:
    from bench.report.plots import all_plots
    from bench.report.quality import section as quality_section

    unreadable: dict[str, int] = {}
    results, details = load_all(out_dir, unreadable)
    first = results[results.phase != RETIME] if "phase" in results else results
    noisy = int((first.noisy.astype(str) == "True").sum())  # as first timed, before any re-time
    results, retimed, retime_used = steadier(results)  # a noisy row's steadier timing; re-time rows folded in
    steps = details["steps"]
    # what the report quotes from env.json is shown on one line each: the file may come from someone else
    env = {k: (one_line(v) if isinstance(v, str) else [one_line(x) for x in v] if isinstance(v, list) else v)
           for k, v in read_env(out_dir).items()}
    plots = all_plots(results, steps, os.path.join(out_dir, "plots"))
    ok = results[results.status == "ok"].copy()
    counts = results.status.value_counts().to_dict()
    wall = results.wall_s.sum()
    L = [f"# llmopt sweep report: {os.path.basename(os.path.normpath(out_dir))}", ""]
    L.append(f"- Command: `{env.get('command', '?')}`  (started {env.get('started_utc', '?')})")
    L.append(f"- Machine: {env.get('cpu_model', '?')}, {env.get('cpu_count', '?')} CPUs"
             + (f", GPUs: {', '.join(env['gpus'])}" if env.get("gpus") else "")
             + f"; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}; "
             f"git {str(env.get('git_commit'))[:10]}")
    data = results.data_description.dropna().unique()
    if len(data):
        floor = results.entropy_floor_nats.dropna()
        L.append(f"- Data: {'; '.join(map(str, data))}; entropy floor: "
                 + (f"{floor.iloc[0]:.4f} nats/token (generated data)" if len(floor) else
                    "unknown (real text has no known floor)"))
    L.append(f"- Configs: {len(results)} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
    L.append(f"- Sweep wall time: {env['sweep_seconds'] / 60:.1f} min (configs themselves: {wall / 60:.1f} min)"
             if "sweep_seconds" in env else f"- Wall time of the configs: {wall / 60:.1f} min")
    if unreadable:
        note = ", ".join(f"{n} in {f}" for f, n in unreadable.items())
        L.append(f"- **Unreadable lines left out**: {note} (a field count other than the header's, or numbers "
                 f"no run records: inf, NaN in an ok row, negative, beyond float32; "
                 f"`python -m bench.run --resume --repair --out DIR` moves them to `<file>.rejected`)")
        print(f"report: unreadable lines left out ({note}); --resume --repair moves them aside", file=sys.stderr)
    if noisy or retimed:
        L.append(f"- **Noisy timings**: {noisy} row(s) spread beyond step-time cv {NOISY_CV:g} or p90/p50 "
                 f"{NOISY_P90_P50:g} (column `timing`); {retimed} re-timed at the end of the sweep, the steadier "
                 f"timing used in {retime_used} (both timings are in results.csv and steps.csv, the second as "
                 f"`<config_id>{RETIME_SUFFIX}`). Comparisons below are stated only beyond the rows' noise.")
    if env.get("executor") == "slurm":
        most = env.get("slurm_most_per_node", 0)
        if env.get("slurm_shared_nodes"):
            L.append(f"- **Figures taken on shared nodes**: one SLURM job per config with `--slurm-share`; up to "
                     f"{most} configs were seen running at once on one node (squeue, polled each second). Jobs "
                     f"on one node share its cores and memory bandwidth: compare these figures with each "
                     f"other, not with a one-at-a-time sweep.")
        else:
            L.append(f"- Executor: slurm, one job per config, each with its node(s) to itself (`--exclusive`; "
                     f"at most {most} per node seen by squeue)")
    elif env.get("executor", "local") != "local" or env.get("jobs", 1) > 1:
        L.append(f"- Executor: {env.get('executor', 'local')}, up to {env.get('jobs', 1)} configs at once")
    requeues = pd.to_numeric(results["requeues"], errors="coerce").fillna(0) if "requeues" in results else None
    if requeues is not None and (requeues > 0).any():
        L.append(f"- **Requeued**: {int((requeues > 0).sum())} config(s) were stopped by SLURM (preempted, or at "
                 f"their time limit) and resumed from their checkpoints ({int(requeues.sum())} requeue(s) in all, "
                 f"column `requeues`): their losses are an uninterrupted run's; their timings span several jobs "
                 f"(the timing warm-up left out after each start).")
    if env.get("warm_up"):
        L.append(f"- Warm-up: before anything was timed, {env['warm_up']} ran once, untimed (`--warm-up`)")
    if env.get("concurrent_cpu") and env.get("alone_phases"):
        L.append(f"- **Runs taken concurrently**: up to {env['jobs']} CPU configs ran side by side, each pinned to "
                 f"its own share of the cores; their figure is their loss, which that does not change (their "
                 f"tokens/s are their share's). The timed phases ({', '.join(env['alone_phases'])}) waited for the "
                 f"machine and ran one at a time on every core: their timings are a one-at-a-time sweep's.")
    elif env.get("concurrent_cpu"):
        L.append(f"- **Figures taken concurrently**: up to {env['jobs']} CPU configs ran side by side, each pinned to "
                 f"its own share of the cores (MFU against that share of the peak). They shared memory bandwidth "
                 f"and caches: compare these figures with each other, not with a one-at-a-time sweep.")
    L.append("")
    L.append("How to read this: see `results/README.md`. Throughput is global tokens/s over the timed steps "
             "(warm-up excluded); memory is the rank with the largest peak; MFU is model FLOPs "
             "(6N + 12·L·H·Q·T per token, PaLM's convention) over `peak_flops`; parity compares each loss "
             "curve with its single-process fp32 baseline.")
    L.append("")
    if not ok.empty:
        L += summary_sections(ok, env, memory_budget_mib)
    if not ok.empty:
        L += optimizer_section(ok)
    if not ok.empty and ok.groupby(["engine", "model_impl"]).ngroups > 1:
        L += peers_section(ok)
    L += quality_section(results, details["evals"], os.path.join(out_dir, "plots"), study_targets(out_dir))
    bad = results[results.status != "ok"]
    if not bad.empty:
        L.append("## Not ok")
        L.append(md_table(bad[["config_id", "status", "error"]].sort_values("config_id")))
    if plots:
        L.append("## Plots")
        for title, path in plots.items():
            L.append(f"### {title}")
            L.append(f"![{title}](plots/{os.path.basename(path)})")
            L.append("")
    path = os.path.join(out_dir, "report.md")
    with open_file(path) as f:
        f.write("\n".join(L) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m bench.report", __doc__)
    p.add_argument("dir", help="a sweep's results directory")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MiB",
                   help="report the fastest config within this much memory (default: three budgets)")
    args = p.parse_args(argv)

    def body() -> int:
        if not os.path.exists(os.path.join(args.dir, "results.csv")):
            raise ValueError(f"{args.dir!r} holds no results.csv; pass a directory written by python -m bench.run")
        if args.memory_budget is not None and not 0 < args.memory_budget < float("inf"):
            raise ValueError(f"--memory-budget {args.memory_budget}: must be a positive number of MiB")
        refuse_links(args.dir, "bench.report")  # before anything is written into it
        print(write_report(args.dir, args.memory_budget))
        return 0

    return cli.main(body)
