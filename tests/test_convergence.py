"""Time to quality: the learning-rate schedule, evals and targets, divergence, the gradient noise scale, and
the convergence matrix's tuning logic."""
import math
from dataclasses import replace

import pytest
import torch

from llmopt.core.config import TrainConfig, validate
from llmopt.instruments import NoiseScale, gradient_noise_scale
from llmopt.loop import measure
from llmopt.step import build, train_step

CPU = torch.device("cpu")


def expected_lr(peak, s, schedule, warmup, total, floor):
    """The schedule written out independently of llmopt.optim.lr_factor."""
    if s < warmup:
        return peak * (s + 1) / warmup
    if schedule == "constant":
        return peak
    p = (s - warmup) / (total - 1 - warmup)
    if schedule == "cosine":
        return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)
    return peak * (floor + (1 - floor) * (1 - p))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_follows_the_closed_form_at_every_step(schedule):
    cfg = validate(TrainConfig(global_batch=2, seq_len=8, steps=12, lr=0.02, lr_schedule=schedule, lr_warmup=3,
                               min_lr_ratio=0.25, optimizer="lamb"))
    state = build(cfg, CPU)
    seen = []
    for s in range(cfg.steps):
        seen.append([g["lr"] for g in state.optimizer.param_groups])
        train_step(state, s)
    for s, lrs in enumerate(seen):
        want = expected_lr(0.02, s, schedule, 3, 12, 0.25)
        assert all(abs(lr - want) < 1e-12 for lr in lrs), (s, lrs, want)
    if schedule != "constant":
        assert abs(seen[-1][0] - 0.02 * 0.25) < 1e-12  # the last step is at the floor


def test_gradient_noise_scale_recovers_a_known_distribution():
    """Per-example gradients from N(mu, Sigma): the estimator's |G|^2 and tr(Sigma), averaged over many
    draws, recover |mu|^2 and tr(Sigma), and B_simple = tr(Sigma) / |mu|^2, within sampling error."""
    g = torch.Generator().manual_seed(0)
    d, b_small, b_big, trials = 50, 4, 32, 4000
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 2  # diagonal Sigma = diag(scale^2)
    true_g2, true_trace = float(mu @ mu), float((scale**2).sum())
    examples = mu + scale * torch.randn(trials, b_big, d, generator=g, dtype=torch.float64)
    g_big = examples.mean(1)
    g_small = examples[:, :b_small].mean(1)
    g2, trace = gradient_noise_scale((g_small**2).sum(1), (g_big**2).sum(1), b_small, b_big)
    assert abs(g2.mean().item() - true_g2) < 4 * g2.std().item() / math.sqrt(trials)
    assert abs(trace.mean().item() - true_trace) < 4 * trace.std().item() / math.sqrt(trials)
    b_simple = trace.mean().item() / g2.mean().item()
    assert abs(b_simple / (true_trace / true_g2) - 1) < 0.1
    # floats work too, and the running estimate (an average of each, then the ratio) agrees
    assert gradient_noise_scale(2.0, 1.0, 1, 3) == ((3 * 1.0 - 2.0) / 2, (2.0 - 1.0) / (1 - 1 / 3))
    ns = NoiseScale(b_small, b_big, decay=0.999)
    for i in range(trials):
        ns.update((g_small[i] ** 2).sum(), (g_big[i] ** 2).sum())
    assert abs(ns.b_simple() / (true_trace / true_g2) - 1) < 0.25
    with pytest.raises(ValueError):
        gradient_noise_scale(1.0, 1.0, 4, 4)


def test_noise_scale_is_measured_in_training():
    cfg = validate(TrainConfig(global_batch=32, seq_len=16, steps=10, grad_accum=2, gns=True, eval_every=5,
                               eval_batches=1))
    state = build(cfg, CPU)
    m = measure(state)
    assert m.gns_b_simple is not None and m.gns_b_simple > 0
    assert [e["gns_b_simple"] is not None for e in m.evals] == [False, True, True]


def test_run_stops_at_the_first_eval_at_or_below_the_target():
    base = TrainConfig(global_batch=8, seq_len=32, steps=60, eval_every=5, eval_batches=2)
    free = measure(build(validate(base), CPU))
    curve = [(e["step"], e["loss"]) for e in free.evals]
    target = curve[-3][1] + 1e-6  # reached late in the curve
    first = next(s for s, loss in curve if loss <= target)
    assert 0 < first < 60
    m = measure(build(validate(replace(base, target_loss=target)), CPU))
    assert m.target_loss == target
    assert m.steps_to_target == first and len(m.losses) == first
    assert m.tokens_to_target == first * 8 * 32
    assert m.seconds_to_target == pytest.approx(sum(m.step_time_ms) / 1e3)
    assert [(e["step"], e["loss"]) for e in m.evals] == [c for c in curve if c[0] <= first]
    assert m.best_eval_loss == min(loss for s, loss in curve if s <= first)
    # a target never reached: nulls, the whole budget spent
    m = measure(build(validate(replace(base, steps=10, target_loss=0.01)), CPU))
    assert m.steps_to_target is None and m.seconds_to_target is None and len(m.losses) == 10


def test_a_huge_learning_rate_diverges_with_exit_3(cli):
    r = cli("-m", "llmopt.train", "--optimizer", "sgd", "--lr", "300", "--max-grad-norm", "0", "--steps", "8",
            "--global-batch", "4", "--seq-len", "16", "--quiet")
    assert r.returncode == 3, r.stderr
    assert "diverged at step" in r.stderr.strip().splitlines()[-1]


def test_max_tokens_sets_the_steps():
    cfg = validate(TrainConfig(global_batch=4, seq_len=16, max_tokens=1000, steps=3))
    assert cfg.steps == 16  # ceil(1000 / 64)


