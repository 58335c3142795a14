"""The analytic memory model against torch's MemTracker on tiny single-process configs (multi-rank layouts
are checked through the harness in test_bench.py)."""
import pytest
import torch

from conftest import REFERENCE_DIR, REFERENCES
from llmopt.core.config import TrainConfig, validate
from llmopt.instruments import tracked_memory_step
from llmopt.memory import predict_memory
from llmopt.step import build, train_step


@pytest.mark.parametrize("kw", [{}, {"grad_accum": 4}, {"optimizer": "sgd"}, {"optimizer": "lion"},
                                {"optimizer": "schedule-free"}, {"optimizer": "soap"}, {"precision": "bf16"},
                                {"seq_len": 256, "global_batch": 4},
                                {"precision": "bf16", "seq_len": 256, "global_batch": 4}], ids=str)
def test_prediction_matches_tracked_memory(kw):
    cfg = validate(TrainConfig(**kw))
    state = build(cfg, torch.device("cpu"))
    train_step(state, 0)  # optimizer state exists from the first step on
    measured = tracked_memory_step(state, lambda: train_step(state, 1))
    predicted = predict_memory(cfg)
    assert abs(predicted.total / measured["total"] - 1) < 0.15, (measured, predicted)
    # categories that are exact by construction
    assert predicted.parameters == measured["parameters"]
    assert abs(predicted.optimizer_state - measured["optimizer_state"]) < 1024
    assert (predicted.gradients > 0) == (measured["gradients"] > 0)


def test_every_reference_is_checked():
    assert {"cpu", "cpu-peers", "cpu-extras", "cpu-convergence", "cpu-convergence-horizon/long"} <= set(REFERENCES)


@pytest.mark.parametrize("reference", REFERENCES)
def test_prediction_matches_the_committed_reference_runs(reference):
    """Every ok row of a committed reference sweep (multi-rank layouts, AMP, accumulation, checkpointing,
    compile, the HF peers): the prediction, recomputed from the row's config by the current model, within
    15% of what was measured."""
    import pandas as pd

    from bench.results import row_config

    rows = pd.read_csv(REFERENCE_DIR / reference / "results.csv")
    rows = rows[rows.status == "ok"]
    misses = []
    for _, row in rows.iterrows():
        cfg = row_config(row)
        err = predict_memory(cfg).total / row.peak_memory_bytes - 1
        if abs(err) > 0.15:
            misses.append(f"{row.config_id}: {err:+.1%}")
    assert len(rows) >= 3 and not misses, misses  # the smallest reference (h200-mfu) has 3 rows


def test_memtracker_private_hook_is_still_there():
    """llmopt.instruments overrides MemTracker's private _pre_fw_hook and reads attributes behind it: a torch
    upgrade that renames them must fail here, not silently measure one micro-batch instead of a step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    assert callable(getattr(MemTracker, "_pre_fw_hook", None))
    assert hasattr(tracker, "memory_tracking") and hasattr(tracker, "_mod_tracker")
    assert hasattr(tracker._mod_tracker, "is_bw") and hasattr(tracker._mod_tracker, "parents")
    assert callable(getattr(tracker._mod_tracker, "get_known_fqn", None))
    # the nested optimizer state's override calls what MemTracker's own calls, with the same arguments
    assert callable(getattr(MemTracker, "_track_optimizer_states", None))
    assert callable(getattr(MemTracker, "_update_and_maybe_create_winfos", None))


def test_ddp_bucket_memory_is_the_gradient_size(cli, tmp_path):
    """Under DDP the tracked gradients include its buckets: one gradient's worth of bytes per parameter, as
    the memory model predicts exactly at the shape of the extras reference (peak at the start of backward)."""
    import json

    out = tmp_path / "m.json"
    r = cli("-m", "llmopt.train", "--quiet", "--dp", "2", "--steps", "2", "--global-batch", "8", "--seq-len", "64",
            "--memory-breakdown", "--metrics-out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(out.read_text())
    assert m["memory_breakdown"]["gradients"] == m["predicted_memory"]["gradients"] > 0


@pytest.mark.parametrize("optimizer, steps, counted", [("soap", 12, 21), ("soap", 10, 11), ("soap", 8, 9),
                                                       ("adamw", 12, 13)])
def test_the_memory_step_is_an_optimizers_heaviest_when_the_run_reaches_one(optimizer, steps, counted):
    """SOAP refreshes its eigenbases on its 11th, 21st, ... step, the run's peak: a run that reaches one (the step
    measured after it counted) is measured at one, not at an ordinary step that misses it (a 128-step run's
    129th step read half the predicted peak); a run that never refreshes, and any other optimizer, is measured
    at the step after it."""
    from llmopt.loop import memory_step

    cfg = validate(TrainConfig(optimizer=optimizer, steps=steps))
    state = build(cfg, torch.device("cpu"))
    for i in range(steps):
        train_step(state, i)
    memory_step(state)
    taken = {g["step"] if not torch.is_tensor(g["step"]) else int(g["step"].item())
             for g in state.optimizer.param_groups if "step" in g}
    if not taken:  # torch's optimizers count per parameter
        taken = {int(s["step"]) for s in state.optimizer.state.values()}
    assert taken == {counted}
