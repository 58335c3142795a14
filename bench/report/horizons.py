"""``python -m bench.report.horizons DIR DIR [...] --out OUT``: convergence studies of one task, model and batch
size at different horizons (whole budgets in tokens per parameter), side by side: does the ranking hold as the
data-to-model ratio grows? Wen et al. 2025 find that it need not (Muon best near 1x Chinchilla, SOAP beyond 8x).

Each study is tuned and laddered at its own horizon (``bench.study``; its own report stays in its directory).
Targets are each horizon's own common targets (``bench.tuning.common_targets``): a loss the longer horizon's
ladder reaches is below what the shorter one's can, and the shorter one's is passed before the longer one's
smallest budget, so no loss is measurable at both. What is compared is what a target makes comparable: each
optimizer's speed-up over AdamW (a ratio of tokens, paired by seed) at the moderate and the hard target of
each horizon, its rank there, and its tuned learning rate (the transfer between horizons, measured).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

import bench.report.stats as stats
from bench.report.markdown import md_table
from bench.report.quality import measured_speedup, model_params, reference_row, speedup_cell, verdict
from bench.tuning import CommonTarget, at_common_targets, best_runs, convergence_rows, finalists, ladder, main_precision


@dataclass
class Horizon:
    """One study's finalists, read at its own common targets."""
    directory: str
    preset: str
    batch: int
    task: str
    params: int
    budget: int                # its largest ladder budget, in tokens
    targets: list[CommonTarget]
    best: pd.DataFrame         # its tuning's best runs in its own precision (bench.tuning.best_runs)

    @property
    def end_losses(self) -> dict:
        """optimizer -> its finalist's end-of-budget losses at the largest budget (finalist_stats' own, the same
        at every target; none without a common target)."""
        fs = finalists(self.targets[0].fs) if self.targets else pd.DataFrame(columns=["optimizer", "end_losses"])
        return dict(zip(fs.optimizer, fs.end_losses))

    @property
    def tokens_per_param(self) -> float:
        return self.budget / self.params

    @property
    def label(self) -> str:
        return f"{self.tokens_per_param:.3g} tokens/parameter"


def read_horizon(directory: str) -> Horizon:
    """A convergence study's directory as a ``Horizon``; ValueError naming it where it holds none, or more than one
    model, batch size or task (compare those within one study's own report)."""
    from bench.report import load_all, study_targets

    if not os.path.isfile(os.path.join(directory, "results.csv")):
        raise ValueError(f"{directory!r} holds no results.csv; pass directories written by python -m bench.run "
                         f"--matrix <a convergence study>")
    results, _ = load_all(directory)
    conv = convergence_rows(results)
    if conv.empty or "phase" not in conv or not conv.phase.eq("ladder").any():
        raise ValueError(f"{directory!r} holds no convergence study's ladder; pass the directory of a finished "
                         f"--matrix convergence study")
    best = best_runs(conv)
    lad = ladder(conv, best)
    settings = sorted(set(zip(lad.preset, lad.global_batch)))
    if len(settings) != 1 or lad.task.nunique() != 1:
        raise ValueError(f"{directory!r} holds {len(settings)} models x batch sizes and {lad.task.nunique()} tasks; "
                         f"a horizon comparison takes studies of one model, batch size and task each")
    (preset, batch), task = settings[0], lad.task.iloc[0]
    given = study_targets(directory)
    return Horizon(directory, preset, int(batch), task, model_params(conv)[preset][0], int(lad.max_tokens.max()),
                   at_common_targets(lad, given or ()), best[best.precision == main_precision(conv)])


def check_comparable(hs: list[Horizon]) -> None:
    """One line naming what differs where the studies are not one task, model and batch size at different
    horizons."""
    first = hs[0]
    for h in hs[1:]:
        for what, a, b in (("task", first.task, h.task), ("preset", first.preset, h.preset),
                           ("global batch", first.batch, h.batch)):
            if a != b:
                raise ValueError(f"{h.directory!r}'s {what} ({b}) differs from {first.directory!r}'s ({a}); compare "
                                 f"horizons of one task, model and batch size")
    budgets = [h.budget for h in hs]
    if len(set(budgets)) != len(budgets):
        raise ValueError("two of the studies have the same largest budget; pass studies at different horizons "
                         "(tokens_per_param)")


