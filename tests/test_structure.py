"""The code's shape: every module imports on its own, and no two modules import each other (directly or
through others, counting imports inside functions, which is where such cycles hide)."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def modules() -> dict[str, str]:
    out = {}
    for pkg in ("llmopt", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {n for n in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if n in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n, path):
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d, path + [d])):
                return c
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "llmopt.step" in graph and "llmopt.engines" in graph["llmopt.step"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the checker itself finds a cycle when there is one
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in modules() if not n.endswith("__main__"))
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_sweep_and_the_config_start_without_the_distributed_stack():
    """``python -m bench.run`` and everything that reads a config import llmopt.core.config; DTensor and FSDP (a large
    share of such a process's start-up) wait for a rank that needs them."""
    code = ("import sys, bench.run, bench.executors, llmopt.core.config\n"
            "print(sorted(m for m in sys.modules if m in %r))"
            % (["torch.distributed.tensor", "torch.distributed.fsdp"],))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_the_core_is_torch_free():
    """llmopt.core (config, shapes, run metrics, cli) and the optimizers' specs import no torch: a flag's check, the
    sweep's parent and a job's wrapper read them, and none should wait seconds for torch (or need it at all)."""
    core = sorted(n for n in modules() if n.startswith(("llmopt.core", "llmopt.optimizers")))
    assert {"llmopt.core.config", "llmopt.core.cli", "llmopt.optimizers.soap"} <= set(core)
    code = "import importlib, sys\nfor n in %r:\n    importlib.import_module(n)\nprint('torch' in sys.modules)" % core
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr[-2000:])


def test_a_jobs_wrapper_starts_without_torch():
    """A submitit or SLURM job unpickles ``bench.executors.job.ConfigJob`` and starts its config, which imports torch
    itself: the wrapper importing torch first (through the ``llmopt`` package, a config or the metrics) delayed
    every job by one import."""
    import pickle

    from bench.executors.job import ConfigJob  # as the sweep submits it

    code = "import pickle, sys\npickle.loads(sys.stdin.buffer.read())\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=pickle.dumps(ConfigJob(30.0)), capture_output=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == b"False", (r.stdout, r.stderr[-2000:])


def test_a_slurm_jobs_peak_from_its_nodes_cache_imports_no_torch(tmp_path):
    """After its config, a SLURM job states the row's peak FLOP/s: measured by the node's first job, read from the
    node's cache by the others, which then end without importing torch."""
    import json

    import torch

    from bench.hardware import measure_node_peak
    from llmopt.core.config import TrainConfig
    from llmopt.core.run_metrics import RunMetrics

    config = {"preset": "tiny", "device": "cpu", "global_batch": 4, "seq_len": 16}
    metrics = RunMetrics(config={"device": "cpu", "pp_microbatches": 1}, losses=[], flops_per_token=1.0)
    cache = str(tmp_path / "peak_flops" / "node.json")
    threads = torch.get_num_threads()
    try:  # the node's first job measures, with every core it has (restored after: this is the test's process)
        measure_node_peak(TrainConfig(**config), metrics, str(tmp_path / "first.json"), cache)
    finally:
        torch.set_num_threads(threads)
    code = ("import json, sys\nfrom bench.hardware import measure_node_peak\n"
            "from llmopt.core.config import TrainConfig\n"
            "from llmopt.core.run_metrics import RunMetrics\nm = RunMetrics(**json.loads(sys.argv[1]))\n"
            "measure_node_peak(TrainConfig(**json.loads(sys.argv[2])), m, sys.argv[3], sys.argv[4])\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(metrics.__dict__), json.dumps(config),
                        str(tmp_path / "later.json"), cache], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr[-2000:])
    first, later = (json.loads((tmp_path / f"{n}.json.peak").read_text()) for n in ("first", "later"))
    assert later == first and first[1].startswith("measured:cpu"), (first, later)


@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--tp", "3"], ["--data", "no-such-file"],
                                  ["--optimizer", "lamb", "--optimizer-impl", "foreach"]])
def test_a_mistake_in_the_flags_is_refused_before_torch_is_imported(argv):
    """``llmopt.train`` checks everything it can (values, combinations, --data) before its first torch import,
    so a mistake is one line at once, not one line after the slowest part of any start."""
    code = ("import sys\nfrom llmopt.train import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_llmopt_never_imports_bench():
    """The library stands alone: the harness imports llmopt, never the other way (inside functions too)."""
    graph = import_graph()
    upward = {(n, d) for n, deps in graph.items() if n.startswith("llmopt") for d in deps if d.startswith("bench")}
    assert not upward, sorted(upward)
    assert any(d.startswith("llmopt") for d in graph["bench.run"])  # the checker sees imports at all


def test_the_readme_layout_names_every_module():
    """README's "Layout" section lists every module of llmopt/ and bench/ (by file name, under its folder), so
    a new module is found where a newcomer looks first. The failure names the ones missing. The optimizers'
    files are named by their folder: adding one is one file, not one file and a README line."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    layout = readme.split("## Layout", 1)[1]
    assert "optimizers/" in layout
    missing = []
    for path in modules().values():
        base = os.path.basename(path)
        if os.path.basename(os.path.dirname(path)) == "optimizers":
            continue
        if base not in ("__init__.py", "__main__.py") and base not in layout:
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, f"README's Layout section lacks {sorted(missing)}"
