"""The sweep harness: matrices, the CSV schema, statuses, resume after SIGKILL, the report and compare."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.matrix import MatrixError, expand, layouts, load_toml, parse_filter, wrapped_optimizers
from bench.plan import config_id
from bench.results import RESULT_COLUMNS, STEP_COLUMNS
from conftest import ROOT, bench_here
from llmopt.core.config import validate

REQUIRED = ["config_id", "status", "error", "model_impl", "preset", "device", "world_size", "dp", "dp_mode", "tp",
            "pp", "pp_schedule", "precision", "grad_accum", "micro_batch", "global_batch", "seq_len", "optimizer",
            "steps", "tokens_per_s", "step_time_ms_p50", "step_time_ms_p90", "peak_memory_bytes",
            "predicted_memory_bytes", "mfu", "peak_flops", "peak_flops_source", "final_loss",
            "loss_parity_max_abs", "energy_j_per_token", "engine"]


def test_results_schema_holds_every_config_field_with_its_kind():
    """results.csv's config columns are derived from TrainConfig's fields: every field (the flags) is among
    them, read back as text exactly when it is a string or a switch, so that a new flag cannot be silently
    dropped from the rows or misread."""
    from dataclasses import fields

    from bench.results import TEXT_COLUMNS
    from llmopt.core.config import TrainConfig

    config = {f.name: f.type for f in fields(TrainConfig)}
    assert set(config) | {"world_size", "micro_batch"} <= set(RESULT_COLUMNS)
    text = {name for name, kind in config.items() if "str" in kind or "bool" in kind}
    assert text == TEXT_COLUMNS & set(config), (text ^ (TEXT_COLUMNS & set(config)))


def write_toml(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- matrices
def test_named_matrices_expand_and_validate():
    smoke = expand("smoke", "cpu", 4)
    assert len([e for e in smoke if e.skipped is None]) >= 4
    assert any(e.config.dp * e.config.tp * e.config.pp > 1 for e in smoke)
    full = expand("full", "cpu", 4)
    n_layouts = len(layouts(4))
    # every layout x precision x accumulation x the four elementwise-or-norm optimizers, and the optimizers that
    # gather whole tensors (Muon, Adafactor, SOAP) on the five baseline layouts
    assert wrapped_optimizers() == ["muon", "adafactor", "soap"]
    assert len([e for e in full if not e.added_as_baseline]) == n_layouts * 3 * 2 * 4 + 5 * 3 * 2 * 3
    assert all(e.config.dp * e.config.tp * e.config.pp <= 4 for e in full)
    ids = [e.config_id for e in full]
    assert len(ids) == len(set(ids))
    # baselines come first, so parity can be computed as rows are written
    first_non_base = next(i for i, e in enumerate(full) if e.config.precision != "fp32" or e.config.dp > 1)
    assert all(e.config.precision == "fp32" for e in full[:first_non_base])


def test_custom_toml_product_skips_invalid_and_adds_baselines(tmp_path):
    path = write_toml(tmp_path / "m.toml", '[base]\nsteps = 3\n[matrix]\ntp = [1, 3]\nprecision = ["bf16"]\n')
    plan = expand(path, "cpu", 4)
    by_tp = {e.config.tp: e for e in plan if not e.added_as_baseline}
    assert by_tp[1].skipped is None
    assert "--tp 3" in by_tp[3].skipped  # kept as a skipped row with its reason, not dropped
    added = [e for e in plan if e.added_as_baseline]
    assert len(added) == 1 and added[0].config.precision == "fp32" and added[0].config.steps == 3


def test_rank_budget_skips_with_reason(tmp_path):
    path = write_toml(tmp_path / "m.toml", "[matrix]\ndp = [8]\n")
    (entry,) = [e for e in expand(path, "cpu", 4) if not e.added_as_baseline]
    assert "needs 8 ranks" in entry.skipped


@pytest.mark.parametrize("text,match", [
    ("[matrix]\nprecison = ['fp32']\n", "unknown field 'precison'"),
    ("[matrix]\nprecision = 'fp32'\n", "must be a non-empty list"),
    ("[matrix\n", "not valid TOML"),
    ("[base]\nsteps = 2\n", "needs a \\[matrix\\] table"),
    ("[matrix]\ndp = ['two']\n", "not an integer"),
    ("[matrix]\ndp = [1]\n[extra]\nx = 1\n", "unknown table"),
])
def test_bad_matrix_files(tmp_path, text, match):
    with pytest.raises(MatrixError, match=match):
        load_toml(write_toml(tmp_path / "m.toml", text))


@pytest.mark.parametrize("text,match", [
    ("[convergence]\nseeds = [1, 2]\n", "needs batches"),
    ("[convergence]\nbatches = [8]\nseed = [1]\n", "unknown setting.*'seed'"),
    ("[convergence]\nbatches = 8\n", "batches = 8 must be a list"),
    ("[convergence]\nbatches = [8]\nseeds = [0, 1]\n", "not one of the evaluation seeds"),
    ("[convergence]\nbatches = [8]\nseeds = [1]\n", "two or more distinct seeds"),
    ("[convergence]\nbatches = [8]\nladder = [0.5, 2]\n", "ladder must be"),
    ("[convergence]\nbatches = [8]\nlr_step = 1\n", "lr_step must be above 1"),
    ("[convergence]\nbatches = [8]\ntokens_per_param = 'lots'\n", "is not a number"),
    ("[convergence]\nbatches = [8]\ntargets = [-1]\n", "targets must be positive"),
    ("[convergence]\nbatches = [8]\noptimizers = ['adamw', 'adam-w']\n", "unknown optimizer.*adam-w"),
    ("[convergence]\nbatches = [8]\n[matrix]\ndp = [1]\n", "plans its own runs"),
    ("[convergence]\nbatches = [8]\n", "needs its whole budget"),
    ("[convergence]\nbatches = [8]\nwall_clock = 1\n", "wall_clock = 1 must be true or false"),
])
def test_bad_convergence_studies_are_refused_before_any_run(tmp_path, text, match):
    """A matrix file's [convergence] table is checked key by key: one line naming the key and the fix."""
    with pytest.raises(MatrixError, match=match):
        expand(write_toml(tmp_path / "m.toml", text), "cpu", 4)