def speedups(hs: list[Horizon]) -> pd.DataFrame:
    """Every optimizer's speed-up over AdamW at every horizon's common targets: columns horizon (tokens per
    parameter), target (its name), loss, optimizer, cell (the table's text), ratio, low, high (NaN where not
    measured on every seed: a bound, or not reached), geomean tokens (for the ranking; NaN where not ranked)."""
    rows = []
    for h in hs:
        for ct in h.targets:
            adamw = reference_row(ct.fs, h.preset, h.batch)
            for r in finalists(ct.fs).itertuples():
                sp = measured_speedup(ct.fs, r)
                rows.append({"horizon": h.tokens_per_param, "target": ct.name, "loss": ct.loss,
                             "optimizer": r.optimizer, "cell": speedup_cell(r, adamw),
                             "ratio": sp.ratio if sp else math.nan, "low": sp.low if sp else math.nan,
                             "high": sp.high if sp else math.nan,
                             "tokens": stats.geomean(r.by_seed) if r.all_reached else math.nan})
    return pd.DataFrame(rows)


def ranking_sentences(d: pd.DataFrame, hs: list[Horizon]) -> list[str]:
    """Per target name, the order by tokens to target (geometric mean over seeds; fewest first) at each horizon,
    Kendall's tau between the first and the last horizon's orders over the optimizers ranked at both, and each
    optimizer whose speed-up's intervals at the first and last horizon do not overlap (the only change called a
    change; two horizons are not a trend)."""
    from scipy.stats import kendalltau

    out = []
    first, last = hs[0].tokens_per_param, hs[-1].tokens_per_param
    for name in dict.fromkeys(d.target):
        t = d[d.target == name]
        orders = {h: list(g.dropna(subset=["tokens"]).sort_values("tokens").optimizer) for h, g in t.groupby("horizon")}
        parts = [f"{h:.3g} tokens/parameter: {' < '.join(o) or 'none ranked'}" for h, o in orders.items()]
        both = [o for o in orders.get(first, []) if o in orders.get(last, [])]
        tau = ""
        if len(both) >= 3:
            res = kendalltau([orders[first].index(o) for o in both], [orders[last].index(o) for o in both])
            tau = (f" Kendall's tau between the {first:.3g} and {last:.3g} tokens/parameter orders over the "
                   f"{len(both)} optimizers ranked at both: {res.statistic:.2f} (p = {res.pvalue:.2g}; 1: the same "
                   f"order).")
        moved = []
        for opt, g in t.groupby("optimizer"):
            a, b = g[g.horizon == first], g[g.horizon == last]
            if a.empty or b.empty or a.low.isna().any() or b.low.isna().any():
                continue
            a, b = a.iloc[0], b.iloc[0]
            if a.high < b.low or b.high < a.low:
                moved.append(f"{opt} {a.ratio:.2f}x -> {b.ratio:.2f}x")
        change = (" Speed-ups over AdamW whose 95% intervals at the two horizons do not overlap: " + ", ".join(moved)
                  + "." if moved else " No optimizer's speed-up over AdamW moved beyond its 95% intervals between "
                  "the two horizons.")
        out.append(f"At the {name} target, by tokens to target (fewest first): " + "; ".join(parts) + "." + tau
                   + change)
    return out


