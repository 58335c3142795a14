"""The analytic memory model against torch's MemTracker on tiny single-process configs (multi-rank layouts
are checked through the harness in test_bench.py)."""
import pytest
import torch

from llmopt.config import TrainConfig, validate
from llmopt.memory import predict_memory
from llmopt.metrics import tracked_memory_step
from llmopt.step import build, train_step


@pytest.mark.parametrize("kw", [{}, {"grad_accum": 4}, {"optimizer": "sgd"}, {"precision": "bf16"},
                                {"seq_len": 256, "global_batch": 4},
                                {"precision": "bf16", "seq_len": 256, "global_batch": 4}], ids=str)
def test_prediction_matches_tracked_memory(kw):
    cfg = validate(TrainConfig(**kw))
    state = build(cfg, torch.device("cpu"))
    train_step(state, 0)  # optimizer state exists from the first step on
    measured = tracked_memory_step(state, 1)
    predicted = predict_memory(cfg)
    assert abs(predicted.total / measured["total"] - 1) < 0.15, (measured, predicted)
    # categories that are exact by construction
    assert predicted.parameters == measured["parameters"]
    assert abs(predicted.optimizer_state - measured["optimizer_state"]) < 1024
    assert (predicted.gradients > 0) == (measured["gradients"] > 0)
