"""Training checkpoints (llmopt.dcp): a run resumed from one continues the uninterrupted run's loss curve, bit
for bit under the same layout, within the layouts' parity tolerance under another, for every optimizer; and
what is not a checkpoint of this run is one error line before any training.

The cross-layout cases run in forked ranks, every case of one world size in one set of ranks
(tests/scripts/resume_runs.py); the references are the uninterrupted single-process runs, computed here.
"""
import functools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
from llmopt.optimizers import names  # noqa: E402
from llmopt.train import main  # noqa: E402
from resume_runs import reference  # noqa: E402

pytestmark = pytest.mark.multiprocess

# Every optimizer saved and resumed across four layout pairs: FSDP2 shards to TP shards, TP to pipeline stages,
# stages back to FSDP2, FSDP2 to one process (each kind of placement written by one layout and read by
# another). The 2-D mesh (4 ranks on 2 cores: the costliest) both ways for the optimizers whose state is not
# elementwise (whole-tensor and sharded paths) and AdamW; accumulation, bf16 and fp16 (the loss scaler's state)
# once more.
PAIRS = ("fsdp2>tp2", "tp2>pp2-1f1b", "pp2-1f1b>fsdp2", "fsdp2>single")
CASES = [f"{p}:{o}" for o in names() for p in PAIRS] + [
    *(f"single>fsdp2xtp2:{o}" for o in ("muon", "adafactor", "lamb", "soap")), "fsdp2xtp2>pp2-1f1b:adamw",
    "ddp2-accum2>fsdp2:adamw", "single>ddp2-accum2:muon", "tp2>fsdp2:adamw:bf16", "fsdp2>single:adamw:fp16",
    # and the rest of fsdp2's pairs both ways, once each: to pp2 and to the 2-D mesh, from one process and the mesh
    "fsdp2>pp2-1f1b:adamw", "fsdp2>fsdp2xtp2:adamw", "fsdp2xtp2>fsdp2:muon", "single>fsdp2:lamb"]
GROUP_COUNTERS = {"soap": "step", "schedule-free": "k"}  # steps taken, counted in the parameter groups
EXACT = 1e-4  # tests/test_parity.py's tolerance for fp32 layouts
AMP = 5e-2    # and for bf16/fp16 ones (bench.results.AMP_TOLERANCE)
# tests/test_parity.py: SOAP's curve is held to its own rounding-noise floor (here the larger of the curves with
# the gradient summed in two other orders, --grad-accum 2 and 4), times this
SOAP_FLOOR = 2.0


def _launch(nproc: int, *args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "resume_runs.py"), str(nproc), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("resume")
    for mode in ("save", "resume"):
        for nproc in (1, 2, 4):
            _launch(nproc, str(out), mode, *CASES)
    name = lambda c: c.replace(">", "-to-").replace(":", "-")  # noqa: E731
    return {c: (torch.load(out / f"{name(c)}.save.pt"), torch.load(out / f"{name(c)}.resume.pt")) for c in CASES}


@functools.cache
def tolerance(optimizer: str, precision: str) -> float:
    if precision != "fp32":
        return AMP
    if optimizer != "soap":
        return EXACT
    ref = reference("soap")
    return SOAP_FLOOR * max(abs(a - b) for k in (2, 4) for a, b in zip(reference("soap", grad_accum=k), ref))


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_resumes_under_another_layout(resumed, case):
    """The state loaded under the new layout is the state saved under the old one, tensor by tensor (whole),
    exactly; and the resumed curve is the uninterrupted single-process run's within the layouts' tolerance, the
    whole curve: SOAP's within its own rounding-noise floor as in tests/test_parity.py (its update under another
    layout amplifies rounding noise, most at the last step)."""
    saved, got = resumed[case]
    optimizer, precision = (case.split(":")[1:] + ["fp32"])[:2]
    ref = reference(optimizer, precision)
    tensors = {k for k in saved["digest"] if not k.startswith("group/")}
    assert {k: got["digest"][k] for k in tensors} == {k: saved["digest"][k] for k in tensors}, case
    assert any(k.startswith("optim/") for k in tensors)
    for k in saved["digest"].keys() - tensors:  # the settings both layouts' optimizers have (ShardedMuon's are
        g, s = got["digest"][k], saved["digest"][k]  # fewer than torch's Muon's): counters and schedule included
        assert "lr" in g.keys() & s.keys() and {x: g[x] for x in g.keys() & s.keys()} == \
               {x: s[x] for x in g.keys() & s.keys()}, (case, k, g, s)
        if optimizer in GROUP_COUNTERS:  # kept in the groups, not the per-parameter state: resumed too
            assert g[GROUP_COUNTERS[optimizer]] == s[GROUP_COUNTERS[optimizer]] == 2, (case, k, g, s)
    assert got["losses"][:2] == saved["losses"]  # the checkpoint's curve so far is the resumed run's start
    assert len(got["losses"]) == len(ref) == 4
    diff = max(abs(a - b) for a, b in zip(got["losses"], ref))
    assert diff < tolerance(optimizer, precision), (case, got["losses"], ref)
    assert abs(ref[-1] - ref[0]) > 1e-3  # the curve being matched moves
    if precision == "fp16":
        assert got["scale_loaded"] == saved["scale"]  # the loss scaler's state travels with it