def lr_table(hs: list[Horizon]) -> str:
    """Each optimizer's tuned learning rate and weight decay at every horizon, the rate's ratio from the first to
    the last (the transfer, measured), and its finalist's end-of-budget loss at the largest budget."""
    rows = {}
    for h in hs:
        ends = h.end_losses
        for r in h.best.itertuples():
            row = rows.setdefault(r.optimizer, {"optimizer": r.optimizer})
            edge = f", at its grid's {r.edge} edge" if isinstance(r.edge, str) else ""  # None reads back as NaN
            row[f"lr (wd), {h.label}"] = f"{r.lr:.3g} ({r.weight_decay:g}){edge}"
            losses = ends.get(r.optimizer, [])
            m, s = stats.mean_std(losses) if losses else (math.nan, math.nan)
            row[f"end loss, {h.label}"] = f"{m:.4f} ± {s:.4f}" if losses else "—"
    a, b = hs[0].best.set_index("optimizer").lr, hs[-1].best.set_index("optimizer").lr
    for opt, row in rows.items():
        row[f"lr ratio, {hs[-1].label} / {hs[0].label}"] = f"{b[opt] / a[opt]:.2g}" if opt in a and opt in b else "—"
    return md_table(pd.DataFrame(list(rows.values())))


def report(directories: list[str], out: str) -> str:
    """OUT/report.md and OUT/plots/speedup_vs_horizon.png from the studies in ``directories``."""
    from bench.report.plots import speedup_vs_horizon
    from llmopt.safe_files import open_file, refuse_links

    hs = sorted((read_horizon(d) for d in directories), key=lambda h: h.budget)
    if len(hs) < 2:
        raise ValueError("pass two or more studies' directories, one per horizon")
    check_comparable(hs)
    d = speedups(hs)
    if d.empty:
        raise ValueError("no study here has common targets (they are read off AdamW's finalists): run the studies "
                         "with adamw among their optimizers")
    h0 = hs[0]
    L = [f"# Optimizers at {len(hs)} horizons: {h0.preset}, global batch {h0.batch}, {h0.task}", "",
         f"{h0.params:,} parameters; whole budgets " + ", ".join(f"{h.budget:,} tokens ({h.label})" for h in hs)
         + ". Each horizon is its own study, tuned at its own budget (its report: "
         + ", ".join(f"`{os.path.relpath(h.directory, out)}/report.md`" for h in hs) + "). Targets are each "
         "horizon's own common targets (no loss is measurable at both: the shorter horizon's are passed before the "
         "longer one's smallest budget); what is compared across horizons is each optimizer's speed-up over AdamW "
         "at them (geometric mean of paired per-seed ratios [95% CI]) and its rank.", ""]
    L += ["## Speed-up over AdamW at each horizon's common targets", ""]
    table = d.assign(column=[f"{h:.3g} tok/param, {t} ({loss:.3f})" for h, t, loss in zip(d.horizon, d.target, d.loss)])
    columns = list(dict.fromkeys(table.column))  # by horizon, then the targets in the rule's order
    L += [md_table(table.pivot(index="optimizer", columns="column", values="cell")[columns].reset_index()), ""]
    L += ["## Verdicts", ""]
    for h in hs:
        for ct in h.targets:
            L.append(f"- {h.label}, the {ct.name} target ({ct.loss:.3f} nats): {verdict(ct.fs)}.")
    L += ["", "## Does the ranking hold?", ""] + [f"- {s}" for s in ranking_sentences(d, hs)] + [""]
    L += ["## Tuned learning rates (each horizon's own grid; the ratio is the transfer between them)", "",
          lr_table(hs), ""]
    refuse_links(out, "bench.report.horizons")
    plot = speedup_vs_horizon(d, os.path.join(out, "plots", "speedup_vs_horizon.png"))
    if plot:
        L += ["## Speed-up over AdamW against the horizon", "",
              f"![speed-up vs horizon](plots/{os.path.basename(plot)})", ""]
    text = "\n".join(L)
    with open_file(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m bench.report.horizons", __doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="two or more convergence studies' directories, one per horizon")
    p.add_argument("--out", required=True, help="where report.md and plots/ are written (made if missing)")
    args = p.parse_args(argv)

    def body() -> int:
        from llmopt.safe_files import makedirs

        makedirs(args.out)
        print(report(args.dirs, args.out))
        return 0

    return cli.main(body)


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
