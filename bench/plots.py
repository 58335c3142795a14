"""The report's seaborn plots, each written as a PNG under DIR/plots/ (Agg backend: no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.matrix import layout_name  # noqa: E402

MIB = 2**20
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def loss_curves(steps: pd.DataFrame, ok: pd.DataFrame, path: str) -> str:
    """Each config's loss curve; beyond MAX_CURVES configs, the median curve per precision with the band
    between the quartiles (a line per config is unreadable there, and slow: 5,000 took 25 s)."""
    d = steps[steps.config_id.isin(ok.config_id)].merge(ok[["config_id", "precision"]], on="config_id")
    fig, ax = plt.subplots(figsize=(9, 5))
    if len(ok) <= MAX_CURVES:
        sns.lineplot(data=d, x="step", y="loss", hue="config_id", style="precision", ax=ax, linewidth=1)
    else:
        sns.lineplot(data=d, x="step", y="loss", hue="precision", estimator="median", errorbar=("pi", 50), ax=ax,
                     linewidth=1.5)
        ax.set_title(f"Median loss per precision over {len(ok)} configs (band: quartiles)")
    floor = ok["entropy_floor_nats"].dropna()
    if len(floor):
        ax.axhline(float(floor.iloc[0]), color="black", linestyle="--", linewidth=1,
                   label=f"entropy floor {float(floor.iloc[0]):.3f} nats")
        ax.legend(fontsize=6, ncol=2)
    ax.set(ylabel="loss (nats/token)")
    if len(ok) <= MAX_CURVES:
        ax.set_title("Loss curves (dashed: the data's entropy floor)")
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


def eval_curves(conv: pd.DataFrame, best: pd.DataFrame, evals: pd.DataFrame, x: str, path: str) -> str:
    """Eval loss against tokens (or training seconds) of the best learning rate per optimizer, one panel per
    global batch (fp32; dashed: the entropy floor)."""
    ids = best[best.precision == "fp32"][["config_id", "optimizer", "global_batch"]]
    d = evals.merge(ids, on="config_id")
    batches = sorted(ids.global_batch.unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        sns.lineplot(data=d[d.global_batch == b], x=x, y="loss", hue="optimizer", marker="o", markersize=3,
                     ax=ax, linewidth=1.2)
        _floor(ax, conv)
        ax.set(title=f"batch {int(b)}", xlabel="tokens" if x == "tokens" else "training seconds",
               ylabel="eval loss (nats/token)")
        ax.legend(fontsize=7)
    fig.suptitle("Eval loss of each optimizer's best learning rate (dashed: entropy floor)")
    return _save(fig, path)


def tokens_to_target(best: pd.DataFrame, path: str) -> str | None:
    """Tokens to target against global batch, log-log, per optimizer; perfect scaling (tokens constant) from
    the smallest batch's winner, and the measured B_simple marked."""
    d = best[(best.precision == "fp32") & best.tokens_to_target.notna()]
    if d.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=d, x="global_batch", y="tokens_to_target", hue="optimizer", marker="o", ax=ax)
    first = d[d.global_batch == d.global_batch.min()].tokens_to_target.min()
    ax.axhline(first, color="grey", linestyle=":", linewidth=1, label="perfect scaling")
    gns = pd.to_numeric(d.gns_b_simple, errors="coerce").dropna()
    if len(gns):
        ax.axvline(float(gns.median()), color="black", linestyle="--", linewidth=1,
                   label=f"B_simple (median) {gns.median():.1f}")
    ax.set(xscale="log", yscale="log", xlabel="global batch (sequences)", ylabel="tokens to target",
           title="Tokens to target vs batch size (flat = perfect scaling)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def tuning_curves(conv: pd.DataFrame, path: str) -> str:
    """Final eval loss against learning rate, per optimizer, one panel per global batch (diverged: x)."""
    d = conv[conv.precision == "fp32"].copy()
    batches = sorted(d.global_batch.unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        g = d[d.global_batch == b]
        sns.lineplot(data=g[g.status == "ok"], x="lr", y="final_eval_loss", hue="optimizer", marker="o", ax=ax)
        bad = g[g.status != "ok"]
        if not bad.empty:
            ax.scatter(bad.lr, [d.final_eval_loss.max()] * len(bad), marker="x", color="red", label="not ok")
        _floor(ax, conv)
        ax.set(xscale="log", title=f"batch {int(b)}", xlabel="learning rate", ylabel="final eval loss")
        ax.legend(fontsize=7)
    fig.suptitle("Tuning curves: final eval loss vs learning rate")
    return _save(fig, path)


def quality_plots(conv: pd.DataFrame, best: pd.DataFrame, evals: pd.DataFrame, plot_dir: str) -> dict[str, str]:
    os.makedirs(plot_dir, exist_ok=True)
    out = {"Eval loss vs tokens": eval_curves(conv, best, evals, "tokens", os.path.join(plot_dir, "eval_tokens.png")),
           "Eval loss vs training seconds": eval_curves(conv, best, evals, "train_seconds",
                                                        os.path.join(plot_dir, "eval_seconds.png")),
           "Tuning curves": tuning_curves(conv, os.path.join(plot_dir, "tuning.png"))}
    scaling = tokens_to_target(best, os.path.join(plot_dir, "tokens_to_target.png"))
    if scaling:
        out["Tokens to target vs batch size"] = scaling
    return out


def all_plots(results: pd.DataFrame, steps: pd.DataFrame, plot_dir: str) -> dict[str, str]:
    os.makedirs(plot_dir, exist_ok=True)
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
