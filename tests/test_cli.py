import json

import pytest

from llmopt.train import main

BAD = [
    (["--tp", "3"], "--tp 3"),
    (["--grad-accum", "3", "--global-batch", "8"], "--global-batch 8"),
    (["--steps", "0"], "--steps 0"),
    (["--pp", "5"], "--pp 5"),
    (["--optimizer", "adagrad"], "--optimizer"),
    (["--precision", "fp8"], "--precision"),
    (["--data", "/no/such/file.txt"], "--data"),
    (["--seq-len", "4096"], "--seq-len 4096"),
    (["--dp", "2", "--global-batch", "8", "--grad-accum", "8"], "--global-batch 8"),
    (["--pp", "2", "--pp-microbatches", "3"], "--pp-microbatches 3"),
    (["--model-impl", "hf", "--tp", "2"], "--model-impl hf"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--lr", "-0.1"], "--lr"),
    (["--dp", "two"], "--dp"),
    (["--metrics-out", "/no/such/dir/m.json"], "--metrics-out"),
    (["--optimizer-impl", "fused", "--precision", "fp16", "--dp", "2"], "--optimizer-impl fused"),
    (["--profile", __file__], "--profile"),
    (["--profile", "/no/such/dir/profile"], "--profile"),
    (["--optimizer", "muon", "--optimizer-impl", "fused"], "--optimizer-impl fused"),
    (["--optimizer", "muon", "--optimizer-impl", "foreach"], "--optimizer-impl foreach"),
    (["--optimizer", "adafactor", "--optimizer-impl", "fused"], "--optimizer-impl fused"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--optimizer", "muon", "--lr", "nan"], "--lr nan"),
    (["--dp", "3", "--global-batch", "6", "--nnodes", "2", "--rdzv-endpoint", "n1:29500"], "--nnodes 2"),
    (["--dp", "2", "--nnodes", "2"], "--rdzv-endpoint None"),
    (["--dp", "2", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "n1:1"], "--node-rank 2"),
    (["--node-rank", "1"], "--node-rank"),
    (["--no-final-checkpoint"], "--no-final-checkpoint has no effect without --checkpoint-dir"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(argv, flag, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own checks (unknown choice, not an int)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and flag in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("text, extra, match", [
    ('{"dp": 2, "global_batch": 8}', ["--dp", "2"], "drop --dp"),       # a flag beside the whole config
    ('{"dp": "2"}', [], "dp is '2', not an int"),
    ('{"lr": true}', [], "lr is True"),
    ('{"dropout": 0.1}', [], "fields llmopt does not have: dropout"),
    ('[1, 2]', [], "a JSON object"),
    ('{"dp": 2', [], "not readable JSON"),
    ('{"tp": 3}', [], "--tp 3"),                                       # read, then validated like flags
])
def test_a_bad_config_file_is_one_line_exit_2(tmp_path, capsys, text, extra, match):
    """``--config FILE.json`` is the config as a harness or a user wrote it: every value is type-checked
    before any check compares it, so a string where a number goes is a line naming the field, not a
    TypeError."""
    path = tmp_path / "c.json"
    path.write_text(text)
    assert main(["--config", str(path), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines


def test_a_config_file_trains_as_its_flags_would(tmp_path):
    """The same run from ``--config`` and from the flags: the same resolved config and the same losses."""
    from dataclasses import asdict

    from llmopt.core.config import TrainConfig

    cfg = TrainConfig(preset="nano", global_batch=4, seq_len=16, steps=3, optimizer="lamb", lr_schedule="cosine")
    (tmp_path / "c.json").write_text(json.dumps(asdict(cfg)))
    flags = ["--preset", "nano", "--global-batch", "4", "--seq-len", "16", "--steps", "3", "--optimizer", "lamb",
             "--lr-schedule", "cosine"]
    got = []
    for argv in (["--config", str(tmp_path / "c.json")], flags):
        assert main([*argv, "--quiet", "--metrics-out", str(tmp_path / "m.json")]) == 0
        got.append(json.loads((tmp_path / "m.json").read_text()))
    assert got[0]["config"] == got[1]["config"] and got[0]["losses"] == got[1]["losses"]


def test_bad_input_from_the_shell_has_no_traceback(cli):
    r = cli("-m", "llmopt.train", "--tp", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "heads" in r.stderr
    assert r.stdout == ""


def test_cli_writes_metrics(cli, tmp_path):
    out = tmp_path / "m.json"
    r = cli("-m", "llmopt.train", "--steps", "3", "--global-batch", "4", "--seq-len", "32",
            "--metrics-out", str(out))
    assert r.returncode == 0, r.stderr
    step_lines = [l for l in r.stdout.splitlines() if l.startswith("step ")]
    assert len(step_lines) == 3 and "tok/s" in step_lines[0] and "ms" in step_lines[0]
    m = json.loads(out.read_text())
    for key in ("config", "losses", "step_time_ms", "tokens_per_s", "peak_memory_bytes"):
        assert key in m
    assert len(m["losses"]) == len(m["step_time_ms"]) == 3
    assert m["config"]["optimizer"] == "adamw" and m["config"]["lr"] > 0  # resolved, not the 0 sentinel
    assert m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0


@pytest.mark.multiprocess
def test_profile_writes_each_ranks_trace_and_operator_table(cli, tmp_path):
    """--profile: after the timed steps, every rank profiles two more and writes its table and trace; the
    timed figures are those of a run without it."""
    out, m = tmp_path / "prof", tmp_path / "m.json"
    r = cli("-m", "llmopt.train", "--preset", "tiny", "--tp", "2", "--steps", "2", "--global-batch", "4",
            "--seq-len", "16", "--profile", str(out), "--metrics-out", str(m))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(m.read_text())["step_time_ms"]) == 2  # the profiled steps are not timed ones
    for rank in (0, 1):
        table = (out / f"rank{rank}.ops.txt").read_text()
        assert "2 training steps of tiny" in table and "aten::mm" in table, table[:500]
        trace = json.loads((out / f"rank{rank}.trace.json").read_text())
        assert any(e.get("name") == "ProfilerStep#1" for e in trace["traceEvents"])
    assert f"profile: {out}" in r.stdout


def test_torchrun_world_mismatch_is_refused(cli):
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "llmopt.train",
            "--dp", "2", "--steps", "1")
    assert r.returncode != 0
    assert "the launcher started 1 ranks but --dp x --tp x --pp = 2" in r.stderr


def test_the_readme_flag_table_names_every_flag():
    """The flags come from TrainConfig's fields (llmopt.train.build_parser); the README's table must name each,
    so a new field is also a new line there. The failure names what is missing."""
    import os
    import re

    from llmopt.train import build_parser

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    table = readme.split("| flag | meaning (default) |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", table))
    flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert flags <= documented, f"README's flag table lacks {sorted(flags - documented)}"
    assert documented <= flags, f"README's flag table names flags that do not exist: {sorted(documented - flags)}"


ENTRY_POINTS = ["llmopt.train", "llmopt.sample", "llmopt.export", "llmopt.prepare", "bench.run", "bench.report",
                "bench.compare", "bench.advise", "bench.kernels", "bench.targets"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_says_a_bad_flag_in_one_line(module, capsys, monkeypatch):
    """One convention for every `python -m` entry point (llmopt.core.cli): a user's mistake is one `error:` line and
    exit 2, no usage block, no traceback; every option's --help line says what it is. (In this process: each
    module's main, as its `python -m` calls it; llmopt.prepare's is `python -m llmopt.data prepare`.)"""
    import importlib

    from llmopt.core import cli

    made = []
    real = cli.parser
    monkeypatch.setattr(cli, "parser", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    mod = importlib.import_module(module)
    try:
        rc = mod.main(["--no-such-flag"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and "usage" not in err, err
    assert len(made) == 1, "the entry point builds its parser with llmopt.core.cli.parser"
    assert all(a.help for a in made[0]._actions), [a.dest for a in made[0]._actions if not a.help]


@pytest.mark.parametrize("argv", [["-m", "llmopt.data"], ["-m", "llmopt.data", "prepare", "--no-such-flag"],
                                  ["scripts/compile_bare_loop.py"], ["scripts/compile_bare_loop.py", "plain", "x"],
                                  ["scripts/repredict_memory.py", "no-such-sweep"]])
def test_the_other_command_lines_say_a_mistake_in_one_line(cli, argv):
    r = cli(*argv)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr


def test_every_error_line_and_exit_code_comes_from_cli():
    """One way to fail: outside llmopt/core/cli.py no code prints an ``error:`` line itself or returns a bare exit code
    (2, 3, 4), and every ``python -m`` entry point exits through ``cli.exit``. The failure names the lines."""
    import os
    import re

    from conftest import ROOT

    printed = re.compile(r"""print\(\s*f?["']error:""")
    bare_code = re.compile(r"(return|exit\()\s*[234]\s*(\)|#|$)")
    found, entry_points = [], 0
    for top in ("llmopt", "bench", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                path = os.path.join(dirpath, name)
                if not name.endswith(".py") or path.endswith(os.path.join("llmopt", "core", "cli.py")):
                    continue
                text = open(path).read()
                for n, line in enumerate(text.splitlines(), 1):
                    if printed.search(line) or bare_code.search(line):
                        found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
                if 'if __name__ == "__main__":' in text:
                    entry_points += 1
                    if "cli.exit(" not in text.split('if __name__ == "__main__":', 1)[1]:
                        found.append(f"{os.path.relpath(path, ROOT)}: its __main__ does not exit through cli.exit")
    assert entry_points >= 9 and not found, found
    # the checker bites
    assert printed.search('print(f"error: x", file=sys.stderr)') and bare_code.search("        return 2")
    assert bare_code.search("sys.exit(4)") and not bare_code.search("return 2 * 4 * n")