@pytest.mark.parametrize("kw, match", [
    (dict(target_loss=1.0), "--eval-every"),
    (dict(target_loss=1.0, target_gap=0.5, eval_every=1), "both"),
    (dict(gns=True), "--grad-accum"),
    (dict(gns=True, grad_accum=2, dp=2, dp_mode="fsdp"), "DistributedDataParallel"),
    (dict(lr_warmup=10, steps=10), "--lr-warmup"),
    (dict(lr=float("nan")), "--lr"),
    (dict(min_lr_ratio=2.0), "--min-lr-ratio"),
    (dict(lr_schedule="step"), "--lr-schedule"),
])
def test_bad_convergence_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        validate(TrainConfig(**kw))


def _row(opt, batch, lr, final=1.0, status="ok", precision="fp32", wd=0.1):
    return {"config_id": f"{opt}-{batch}-{lr}-{wd}-{precision}", "preset": "tiny", "optimizer": opt,
            "global_batch": batch, "lr": lr, "weight_decay": wd, "precision": precision, "status": status,
            "final_eval_loss": final}


def test_tuning_brackets_each_optimum_tries_both_weight_decays_then_adds_the_ladder_on_other_seeds():
    """Every optimizer gets the same protocol (issue 34): a grid x2 apart, widened until its best has a worse
    neighbour on each side (at most MAX_WIDENINGS times), the best at the other weight decay, and the finalist's
    ladder on the evaluation seeds, which exclude the tuning seed; then an unstable finalist's next stable rate;
    then the bf16 winner, the layouts, the to-target check."""
    from dataclasses import replace

    from bench import tuning
    from bench.plan import PlanEntry
    from bench.study import STUDIES

    study = replace(STUDIES["convergence"], optimizers=("sgd", "adamw", "lamb"))  # Muon's grid: the next test
    LADDER, SEEDS, TUNING_SEED, MAX_WIDENINGS = study.ladder, study.seeds, study.tuning_seed, study.max_widenings
    assert study.lr_step <= 2 and TUNING_SEED not in SEEDS and set(study.weight_decays) == {0.01, 0.1}
    rows = [_row("adamw", 4, 1e-3, final=2.0), _row("adamw", 4, 3e-3, final=0.95),
            _row("adamw", 4, 6e-3, final=0.9),   # the lowest end-of-budget loss: best, at the high edge
            _row("sgd", 4, 0.03, final=1.5), _row("sgd", 4, 0.1, final=1.2), _row("sgd", 4, 0.3, status="diverged"),
            _row("lamb", 4, 0.01, final=2.0), _row("lamb", 4, 0.02, final=1.0)]
    g = tuning.groups(rows)
    assert tuning.best(g[("tiny", "adamw", "4", "fp32")])["lr"] == 6e-3
    assert tuning.edge(g[("tiny", "adamw", "4", "fp32")]) == "high"
    sgd = g[("tiny", "sgd", "4", "fp32")]
    assert tuning.best(sgd)["lr"] == 0.1 and tuning.edge(sgd) is None  # a diverged neighbour is a worse one
    assert tuning.winners(rows)[("tiny", "4")]["optimizer"] == "adamw"
    # every run of a batch diverged: no winner, so no bf16 or layout runs of a diverged "winner"
    assert tuning.winners([_row("adamw", 8, 1e-3, status="diverged"), _row("sgd", 8, 0.1, status="failed")]) == {}
    base = TrainConfig(device="cpu", grad_accum=1, max_tokens=4096, seq_len=16, seed=TUNING_SEED)
    plan = [PlanEntry(replace(base, optimizer=r["optimizer"], global_batch=r["global_batch"], lr=r["lr"],
                              weight_decay=r["weight_decay"]), r["config_id"], phase="grid") for r in rows]

    def step(losses: dict) -> list:
        """The next phase's entries, after giving the last ones their rows (loss by (optimizer, lr, wd))."""
        more = tuning.followups(study, plan, rows)
        plan.extend(more)
        for e in more:
            c = e.config
            rows.append(dict(_row(c.optimizer, 4, c.lr, final=losses.get((c.optimizer, c.lr, c.weight_decay), 3.0),
                                  wd=c.weight_decay, precision=c.precision), config_id=e.config_id))
        return more

    # adamw at 0.012 wins again, so it widens again; at 0.024 it is worse: bracketed. lamb improves every time:
    # it stops at MAX_WIDENINGS, still at its edge (the report says so)
    widen = {("adamw", 0.012, 0.1): 0.85, ("adamw", 0.024, 0.1): 0.88}
    widen |= {("lamb", 0.02 * 2 ** k, 0.1): 1.0 - 0.1 * k for k in range(1, MAX_WIDENINGS + 1)}
    lrs = []
    while (more := step(widen)) and more[0].phase == "widen":
        lrs += [(e.config.optimizer, round(e.config.lr, 6)) for e in more]
    # then every grid to the same number of runs as the largest (lamb's 5): sgd's best (0.1) has a diverged
    # higher neighbour, so it widens downwards only
    assert sorted(lrs) == sorted([("adamw", 0.012), ("adamw", 0.024), ("sgd", 0.015), ("sgd", 0.0075)]
                                 + [("lamb", round(0.02 * 2 ** k, 6)) for k in range(1, MAX_WIDENINGS + 1)])
    # the grid's best at weight decay 0.01 (adamw's finalist becomes that one: 0.80 < 0.85)
    assert {(e.phase, e.config.optimizer, round(e.config.lr, 6), e.config.weight_decay) for e in more} == \
        {("decay", "adamw", 0.012, 0.01), ("decay", "sgd", 0.1, 0.01), ("decay", "lamb", 0.16, 0.01)}
    rows[-3:] = [dict(r, final_eval_loss=v) for r, v in zip(rows[-3:], (0.80, 1.3, 0.75))]
    more = step({})
    assert {e.phase for e in more} == {"ladder"} and len(more) == 3 * len(LADDER) * len(SEEDS)
    ladder = {(e.config.optimizer, round(e.config.lr, 6), e.config.weight_decay, e.config.max_tokens, e.config.seed)
              for e in more}
    assert ("adamw", 0.012, 0.01, 1024, SEEDS[-1]) in ladder and ("sgd", 0.1, 0.1, 2048, SEEDS[0]) in ladder
    assert all(e.config.eval_every == e.config.steps for e in more)  # evals at the end only
    assert not any(e.config.seed == TUNING_SEED for e in more)  # selection and evaluation never share a run
    assert all(e.config.lr_warmup >= min(3, e.config.steps // 2) for e in more)  # never 1 step of 32
    # sgd's ladder diverges once: unstable, so its next smaller rate that finished (0.03) runs the same ladder
    for r in rows[-len(more):]:
        cfg = next(e.config for e in more if e.config_id == r["config_id"])
        r.update(max_tokens=cfg.max_tokens, seed=cfg.seed, final_eval_loss=3.0 - cfg.max_tokens / 4096)
        if cfg.optimizer == "sgd" and cfg.seed == SEEDS[0] and cfg.max_tokens == 1024:
            r.update(status="diverged")
    for r in rows:
        r.setdefault("max_tokens", 4096)
        r.setdefault("seed", TUNING_SEED)
    more = step({})
    assert {(e.phase, e.config.optimizer, e.config.lr) for e in more} == {("stable", "sgd", 0.03)}
    assert len(more) == len(LADDER) * len(SEEDS)
    assert tuning.followups(None, plan, rows) == []  # not a study
    for r in rows[-len(more):]:
        cfg = next(e.config for e in more if e.config_id == r["config_id"])
        r.update(max_tokens=cfg.max_tokens, seed=cfg.seed, final_eval_loss=3.2 - cfg.max_tokens / 4096)
    # every finalist's seeds alike (no verdict is close: no more seeds); then the winner in bf16 (lamb's last
    # widening, 0.70 at weight decay 0.1: its 0.75 at 0.01 lost), then every finalist's shape as throughput rows
    # on each layout (no evals)
    more = step({})
    assert [(e.phase, e.config.optimizer, e.config.precision, e.config.weight_decay) for e in more] == \
        [("precision", "lamb", "bf16", 0.1)]
    more = step({})
    assert {e.phase for e in more} == {"layouts"} and len(more) == 3 * len(tuning.THROUGHPUT_LAYOUTS)
    assert all(e.config.target_gap == 0 and e.config.eval_every == 0 for e in more)
    layouts = {(e.config.optimizer, e.config.dp, e.config.dp_mode, e.config.tp, e.config.pp) for e in more}
    assert layouts == {(o, *l) for o in ("adamw", "sgd", "lamb")
                       for l in ((1, "ddp", 1, 1), (2, "ddp", 1, 1), (2, "fsdp", 1, 1), (1, "ddp", 2, 1))}
    # last, each finalist that reached its batch's target (AdamW's 2.5 at half the budget) on every seed, trained
    # to it under fsdp2 on the tuning seed: sgd too, its diverged seed counted at the budget after it (2048)
    more = step({})
    got = {(e.phase, e.config.optimizer, e.config.dp, e.config.dp_mode, e.config.seed) for e in more}
    assert got == {("to-target", o, 2, "fsdp", TUNING_SEED) for o in ("adamw", "lamb", "sgd")}
    assert {e.config.max_tokens for e in more if e.config.optimizer == "adamw"} == {2048}


def test_a_study_tuned_in_bf16_ladders_in_bf16_and_checks_its_winner_in_fp32():
    """The grid's precision is the study's ([base] precision = "bf16" on a GPU): its groups are the ones tuned,
    laddered and checked; the precision phase runs the winner in the other precision."""
    from dataclasses import replace

    from bench import tuning
    from bench.plan import PlanEntry
    from bench.study import Study

    study = Study(batches=(4,), optimizers=("adamw",), ladder=(0.5, 1), seeds=(1, 2))
    rows = [_row("adamw", 4, lr, final=f, precision="bf16") for lr, f in ((1e-3, 2.0), (3e-3, 0.9), (9e-3, 1.5))]
    base = TrainConfig(device="cpu", grad_accum=1, max_tokens=4096, seq_len=16, precision="bf16")
    plan = [PlanEntry(replace(base, optimizer="adamw", global_batch=4, lr=r["lr"], weight_decay=0.1), r["config_id"],
                      phase="grid") for r in rows]
    seen = []
    for _ in range(4):
        more = tuning.followups(study, plan, rows)
        seen.append({(e.phase, e.config.precision) for e in more})
        plan += more
        for e in more:
            c = e.config
            rows.append(dict(_row("adamw", 4, c.lr, final=1.0 + c.max_tokens / 8192 + 0.01 * c.seed,
                                  precision=c.precision, wd=c.weight_decay), config_id=e.config_id,
                             max_tokens=c.max_tokens, seed=c.seed))
    for r in rows:
        r.setdefault("max_tokens", 4096)
        r.setdefault("seed", 0)
    assert seen[:2] == [{("decay", "bf16")}, {("ladder", "bf16")}]
    assert {("precision", "fp32")} in seen


def test_muons_adamw_part_runs_at_adamws_tuned_rate_and_what_that_changes_is_measured():
    """Issue 34: Muon's AdamW part (embeddings, head, gains) runs at AdamW's tuned rate for the same setting, so
    Muon's grid waits until AdamW's is bracketed; its finalist then runs again with that part at its own rate
    on the evaluation seeds (phase adamw-lr), the measured difference."""
    from dataclasses import replace

    from bench import tuning
    from bench.matrix import study_grid, waits_for_adamw
    from bench.plan import PlanEntry
    from bench.study import Study

    study = Study(batches=(4,), optimizers=("adamw", "muon"), ladder=(0.5, 1), seeds=(1, 2))
    assert waits_for_adamw(study, "muon") and not waits_for_adamw(replace(study, optimizers=("muon",)), "muon")
    base = dict(device="cpu", preset="tiny", grad_accum=1, seq_len=16, max_tokens=4096, lr_schedule="cosine")
    assert {c["optimizer"] for c in study_grid(study, base)} == {"adamw"}
    assert {c["optimizer"] for c in study_grid(replace(study, optimizers=("muon",)), base)} == {"muon"}
    # AdamW's best is at its grid's high edge: it widens first, and Muon waits
    rows = [_row("adamw", 4, lr, final=f) for lr, f in ((1.5e-3, 2.0), (3e-3, 1.0), (6e-3, 0.9))]
    cfg = TrainConfig(device="cpu", grad_accum=1, max_tokens=4096, seq_len=16)
    plan = [PlanEntry(replace(cfg, optimizer="adamw", global_batch=4, lr=r["lr"], weight_decay=0.1), r["config_id"],
                      phase="grid") for r in rows]
    losses = {("adamw", 0.012): 0.95, ("muon", 0.005): 0.9, ("muon", 0.01): 0.7, ("muon", 0.02): 0.8}

    def step() -> list:
        more = tuning.followups(study, plan, rows)
        plan.extend(more)
        for e in more:
            c = e.config
            later = c.seed / 100 + (4096 - c.max_tokens) / 1e4 if c.seed else 0.0  # ladder runs: by seed, budget
            own = 0.05 if c.optimizer == "muon" and c.adamw_lr == 0 else 0.0
            rows.append(dict(_row(c.optimizer, 4, c.lr, final=losses.get((c.optimizer, round(c.lr, 6)), 1.5)
                                  + later + own,
                                  wd=c.weight_decay), config_id=e.config_id, max_tokens=c.max_tokens, seed=c.seed,
                             adamw_lr=c.adamw_lr))
        return more

    more = step()
    assert [(e.phase, e.config.optimizer, e.config.lr) for e in more] == [("widen", "adamw", 0.012)]
    more = step()  # 0.012 is worse: AdamW's rate is 0.006, and Muon's grid runs its AdamW part at it
    assert {(e.phase, e.config.optimizer, e.config.adamw_lr) for e in more} == {("grid", "muon", 0.006)}
    assert sorted(e.config.lr for e in more) == [0.005, 0.01, 0.02]
    assert all(e.config.weight_decay == 0.1 and e.config.seed == study.tuning_seed for e in more)
    more = step()  # as many tuning runs as AdamW's 4: one more, beside Muon's best's better neighbour (0.02)
    assert [(e.phase, e.config.optimizer, e.config.lr, e.config.adamw_lr) for e in more] == \
        [("widen", "muon", 0.04, 0.006)]
    phases = [{e.phase for e in step()} for _ in range(3)]
    assert phases == [{"decay"}, {"ladder"}, {"adamw-lr"}]
    own = [e.config for e in plan if e.phase == "adamw-lr"]
    assert {(c.optimizer, c.lr, c.adamw_lr, c.max_tokens, c.seed) for c in own} == \
        {("muon", 0.01, 0.0, 4096, seed) for seed in study.seeds}
    ladder = [e.config for e in plan if e.phase == "ladder" and e.config.optimizer == "muon"]
    assert ladder and all(c.adamw_lr == 0.006 for c in ladder)


def test_muons_grid_keeps_its_adamw_rate_when_adamws_equal_budget_widening_moves_adamws_best():
    """Muon's grid needs two widenings, so AdamW's grid is widened to the same count, and one of those runs
    becomes AdamW's best: Muon's AdamW part keeps the rate its grid started with (no second grid), and every
    grid ends with as many learning rates as the other's."""
    from dataclasses import replace

    from bench import tuning
    from bench.plan import PlanEntry
    from bench.study import Study

    study = Study(batches=(4,), optimizers=("adamw", "muon"), ladder=(0.5, 1), seeds=(1, 2))
    rows = [_row("adamw", 4, lr, final=f) for lr, f in ((3e-3, 1.0), (6e-3, 0.9), (1.2e-2, 0.95))]
    cfg = TrainConfig(device="cpu", grad_accum=1, max_tokens=4096, seq_len=16)
    plan = [PlanEntry(replace(cfg, optimizer="adamw", global_batch=4, lr=r["lr"], weight_decay=0.1), r["config_id"],
                      phase="grid") for r in rows]
    losses = {("adamw", 0.024): 0.85, ("muon", 0.005): 0.9, ("muon", 0.01): 0.8, ("muon", 0.02): 0.75,
              ("muon", 0.04): 0.7, ("muon", 0.08): 0.9}
    for _ in range(8):
        more = tuning.followups(study, plan, rows)
        if any(e.phase == "decay" for e in more):
            break
        plan.extend(more)
        rows += [dict(_row(e.config.optimizer, 4, e.config.lr, final=losses.get((e.config.optimizer,
                                                                                 round(e.config.lr, 6)), 1.5)),
                      config_id=e.config_id) for e in more]
    grids = tuning.groups(rows)
    assert {k[1]: len(g) for k, g in grids.items()} == {"adamw": 6, "muon": 6}
    assert tuning.best(grids[("tiny", "adamw", "4", "fp32")])["lr"] == 0.024  # moved by a widening to equal runs
    assert {e.config.adamw_lr for e in plan if e.config.optimizer == "muon"} == {0.006}


def test_the_loss_plot_compares_precisions_on_twins_only():
    """Beyond a handful of configs the loss plot shows a median per precision: over the configs run in every
    precision, each beside its twin, not every fp32 config against the few winners a sweep ran in bf16."""
    import pandas as pd

    from bench.report.plots import paired_by_precision

    rows = [dict(config_id=f"c{i}", optimizer=o, lr=lr, precision=p)
            for i, (o, lr, p) in enumerate([("adamw", 1e-3, "fp32"), ("adamw", 3e-3, "fp32"), ("sgd", 0.1, "fp32"),
                                            ("adamw", 3e-3, "bf16")])]
    twins = paired_by_precision(pd.DataFrame(rows))
    assert sorted(twins.config_id) == ["c1", "c3"]
    alone = pd.DataFrame(rows[:3])  # one precision: every config is its own twin
    assert len(paired_by_precision(alone)) == 3


def _ladder_frame(tokens_scale: dict):
    """A ladder at budgets 1024, 2048, 4096 where AdamW's losses are 3, 2, 1 on every seed (its target, 2.0 at
    half the budget, is crossed at 2048 tokens) and muon's reach 2.0 after 2048 / r tokens on a seed with scale
    r (``tokens_scale``: seed -> r): its loss at 2048 is 3 - 1 / (1 - log2 r)."""
    import pandas as pd

    rows = []
    for seed, r in tokens_scale.items():
        mid = 3 - 1 / (1 - math.log2(r))
        for opt, losses in (("adamw", (3.0, 2.0, 1.0)), ("muon", (3.0, mid, 0.5))):
            for budget, loss in zip((1024, 2048, 4096), losses):
                rows.append({"preset": "tiny", "optimizer": opt, "global_batch": 8, "lr": 0.01, "weight_decay": 0.1,
                             "role": "finalist", "max_tokens": budget, "seed": seed, "final_eval_loss": loss,
                             "diverged": False, "config_id": f"{opt}-{budget}-{seed}", "tuning_id": f"{opt}-tune",
                             "task": "generated", "floor": 0.0})
    return pd.DataFrame(rows)


def test_a_close_verdict_gets_more_seeds_before_it_is_called():
    """Where the lead's test against another optimizer has 0.01 <= p < 0.1, both run SEED_STEP more seeds (the
    same ones), up to MAX_SEEDS; a clear verdict (the same ratio on every seed) adds none."""
    import bench.tuning as bt
    from bench.report.stats import lead_tests, paired_speedup
    from bench.study import Study

    close = _ladder_frame({1: math.exp(0.10), 2: math.exp(0.15), 3: math.exp(0.20)})
    fs = bt.finalist_stats(close, bt.targets(close))
    by = {r.optimizer: r.by_seed for r in fs.itertuples()}
    assert paired_speedup(by["adamw"], by["muon"]).ratio == pytest.approx(math.exp(0.15), rel=1e-6)
    lead, tests, _ = lead_tests(by)
    assert lead == "muon" and 0.01 <= tests[0][1].p < 0.1  # t = 0.15 / (0.05 / sqrt 3) = 5.2, 2 df: p = 0.035
    study = Study(batches=(8,))
    assert bt.more_seeds(close, fs, study) == {"adamw-tune": [1, 2, 3, 4, 5], "muon-tune": [1, 2, 3, 4, 5]}
    clear = _ladder_frame(dict.fromkeys((1, 2, 3), math.exp(0.15)))
    assert bt.more_seeds(clear, bt.finalist_stats(clear, bt.targets(clear)), study) == {}
    assert bt.more_seeds(close, fs, Study(batches=(8,), max_seeds=3)) == {}  # at the cap
    # the common targets: AdamW's worst end loss at the largest budget (1.0) and halfway, on a log scale, to its
    # lowest at the smallest (3.0): sqrt(1 x 3); or the losses a study was given
    assert bt.common_targets(close) == {"generated": {"moderate": round(math.sqrt(3.0), 3), "hard": 1.0}}
    assert bt.common_targets(close, (2.5, 1.5)) == {"generated": {"given #1": 2.5, "given #2": 1.5}}


def test_an_adamw_finalist_that_diverged_on_a_seed_hands_the_reference_to_its_next_stable_rate():
    """AdamW's finalist diverged on one seed at the largest budget, and its next stable rate ran beside it: the
    targets (per-batch and common) are read off that stable rate and speed-ups are over it, the unstable finalist
    shown against it like any other; without the stable rate there is no common target, as before."""
    import pandas as pd

    import bench.tuning as bt
    from bench.report.quality import reference_row, speedup_cell, target_source

    scale = math.exp(0.15)
    lad = _ladder_frame(dict.fromkeys((1, 2, 3), scale))
    lost = (lad.optimizer == "adamw") & (lad.seed == 2) & (lad.max_tokens == 4096)
    lad.loc[lost, ["final_eval_loss", "diverged"]] = [float("nan"), True]
    stable = lad[lad.optimizer.eq("adamw") & ~lost].assign(lr=0.005, role="stable", tuning_id="adamw-stable")
    stable.loc[stable.seed == 2, "diverged"] = False
    stable = pd.concat([stable, lad[lost].assign(lr=0.005, role="stable", tuning_id="adamw-stable",
                                                 diverged=False)])
    stable["final_eval_loss"] = stable.max_tokens.map({1024: 3.2, 2048: 2.2, 4096: 1.2})
    stable["config_id"] = "stable-" + stable.max_tokens.astype(str) + "-" + stable.seed.astype(str)
    both = pd.concat([lad, stable], ignore_index=True)

    assert bt.common_targets(lad) == {}  # the finalist alone: no common target
    ref = bt.adamw_reference(both, "tiny", 8)
    assert set(ref.role) == {"stable"} and len(ref) == 9
    assert bt.targets(both) == {("tiny", 8): pytest.approx(2.2)}  # the stable rate's mean at half the budget
    # hard: its highest loss at the largest budget (1.2); moderate: halfway on a log scale to its lowest at the
    # smallest (3.2)
    assert bt.common_targets(both) == {"generated": {"moderate": round(math.sqrt(1.2 * 3.2), 3), "hard": 1.2}}

    fs = bt.finalist_stats(both, bt.targets(both))
    adamw = reference_row(fs, "tiny", 8)
    assert (adamw.optimizer, adamw.role, adamw.lr) == ("adamw", "stable", 0.005)
    row = {(r.optimizer, r.role): r for _, r in fs.iterrows()}
    assert speedup_cell(row["adamw", "stable"], adamw) == "1 (the reference)"
    assert speedup_cell(row["adamw", "finalist"], adamw) != "1 (the reference)"  # shown against it
    # muon crosses 2.2 between 1024 (loss 3.0) and 2048 tokens (its loss there, log-linear in tokens); the
    # stable AdamW at exactly 2048
    mid = 3 - 1 / (1 - math.log2(scale))
    muon = 1024 * 2 ** ((3.0 - 2.2) / (3.0 - mid))
    assert speedup_cell(row["muon", "finalist"], adamw).startswith(f"{2048 / muon:.2f} [")
    assert "next stable learning rate" in target_source(both, "tiny", 8)
    assert target_source(lad, "tiny", 8) == ""  # AdamW's finalist, the usual: no note

    # seconds to target: AdamW's tokens are the stable rate's (2048 on every seed), over its throughput row's
    # tokens/s (the finalist's shape); muon's, over its own
    from bench.report.quality import layout_estimates

    layout = dict(status="ok", phase="layouts", preset="tiny", global_batch=8, dp=1, tp=1, pp=1, dp_mode="ddp",
                  pp_schedule="", steps_run=24)
    thr = pd.DataFrame([dict(layout, optimizer="adamw", tokens_per_s=1000.0),
                        dict(layout, optimizer="muon", tokens_per_s=500.0)])
    text = "\n".join(layout_estimates(thr, fs))
    assert "next stable rate's" in text and "tiny, batch 8 (lr 0.005)" in text
    assert "| adamw | 1.00x | 2.0 s (1.00x) |" in text  # 2048 tokens at 1000 tokens/s
    assert f"| muon | {2048 / muon:.2f}x | {muon / 500:.1f} s ({2.048 / (muon / 500):.2f}x) |" in text


def test_tokens_to_target_interpolates_between_budgets_and_never_guesses():
    from bench.report.stats import AFTER_DIVERGED, AT_FIRST, NOT_REACHED, REACHED, tokens_to_target

    # log-linear: halfway in loss between 2^10 and 2^12 tokens is 2^11
    c = tokens_to_target([1024, 2048, 4096], [3.0, 2.5, 2.0], 2.25)
    assert c.status == REACHED and abs(c.tokens - 2896.309) < 1e-3  # 2048 * sqrt(2): halfway from 2^11 to 2^12
    assert tokens_to_target([4096, 1024, 2048], [2.0, 3.0, 2.5], 2.5).tokens == 2048  # order-free, exact hits
    assert tokens_to_target([1024, 2048], [1.0, 0.9], 2.0) == (1024, AT_FIRST)  # an upper bound, marked
    assert tokens_to_target([1024, 2048], [3.0, 2.9], 2.0) == (None, NOT_REACHED)  # no extrapolation
    assert tokens_to_target([1024, 2048, 4096], [3.0, 1.0, 2.0], 2.0).status == REACHED  # the first crossing
    # a diverged budget (no end-of-budget loss) is not reached there and never interpolated across or from
    nan = float("nan")
    assert tokens_to_target([1024, 2048, 4096], [3.0, nan, 1.0], 2.0) == (4096, AFTER_DIVERGED)
    assert tokens_to_target([1024, 2048, 4096], [3.0, None, 2.5], 2.0) == (None, NOT_REACHED)
    assert tokens_to_target([1024, 2048], [nan, 1.0], 2.0) == (2048, AFTER_DIVERGED)
    assert tokens_to_target([1024, 2048, 4096], [3.0, 1.0, nan], 2.0).status == REACHED  # crossed before it


def test_welch_and_the_winner_rule_on_constructed_rows():
    """Welch's t-test against values computed by hand (and Student's t quantiles from tables), then the rule:
    a lead counts only at p < 0.05 against every other optimizer."""
    import pandas as pd

    from bench.report.quality import verdict
    from bench.report.stats import paired, student_t_two_sided, welch

    assert abs(student_t_two_sided(2.228138852, 10) - 0.05) < 1e-8  # the tabled 97.5% quantile at 10 df
    assert abs(student_t_two_sided(12.7062047, 1) - 0.05) < 1e-7
    assert abs(student_t_two_sided(1.959963985, float("inf")) - 0.05) < 1e-8
    w = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.5])
    # by hand: means 2 and 5.1667, variances of the means 1/3 and 1.5833/3; df by Welch-Satterthwaite
    assert abs(w.t - (-3.1666667 / math.sqrt(1 / 3 + 1.5833333 / 3))) < 1e-6 and abs(w.df - 3.80594) < 1e-4
    assert 0.02 < w.p < 0.04

    def fs(*opts):
        return pd.DataFrame([{"optimizer": o, "tokens": t, "by_seed": dict(enumerate(t)), "all_reached": True}
                             for o, t in opts])

    clear = verdict(fs(("muon", [1000, 1010, 990]), ("adamw", [2000, 2050, 1950]), ("sgd", [4000, 4100, 3900])))
    assert clear.startswith("**muon** reached the target first") and "vs adamw: paired t = " in clear
    noisy = verdict(fs(("muon", [1000, 1500, 700]), ("adamw", [1200, 900, 1600])))
    assert noisy.startswith("tie within noise between muon and adamw") and "p = " in noisy
    # seeds shared by every optimizer: a seed that is hard for all cancels in the paired test, not in Welch's
    hard = (("muon", [1000, 2000, 1500]), ("adamw", [1110, 2090, 1605]))
    assert welch(hard[0][1], hard[1][1]).p > 0.5
    d = paired(hard[0][1], hard[1][1])  # differences -110, -90, -105: mean -101.67, sd 10.41, t = -16.91, 2 df
    assert d.kind == "paired" and d.df == 2 and abs(d.t - (-101.6667 / (10.4083 / math.sqrt(3)))) < 1e-3
    assert abs(d.p - student_t_two_sided(d.t, 2)) < 1e-12 and d.p < 0.01
    # the verdict tests log tokens (a speed-up is a ratio): the same 1.1x on every seed is a clear lead
    steady = (("muon", [1000, 2000, 1500]), ("adamw", [1100, 2210, 1650]))
    assert verdict(fs(*steady)).startswith("**muon** reached the target first")
    assert "paired t = " in verdict(fs(*steady)) and welch(*[t for _, t in steady]).p > 0.5