def test_a_convergence_study_file_plans_the_grid_of_its_settings(tmp_path):
    """Every model x optimizer x batch x learning-rate multiple, on the tuning seed at the grid's weight decay,
    at the whole budget of tokens_per_param times the model's parameters; the study rides in the plan."""
    from bench.study import Study
    from llmopt.core.shapes import PRESETS, param_count
    from llmopt.optimizers import spec

    path = write_toml(tmp_path / "s.toml", "[base]\nseq_len = 16\n[convergence]\nbatches = [4, 8]\n"
                      "presets = ['tiny-v256', 'nano']\noptimizers = ['adamw', 'muon', 'lamb']\n"
                      "tokens_per_param = 0.01\nlr_multiples = [0.5, 2]\n")
    plan = expand(path, "cpu", 4)
    assert len(plan) == 2 * 2 * 2 * 2 and {e.phase for e in plan} == {"grid"}
    # Muon's AdamW part runs at AdamW's tuned rate: its grid waits for AdamW's (bench.tuning.adamw_part_grids)
    assert {e.config.optimizer for e in plan} == {"adamw", "lamb"}
    assert not any(e.added_as_baseline for e in plan)  # compared with each other, not with a fp32 baseline
    for e in plan:
        c = e.config
        assert c.seq_len == 16 and c.seed == 0 and c.weight_decay == 0.1 and c.lr_schedule == "cosine"
        assert c.max_tokens == round(0.01 * param_count(PRESETS[c.preset]))
        assert c.lr in {spec(c.optimizer).lr_centre * m for m in (0.5, 2)}
    assert Study.from_mapping({"batches": [4, 8], "presets": ["a"]}, "x").to_json()["batches"] == [4, 8]


