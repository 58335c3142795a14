"""Figures that say when they are noisy (bench.noise): every row carries its steps' spread, a noisy row is
re-timed at the end of a local sweep and the steadier timing used, the first timed config follows an untimed
warm-up run, and the report states a comparison only beyond the rows' noise."""
import csv

import pandas as pd
import pytest

from conftest import bench_here

MATRIX = "[base]\nsteps = 12\nseq_len = 16\nglobal_batch = 4\n[matrix]\nseed = [0, 1]\n"


def rows(out) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """Seed 1 stalls for a quarter second at one timed step of its first timing (the fault hook's ``slow``),
    seed 0 runs clean; --warm-up and --retime on, as a user's sweep has them."""
    d = tmp_path_factory.mktemp("noise")
    (d / "m.toml").write_text(MATRIX)
    r = bench_here("--matrix", d / "m.toml", "--out", d / "o", "--warm-up", "--retime",
                   env={"LLMOPT_FAIL_AT": "0:6:slow:1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d / "o", r.stdout


def test_a_stalled_row_is_flagged_and_retimed_and_a_clean_one_is_not(stalled):
    out, stdout = stalled
    got = {r["config_id"]: r for r in rows(out)}
    firsts = {r["seed"]: r for r in got.values() if r["phase"] != "retime"}
    retimes = [r for r in got.values() if r["phase"] == "retime"]
    assert firsts["1"]["noisy"] == "True" and float(firsts["1"]["step_time_p90_p50"]) > 1.25, firsts["1"]
    assert firsts["0"]["noisy"] == "False" and float(firsts["0"]["step_time_cv"]) < 0.15, firsts["0"]
    assert [r["config_id"] for r in retimes] == [firsts["1"]["config_id"] + "-retime"]
    assert retimes[0]["noisy"] == "False"  # the re-time ran without the stall
    with open(out / "steps.csv") as f:  # both timings' steps are kept
        ids = {s["config_id"] for s in csv.DictReader(f)}
    assert {firsts["1"]["config_id"], retimes[0]["config_id"]} <= ids
    report = (out / "report.md").read_text()
    assert "1 row(s) spread beyond" in report and "1 re-timed at the end of the sweep" in report
    line = next(l for l in report.splitlines() if l.startswith(f"| {firsts['1']['config_id']} |"))
    assert "| re-timed: second used |" in line and f"{float(retimes[0]['tokens_per_s']):,.0f}" in line
    assert "Configs: 2 (ok 2)" in report  # the re-time is a timing, not a config


def test_the_first_timed_config_follows_an_untimed_warm_up(stalled):
    out, stdout = stalled
    first = rows(out)[0]["config_id"]
    assert f"bench: warm-up: {first} run once, untimed" in stdout
    assert (out / "logs" / f"warmup-{first}.log").exists() and not (out / "metrics" / f"warmup-{first}.json").exists()
    assert len(rows(out)) == 3  # two configs and one re-time: the warm-up wrote no row


def test_resume_keeps_the_retime(stalled, tmp_path):
    import shutil

    out = shutil.copytree(stalled[0], tmp_path / "o", ignore=shutil.ignore_patterns(".lock"))
    before = (out / "results.csv").read_text()
    r = bench_here("--resume", "--out", out, "--no-report", "--retime")
    assert r.returncode == 0 and (out / "results.csv").read_text() == before, r.stderr[-2000:]


def _row(cid, precision, tokens_per_s, cv, seed=0):
    return dict(config_id=cid, precision=precision, tokens_per_s=tokens_per_s, step_time_cv=cv, steps_run=12,
                timing_warmup=2, optimizer="adamw", seed=seed)


@pytest.mark.parametrize("ratio, cv, verdict", [(1.04, 0.05, "within noise of fp32"), (1.04, 0.001, "faster than"),
                                                (0.7, 0.05, "slower than")])
def test_the_precision_sentence_respects_the_rows_noise(ratio, cv, verdict):
    """"bf16 is faster than fp32: 1.04x" once stood on rows whose own spread was larger than 4%."""
    from bench.report import amp_speed

    ok = pd.DataFrame([_row("a", "fp32", 1000.0, cv), _row("b", "bf16", 1000.0 * ratio, cv),
                       _row("c", "fp32", 2000.0, cv, seed=1), _row("d", "bf16", 2000.0 * ratio, cv, seed=1)])
    (line,) = amp_speed(ok)
    assert f"bf16 is {verdict}" in line, line


def test_noise_rules():
    from bench.noise import beyond_noise, is_noisy, relative_se

    assert is_noisy(0.2, 1.0) and is_noisy(0.01, 1.4) and not is_noisy(0.05, 1.1) and not is_noisy(None, None)
    assert relative_se(0.1, 4) == pytest.approx(0.05) and relative_se(None, 4) == 0.0 and relative_se(0.1, 1) == 0.0
    assert beyond_noise(1.2, 0.01, 0.01) and not beyond_noise(1.02, 0.01, 0.01)
