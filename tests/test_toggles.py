"""Toggles that must not change what is computed: compile, activation checkpointing, the Accelerate engine,
AMP under sharded layouts, and the loss scaler when one rank overflows."""
import json
import os
from dataclasses import replace

import pytest
import torch

from conftest import run_cli
from llmopt.core.config import TrainConfig, validate
from llmopt.step import build, train_step

CPU = torch.device("cpu")
BASE = TrainConfig(preset="tiny", global_batch=8, seq_len=32, steps=4, optimizer="adamw")


def losses(cfg, steps=4):
    state = build(validate(cfg), CPU)
    return [train_step(state, s).loss.item() for s in range(steps)]


@pytest.fixture(scope="module")
def eager():
    return losses(BASE)


def test_activation_checkpointing_matches_eager(eager):
    ac = losses(replace(BASE, activation_checkpointing=True))
    assert max(abs(a - b) for a, b in zip(ac, eager)) < 1e-5, (ac, eager)
    assert abs(eager[-1] - eager[0]) > 1e-3  # the curve being matched moves


def test_compile_matches_eager(eager):
    compiled = losses(replace(BASE, compile=True))
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-4, (compiled, eager)


def test_accelerate_engine_matches_native_step():
    """The Accelerate peer trains HF's model with torch's AdamW; llmopt's step trains the same model from the
    same weights on the same tokens: the loss curves agree (fp32, clipping on in both)."""
    hf = replace(BASE, model_impl="hf")
    native, acc = losses(hf), losses(replace(hf, engine="accelerate"))
    assert max(abs(a - b) for a, b in zip(acc, native)) < 1e-4, (acc, native)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--dp", "2", "--dp-mode", "fsdp"], ["--tp", "2"]], ids=["fsdp2", "tp2"])
def test_bf16_under_sharded_layouts_tracks_fp32(cli, tmp_path, layout, eager):
    out = tmp_path / "m.json"
    args = ["-m", "llmopt.train", "--quiet", "--precision", "bf16", "--metrics-out", str(out), "--preset", "tiny",
            "--global-batch", "8", "--seq-len", "32", "--steps", "4", "--optimizer", "adamw", *layout]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())["losses"]
    assert max(abs(a - b) for a, b in zip(got, eager)) < 0.05, (got, eager)  # the AMP tolerance of the reports
    assert got != eager  # bf16 really ran


SCALER_LAYOUTS = {"ddp2": "dp=2", "fsdp2": "dp=2,dp_mode=fsdp", "tp2": "tp=2", "pp2": "pp=2"}
# layout: (spec, ranks, mesh dimensions the gradients are spread over)
NORM_LAYOUTS = {"tp2": ("tp=2", 2, 1), "fsdp2": ("dp=2,dp_mode=fsdp", 2, 1),
                "fsdp2xtp2": ("dp=2,dp_mode=fsdp,tp=2", 4, 2), "tp2xpp2": ("tp=2,pp=2", 4, 2)}


def _rank_script(name: str, nproc: int, out, layouts) -> None:
    """tests/scripts/<name> over several layouts of one world size in one set of ranks."""
    r = run_cli(os.path.join(os.path.dirname(__file__), "scripts", name), str(nproc), str(out), *layouts)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def scaler_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaler")
    _rank_script("scaler_inf.py", 2, out, SCALER_LAYOUTS.values())
    return out


@pytest.fixture(scope="module")
def norm_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("norms")
    for nproc in (2, 4):
        _rank_script("norm_collectives.py", nproc, out, [spec for spec, n, _ in NORM_LAYOUTS.values() if n == nproc])
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", SCALER_LAYOUTS)
def test_grad_scaler_skips_the_same_step_on_every_rank(scaler_runs, layout):
    """An inf in one rank's gradient (after the data-parallel sync, so no collective spreads it; under TP in one
    rank's shard, under PP in one stage): every rank skips that step and halves its scale, and the replicas stay
    identical. Under PP the first stage never scales a loss, yet it unscales and updates with the same scale."""
    ranks = [json.loads((scaler_runs / SCALER_LAYOUTS[layout] / f"rank{i}.json").read_text()) for i in range(2)]
    for rec in ranks:
        clean, poisoned, after = rec["steps"]
        assert not clean["skipped"] and poisoned["skipped"] and not after["skipped"], rec
        assert poisoned["scale_after"] == poisoned["scale_before"] / 2  # torch's backoff factor 0.5
        assert rec["after"] == rec["before"]  # the update was skipped
    assert ranks[0]["steps"] == ranks[1]["steps"]  # one scale on every rank, stages included
    if layout != "pp2":  # replicas (DP) or one model seen through its shards (TP): the same weights
        assert ranks[0]["before"] == ranks[1]["before"] and ranks[0]["after"] == ranks[1]["after"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", NORM_LAYOUTS)
def test_gradient_norm_is_one_reduction_per_mesh_dimension(norm_runs, layout):
    """torch's get_total_norm over the whole model's gradients, replicated TP parameters included (DTensors on
    the TP mesh, as torchtitan's NoParallel): one all-reduce per mesh dimension the gradients are spread over
    (PP's stage sum counted), not one per tensor (the per-tensor full_tensor() it replaced made one per
    parameter)."""
    spec, _, dims = NORM_LAYOUTS[layout]
    got = json.loads((norm_runs / f"{spec}.json").read_text())
    assert got["parameters"] > 20 and got["collectives"] == dims, got
    assert got["norm"] > 0