def test_filters():
    assert parse_filter("precision=fp32,dp=2") == {"precision": ["fp32"], "dp": [2]}
    plan = expand("default", "cpu", 4, filters={"precision": ["bf16"]})
    assert {e.config.precision for e in plan if not e.added_as_baseline} == {"bf16"}
    for bad in ("precision", "nosuch=1"):
        with pytest.raises(MatrixError):
            parse_filter(bad)
    with pytest.raises(MatrixError, match="leaves no config"):
        expand("smoke", "cpu", 4, filters={"precision": ["fp16"]})
    # a key given twice is a union (it once kept only the last value: sgd alone)
    both = parse_filter("optimizer=muon,optimizer=sgd")
    plan = expand("optimizers", "cpu", 4, filters=both)
    assert {e.config.optimizer for e in plan if not e.added_as_baseline} == {"muon", "sgd"}


def test_max_configs_counts_named_matrices_too():
    """``--matrix convergence --max-configs 2`` once ran all of convergence's configs."""
    n = len(expand("convergence", "cpu", 4))
    assert n > 2
    with pytest.raises(MatrixError, match=f"{n} configs, more than --max-configs 2"):
        expand("convergence", "cpu", 4, max_configs=2)


def test_config_id_is_stable_and_readable():
    e = expand("smoke", "cpu", 4)[0]
    assert config_id(e.config) == e.config_id
    assert e.config_id.startswith("single-fp32-ga1-adamw-")


