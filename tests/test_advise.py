"""The layout advisor: its memory is the harness's, its communication volumes are the hand-computed ones,
impossible requests are one-line errors, and the matrix it emits runs through the harness unchanged."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import advise
from bench.advisor import layouts, probe
from bench.advisor.costmodel import GPUS, Hardware, Link, comm_bytes, predict_step, wire_bytes
from bench.results import row_config
from conftest import bench_here
from llmopt.core.config import TrainConfig, validate

ROOT = Path(__file__).resolve().parent.parent


def test_memory_side_is_the_harness_prediction_on_every_reference_row():
    rows = probe.reference_rows()
    assert len(rows) > 300 and set(rows.reference) >= {"cpu", "cpu-peers", "cpu-extras", "cpu-convergence"}
    for _, r in rows.iterrows():
        pred, low, high = layouts.layout_memory(row_config(r))
        assert pred == r.predicted_memory_bytes, (r.reference, r.config_id, pred, r.predicted_memory_bytes)
        # the band is the one measured on these rows (the extreme rows sit on its edges, up to rounding)
        assert low * (1 - 1e-12) <= r.peak_memory_bytes <= high * (1 + 1e-12)


def test_communication_volume_matches_hand_computed_bytes():
    # tiny: L=4, C=128, V=1024, 256 positions. Parameters: wte 131,072 + wpe 32,768 + 4 blocks x
    # (12 C^2 + 13 C = 198,272) + ln_f 256 = 957,184, i.e. 3,828,736 fp32 bytes.
    P = 3_828_736
    tiny = dict(preset="tiny", global_batch=8, seq_len=64)
    ddp = validate(TrainConfig(**tiny, dp=2))
    assert wire_bytes(ddp) == {"dp": P}  # ring all-reduce: 2 (n-1)/n = 1 buffer per rank
    fsdp = validate(TrainConfig(**tiny, dp=2, dp_mode="fsdp"))
    assert wire_bytes(fsdp) == pytest.approx({"dp": 3 * P / 2})  # gather fwd + gather bwd + reduce-scatter, half each
    assert sum(c[-1] for c in comm_bytes(fsdp)) == 3 * 5  # per unit: 4 blocks and the root
    fsdp_ga2 = validate(TrainConfig(**tiny, dp=2, dp_mode="fsdp", grad_accum=2))
    assert wire_bytes(fsdp_ga2) == pytest.approx({"dp": 5 * P / 2})  # the gathers repeat per micro-batch
    act = 8 * 64 * 128 * 4  # B·T·C fp32 of one micro-batch
    tp = validate(TrainConfig(**tiny, tp=2))
    assert wire_bytes(tp) == {"tp": 16 * act}  # 4 all-reduces per block x 4 blocks, 1 buffer each
    assert wire_bytes(validate(TrainConfig(**tiny, tp=2, precision="bf16"))) == {"tp": 16 * act / 2}
    pp = validate(TrainConfig(**tiny, pp=2))
    assert wire_bytes(pp) == {"pp": 2 * act}  # activations forward, gradients back, over 2 chunks


def test_time_model_prices_what_it_should():
    h100 = Hardware("H100", {"bf16": 989e12}, 80e9, 8, 2, GPUS["H100"][1], GPUS["H100"][2], achievable={"bf16": 0.5})
    base = dict(preset="gpt2", global_batch=64, seq_len=1024, precision="bf16", device="cuda")
    one = predict_step(validate(TrainConfig(**base, dp=8)), h100)
    assert one.bottleneck == "compute" and 0.45 < one.mfu <= 0.5  # DDP's all-reduce hides behind backward
    gpipe = predict_step(validate(TrainConfig(**base, dp=4, pp=2, pp_schedule="gpipe")), h100)
    assert gpipe.bubble_s == pytest.approx(gpipe.compute_s / 2)  # (p-1)/m with p=2 stages, m=2 chunks
    inside = predict_step(validate(TrainConfig(**base, dp=4, tp=4)), h100)  # tp=4 within an 8-GPU node
    small = Hardware("H100", {"bf16": 989e12}, 80e9, 2, 8, GPUS["H100"][1], GPUS["H100"][2], achievable={"bf16": 0.5})
    across = predict_step(validate(TrainConfig(**base, dp=4, tp=4)), small)  # tp=4 over two 2-GPU nodes
    assert across.comm_s > 3 * inside.comm_s  # NVLink 360 GB/s against InfiniBand 40 GB/s for the tp traffic


def _advise(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bench.advise", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["--devices", "0"], "--devices 0"),
    (["--device", "B200"], "--device-memory and --peak-tflops"),
    (["--preset", "gpt2-xl", "--device", "H100", "--devices", "1", "--device-memory", "4GiB"], "fits in no layout"),
    (["--device", "H100", "--device-memory", "lots"], "--device-memory 'lots'"),
    (["--shape", "3,x"], "--shape '3,x'"),
    (["--shape", "4,3,256"], "not a multiple of the 3 heads"),
    (["--shape", "4,4,256", "--emit-matrix", "x.toml"], "the harness runs presets only"),
    (["--devices", "3", "--global-batch", "16", "--preset", "tiny"], None),  # dp=3 divides nothing: odd but valid
    # nonsense that once produced a figure or a traceback
    *[(["--peak-tflops", v], f"--peak-tflops {v}") for v in ("0", "nan", "-5", "inf")],
    *[([f"--{k}", v], f"--{k} '{v}'") for k in ("intra", "inter") for v in ("nan", "inf,10", "400,nan")],
    (["--emit-matrix", "/proc/llmopt-test.toml"], "--emit-matrix '/proc/llmopt-test.toml' cannot be written"),
    (["--bad-flag"], "unrecognized arguments"),
    # a target that cannot be priced: said before anything is probed
    *[(["--tokens", v], f"--tokens '{v}'") for v in ("0", "abc", "inf", "0B", "1e400", "20y", "nanx")],
    (["--speedup-from", "results/reference/cpu-convergence"], "give --tokens too"),
    (["--tokens", "1B", "--speedup-batch", "8"], "give that too"),
    (["--tokens", "1B", "--optimizer", "muon", "--speedup-from", "/nonexistent"], "no results.csv there"),
    (["--tokens", "1B", "--optimizer", "muon", "--speedup-from", "results/reference/cpu"], "no convergence ladder"),
    (["--tokens", "1B", "--optimizer", "soap", "--speedup-from", "results/reference/cpu-convergence-full"],
     "has no finalist of soap"),
    (["--tokens", "1B", "--optimizer", "muon", "--speedup-from", "results/reference/cpu-convergence",
      "--speedup-batch", "3"], "has no batch 3"),
    (["--tokens", "1B", "--speedup-from", "results/reference/cpu-convergence"], "--optimizer adamw"),
    # no layout exists: said before this CPU is probed (the probe once ran 100 s first)
    (["--device", "cpu", "--devices", "3", "--preset", "tiny", "--global-batch", "7", "--seq-len", "64"],
     "no layout of tiny runs on 3 ranks"),
])
def test_impossible_requests_are_one_line_errors(args, needle, tmp_path, capsys, monkeypatch):
    def no_probe(*a, **k):
        raise AssertionError("this CPU was probed for a request that has no answer")

    monkeypatch.setattr(advise, "cpu_hardware", no_probe)
    try:
        rc = advise.main([*args, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own exit, as on the command line
        rc = e.code
    err = capsys.readouterr().err
    if needle is None:
        assert rc in (0, 2) and "Traceback" not in err
        return
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_hours_to_a_target_apply_the_references_token_speedup(tmp_path):
    """--tokens 20x --speedup-from: AdamW's tokens at 20 per parameter, over Muon's token speed-up in the
    convergence reference (recomputed here from its rows), at each layout's predicted tokens/s; the sentence
    names the reference's model size and horizon and says published speed-ups shrink with scale."""
    from bench.report.quality import token_speedup
    from llmopt.core.shapes import PRESETS, param_count

    r = _advise("--preset", "gpt2", "--device", "H100", "--devices", "8", "--global-batch", "512", "--precisions",
                "bf16", "--optimizer", "muon", "--tokens", "20x", "--speedup-from",
                "results/reference/cpu-convergence", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "advise.csv")
    sp = token_speedup(pd.read_csv(ROOT / "results" / "reference" / "cpu-convergence" / "results.csv"), "muon")
    tokens = 20 * param_count(PRESETS["gpt2"]) / sp.speedup
    assert sp.speedup > 0 and (t.pred_hours * 3600 * t.pred_tokens_per_s).sub(tokens).abs().max() < 1e-6 * tokens
    text = (tmp_path / "advise.md").read_text()
    assert f"{sp.speedup:.2f}x" in text and "published speed-ups shrink with scale" in text
    assert f"{sp.params / 1e6:.2g}M-parameter model" in text and "tokens per parameter" in text