def test_speedups_are_paired_geometric_means_with_t_intervals_and_verdicts_are_holm_corrected():
    """The speed-up over AdamW: exp(mean log ratio) over seeds with exp(mean ± t(0.975, n-1) sd / sqrt(n)),
    computed here by hand with the tabled t quantile; Holm's adjustment against the worked example of Holm
    (1979)'s procedure; and a verdict whose every raw p passes but whose Holm-adjusted p does not is a tie."""
    import pandas as pd

    from bench.report.quality import verdict
    from bench.report.stats import holm, paired_speedup

    base, other = {0: 2000.0, 1: 3000.0, 2: 2400.0}, {0: 1000.0, 1: 1200.0, 2: 1000.0}
    logs = [math.log(2.0), math.log(2.5), math.log(2.4)]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    sp = paired_speedup(base, other)
    assert sp.seeds == 3 and abs(sp.ratio - math.exp(m)) < 1e-12 and abs(sp.ratio - (2.0 * 2.5 * 2.4) ** (1 / 3)) < 1e-9
    half = 4.302652730 * sd / math.sqrt(3)  # Student's t, 97.5% quantile, 2 df (tables)
    assert abs(sp.low - math.exp(m - half)) < 1e-6 and abs(sp.high - math.exp(m + half)) < 1e-6
    assert paired_speedup(base, {5: 1.0}) is None and math.isnan(paired_speedup({0: 2.0}, {0: 1.0}).low)
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([0.02]) == [0.02]

    def fs(*opts):
        return pd.DataFrame([{"optimizer": o, "tokens": t, "by_seed": dict(enumerate(t)), "all_reached": True}
                             for o, t in opts])

    # muon's lead: p = 0.031 against adamw and 0.034 against adam, each a pass alone; Holm's step-down over the
    # two tests (0.031 x 2 = 0.062) keeps the family's error at 5%, so the verdict is a tie
    lead = ("muon", [1000, 1000, 1000])
    two = verdict(fs(lead, ("adamw", [1100, 1150, 1200]), ("adam", [1100, 1200, 1200])))
    assert "p = 0.0311, Holm p = 0.0622" in two and "p = 0.034, Holm p = 0.0622" in two
    assert two.startswith("tie within noise between muon and adamw, adam")
    assert verdict(fs(lead, ("adamw", [1100, 1150, 1200]))).startswith("**muon**")  # one test: no correction


