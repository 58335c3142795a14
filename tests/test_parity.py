"""Each parallel layout reproduces the single-process fp32 loss curve (gloo on CPU, real ranks).

The reference is computed in this process by the plain single-rank step; the layouts run as separate ranks
through ``python -m llmopt.train``, which starts them with torch's elastic launcher.
"""
import functools
import json

import pytest
import torch

from llmopt.config import TrainConfig, validate
from llmopt.step import build, evaluate, train_step

pytestmark = pytest.mark.multiprocess

COMMON = dict(preset="tiny", global_batch=8, seq_len=32, steps=5, seed=0, eval_every=2, eval_batches=2)
LAYOUTS = {
    "ddp2": ["--dp", "2"],
    "fsdp2": ["--dp", "2", "--dp-mode", "fsdp"],
    "tp2": ["--tp", "2"],
    "pp2-gpipe": ["--pp", "2", "--pp-schedule", "gpipe"],
    "pp2-1f1b": ["--pp", "2", "--pp-schedule", "1f1b"],
    "dp2xtp2": ["--dp", "2", "--tp", "2"],
    "dp2xpp2": ["--dp", "2", "--pp", "2"],
    "tp2xpp2": ["--tp", "2", "--pp", "2"],
    "ddp2-accum2": ["--dp", "2", "--grad-accum", "2"],
}


@functools.cache
def reference_run(optimizer: str) -> tuple[list[float], list[float]]:
    """(training losses, held-out eval losses after 0, 2, 4 and 5 steps) of the plain single-rank step."""
    cfg = validate(TrainConfig(optimizer=optimizer, **COMMON))
    state = build(cfg, torch.device("cpu"))
    losses, evals = [], [evaluate(state).item()]
    for s in range(cfg.steps):
        losses.append(train_step(state, s).loss.item())
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            evals.append(evaluate(state).item())
    return losses, evals


def reference(optimizer: str) -> list[float]:
    return reference_run(optimizer)[0]


def run_layout(cli, tmp_path, optimizer, extra):
    out = tmp_path / "m.json"
    args = ["-m", "llmopt.train", "--quiet", "--optimizer", optimizer, "--metrics-out", str(out)]
    for k, v in COMMON.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    r = cli(*args, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(cli, tmp_path, layout, optimizer):
    m = run_layout(cli, tmp_path, optimizer, LAYOUTS[layout])
    ref = reference(optimizer)
    assert len(m["losses"]) == len(ref)
    diff = max(abs(a - b) for a, b in zip(m["losses"], ref))
    assert diff < 1e-4, (layout, optimizer, m["losses"], ref)
    assert abs(ref[-1] - ref[0]) > 1e-3  # the curve being matched actually moves
    # the held-out eval, forward only under the layout, is the single-process eval
    ref_evals = reference_run(optimizer)[1]
    assert [e["step"] for e in m["evals"]] == [0, 2, 4, 5]
    assert max(abs(e["loss"] - r) for e, r in zip(m["evals"], ref_evals)) < 1e-5, (m["evals"], ref_evals)
    assert len(m["peak_memory_bytes_per_rank"]) == m["config"]["world_size"]


def test_3d_fsdp_lamb_matches_single_process(cli, tmp_path):
    """dp2 x tp2 x pp2 (8 ranks): LAMB's trust ratios and the clipping norm span FSDP shards, TP shards and
    pipeline stages at once."""
    m = run_layout(cli, tmp_path, "lamb", ["--dp", "2", "--tp", "2", "--pp", "2", "--dp-mode", "fsdp"])
    assert max(abs(a - b) for a, b in zip(m["losses"], reference("lamb"))) < 1e-4