BASE = ["--preset", "nano", "--global-batch", "4", "--seq-len", "16", "--quiet", "--lr-schedule", "cosine",
        "--lr-warmup", "1"]


def _schedule(argv) -> list[str]:
    """Schedule-Free AdamW takes no decaying schedule (its averaging is the decay)."""
    return ["--lr-schedule", "constant"] if "schedule-free" in argv else []


def _run(tmp_path, *argv) -> dict:
    assert main([*BASE, *argv, *_schedule(argv), "--metrics-out", str(tmp_path / "m.json")]) == 0
    return json.loads((tmp_path / "m.json").read_text())


@pytest.mark.parametrize("optimizer", names())
def test_the_same_layout_resumes_bit_for_bit(tmp_path, monkeypatch, optimizer):
    """A 6-step run with a checkpoint after every step (the last 2 kept), failing at its fourth step, resumed
    from the directory: the curve is the uninterrupted run's exactly, in fp32, for every optimizer (its
    schedule, a cosine over the 6 steps, included)."""
    from llmopt.faults import FAIL_ENV

    full = _run(tmp_path, "--optimizer", optimizer, "--steps", "6")
    ck = tmp_path / "ck"
    monkeypatch.setenv(FAIL_ENV, "0:3:raise")
    with pytest.raises(RuntimeError, match="injected failure"):
        main([*BASE, "--optimizer", optimizer, "--steps", "6", "--checkpoint-dir", str(ck), "--checkpoint-every", "1",
              *_schedule([optimizer])])
    monkeypatch.delenv(FAIL_ENV)
    assert sorted(os.listdir(ck)) == [".lock", "step-00000002", "step-00000003"]
    again = _run(tmp_path, "--optimizer", optimizer, "--steps", "6", "--checkpoint-dir", str(ck))
    assert again["resumed_from_step"] == 3 and again["losses"] == full["losses"] and again["checkpoint_load_s"] > 0
    assert again["grad_norms"] == full["grad_norms"]
    assert again["checkpoints_saved"] == 1 and again["checkpoint_bytes"] > 0 and again["checkpoint_save_s"] > 0
    assert sorted(os.listdir(ck)) == [".lock", "step-00000003", "step-00000006"]  # the last two kept


def test_a_resumed_run_reads_the_batches_the_uninterrupted_one_would(tmp_path, monkeypatch):
    """Text data too (a file of Python's own source, byte tokens): the data position is the step count, so the
    resumed run's batches, and with them its losses, are the uninterrupted run's."""
    import os as os_module

    from llmopt.faults import FAIL_ENV

    text = ["--data", os_module.__file__, "--optimizer", "adam", "--steps", "5"]
    full = _run(tmp_path, *text)
    monkeypatch.setenv(FAIL_ENV, "0:2:raise")
    with pytest.raises(RuntimeError, match="injected failure"):
        main([*BASE, *text, "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1"])
    monkeypatch.delenv(FAIL_ENV)
    again = _run(tmp_path, *text, "--checkpoint-dir", str(tmp_path / "ck"))
    assert again["resumed_from_step"] == 2 and again["losses"] == full["losses"]


