"""The cost model's price of an optimizer's update (issue 38): the collectives it predicts against those a real
sharded step makes, the counted operations and bytes against what the optimizers' code must do, the committed
fit against its reference, and the sweep's predicted_optimizer_ms column."""
import json
import math
import os
from pathlib import Path

import pytest

from conftest import run_cli
from llmopt.core.config import TrainConfig, validate
from llmopt.core.shapes import PRESETS, stage_tensors

ROOT = Path(__file__).resolve().parent.parent
# layout: its TrainConfig fields, ranks
# (ddp2xtp2: DDP beside TP replicates the TP shards over a 2-D mesh, where Muon's work is not split)
LAYOUTS = {"dp=2,dp_mode=fsdp": (dict(dp=2, dp_mode="fsdp"), 2), "tp=2": (dict(tp=2), 2),
           "dp=2,dp_mode=fsdp,tp=2": (dict(dp=2, dp_mode="fsdp", tp=2), 4), "dp=2,tp=2": (dict(dp=2, tp=2), 4)}


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    out = tmp_path_factory.mktemp("update-collectives")
    for nproc in (2, 4):
        r = run_cli(os.path.join(os.path.dirname(__file__), "scripts", "update_collectives.py"), str(nproc), str(out),
                    *[k for k, (_, n) in LAYOUTS.items() if n == nproc])
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_update_makes_the_collectives_the_cost_model_prices(collectives, layout):
    """One step of Muon, Adafactor, SOAP and LAMB under FSDP2, TP, both, and DDP beside TP: the collectives
    DTensor's CommDebugMode counts are the calls ``optimizer_comm`` prices (gathers per bucket and placement,
    strided shards one at a time, Muon's two all-to-alls per bucket on a 1-D mesh, LAMB's norms and Adafactor's
    sums per sharded mesh dimension)."""
    got = json.loads((collectives / f"{layout}.json").read_text())
    assert set(got) == {"muon", "adafactor", "soap", "lamb"}
    for name, counts in got.items():
        assert counts["counted"] > 0, (name, counts)
        assert counts["predicted"] == counts["counted"], (layout, name, counts)


def test_the_counted_steps_are_what_the_optimizers_code_does():
    """The counting (``bench.advisor.update``) against facts of the implementations: torch's fused AdamW is a
    couple of calls for the whole model and reads the parameter, gradient and both moments and writes three of
    them (28 bytes per value at least); lion-pytorch steps each tensor in several operations; on FSDP2 shards
    both step the local shards as plain tensors (``OnShards``): the same operations as on whole tensors and no
    DTensor call, and so do Adafactor (its sums from the shards) and SOAP (whole tensors gathered)."""
    from bench.advisor.update import profiles

    plain = profiles(PRESETS["tiny"], "auto", False, ["adamw", "lion", "adafactor"])
    sharded = profiles(PRESETS["tiny"], "auto", True, ["adamw", "lion", "adafactor", "soap"])
    tensors = 2 + 12 * PRESETS["tiny"].n_layer + 2
    assert plain["adamw"].plain_ops * tensors <= 6 and 28 <= plain["adamw"].plain_bytes <= 40, plain["adamw"]
    assert plain["lion"].plain_ops >= 4 and plain["lion"].plain_bytes >= 20, plain["lion"]
    for name in ("adamw", "lion"):
        assert sharded[name].plain_ops == plain[name].plain_ops, (name, sharded[name], plain[name])
    for name in ("adamw", "lion", "adafactor", "soap"):
        assert sharded[name].dtensor_calls == 0 and sharded[name].plain_ops > 0, (name, sharded[name])


def test_without_a_profile_only_flops_and_collectives_are_priced():
    """update_seconds is linear in what it prices: no profile, no dispatch or bytes; a profile adds them."""
    from dataclasses import replace

    from bench.advisor.costmodel import Hardware, Link, update_seconds
    from bench.advisor.update import UpdateProfile

    link = Link(1e9, 1e-5)
    hw = Hardware("cpu", {"fp32": 1e11, "bf16": 1e11}, 1e12, 2, 1, link, link, shared=True, op_overhead=1e-6,
                  dtensor_call_overhead=1e-5, dtensor_op_overhead=1e-6, memory_bandwidth=1e10, update_flop_rate=1e11)
    cfg = validate(TrainConfig(optimizer="muon"))
    bare, _ = update_seconds(cfg, hw, None)
    profile = UpdateProfile(plain_ops=2.0, dtensor_calls=0.0, dtensor_ops=0.0, plain_bytes=40.0, dtensor_bytes=0.0)
    own, comm = update_seconds(cfg, hw, profile)
    values = sum(math.prod(t) for t in stage_tensors(cfg, 0))
    tensors = 2 + 12 * cfg.model_config.n_layer + 2
    assert comm == 0 and own == pytest.approx(bare + tensors * 2 * 1e-6 + 40 * values / 1e10)
    assert update_seconds(cfg, replace(hw, update_flop_rate=2e11), None)[0] == pytest.approx(bare / 2)


def test_the_committed_update_fit_recomputes_from_its_reference():
    """results/reference/cpu-optimizers/update-fit.json is what fitting that sweep gives, with the link and
    per-call overhead it records (the fit is a figure: it must recompute)."""
    from bench.advisor.costmodel import Link
    from bench.advisor.probe import REFERENCES, UPDATE_CONSTANTS, UPDATE_FIT, UPDATE_REFERENCE, fit_update_reference
    from bench.advisor.update import profiles

    committed = json.loads((REFERENCES / UPDATE_REFERENCE / UPDATE_FIT).read_text())
    fit = fit_update_reference(Link(committed["link_bandwidth"], committed["link_latency"]))
    assert fit["call_overhead"] == pytest.approx(committed["call_overhead"], rel=1e-9)
    for k in UPDATE_CONSTANTS:
        assert fit[k] == pytest.approx(committed[k], rel=1e-6), k
    assert committed["op_overhead"] > 0 and committed["memory_bandwidth"] > 0
    if committed["dtensor_call_overhead"] > 0:  # a DTensor call dispatches more than a plain operation
        assert committed["dtensor_call_overhead"] > committed["op_overhead"]
    else:  # unidentified: the sweep's optimizers step plain shards; a zero price is harmless only while they do
        from llmopt.optimizers import names

        sharded = profiles(PRESETS["tiny"], "auto", True, list(names()))
        assert all(p.dtensor_calls == 0 for p in sharded.values()), sharded


def test_the_counting_cache_key_follows_the_optimizers_code(tmp_path, monkeypatch):
    """A cached count is reused only for the same code: editing an optimizer file changes the key; the same
    bytes checked out again (a fresh clone: new modification times) keep it."""
    from bench.advisor.update import cache_key
    from llmopt.optimizers import PLUGINS_ENV

    plugin = tmp_path / "toy.py"
    plugin.write_text("SPEC = None\n")
    monkeypatch.setenv(PLUGINS_ENV, str(plugin))
    first = cache_key(PRESETS["tiny"], "auto", True)
    os.utime(plugin, (1, 1))  # touched, not edited
    assert cache_key(PRESETS["tiny"], "auto", True) == first
    plugin.write_text("SPEC = None  # edited\n")
    assert cache_key(PRESETS["tiny"], "auto", True) != first