def test_a_finalist_there_by_the_smallest_budget_is_ranked_at_that_bound():
    """An optimizer whose every seed is at or under the target already at the smallest budget has no crossing
    to interpolate: it is ranked at the budget (an upper bound on its tokens), its speed-up is a lower bound,
    and two such optimizers are a tie the ladder cannot break."""
    import pandas as pd

    from bench.report.quality import _tokens_cell, speedup_cell, verdict

    def row(o, tokens=(), bounded=False):
        return {"optimizer": o, "tokens": list(tokens), "by_seed": dict(enumerate(tokens)), "seed_list": [0, 1, 2],
                "all_reached": not bounded, "bounded": bounded, "bound": 1000.0, "seeds": 3,
                "statuses": ["by the smallest budget"] if bounded else ["interpolated"]}

    adamw = row("adamw", [2000, 2100, 1900])
    lone = verdict(pd.DataFrame([row("muon", bounded=True), adamw, row("sgd", [4000, 4100, 3900])]))
    assert lone.startswith("**muon** reached the target first") and "taken as the smallest budget, 1,000" in lone
    two = verdict(pd.DataFrame([row("muon", bounded=True), row("adafactor", bounded=True), adamw]))
    assert two.startswith("tie within noise between") and "cannot order them" in two
    r = pd.Series(row("muon", bounded=True))
    assert speedup_cell(r, pd.Series(adamw)).startswith("≥ 2.00") and _tokens_cell(r).startswith("≤ 1,000")


