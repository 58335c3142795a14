"""The report's seaborn plots, each written as a PNG under DIR/plots/ (Agg backend: no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.layouts import layout_name  # noqa: E402
from llmopt.safe_files import makedirs, open_file  # noqa: E402

MIB = 2**20
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    with open_file(path, "wb") as f:  # never through a link planted in a results directory
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def _height(n: int) -> float:
    return max(3.0, 0.28 * n + 1.2)


MAX_BARS = 40  # a figure with more named bars is neither readable nor quick to draw (5,000 took 97 s, 21 MB)
TOP_BARS = 30


def throughput(ok: pd.DataFrame, path: str) -> str:
    """Tokens/s of every config as a bar; in a larger sweep, the TOP_BARS fastest beside the spread of every
    config per layout and precision (a box per layout)."""
    d = ok.sort_values("tokens_per_s", ascending=False)
    if len(d) <= MAX_BARS:
        fig, ax = plt.subplots(figsize=(9, _height(len(d))))
        sns.barplot(data=d, y="config_id", x="tokens_per_s", hue="precision", dodge=False, ax=ax)
        ax.set(xlabel="tokens/s (global)", ylabel="config_id", title="Throughput by config")
        return _save(fig, path)
    d = d.assign(layout=d.apply(layout_name, axis=1))
    layouts = sorted(d.layout.unique())
    fig, (top, spread) = plt.subplots(1, 2, figsize=(16, _height(max(TOP_BARS, len(layouts)))))
    sns.barplot(data=d.head(TOP_BARS), y="config_id", x="tokens_per_s", hue="precision", dodge=False, ax=top)
    top.set(xlabel="tokens/s (global)", ylabel="config_id", title=f"The {TOP_BARS} fastest of {len(d)} configs")
    top.tick_params(axis="y", labelsize=7)
    sns.boxplot(data=d, y="layout", x="tokens_per_s", hue="precision", order=layouts, ax=spread, fliersize=2)
    spread.set(xlabel="tokens/s (global)", ylabel="layout", title="Every config, by layout and precision")
    return _save(fig, path)


MAX_MEMORY_BARS = MAX_BARS


def memory(ok: pd.DataFrame, path: str) -> str:
    """Measured and predicted memory side by side, stacked by category: every config, or in a large sweep
    one per layout x precision (the one with the median peak), so the figure stays readable."""
    title = "Memory by category: measured vs predicted"
    if len(ok) > MAX_MEMORY_BARS:
        groups = ok.assign(layout=ok.apply(layout_name, axis=1)).groupby(["layout", "precision"])
        ok = groups.apply(lambda g: g.sort_values("peak_memory_bytes").iloc[len(g) // 2],
                          include_groups=False).reset_index(drop=True)
        title += " (median config per layout x precision)"
    rows = []
    for _, r in ok.iterrows():
        for kind, prefix in (("measured", "memory_"), ("predicted", "predicted_")):
            for cat in CATEGORIES:
                v = r.get(f"{prefix}{cat}_bytes")
                rows.append({"config_id": r["config_id"], "kind": kind, "category": cat,
                             "MiB": (float(v) if pd.notna(v) else 0.0) / MIB})
    d = pd.DataFrame(rows)
    ids = list(ok.sort_values("peak_memory_bytes")["config_id"])
    fig, ax = plt.subplots(figsize=(10, _height(2 * len(ids))))
    colors = sns.color_palette("deep", len(CATEGORIES))
    labels, y = [], 0
    for cid in ids:
        for kind in ("measured", "predicted"):
            left = 0.0
            part = d[(d.config_id == cid) & (d.kind == kind)]
            for color, cat in zip(colors, CATEGORIES):
                w = float(part[part.category == cat]["MiB"].sum())
                ax.barh(y, w, left=left, color=color, alpha=1.0 if kind == "measured" else 0.55,
                        hatch=None if kind == "measured" else "//", label=cat if y == 0 else None)
                left += w
            labels.append(f"{cid} ({kind})")
            y += 1
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="MiB (rank with the largest peak)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


MAX_CURVES = 16


def paired_by_precision(ok: pd.DataFrame) -> pd.DataFrame:
    """The configs that ran in every precision of the sweep, each beside its twin (the same config in every
    other field): a median per precision over these compares precisions on the same configs, not on whichever
    ran in each (a convergence sweep runs only its winners in bf16, beside every fp32 config)."""
    from llmopt.core.config import TrainConfig

    fields = [c for c in TrainConfig.field_names() if c in ok and c != "precision"]
    key = ok[fields].apply(lambda row: "|".join(map(str, row)), axis=1)
    counts = ok.precision.groupby(key).nunique()
    return ok[key.map(counts).eq(ok.precision.nunique()).to_numpy()]


def loss_curves(steps: pd.DataFrame, ok: pd.DataFrame, path: str) -> str:
    """Each config's loss curve; beyond MAX_CURVES configs, the median curve per precision with the band
    between the quartiles over the configs run in every precision (``paired_by_precision``; a line per config
    is unreadable there, and slow: 5,000 took 25 s)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    if len(ok) <= MAX_CURVES:
        d = steps[steps.config_id.isin(ok.config_id)].merge(ok[["config_id", "precision"]], on="config_id")
        sns.lineplot(data=d, x="step", y="loss", hue="config_id", style="precision", ax=ax, linewidth=1)
        ax.set_title("Loss curves (dashed: the data's entropy floor)")
    else:
        twins = paired_by_precision(ok)
        d = steps[steps.config_id.isin(twins.config_id)].merge(twins[["config_id", "precision"]], on="config_id")
        sns.lineplot(data=d, x="step", y="loss", hue="precision", estimator="median", errorbar=("pi", 50), ax=ax,
                     linewidth=1.5)
        ax.set_title(f"Median loss per precision over the {len(twins)} of {len(ok)} configs run in every "
                     f"precision\n(each beside its twin; band: quartiles)", fontsize=10)
    floor = ok["entropy_floor_nats"].dropna()
    if len(floor):
        ax.axhline(float(floor.iloc[0]), color="black", linestyle="--", linewidth=1,
                   label=f"entropy floor {float(floor.iloc[0]):.3f} nats")
        ax.legend(fontsize=6, ncol=2)
    ax.set(ylabel="loss (nats/token)")
    return _save(fig, path)