# ---------------------------------------------------------------- end-to-end sweeps (subprocesses)
def bench(*args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small sweep shared by the schema, report and compare tests: two ok configs (a 2-rank one with
    bf16 among them), a skipped one, and the baseline."""
    d = tmp_path_factory.mktemp("sweep")
    m = write_toml(d / "m.toml", "[base]\nsteps = 3\nseq_len = 32\n[matrix]\ndp = [1, 2]\n"
                                 "precision = ['fp32', 'bf16']\ntp = [1, 3]\n")
    out = d / "out"
    r = bench_here("--matrix", m, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_results_schema_and_statuses(sweep):
    out, r = sweep
    rows = read_csv(out / "results.csv")
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header == RESULT_COLUMNS and set(REQUIRED) <= set(header)
    statuses = {row["status"] for row in rows}
    assert statuses == {"ok", "skipped"}
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 4 and len(rows) == 8
    for row in ok:
        assert float(row["tokens_per_s"]) > 0 and float(row["step_time_ms_p90"]) >= float(row["step_time_ms_p50"])
        assert int(row["peak_memory_bytes"]) > 0 and row["peak_memory_kind"] == "tracked_tensors"
        assert 0 < float(row["mfu"]) < 1 and row["peak_flops_source"].startswith("measured:cpu")
        assert row["engine"] == "native" and row["energy_j_per_token"] == ""  # no counter readable here
    by_id = {row["config_id"]: row for row in ok}
    fp32_dp2 = next(r_ for r_ in ok if r_["dp"] == "2" and r_["precision"] == "fp32")
    assert float(fp32_dp2["loss_parity_max_abs"]) < 1e-4 and fp32_dp2["parity_verdict"] == "exact"
    assert all(by_id[row["baseline_id"]]["precision"] == "fp32" for row in ok)
    bf16 = [row for row in ok if row["precision"] == "bf16"]
    assert all(row["parity_verdict"] in ("exact", "within AMP tolerance", "drifted") for row in bf16)
    skipped = [row for row in rows if row["status"] == "skipped"]
    assert all("--tp 3" in row["error"] for row in skipped)
    steps = read_csv(out / "steps.csv")
    assert list(steps[0]) == STEP_COLUMNS and len(steps) == 4 * 3
    env = json.loads((out / "env.json").read_text())
    for key in ("torch", "cuda", "nccl", "cpu_model", "torch_threads", "git_commit", "command"):
        assert key in env
    assert (out / "logs").is_dir() and len(os.listdir(out / "logs")) == 4
    # one progress line per config, with the bar and an ETA
    lines = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert len(lines) == 8 and "ETA" in lines[-1]


def test_memory_prediction_within_15_percent_on_sweep(sweep):
    out, _ = sweep
    for row in read_csv(out / "results.csv"):
        if row["status"] == "ok":
            assert abs(float(row["memory_prediction_error"])) < 0.15, row["config_id"]


def test_report_renders_every_plot(sweep):
    from bench.report import write_report

    out, _ = sweep
    before = (out / "results.csv").read_bytes(), (out / "steps.csv").read_bytes()
    text = open(write_report(str(out))).read()
    assert ((out / "results.csv").read_bytes(), (out / "steps.csv").read_bytes()) == before  # read-only
    for name in ("throughput.png", "memory.png", "loss.png", "throughput_vs_memory.png", "speedup.png"):
        assert f"plots/{name}" in text
        assert (out / "plots" / name).stat().st_size > 10_000
    assert "Fastest config that fits" in text and "Pareto front" in text and "## Not ok" in text


def test_compare_prints_ratios(sweep, cli):
    out, _ = sweep
    r = cli("-m", "bench.compare", str(out), str(out))
    assert r.returncode == 0, r.stderr
    assert "speed_ratio_B/A" in r.stdout and "4 configs compared; 0 changed" in r.stdout


def test_failures_become_rows_and_leave_no_process(tmp_path):
    m = write_toml(tmp_path / "m.toml", "[base]\nsteps = 4\nseq_len = 16\nglobal_batch = 2\nmax_grad_norm = 0.0\n"
                                        "optimizer = 'sgd'\n[matrix]\nlr = [1e4, 0.1]\ndp = [1, 2]\n")
    r = bench_here("--matrix", m, "--out", str(tmp_path / "o"), "--no-report", env={"LLMOPT_FAIL_AT": "1:1:raise"})
    assert r.returncode == 1, r.stderr[-2000:]  # a config failed: the sweep says so
    rows = {(row["lr"], row["dp"]): row for row in read_csv(tmp_path / "o" / "results.csv")}
    assert rows[("10000", "1")]["status"] == "diverged" and "diverged" in rows[("10000", "1")]["error"]
    assert rows[("0.1", "2")]["status"] == "failed"
    assert "injected failure on rank 1" in rows[("0.1", "2")]["error"]
    assert rows[("0.1", "1")]["status"] == "ok"
    # --retry failed runs the failed config again (now without the injected fault); nothing else changes
    r = bench_here("--resume", "--out", str(tmp_path / "o"), "--no-report", "--retry", "failed")
    assert r.returncode == 0, r.stderr[-2000:]
    after = {(row["lr"], row["dp"]): row for row in read_csv(tmp_path / "o" / "results.csv")}
    assert after.keys() == rows.keys() and after[("0.1", "2")]["status"] == "ok"
    assert after[("0.1", "1")] == rows[("0.1", "1")] and after[("10000", "1")] == rows[("10000", "1")]


def test_resume_after_sigkill(tmp_path):
    m = write_toml(tmp_path / "m.toml",
                   "[base]\nsteps = 3\nseq_len = 16\n[matrix]\noptimizer = ['sgd', 'adam', 'adamw']\n")
    out = tmp_path / "o"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--matrix", m, "--out", str(out), "--no-report"],
                            cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results = out / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_csv(results) if results.exists() else []) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the harness and whatever config it was running
    proc.wait()
    before = read_csv(results)
    assert 1 <= len(before) < 3
    with open(results, "a") as f:
        f.write("single-fp32-ga1-adam-deadbe,ok,,nat")  # a torn row, as if killed mid-write
    with open(out / "steps.csv", "a") as f:
        f.write(f"{before[0]['config_id']},99,1.0")  # a torn steps row
    r = bench_here("--resume", "--out", out, "--no-report")
    assert r.returncode == 0, r.stderr[-2000:]
    after = read_csv(results)
    assert sorted(row["config_id"] for row in after) == sorted({row["config_id"] for row in after})
    assert len(after) == 3 and {row["status"] for row in after} == {"ok"}
    from bench.results import FILLED_AT_END

    kept = {k: v for k, v in after[0].items() if k not in FILLED_AT_END}
    assert kept == {k: v for k, v in before[0].items() if k not in FILLED_AT_END}  # a finished row is kept
    assert all(after[0][k] for k in FILLED_AT_END)  # and its update predicted once the sweep finished
    steps = read_csv(out / "steps.csv")
    assert len(steps) == 3 * 3 and all(s["step"] != "99" for s in steps)


def test_bench_cli_errors_are_one_line(tmp_path, capsys):
    from bench.run import main

    for args in (["--matrix", "nosuch"], ["--filter", "nosuch=1"], ["--steps", "0"],
                 ["--matrix", str(tmp_path / "missing.toml")], ["--resume", "--out", str(tmp_path)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err


def test_existing_results_are_never_overwritten(sweep):
    out, _ = sweep
    before = (out / "results.csv").read_text()
    r = bench_here("--matrix", "smoke", "--out", str(out))
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (out / "results.csv").read_text() == before


def test_peak_flops_sources():
    from bench.hardware import datasheet_peak, peak_flops

    assert datasheet_peak("NVIDIA H200", "bf16") == 989e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert datasheet_peak("Some Future GPU", "bf16") is None  # -> measured instead
    cache = {}
    value, source = peak_flops("cpu", "fp32", cache, n_embd=64, vocab_size=256, tokens=128)
    assert value > 1e8 and source.startswith("measured:cpu") and list(cache) == ["cpu:fp32:C64:V256:M128"]
    assert peak_flops("cpu", "fp32", cache, 64, 256, 128) == (value, source)  # measured once per sweep
    # An AMP dtype's peak is the best of that dtype and fp32 (autocast can run either), so never below fp32's.
    bf16, _ = peak_flops("cpu", "bf16", cache, 64, 256, 128)
    assert bf16 >= value and len(cache) == 2


@pytest.mark.parametrize("native", [True, False])
def test_a_dtype_the_cpu_emulates_is_not_measured(monkeypatch, native):
    """fp16 on a CPU without native fp16 kernels runs through fp32 and cannot beat it; measuring it took 95 of
    the default sweep's 126 s on an AMD EPYC. Its peak is fp32's, and the source says why."""
    import llmopt.cpu
    from bench import hardware

    measured = []
    monkeypatch.setattr(llmopt.cpu, "cpu_has_native", lambda p: native or p == "fp32")
    monkeypatch.setattr(hardware, "measure_matmul_peak",
                        lambda device, dtype, shapes, seconds, threads: measured.append(dtype) or 1e9)
    value, source = hardware.peak_flops("cpu", "fp16", {}, 64, 256, 128)
    assert value == 1e9 and measured == (["fp16", "fp32"] if native else ["fp32"])
    assert ("emulated" in source) == (not native), source


def test_gemm_shapes_cover_forward_and_backward():
    from bench.hardware import gemm_shapes

    shapes = gemm_shapes(n_embd=8, vocab_size=100, tokens=32)
    # the MLP's first layer: forward (M,C)@(C,4C), grad-input (M,4C)@(4C,C), grad-weight (C,M)@(M,4C)
    assert {(32, 8, 32), (32, 32, 8), (8, 32, 32)} <= set(shapes)
    assert (32, 8, 100) in shapes and (8, 32, 100) in shapes  # the head, forward and grad-weight


def test_energy_meter_reports_none_without_counters():
    from llmopt.instruments import EnergyMeter

    meter = EnergyMeter(torch.device("cpu"), local_rank=1)  # non-zero local rank never reads RAPL
    meter.start()
    assert meter.stop() == {"energy_j": None, "gpu_util_mean": None, "gpu_power_w_mean": None}


def test_older_schema_is_read_not_lost(tmp_path):
    """A results.csv written with fewer columns (an older version) is read as written; only a resume
    rewrites it, into the current schema, keeping every value; unknown columns stop a resume."""
    from bench.results import ResultFiles

    (tmp_path / "results.csv").write_text("config_id,status,tokens_per_s\na,ok,123.5\nb,failed,\n")
    (tmp_path / "steps.csv").write_text("config_id,step,loss,step_time_ms\na,0,6.9,30.0\n")
    files = ResultFiles(str(tmp_path))
    rows, steps = files.load()
    assert [r["config_id"] for r in rows] == ["a", "b"] and rows[0]["tokens_per_s"] == "123.5"
    assert (tmp_path / "results.csv").read_text().startswith("config_id,status,tokens_per_s\n")  # untouched
    files.load(repair=True)
    rewritten = read_csv(tmp_path / "results.csv")
    assert list(rewritten[0]) == RESULT_COLUMNS and rewritten[0]["tokens_per_s"] == "123.5"
    (tmp_path / "results.csv").write_text("config_id,status,mystery\na,ok,1\n")
    with pytest.raises(ValueError, match="mystery"):
        files.load(repair=True)


def test_a_diverged_learning_rate_is_a_row_and_the_sweep_goes_on(tmp_path):
    m = write_toml(tmp_path / "m.toml", "[base]\nsteps = 6\nglobal_batch = 4\nseq_len = 16\noptimizer = 'sgd'\n"
                                        "max_grad_norm = 0.0\neval_every = 3\neval_batches = 1\n"
                                        "[matrix]\nlr = [300.0, 0.1]\n")
    out = tmp_path / "out"
    r = bench_here("--matrix", m, "--out", str(out), "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {float(x["lr"]): x for x in read_csv(out / "results.csv")}
    assert rows[300.0]["status"] == "diverged" and "diverged at step" in rows[300.0]["error"]
    assert rows[300.0]["diverged_at_step"] != "" and rows[0.1]["status"] == "ok"
    evals = read_csv(out / "evals.csv")
    ok_evals = [e for e in evals if e["config_id"] == rows[0.1]["config_id"]]
    assert [int(e["step"]) for e in ok_evals] == [0, 3, 6]
    assert float(rows[0.1]["final_eval_loss"]) == float(ok_evals[-1]["loss"])


def test_report_says_when_amp_is_slower_than_fp32():
    import pandas as pd

    from bench.report import amp_speed

    rows = pd.DataFrame({"config_id": list("abcd"), "precision": ["fp32", "bf16", "fp32", "bf16"],
                         "dp": [1, 1, 2, 2], "lr": [1e-3, 1e-3, 1e-3, 1e-3], "target_loss": [float("nan")] * 4,
                         "tokens_per_s": [100.0, 25.0, 200.0, 60.0]})
    (line,) = amp_speed(rows, "none")
    assert line.startswith("bf16 is slower than fp32 on this machine: median 0.28x") and "over 2 configs" in line
    rows.loc[rows.precision == "bf16", "tokens_per_s"] *= 8
    assert amp_speed(rows)[0].startswith("bf16 is faster than fp32")


def test_targets_report_states_the_cpu_flags(tmp_path):
    from bench.targets import write

    p = {"shape": {}, "threads": 2, "steps_each": 4, "llmopt_tokens_per_s": 130.0, "hf_user_loop_tokens_per_s": 100.0,
         "speedup": 1.3, "target": 1.15}
    o = {"shape": {}, "steps": 3, "warmup": 1, "pairs": 2, "recorded_tokens_per_s": [99.0],
         "bare_loop_tokens_per_s": [100.0], "overhead": 0.01, "target": 0.03}
    text = open(write(str(tmp_path), {"cpu_model": "Xeon", "cpu_flags": ["avx512_bf16"], "llmopt_vs_hf": p,
                                      "harness_overhead": o})).read()
    assert "native low-precision flags: avx512_bf16" in text and "**1.30x**" in text
    assert "Peers" not in text  # --peers-rounds 0
    q = {"rounds": 3, "round_ratios": [1.2, 1.25, 1.4], "ratio": 1.25, "target": 1.3,
         "best_llmopt": "native/llmopt/fp32", "best_hf": "accelerate/hf/fp32/compile",
         "best_tokens_per_s": {"llmopt": 125.0, "hf": 100.0}}
    text = open(write(str(tmp_path), {"cpu_model": "Xeon", "cpu_flags": [], "llmopt_vs_hf": p,
                                      "harness_overhead": o, "peers": q})).read()
    assert "none (bf16 matmuls emulated)" in text
    assert "1.20, 1.25, 1.40x, median **1.25x** (target 1.3x on this CPU kind: NOT met)" in text
    assert "`accelerate/hf/fp32/compile` 100" in text


def test_peers_rounds_run_each_config_in_its_own_process_in_alternating_order(tmp_path):
    """bench.targets' peers ratio: one llmopt-over-HF ratio per round, the median of them, every config's
    tokens/s from its own llmopt.train process (here a two-config matrix at the tiny shape)."""
    from bench.targets import peers_rounds

    m = write_toml(tmp_path / "m.toml", '[base]\npreset = "tiny"\nsteps = 2\nseq_len = 16\nglobal_batch = 4\n'
                                        '[matrix]\nmodel_impl = ["llmopt", "hf"]\n')
    lines = []
    q = peers_rounds(2, matrix=m, log=lambda line, **_: lines.append(line))
    assert list(q["tokens_per_s"]) == ["native/llmopt/fp32", "native/hf/fp32"]
    assert all(len(v) == 2 and min(v) > 0 for v in q["tokens_per_s"].values())
    ratios = [a / b for a, b in zip(*q["tokens_per_s"].values())]
    assert q["round_ratios"] == pytest.approx(ratios) and q["ratio"] == pytest.approx(sum(ratios) / 2)
    assert [line.split()[3] for line in lines] == ["native/llmopt/fp32", "native/hf/fp32", "native/hf/fp32",
                                                   "native/llmopt/fp32"]  # the second round runs backwards


def test_kernels_measures_the_choices_llmopt_makes(tmp_path, capsys):
    import pandas as pd
    import torch

    from bench.kernels import main
    from llmopt.model import explicit_attention

    assert main(["--reps", "1", "--out", str(tmp_path)]) == 0  # in this process, as its command line calls it
    rows = pd.read_csv(tmp_path / "kernels.csv")
    att = rows[rows.kernel == "attention"]
    assert len(att) == 10 and (att.explicit_ms > 0).all() and (att.sdpa_ms > 0).all()
    for _, a in att.iterrows():
        dtype = torch.bfloat16 if a["dtype"] == "bf16" else torch.float32
        assert (a.llmopt_uses == "explicit") == explicit_attention("cpu", dtype, int(a["T"]))
    assert (rows[rows.kernel == "head"].fused_ms > 0).all()
    assert "native low-precision flags" in (tmp_path / "kernels.md").read_text()
    assert main(["--reps", "0"]) == 2


def test_the_config_a_run_is_handed_is_the_plan_entrys_config(tmp_path):
    """What the harness hands llmopt.train for a config (``--config FILE.json``) reads back as that very
    ``TrainConfig`` (the optimizer's default learning rate, 0, included), for every config of the named
    matrices; and a field's flag beside the file is refused, not merged."""
    from bench.executors import config_argv, write_config
    from llmopt.train import _checked

    entries = [e for name in ("default", "extras", "optimizers", "convergence") for e in expand(name, "cpu", 4)]
    assert any(e.config.lr == 0.0 for e in entries) and any(e.config.lr > 0 for e in entries)
    path = str(tmp_path / "c.json")
    for e in entries:
        if e.skipped is None:
            write_config(path, e.config)
            assert _checked(config_argv(path, str(tmp_path / "m.json"), 1))[1] == validate(e.config), e.config_id
    with pytest.raises(ValueError, match="holds the whole config; drop --dp"):
        _checked(["--config", path, "--dp", "2"])


def test_a_row_read_as_text_gives_its_switches_back():
    """bench.report reads switches as text, and bool("False") is True: the real-text reference's report once
    crashed validating a config with --gns on, which its rows had off."""
    import pandas as pd

    from bench.results import row_config

    c = row_config(pd.Series({"compile": "False", "gns": "True", "grad_accum": 2, "activation_checkpointing": "false"}))
    assert c.compile is False and c.gns is True and c.activation_checkpointing is False


def test_a_bad_peak_timing_is_one_line(tmp_path):
    r = bench_here("--matrix", "smoke", "--out", tmp_path / "o", env={"LLMOPT_PEAK_SECONDS": "soon"})
    assert r.returncode == 2 and r.stderr.strip() == ("error: LLMOPT_PEAK_SECONDS='soon': use a positive number of "
                                                      "seconds (default 1)"), r.stderr
    assert not os.path.exists(tmp_path / "o")  # refused before anything is written