def test_divisors_of_a_huge_batch_come_from_its_square_root():
    """A global batch of 10^12 once took minutes (counting to n)."""
    d = layouts._divisors(10**12)
    assert len(d) == 169 and d == sorted(d) and all(10**12 % x == 0 for x in d) and d[-1] == 10**12
    assert layouts._divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36] and layouts._divisors(1) == [1]


def test_gpt2_xl_on_eight_h100_names_a_layout_that_fits(tmp_path):
    r = _advise("--preset", "gpt2-xl", "--device", "H100", "--devices", "8", "--global-batch", "64",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "advise.csv")
    assert (t.tp == 1).all()  # 25 heads: no tensor-parallel degree of 2, 4 or 8 divides them
    best = t.iloc[0]
    assert best.fits == "yes" and best.pred_memory_high_gib <= 78
    assert f"the fastest predicted is {best.layout}" in (tmp_path / "advise.md").read_text()
    assert (tmp_path / "plots" / "advise.png").stat().st_size > 0


def test_emitted_matrix_runs_through_the_harness_unchanged(tmp_path, monkeypatch, capsys):
    """In this process, with this CPU's probe replaced by fixed figures (what is under test is the matrix)."""
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "allreduce_probe", lambda world=2: Link(1e9, 1e-4, "fixed for the test"))
    monkeypatch.setattr(probe, "peak_flops", lambda *a, **k: (1e11, "fixed for the test"))
    matrix = tmp_path / "top.toml"
    rc = advise.main(["--preset", "tiny", "--device", "cpu", "--devices", "2", "--global-batch", "8", "--seq-len",
                      "64", "--emit-matrix", str(matrix), "--measure-steps", "3", "--out", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    top = pd.read_csv(tmp_path / "a" / "advise.csv")
    assert top.iloc[0].fits == "yes" and matrix.read_text().count("[[config]]") == 5
    run = bench_here("--matrix", matrix, "--out", tmp_path / "run", "--no-report")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "run" / "results.csv")
    emitted = rows[rows.added_as_baseline.astype(str) == "False"]
    assert len(emitted) == 5 and (emitted.status == "ok").all() and (emitted.steps == 3).all()
    assert set(emitted.precision) <= {"fp32", "bf16"} and (emitted.world_size == 2).all()


def test_check_against_a_reference_reports_rank_correlation():
    t, stats = probe.check_reference(str(ROOT / "results" / "reference" / "cpu-extras"),
                                      link=Link(1e9, 3e-4, "fixed for the test"))
    import pandas as pd

    ok = pd.read_csv(ROOT / "results" / "reference" / "cpu-extras" / "results.csv").status.eq("ok").sum()
    assert stats["rows"] == len(t) == ok > 0 and stats["call_overhead_source"].endswith("reference/cpu")
    assert -1 <= stats["spearman"] <= 1 and stats["median_abs_error"] >= 0
    assert (t.pred_tokens_per_s > 0).all()


def test_a_model_shape_instead_of_a_preset(tmp_path):
    r = _advise("--shape", "32,32,4096", "--device", "H100", "--devices", "8", "--nodes", "2", "--global-batch", "64",
                "--seq-len", "2048", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "advise.csv")
    assert (t.fits == "yes").any() and (t.dp * t.tp * t.pp == 16).all()
    assert "shape-32x32x4096x50257" in (tmp_path / "advise.md").read_text()


def test_repredict_rewrites_only_the_prediction_columns(tmp_path):
    """scripts/repredict_memory.py on a reference whose predictions went stale: the prediction columns are the
    model's again, every other field (the measurements) is byte for byte what was recorded."""
    import csv
    import shutil
    import subprocess
    import sys

    src = ROOT / "results" / "reference" / "cpu-optimizers"
    ref = tmp_path / "ref"
    shutil.copytree(src, ref, ignore=shutil.ignore_patterns("plots"))
    with open(ref / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["predicted_memory_bytes"], rows[0]["memory_prediction_error"] = "1", "-0.99"
    with open(ref / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = subprocess.run([sys.executable, "scripts/repredict_memory.py", str(ref)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "1 row(s) re-predicted" in r.stdout, r.stderr[-2000:]
    assert (ref / "results.csv").read_bytes() == (src / "results.csv").read_bytes()


def test_an_optimizer_whose_step_cannot_be_counted_is_one_error_line(tmp_path):
    """An optimizer (here from a file) whose step fails on the stand-in cannot be priced: one error line naming
    it and why, exit 2, not a table that leaves its update out."""
    path = tmp_path / "broken.py"
    path.write_text(
        "from llmopt.optimizers import OptimizerSpec, nothing\n\n\n"
        "class Broken:\n    def step(self):\n        raise RuntimeError('no step here')\n\n\n"
        "SPEC = OptimizerSpec(name='broken', about='a step that raises', build=lambda *a: Broken(),\n"
        "                     default_lr=0.1, lr_centre=0.1, state_bytes=nothing)\n")
    env = dict(os.environ, LLMOPT_OPTIMIZERS=str(path), LLMOPT_CACHE=str(tmp_path / "cache"))
    r = _advise("--preset", "gpt2", "--device", "H100", "--devices", "8", "--optimizer", "broken",
                "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --optimizer broken") and "no step here" in lines[0], lines