def pareto_front(ok: pd.DataFrame, tolerance: float = 0.005) -> pd.DataFrame:
    """Configs that no other config beats on throughput at the same or lower memory (memory within
    ``tolerance`` counts as the same: a few hundred bytes are not a trade-off)."""
    mem, tps = ok["peak_memory_bytes"].to_numpy(), ok["tokens_per_s"].to_numpy()
    keep = [i for i in range(len(ok)) if not ((mem <= mem[i] * (1 + tolerance)) & (tps > tps[i])).any()]
    return ok.iloc[keep]


def throughput_vs_memory(ok: pd.DataFrame, path: str) -> str:
    d = ok.assign(MiB=ok["peak_memory_bytes"] / MIB)
    front = pareto_front(ok).assign(MiB=lambda f: f["peak_memory_bytes"] / MIB).sort_values("MiB")
    fig, ax = plt.subplots(figsize=(8, 5))
    sns.scatterplot(data=d, x="MiB", y="tokens_per_s", hue="precision", style="world_size", ax=ax, s=50)
    ax.plot(front["MiB"], front["tokens_per_s"], color="black", linewidth=1, marker="o", mfc="none",
            markersize=10, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(r["config_id"].rsplit("-", 1)[0], (r["MiB"], r["tokens_per_s"]), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")
    ax.legend(fontsize=7)
    ax.set(xlabel="peak memory, MiB", ylabel="tokens/s", title="Throughput vs memory (Pareto front marked)")
    return _save(fig, path)


def speedup_heatmap(ok: pd.DataFrame, path: str) -> str | None:
    """Tokens/s over the baseline's (single process, fp32, same optimizer and batch), layout x precision,
    averaged (geometric mean) over the optimizers and accumulation settings in the sweep."""
    import numpy as np

    base = ok.set_index("config_id")["tokens_per_s"]
    d = ok[ok.baseline_id.isin(base.index)].copy()
    if d.empty:
        return None
    d["speedup"] = d["tokens_per_s"].values / base.loc[d["baseline_id"]].values
    d["layout"] = d.apply(layout_name, axis=1)
    table = d.groupby(["layout", "precision"])["speedup"].apply(lambda s: float(np.exp(np.log(s).mean()))).unstack()
    fig, ax = plt.subplots(figsize=(6, _height(len(table))))
    sns.heatmap(table, annot=True, fmt=".2f", cmap="RdYlGn", center=1.0, ax=ax, cbar_kws={"label": "x baseline"})
    ax.set(title="Speed-up over the single-process fp32 baseline", xlabel="precision", ylabel="layout")
    return _save(fig, path)


def _floor(ax, conv: pd.DataFrame) -> None:
    floor = conv["entropy_floor_nats"].dropna()
    if len(floor):
        ax.axhline(float(floor.iloc[0]), color="black", linestyle="--", linewidth=1)


def _panels(keys: list[tuple]) -> tuple:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.9), sharey=False, squeeze=False)
    return fig, axes[0]