def test_wsd_stays_at_the_peak_then_decays_linearly_to_the_floor():
    from llmopt.optim import lr_factor

    f = [lr_factor(s, "wsd", 2, 20, 0.1, 0.25) for s in range(20)]  # 2 warm-up, 13 stable, 5 decay steps
    assert f[:2] == [0.5, 1.0] and f[2:15] == [1.0] * 13
    assert [round(x, 6) for x in f[15:]] == [0.82, 0.64, 0.46, 0.28, 0.1]  # linear, the last at the floor


TOY_BASE = """
[base]
preset = "tiny-v256"
seq_len = 16
lr_schedule = "cosine"
"""
# a convergence study at a toy size, as a user writes one for their own model, data and hardware
TOY_STUDY = TOY_BASE + """[convergence]
batches = [8]
tokens_per_param = 0.005         # 4,294 tokens: 34 steps of 8 x 16
optimizers = ["adamw", "muon"]
lr_multiples = [0.333333, 1]
ladder = [0.25, 0.5, 1]
seeds = [1, 2]
"""


def _toy_study(tmp_path, monkeypatch) -> str:
    """A convergence study from a matrix file at a toy size: AdamW and Muon, one batch size, two learning rates,
    a ladder of three budgets, two evaluation seeds; the layout rows on one layout."""
    import bench.tuning as bt

    monkeypatch.setattr(bt, "THROUGHPUT_LAYOUTS", (dict(),))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "study.toml"
    path.write_text(TOY_STUDY)
    return str(path)