def test_a_checkpoint_is_also_a_model(tmp_path, capsys, monkeypatch):
    """``llmopt.export`` writes from a checkpoint the very weights ``--save`` writes at the end of the same run,
    ``llmopt.sample`` reads a checkpoint directly, and ``--init ckpt:DIR`` starts a run from its model: the
    losses of ``--init hf:`` of the export (Hugging Face's loader), in one process and under dp2 (its ranks
    load what the launcher exported once)."""
    from safetensors.torch import load_file

    from llmopt.checkpoint import INIT_EXPORT_ENV
    from llmopt.export import main as export
    from llmopt.sample import main as sample

    text = ["--data", os.__file__, "--optimizer", "schedule-free", "--lr-schedule", "constant", "--steps", "3"]
    _run(tmp_path, *text, "--checkpoint-dir", str(tmp_path / "ck"), "--save", str(tmp_path / "saved"))
    assert export([str(tmp_path / "ck"), str(tmp_path / "exported")]) == 0
    saved, exported = (load_file(tmp_path / d / "model.safetensors") for d in ("saved", "exported"))
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    capsys.readouterr()
    assert sample([str(tmp_path / "ck"), "--max-new-tokens", "8", "--prompt", "def "]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert export([str(tmp_path / "ck"), str(tmp_path / "exported")]) == 2  # never over an existing directory
    capsys.readouterr()
    assert "start from its model with --init ckpt:" in _error(capsys, "--init", f"hf:{tmp_path / 'ck'}")
    again = _run(tmp_path, "--data", os.__file__, "--init", f"hf:{tmp_path / 'exported'}", "--steps", "2")
    assert again["losses"][0] < 5.0  # the trained model, not a fresh one (ln 256 = 5.5 nats for byte tokens)
    monkeypatch.delenv(INIT_EXPORT_ENV, raising=False)  # what this process exports is its own, not a leftover
    direct = _run(tmp_path, "--data", os.__file__, "--init", f"ckpt:{tmp_path / 'ck'}", "--steps", "2")
    assert direct["losses"] == again["losses"]
    dp2 = _run(tmp_path, "--data", os.__file__, "--init", f"ckpt:{tmp_path / 'ck'}", "--steps", "2", "--dp", "2")
    assert dp2["losses"] == pytest.approx(again["losses"], abs=1e-4)  # the parity tests' fp32 tolerance
    monkeypatch.delenv(INIT_EXPORT_ENV)
    assert "not a checkpoint" in _error(capsys, "--init", f"ckpt:{tmp_path / 'saved'}")


def _events(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_continue_across_a_resume(tmp_path, monkeypatch):
    """``--log-dir``: torchtitan's metric names, one point per step and eval; a run killed after 3 of 6 steps and
    resumed into the same directory reads back as the uninterrupted run (each step once, its loss)."""
    from llmopt.faults import FAIL_ENV

    common = ["--steps", "6", "--eval-every", "2", "--eval-batches", "1", "--log-dir"]
    full = _run(tmp_path, *common, str(tmp_path / "tb-full"))
    monkeypatch.setenv(FAIL_ENV, "0:4:raise")  # after step 4 was logged, its checkpoint was not written
    with pytest.raises(RuntimeError, match="injected failure"):
        main([*BASE, *common, str(tmp_path / "tb"), "--checkpoint-dir", str(tmp_path / "ck"),
              "--checkpoint-every", "3"])
    monkeypatch.delenv(FAIL_ENV)
    _run(tmp_path, *common, str(tmp_path / "tb"), "--checkpoint-dir", str(tmp_path / "ck"))
    want, got = _events(tmp_path / "tb-full"), _events(tmp_path / "tb")
    assert {"loss_metrics/global_avg_loss", "grad_norm", "lr", "throughput(tps)", "tflops", "eval/loss"} <= set(got)
    assert got["loss_metrics/global_avg_loss"] == list(enumerate(full["losses"], start=1))  # each step once
    assert got["eval/loss"] == want["eval/loss"] and [s for s, _ in got["eval/loss"]] == [0, 2, 4, 6]
    assert got["lr"] == want["lr"] and got["grad_norm"] == want["grad_norm"]


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    """A save killed half-way leaves its ``.tmp-`` directory, never a step directory: the run resumes from the
    last complete one, and the next save removes the remains."""
    ck = tmp_path / "ck"
    _run(tmp_path, "--steps", "2", "--checkpoint-dir", str(ck))
    (ck / ".tmp-step-00000004").mkdir()
    (ck / ".tmp-step-00000004" / "__0_0.distcp").write_bytes(b"half")
    (ck / "step-00000003").mkdir()  # a directory without its train_state.json is not a checkpoint either
    again = _run(tmp_path, "--steps", "4", "--checkpoint-dir", str(ck))
    assert again["resumed_from_step"] == 2 and not (ck / ".tmp-step-00000004").exists()


def _error(capsys, *argv) -> str:
    assert main([*BASE, *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_a_checkpoint_that_does_not_fit_the_run_is_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    _run(tmp_path, "--steps", "2", "--checkpoint-dir", str(ck))
    step = ck / "step-00000002"
    before = {p: p.read_bytes() for p in step.iterdir()}
    assert "--optimizer adamw, this run has lamb" in _error(capsys, "--steps", "4", "--resume-from", str(step),
                                                               "--optimizer", "lamb")
    assert "--precision fp32, this run has bf16" in _error(capsys, "--steps", "4", "--resume-from", str(ck),
                                                           "--precision", "bf16")
    assert "--seed 0, this run has 1" in _error(capsys, "--steps", "4", "--resume-from", str(ck), "--seed", "1")
    assert "n_embd 64, this run's has 128" in _error(capsys, "--steps", "4", "--resume-from", str(ck),
                                                     "--preset", "tiny")
    assert "after step 2 of this run's 2" in _error(capsys, "--steps", "2", "--checkpoint-dir", str(ck))
    assert "not a checkpoint" in _error(capsys, "--steps", "4", "--resume-from", str(tmp_path))
    assert "has no effect without --checkpoint-dir" in _error(capsys, "--checkpoint-every", "2")
    metadata = (step / ".metadata").read_bytes()
    planted = tmp_path / "planted"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(planted),))

    import pickle

    (step / ".metadata").write_bytes(pickle.dumps(Evil()))
    assert "names posix.mkdir" in _error(capsys, "--steps", "4", "--resume-from", str(step))
    assert not planted.exists()  # torch's own reader would have unpickled it
    (step / ".metadata").write_bytes(metadata)
    state = (step / "train_state.json").read_text()
    for key, bad in (("rng", ["x"]), ("evals", [{"nope": 1}]), ("scheduler", {"last_epoch": "late"}),
                     ("groups", [{"lr": None}, {"lr": None}])):
        (step / "train_state.json").write_text(json.dumps(dict(json.loads(state), **{key: bad})))
        assert "train_state.json is malformed" in _error(capsys, "--steps", "4", "--resume-from", str(step))
    (step / "train_state.json").write_text(state)
    (step / "__0_0.distcp").write_bytes(b"truncated")
    assert "cannot be loaded" in _error(capsys, "--steps", "4", "--resume-from", str(step))
    (step / "train_state.json").write_text("{")
    assert "train_state.json is unreadable" in _error(capsys, "--steps", "4", "--resume-from", str(step))
    assert {p.name for p in step.iterdir()} == {p.name for p in before}  # nothing overwritten or removed


def test_a_directory_another_run_is_writing_is_refused(tmp_path, capsys):
    from llmopt import dcp

    ck = tmp_path / "ck"
    held = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                             f"os.makedirs({str(ck)!r}, exist_ok=True)\n"
                             f"f = open({str(ck / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                             "f.write(str(os.getpid())); f.flush()\n"
                             "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        assert f"another run (PID {held.pid}) is writing checkpoints there" in _error(capsys, "--checkpoint-dir",
                                                                                        str(ck))
    finally:
        held.kill()
        held.wait()
    assert not dcp.complete(str(ck))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ck / ".tmp-step-00000002").symlink_to(elsewhere)  # a save would write into it, a later one delete it
    assert "is a symbolic link" in _error(capsys, "--checkpoint-dir", str(ck), "--steps", "2")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("dp, sig", [(1, signal.SIGTERM), (2, signal.SIGUSR2)], ids=["single-SIGTERM", "dp2-SIGUSR2"])