def _colours(lad: pd.DataFrame) -> dict[str, tuple]:
    """One colour per optimizer, the same in every panel and plot of the section."""
    names = sorted(lad.optimizer.unique())
    return dict(zip(names, sns.color_palette(n_colors=len(names))))


def budget_curves(lad: pd.DataFrame, target: dict, common: list, path: str) -> str:
    """End-of-budget eval loss against the budget in tokens, per optimizer: the mean over the seeds that
    finished, with the band between the lowest and highest; a diverged budget as an x on the panel's top edge
    in its optimizer's colour, labelled with how many seeds diverged there; the batch's own target dashed and
    the task's common targets dotted. One panel per model and batch size."""
    keys = sorted(target)
    colour = _colours(lad)
    fig, axes = _panels(keys)
    for ax, key in zip(axes, keys):
        g = lad[(lad.preset == key[0]) & (lad.global_batch == key[1])]
        for opt, o in g.groupby("optimizer"):
            by = o[~o.diverged].groupby("max_tokens").final_eval_loss
            ax.plot(by.mean().index, by.mean().values, marker="o", markersize=3, label=opt, color=colour[opt])
            ax.fill_between(by.min().index, by.min().values, by.max().values, alpha=0.2, color=colour[opt])
        ax.axhline(target[key], color="black", linestyle="--", linewidth=1, label="this batch's target")
        for ct in common:
            if ct.task == g.task.iloc[0]:
                ax.axhline(ct.loss, color="grey", linestyle=":", linewidth=1.2)
                ax.annotate(f"{ct.name} (common)", (0.01, ct.loss), xycoords=("axes fraction", "data"), fontsize=6,
                            va="bottom", color="grey")
        top = ax.get_ylim()[1]
        for (opt, budget), d in g[g.diverged].groupby(["optimizer", "max_tokens"]):
            ax.scatter([budget], [top], marker="x", color=colour[opt], s=40, clip_on=False, zorder=5)
            ax.annotate(f"{len(d)} seed{'s' if len(d) > 1 else ''}", (budget, top), fontsize=6, color=colour[opt],
                        xytext=(3, -8), textcoords="offset points")
        ax.set(xscale="log", title=f"{key[0]}, batch {int(key[1])}", xlabel="budget (tokens)",
               ylabel="end-of-budget eval loss")
        budgets = sorted(g.max_tokens.unique())  # the ladder's own budgets as ticks: log minor labels collide
        ax.set_xticks(budgets, [f"{b / 1024:g}k" for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=6)
    fig.suptitle("End-of-budget loss vs budget (band: the seeds' range; x: a diverged budget)")
    return _save(fig, path)


def speedup_at_targets(d: pd.DataFrame, titles: list[str], path: str) -> str | None:
    """Each optimizer's speed-up over AdamW at each common target (one panel per title; ``d``'s rows: panel,
    optimizer, preset, batch, params, speedup, low, high, from ``bench.report.quality.speedup_points``) against
    the batch size (or the model's non-embedding parameters where the task has one batch size), with its paired
    95% confidence interval; points are joined only where there are three or more (two are not a trend)."""
    if d.empty:
        return None
    colour = _colours(d)
    fig, axes = plt.subplots(1, len(titles), figsize=(5.2 * len(titles), 4.2), squeeze=False)
    for i, (ax, title) in enumerate(zip(axes[0], titles)):
        p = d[d.panel == i]
        x = "batch" if p.batch.nunique() > 1 else "params"
        for (opt, preset), o in p.groupby(["optimizer", "preset"]):
            o = o.sort_values(x)
            ax.errorbar(o[x], o.speedup, yerr=[o.speedup - o.low, o.high - o.speedup], color=colour[opt],
                        marker="o", capsize=3, linestyle="-" if len(o) >= 3 else "none",
                        label=opt if p.preset.nunique() == 1 else f"{opt} ({preset})")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", yscale="log", ylabel="speed-up over AdamW (tokens to target)",
               xlabel="global batch (sequences)" if x == "batch" else "non-embedding parameters",
               title=title)
        if x == "batch":
            ax.set_xticks(sorted(p.batch.unique()), [str(b) for b in sorted(p.batch.unique())])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if p.empty:
            ax.text(0.5, 0.5, "no speed-up measured here\n(by the smallest budget, or not reached)",
                    transform=ax.transAxes, ha="center", fontsize=8)
        else:
            ax.legend(fontsize=6)
    fig.suptitle("Speed-up over AdamW at the common targets\n(geometric mean of paired ratios over seeds, 95% CI)",
                 fontsize=10)
    return _save(fig, path)


