"""Time to quality: the learning-rate schedule, evals and targets, divergence, the gradient noise scale, and
the convergence matrix's tuning logic."""
import math
from dataclasses import replace

import pytest
import torch

from llmopt.config import TrainConfig, validate
from llmopt.metrics import NoiseScale, gradient_noise_scale
from llmopt.runner import measure
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


def _row(opt, batch, lr, tokens=None, final=1.0, status="ok", precision="fp32"):
    return {"config_id": f"{opt}-{batch}-{lr}-{precision}", "optimizer": opt, "global_batch": batch, "lr": lr,
            "precision": precision, "status": status, "tokens_to_target": tokens, "final_eval_loss": final}


def test_tuning_picks_by_tokens_then_loss_and_widens_edges_once():
    from bench import tuning
    from bench.matrix import LR_STEP

    rows = [_row("adamw", 4, 1e-3, final=2.0), _row("adamw", 4, 3e-3, tokens=500, final=0.9),
            _row("adamw", 4, 9e-3, tokens=300, final=0.95),   # reached first: best, at the high edge
            _row("sgd", 4, 0.03, final=1.5), _row("sgd", 4, 0.1, final=1.2), _row("sgd", 4, 0.3, status="diverged")]
    g = tuning.groups(rows)
    assert tuning.best(g[("adamw", "4", "fp32")])["lr"] == 9e-3 and tuning.edge(g[("adamw", "4", "fp32")]) == "high"
    assert tuning.best(g[("sgd", "4", "fp32")])["lr"] == 0.1 and tuning.edge(g[("sgd", "4", "fp32")]) is None
    assert tuning.winners(rows)["4"]["optimizer"] == "adamw"
    base = dict(TrainConfig().__dict__, device="cpu", grad_accum=1)
    plan = [{"config_id": r["config_id"], "config": dict(base, optimizer=r["optimizer"], global_batch=r["global_batch"],
                                                         lr=r["lr"]), "phase": "grid"} for r in rows]
    more = tuning.followups("convergence", plan, rows)
    got = [(e["phase"], e["config"]["optimizer"], e["config"]["lr"]) for e in more]
    assert got == [("widen", "adamw", 9e-3 * LR_STEP)]
    # once widened, the group is settled even if the new lr wins again; then the winner runs in bf16
    plan += more
    rows.append(_row("adamw", 4, 9e-3 * LR_STEP, tokens=200, final=0.9))
    rows[-1]["config_id"] = more[0]["config_id"]
    more = tuning.followups("convergence", plan, rows)
    got = [(e["phase"], e["config"]["precision"], e["config"]["lr"]) for e in more]
    assert got == [("precision", "bf16", 9e-3 * LR_STEP)]
    assert tuning.followups("default", plan, rows) == []
    # then the winner's shape as throughput rows on each layout (no target, no evals)
    plan += more
    rows.append(dict(_row("adamw", 4, 9e-3 * LR_STEP, tokens=200, precision="bf16"), config_id=more[0]["config_id"]))
    more = tuning.followups("convergence", plan, rows)
    assert {e["phase"] for e in more} == {"layouts"} and len(more) == len(tuning.LAYOUTS)
    assert all(e["config"]["target_gap"] == 0 and e["config"]["eval_every"] == 0 for e in more)
    layouts = {(e["config"]["dp"], e["config"]["tp"], e["config"]["pp"]) for e in more}
    assert layouts == {(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)}
