"""The optimizer registry (llmopt.optimizers): an optimizer is one file, read by every part of llmopt that knows
optimizers, including one from a file outside the package (LLMOPT_OPTIMIZERS); and what the new optimizers
need beyond an update (Schedule-Free's evaluated weights, its schedule)."""
import csv
import json
import os
import re
import textwrap

import pytest
import torch

import llmopt.optimizers as registry
from conftest import ROOT, one_error_line, run_cli

# A toy optimizer, as a user would write one: plain SGD without momentum (no state), from torch.
TOY = textwrap.dedent('''
    """Plain SGD, no momentum: a toy optimizer from a file outside llmopt."""
    from llmopt.optimizers import OptimizerSpec, nothing


    def build(model, lr, weight_decay, impl, fused_ok):
        import torch

        from llmopt.optim import param_groups

        return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.0)


    SPEC = OptimizerSpec(name="toy-sgd", about="plain SGD (a toy from a file)", build=build, default_lr=0.5,
                         lr_centre=0.5, state_bytes=nothing)
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy's file, named in LLMOPT_OPTIMIZERS for this process and every process it starts."""
    path = tmp_path / "toy_sgd.py"
    path.write_text(TOY)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(path))
    registry.registry.cache_clear()
    yield str(path)
    monkeypatch.delenv(registry.PLUGINS_ENV)
    registry.registry.cache_clear()


def test_every_optimizer_has_one_spec_and_the_readme_table_lists_them():
    names = registry.names()
    assert names[:6] == ("sgd", "adam", "adamw", "lamb", "muon", "adafactor")
    assert {"lion", "schedule-free", "soap"} <= set(names)
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("| `--optimizer` | what it updates, and how |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert rows == list(names)
    for line, name in zip(table.splitlines()[2:], names):  # the defaults column states the spec's default lr
        lr = re.search(r"\blr ([0-9.e-]+)", line.split("|")[4])
        assert lr and float(lr.group(1)) == registry.spec(name).default_lr, (name, line)


def test_a_toy_optimizer_from_one_file_runs_through_train_memory_a_matrix_and_the_report(toy, tmp_path):
    from bench.matrix import expand
    from llmopt.core.config import TrainConfig, validate
    from llmopt.memory import predict_memory

    cfg = validate(TrainConfig(optimizer="toy-sgd"))
    assert cfg.lr == 0.5 and predict_memory(cfg).optimizer_state == 0  # its default lr, its state formula
    plan = expand("optimizers", "cpu", 2)
    assert sum(e.config.optimizer == "toy-sgd" for e in plan) == 5  # one per baseline layout
    conv = expand("convergence", "cpu", 2)
    assert {e.config.lr for e in conv if e.config.optimizer == "toy-sgd"} == {0.25, 0.5, 1.0}  # x1/2, x1, x2 its centre

    metrics = tmp_path / "m.json"
    r = run_cli("-m", "llmopt.train", "--optimizer", "toy-sgd", "--steps", "4", "--metrics-out", str(metrics))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(metrics.read_text())
    assert m["config"]["optimizer"] == "toy-sgd" and m["losses"][-1] < m["losses"][0]

    matrix = tmp_path / "m.toml"
    matrix.write_text('[base]\nsteps = 3\n[matrix]\noptimizer = ["adamw", "toy-sgd"]\ndp = [1, 2]\n')
    out = tmp_path / "sweep"
    r = run_cli("-m", "bench.run", "--matrix", str(matrix), "--out", str(out), "--no-retime", "--no-warm-up",
                timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(out / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["optimizer"] == "toy-sgd"]
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows), rows
    assert all(float(row["predicted_optimizer_state_bytes"]) == 0 for row in rows)
    assert all(abs(float(row["memory_prediction_error"])) < 0.15 for row in rows), rows
    for row in rows:  # its update priced from its own counted step (the file, in the counting subprocess too)
        predicted, measured = float(row["predicted_optimizer_ms"]), float(row["optimizer_ms_p50"])
        assert predicted > 0 and float(row["optimizer_ms_prediction_error"]) == pytest.approx(
            predicted / measured - 1, rel=1e-6, abs=1e-7), row
    report = (out / "report.md").read_text()
    section = report.split("## The optimizer's step", 1)[1].split("\n## ", 1)[0]
    assert "toy-sgd" in section and "Median absolute error of the predicted update" in section, section


@pytest.mark.parametrize("text, why", [
    ("x = 1\n", "defines no SPEC"),
    ("import no_such_module_xyz\n", "could not be loaded (ModuleNotFoundError"),
    ("def broken(:\n", "could not be loaded (SyntaxError"),
    ("SPEC = 3\n", "must be an llmopt.optimizers.OptimizerSpec"),
    ("from llmopt.optimizers import OptimizerSpec\nSPEC = OptimizerSpec(name='Bad Name', about='', "
     "build=print, default_lr=1.0, lr_centre=1.0)\n", "lower-case letters"),
    ("from llmopt.optimizers import OptimizerSpec\nSPEC = OptimizerSpec(name='adamw', about='', "
     "build=print, default_lr=1.0, lr_centre=1.0)\n", "defined twice"),
])
def test_a_bad_optimizer_file_is_one_line_before_torch(tmp_path, text, why):
    path = tmp_path / "bad.py"
    path.write_text(text)
    code = ("import sys\nfrom llmopt.train import main\nrc = main(sys.argv[1:])\nprint(rc, 'torch' in sys.modules)")
    r = run_cli("-c", code, "--steps", "1", env={registry.PLUGINS_ENV: str(path)})
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], r.stderr
    assert registry.PLUGINS_ENV in lines[0], lines[0]


@pytest.mark.parametrize("module, argv", [("bench.run", ["--matrix", "smoke"]), ("bench.advise", ["--preset", "tiny"])])
def test_a_bad_optimizer_file_is_one_line_in_the_harness_too(tmp_path, module, argv):
    path = tmp_path / "bad.py"
    path.write_text("x = 1\n")
    r = run_cli("-m", module, *argv, "--out", str(tmp_path / "out"), env={registry.PLUGINS_ENV: str(path)})
    assert "defines no SPEC" in one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_a_missing_optimizer_file_and_an_unknown_optimizer_are_one_line(tmp_path):
    r = run_cli("-m", "llmopt.train", "--steps", "1", env={registry.PLUGINS_ENV: str(tmp_path / "none.py")})
    assert "no such Python file" in one_error_line(r)
    r = run_cli("-m", "llmopt.train", "--optimizer", "adamww")
    line = one_error_line(r)
    assert "adamww" in line and "soap" in line, line


def test_an_optimizer_whose_package_is_missing_is_one_line_naming_it(tmp_path):
    path = tmp_path / "needs.py"
    path.write_text(TOY.replace('name="toy-sgd"', 'name="needs-pkg"').replace(
        "state_bytes=nothing)", "state_bytes=nothing,\n    packages=(('no_such_module_xyz', 'no-such-pkg'),))"))
    r = run_cli("-m", "llmopt.train", "--optimizer", "needs-pkg", env={registry.PLUGINS_ENV: str(path)})
    assert "needs the package no-such-pkg, which is not installed: pip install no-such-pkg" in one_error_line(r)


def test_schedule_free_takes_a_constant_schedule_only():
    from llmopt.core.config import TrainConfig, validate

    with pytest.raises(ValueError, match="--optimizer schedule-free takes --lr-schedule constant, not cosine"):
        validate(TrainConfig(optimizer="schedule-free", lr_schedule="cosine"))
    from bench.matrix import expand

    conv = [e for e in expand("convergence", "cpu", 2) if e.config.optimizer == "schedule-free"]
    assert conv and all(e.config.lr_schedule == "constant" and e.skipped is None for e in conv)


def test_schedule_free_evaluates_and_saves_its_average_and_trains_on(tmp_path):
    """An eval and a save see the averaged weights (schedulefree's eval()), and training goes on from the
    weights it left (train()): the losses after an eval are those of a run without it, to rounding."""
    from llmopt.checkpoint import save_pretrained
    from llmopt.core.config import TrainConfig, validate
    from llmopt.precision import autocast
    from llmopt.step import build, evaluate, micro_batches, train_step

    cfg = validate(TrainConfig(optimizer="schedule-free", steps=6, eval_every=3, eval_batches=2, lr=1e-2))

    def eval_here(state) -> float:  # evaluate's loop at whatever weights the model holds now
        amp = autocast(cfg.precision, "cpu")
        return sum(state.layout.eval_loss(micro_batches(state, i, split="val"), amp).item()
                   for i in range(cfg.eval_batches)) / cfg.eval_batches

    def run(with_evals: bool):
        state = build(cfg, torch.device("cpu"))
        out, evals = [], []
        for s in range(cfg.steps):
            out.append(train_step(state, s).loss.item())
            if with_evals and s == 2:
                train_point = [p.detach().clone() for p in state.layout.module.parameters()]
                evals.append(evaluate(state).item())
                # back at the train point, to rounding: eval() and train() are two lerps, inverse in exact arithmetic
                assert all(torch.allclose(a, b, rtol=0, atol=1e-6)
                           for a, b in zip(train_point, state.layout.module.parameters()))
                evals.append(eval_here(state))
                state.optimizer.eval()
                evals.append(eval_here(state))
                state.optimizer.train()
        return out, evals, state

    plain, _, _ = run(False)
    with_evals, (evaluated, at_train_point, at_average), state = run(True)
    assert with_evals == pytest.approx(plain, abs=1e-5)
    assert evaluated == pytest.approx(at_average, abs=1e-6) and abs(evaluated - at_train_point) > 1e-4
    state.optimizer.eval()
    average = [p.detach().clone() for p in state.layout.module.parameters()]
    state.optimizer.train()
    save_pretrained(state, str(tmp_path / "saved"))
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    wpe = hf.transformer.wpe.weight
    assert torch.allclose(wpe, average[1]) and not torch.allclose(wpe, state.layout.module.wpe.weight)


def test_an_optimizer_that_accelerate_cannot_take_is_refused_by_its_spec():
    from llmopt.core.config import TrainConfig, validate

    with pytest.raises(ValueError, match="--engine accelerate takes torch's optimizers, not --optimizer lamb"):
        validate(TrainConfig(optimizer="lamb", engine="accelerate"))


def test_the_report_says_when_a_drift_is_the_optimizers_own_noise(tmp_path):
    """SOAP's curves drift under every layout (its own noise: README, "Parity"); the report says so beside the
    drifted rows, and for SOAP only."""
    import shutil

    from bench.report import main as report

    ref = os.path.join(ROOT, "results", "reference", "cpu-optimizers")
    shutil.copytree(ref, tmp_path / "s", ignore=shutil.ignore_patterns("plots"))
    assert report([str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "report.md").read_text()
    drifted = text.split("Drifted configs:", 1)[1].split("\n## ", 1)[0]
    assert "soap" in drifted and "soap: a loss curve that does not keep to rounding" in drifted, drifted
    assert "lion:" not in drifted and "adamw:" not in drifted