def tuning_curves(conv: pd.DataFrame, lad: pd.DataFrame, target: dict, path: str) -> str:
    """End-of-budget eval loss at the largest budget against the learning rate, per optimizer (seed 0), on a
    log loss axis (batches whose losses differ by 10x share a figure), with each finalist's mean and standard
    deviation over seeds as an error bar; a run that diverged or failed as an x in its optimizer's colour on
    the panel's top edge. One panel per model and batch size."""
    keys = sorted(target)
    colour = _colours(conv)
    fig, axes = _panels(keys)
    top = conv.max_tokens.max()
    for ax, key in zip(axes, keys):
        g = conv[(conv.preset == key[0]) & (conv.global_batch == key[1]) & conv.phase.isin(["grid", "widen"])]
        here = lad[(lad.preset == key[0]) & (lad.global_batch == key[1])]
        for opt, o in g[g.status == "ok"].sort_values("lr").groupby("optimizer"):
            ax.plot(o.lr, o.final_eval_loss, marker="o", markersize=3, label=opt, color=colour[opt])
            f = here[(here.optimizer == opt) & (here.max_tokens == here.max_tokens.max()) & ~here.diverged]
            if len(f) > 1:
                ax.errorbar([f.lr.iloc[0]], [f.final_eval_loss.mean()], yerr=[f.final_eval_loss.std()],
                            color=colour[opt], capsize=4, marker="s", markersize=5)
        ax.set_yscale("log")
        ceiling = ax.get_ylim()[1]
        for opt, bad in g[g.status != "ok"].groupby("optimizer"):
            ax.scatter(bad.lr, [ceiling] * len(bad), marker="x", color=colour[opt], s=40, clip_on=False, zorder=5,
                       label=f"{opt}: {', '.join(sorted(set(bad.status)))}")
        ax.set(xscale="log", title=f"{key[0]}, batch {int(key[1])}", xlabel="learning rate",
               ylabel=f"end-of-budget loss ({int(top):,} tokens)")
        ax.legend(fontsize=6)
    fig.suptitle("Tuning curves (squares: the finalist's mean over seeds, one standard deviation; "
                 "x: diverged or failed)", fontsize=10)
    return _save(fig, path)