def test_a_convergence_study_from_a_file_end_to_end_and_a_resumed_sweep_adds_the_same_runs(tmp_path, monkeypatch,
                                                                                         capsys):
    """A [convergence] table plans the grid (its budget in tokens per parameter), then the widening, weight
    decay, ladder, seeds, precision, layout and to-target phases from the rows, and the report's section; then
    the same sweep as if killed after its first rows and resumed after the file was edited (the study travels
    in plan.json): it plans exactly the same configs and ends with the same rows. Two configs run at a time
    (--jobs 2, a core each): each config computes as one thread alone, so the rows still match to the bit."""
    import csv
    import json
    import shutil

    from bench.run import main
    from llmopt.core.shapes import PRESETS, param_count

    study = _toy_study(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert main(["--matrix", study, "--device", "cpu", "--out", str(out), "--jobs", "2"]) == 0
    saved = json.loads((out / "plan.json").read_text())
    plan, phases = saved["plan"], [e.get("phase") for e in saved["plan"]]
    assert saved["study"]["seeds"] == [1, 2] and saved["study"]["ladder"] == [0.25, 0.5, 1]
    whole = round(0.005 * param_count(PRESETS["tiny-v256"]))
    assert {e["config"]["max_tokens"] for e in plan if e.get("phase") == "grid"} == {whole}
    assert phases[:2] == ["grid"] * 2 and phases.count("ladder") == 2 * 3 * 2 and phases.count("layouts") == 2
    assert phases.count("decay") == 2 and 1 <= phases.count("to-target") <= 2
    # Muon's grid after AdamW's is settled, its AdamW part at AdamW's best rate; its finalist then again on the
    # evaluation seeds with that part at its own rate (phase adamw-lr)
    adamw = min((r for r in csv.DictReader(open(out / "results.csv")) if r["phase"] in ("grid", "widen")
                 and r["optimizer"] == "adamw"), key=lambda r: float(r["final_eval_loss"]))
    muon = [e["config"] for e in plan if e.get("phase") == "grid" and e["config"]["optimizer"] == "muon"]
    assert len(muon) == 2 and {c["adamw_lr"] for c in muon} == {float(adamw["lr"])}
    assert min(i for i, e in enumerate(plan) if e["config"]["optimizer"] == "muon") >= 2  # after AdamW's grid
    assert [e["config"]["adamw_lr"] for e in plan if e.get("phase") == "adamw-lr"] == [0.0, 0.0]
    assert all(e["config"]["seed"] in (1, 2, 3, 4, 5, 6, 7, 8) for e in plan if e.get("phase") in ("ladder", "seeds"))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(plan) and {r["status"] for r in rows} == {"ok"}
    assert {r["phase"] for r in rows} >= {"grid", "decay", "ladder", "precision", "layouts", "to-target"}
    # the loss runs went two at once, a core each; the timed phases alone on every core
    timed = {"layouts", "to-target"}
    assert all(("(--jobs)" in r["peak_flops_source"]) == (r["phase"] not in timed) for r in rows)
    assert json.loads((out / "env.json").read_text())["alone_phases"] == ["layouts", "retime", "to-target"]
    report = (out / "report.md").read_text()
    assert "ran one at a time on every core" in report
    assert "## Time to quality" in report and "### Common targets" in report and "the hard target" in report
    assert "#### tiny-v256, global batch 8 sequences: target" in report and "### Tuning budget" in report
    assert "Verdict: " in report and "old method: first crossing" in report and "tokens per parameter" in report
    assert "### Seconds to target per layout" in report and "The estimate checked" in report
    assert "### The AdamW part's learning rate" in report
    assert (out / "plots" / "budgets.png").exists() and (out / "plots" / "tuning.png").exists()
    # killed after the grid and part of the ladder: the plan as saved then, the rows written by then
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, ignore=shutil.ignore_patterns(".lock", "report.md", "plots"))
    first_ladder = phases.index("ladder")
    saved["plan"] = plan[:first_ladder + 2]
    (cut / "plan.json").write_text(json.dumps(saved))
    keep = {e["config_id"] for e in saved["plan"][:first_ladder]}
    with open(cut / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["config_id"] in keep)
    with open(study, "w") as f:  # edited since: the resume follows the protocol the sweep started with
        f.write(TOY_STUDY.replace("seeds = [1, 2]", "seeds = [5, 6]"))
    capsys.readouterr()
    assert main(["--resume", "--out", str(cut), "--jobs", "2"]) == 0
    resumed = json.loads((cut / "plan.json").read_text())["plan"]
    assert [(e["config_id"], e.get("phase"), e["config"]["seed"]) for e in resumed] == \
           [(e["config_id"], e.get("phase"), e["config"]["seed"]) for e in plan]
    again = {r["config_id"]: r for r in csv.DictReader(open(cut / "results.csv"))}
    assert again.keys() == {r["config_id"] for r in rows}
    trained = [r for r in rows if r["phase"] != "layouts"]
    assert all(again[r["config_id"]]["final_eval_loss"] == r["final_eval_loss"] for r in trained)