def test_a_stop_signal_checkpoints_after_the_step_under_way_and_the_same_command_continues(tmp_path, dp, sig):
    """What SLURM's requeues rest on, without SLURM: a run with --checkpoint-dir waiting before its step 3
    (LLMOPT_FAIL_AT wait) is sent SIGTERM or SIGUSR2 (to the launcher only, under dp2: it passes it on to its
    ranks, which agree on the step), saves after that step, exits 75 with one line; the same command continues
    it to the uninterrupted run's losses, bit for bit."""
    from llmopt.core import cli as codes
    from llmopt.faults import FAIL_ENV

    argv = [*BASE, "--optimizer", "adamw", "--steps", "6", "--dp", str(dp)]
    full = _run(tmp_path, *argv[len(BASE):])
    ck = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{FAIL_ENV: "0:3:wait"})
    cmd = [sys.executable, "-m", "llmopt.train", *argv, "--checkpoint-dir", str(ck), "--no-final-checkpoint"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    while not said or "waiting for a stop signal before step 3" not in said[-1]:  # rank 0, before step 3
        said.append(p.stderr.readline())
        assert said[-1], "".join(said)  # not ended
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == codes.PREEMPTED, err
    assert err.strip().splitlines()[-1] == (f"error: stopped by {signal.Signals(sig).name} after 4 steps, with a "
                                            f"checkpoint in {ck}; the same command continues the run")
    assert sorted(os.listdir(ck)) == [".lock", "step-00000004"]
    again = _run(tmp_path, *argv[len(BASE):], "--checkpoint-dir", str(ck), "--no-final-checkpoint")
    assert again["resumed_from_step"] == 4 and again["losses"] == full["losses"]
    assert sorted(os.listdir(ck)) == [".lock", "step-00000004"]  # none after the last step
    # the timing warm-up (1 step) left out at the start and again after the resume: steps 1, 2, 3 and 5 timed
    timed = [ms for i, ms in enumerate(again["step_time_ms"]) if i not in (0, 4)]
    assert again["tokens_per_s"] == pytest.approx(4 * 16 * len(timed) / (sum(timed) / 1e3))


def test_a_sweeps_configs_checkpoint_resume_and_log_each_their_own(tmp_path, cli):
    """``bench.run --checkpoint-every 2 --log-dir DIR`` on the local executor: a config failing at step 5 keeps
    its checkpoint (``OUT/checkpoints/<id>``), an ok row's is removed; ``--resume --retry failed`` continues the
    failed config from it to the losses of an uninterrupted run; each config's TensorBoard events are in
    ``DIR/<id>``, the resumed one's each step once."""
    import csv

    from llmopt.faults import FAIL_ENV

    m = tmp_path / "m.toml"
    m.write_text("[base]\nsteps = 6\nseq_len = 16\nglobal_batch = 4\npreset = \"nano\"\n[matrix]\nseed = [0, 1]\n")
    out, tb = tmp_path / "o", tmp_path / "tb"
    flags = ["--checkpoint-every", "2", "--log-dir", str(tb), "--no-warm-up", "--no-retime", "--no-report"]
    r = cli("-m", "bench.run", "--matrix", str(m), "--out", str(out), *flags, env={FAIL_ENV: "0:5:raise:1"})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    with open(out / "results.csv") as f:
        first = {row["seed"]: row for row in csv.DictReader(f)}
    ok, failed = first["0"], first["1"]
    assert ok["status"] == "ok" and failed["status"] == "failed", failed
    assert sorted(os.listdir(out / "checkpoints")) == [failed["config_id"]]
    assert "step-00000004" in os.listdir(out / "checkpoints" / failed["config_id"])
    r = cli("-m", "bench.run", "--resume", "--out", str(out), "--retry", "failed", *flags)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(out / "results.csv") as f:
        resumed = {row["seed"]: row for row in csv.DictReader(f)}["1"]
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == "4", resumed
    assert os.listdir(out / "checkpoints") == []
    config = str(out / "configs" / f"{resumed['config_id']}.json")  # run as the sweep ran it: one thread
    r = cli("-m", "llmopt.train", "--config", config, "--quiet", "--metrics-out", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    uninterrupted = json.loads((tmp_path / "m.json").read_text())["losses"]
    with open(out / "steps.csv") as f:
        losses = [r["loss"] for r in csv.DictReader(f) if r["config_id"] == resumed["config_id"]]
    assert losses == [f"{x:.8g}" for x in uninterrupted]
    assert sorted(os.listdir(tb)) == sorted([ok["config_id"], failed["config_id"]])
    steps = [s for s, _ in _events(tb / resumed["config_id"])["loss_metrics/global_avg_loss"]]
    assert steps == list(range(1, 7))


def test_tensorboard_mfu_is_against_a_datasheet_peak_only(tmp_path):
    """``mfu(%)`` (torchtitan's name) is logged only where a peak is stated: a known GPU's datasheet figure
    (``llmopt.core.peaks``); a CPU run has none, so none is logged. The arithmetic checked with a stand-in peak."""
    from llmopt.core.config import TrainConfig, validate
    from llmopt.core.peaks import datasheet_peak
    from llmopt.loop import Board
    from llmopt.step import build

    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    cfg = validate(TrainConfig(preset="nano", steps=1, seq_len=16, global_batch=4))
    board = Board(str(tmp_path / "cpu"), build(cfg, torch.device("cpu")), 0)
    board.step(1, 2.0, 1.0, 100.0)
    board.close()
    assert board.peak is None and "mfu(%)" not in _events(tmp_path / "cpu")
    board = Board(str(tmp_path / "gpu"), build(cfg, torch.device("cpu")), 0)
    board.peak = 1e9  # as a GPU's datasheet would give
    board.step(1, 2.0, 1.0, 100.0)
    board.close()
    ((step, got),) = _events(tmp_path / "gpu")["mfu(%)"]
    assert step == 1 and got == pytest.approx(100 * cfg.tokens_per_step / 0.1 * board.flops / 1e9, rel=1e-6)