def speedup_vs_horizon(d: pd.DataFrame, path: str) -> str | None:
    """Each optimizer's speed-up over AdamW against the horizon (tokens per parameter), one panel per target name
    (each horizon's own loss of that name), with its paired 95% confidence interval; only speed-ups measured on
    every seed are drawn (``d``: ``bench.report.horizons.speedups``), joined only where there are three or more
    horizons (two are not a trend)."""
    d = d[d.optimizer != "adamw"].dropna(subset=["ratio"])
    if d.empty:
        return None
    names = list(dict.fromkeys(d.target))
    colour = _colours(d)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for opt, o in d[d.target == name].groupby("optimizer"):
            o = o.sort_values("horizon")
            # side by side at each horizon (a log axis: a factor), each optimizer at the same place in every panel
            dodge = 1.04 ** (list(colour).index(opt) - len(colour) / 2)
            ax.errorbar(o.horizon * dodge, o.ratio, yerr=[o.ratio - o.low, o.high - o.ratio], color=colour[opt],
                        marker="o", capsize=3, linestyle="-" if len(o) >= 3 else "none", label=opt)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="whole budget (tokens per parameter)",
               ylabel="speed-up over AdamW (tokens to target)", title=f"each horizon's {name} target")
        ticks = sorted(d.horizon.unique())
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        lo, hi = min(d.low.min(), 1.0), max(d.high.max(), 1.0)
        ys = [v for v in (1 / 8, 1 / 4, 1 / 2, 1, 1.5, 2, 3, 4, 6, 8, 16, 32) if lo / 1.3 <= v <= hi * 1.3]
        ax.set_yticks(ys, [f"{v:g}" for v in ys])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=6)
    fig.suptitle("Speed-up over AdamW against the horizon\n(geometric mean of paired ratios over seeds, 95% CI)",
                 fontsize=10)
    makedirs(os.path.dirname(path))
    return _save(fig, path)


def quality_plots(conv: pd.DataFrame, lad: pd.DataFrame, target: dict, common: list, speedups: pd.DataFrame,
                  plot_dir: str) -> dict[str, str]:
    makedirs(plot_dir)
    out = {"End-of-budget loss vs budget, over seeds": budget_curves(lad, target, common,
                                                                     os.path.join(plot_dir, "budgets.png")),
           "Tuning curves": tuning_curves(conv, lad, target, os.path.join(plot_dir, "tuning.png"))}
    titles = [f"{ct.name} target, {ct.loss:.3f} nats" for ct in common]
    speed = speedup_at_targets(speedups, titles, os.path.join(plot_dir, "speedup_at_targets.png"))
    if speed:
        out["Speed-up over AdamW at the common targets"] = speed
    return out


def all_plots(results: pd.DataFrame, steps: pd.DataFrame, plot_dir: str) -> dict[str, str]:
    makedirs(plot_dir)
    ok = results[results.status == "ok"].copy()
    if ok.empty:
        return {}
    out = {
        "Throughput by config": throughput(ok, os.path.join(plot_dir, "throughput.png")),
        "Memory by category, measured beside predicted": memory(ok, os.path.join(plot_dir, "memory.png")),
        "Loss curves and the entropy floor": loss_curves(steps, ok, os.path.join(plot_dir, "loss.png")),
        "Throughput vs memory": throughput_vs_memory(ok, os.path.join(plot_dir, "throughput_vs_memory.png")),
    }
    heat = speedup_heatmap(ok, os.path.join(plot_dir, "speedup.png"))
    if heat:
        out["Speed-up over the baseline"] = heat
    return out