HORIZON_STUDY = TOY_BASE + """[convergence]
batches = [8]
tokens_per_param = {horizon}
optimizers = ["adamw", "lion"]
lr_multiples = [0.5, 1]
max_widenings = 0
weight_decays = [0.1]
ladder = [0.5, 1]
seeds = [1, 2]
more_seeds_band = [0, 0]
wall_clock = false
"""


def test_studies_at_two_horizons_are_compared_side_by_side(tmp_path, monkeypatch):
    """Issue 34: the same task, model and batch at two horizons, each tuned at its own (a study of losses only:
    no layouts or to-target phase), then side by side: speed-ups at each horizon's common targets, verdicts,
    the rankings and the tuned learning rates' transfer. Studies of different tasks, or one study twice, are
    refused in one line."""
    import csv
    import os

    from bench.report import horizons
    from bench.run import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dirs = []
    for h in (0.002, 0.004):
        (tmp_path / f"{h}.toml").write_text(HORIZON_STUDY.format(horizon=h))
        dirs.append(str(tmp_path / f"h{h}"))
        assert main(["--matrix", str(tmp_path / f"{h}.toml"), "--device", "cpu", "--out", dirs[-1], "--jobs", "2",
                     "--no-retime", "--no-report"]) == 0
        phases = {r["phase"] for r in csv.DictReader(open(os.path.join(dirs[-1], "results.csv")))}
        assert phases == {"grid", "ladder", "precision"}  # wall_clock = false: no layouts, no to-target
    out = tmp_path / "cmp"
    assert horizons.main([*dirs, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Speed-up over AdamW at each horizon's common targets" in text and "## Does the ranking hold?" in text
    assert "0.002 tokens/parameter" in text and "0.004 tokens/parameter" in text and "lr ratio" in text
    assert text.count("the hard target (") == 2 and text.count("the moderate target (") == 2  # one verdict each
    hs = [horizons.read_horizon(d) for d in dirs]
    assert hs[1].budget == 2 * hs[0].budget and hs[0].params == hs[1].params
    d = horizons.speedups(hs)
    assert set(d.optimizer) == {"adamw", "lion"} and set(d.horizon) == {h.tokens_per_param for h in hs}
    with pytest.raises(ValueError, match="same largest budget"):
        horizons.report([dirs[0], dirs[0]], str(out))
    with pytest.raises(ValueError, match="holds no results.csv"):
        horizons.report([dirs[0], str(tmp_path)], str(out))
