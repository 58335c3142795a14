"""Configs across nodes, for real: a two-node SLURM cluster on this one machine (``slurm_cluster``: nodes n1 and
n2, one slurmd each). A config of more ranks than ``--ranks-per-node`` is one job on two nodes, each node's
task starting its ranks through torch's elastic agent with c10d rendezvous on the first node. What is verified
here and what is not (real networks between hosts, a shared filesystem's caching) is in the README's "Long
runs"."""
import csv
import json
import os
import signal
import uuid

import pytest

from conftest import processes_with
from slurm_cluster import start_or_skip
from test_slurm import finish, rows, sweep, wait_for

pytestmark = pytest.mark.multiprocess

BASE = "[base]\nsteps = 6\nseq_len = 16\nglobal_batch = 4\npreset = \"nano\"\n"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    cluster = start_or_skip(str(tmp_path_factory.mktemp("slurm2")), nodes=2)
    yield cluster
    cluster.stop()


def nodes_of(log: str) -> list[str]:
    return sorted(line.split(" running on ")[1].split(",")[0] for line in log.splitlines()
                  if line.startswith("# job ") and " running on " in line)


def test_dp2_across_two_nodes_matches_the_single_process_loss(two_nodes, tmp_path):
    m = tmp_path / "m.toml"
    m.write_text(BASE + "[matrix]\ndp = [2]\n")
    out = tmp_path / "o"
    rc, stdout, err = finish(sweep(two_nodes, "--matrix", m, "--out", out, "--executor", "slurm", "--ranks-per-node",
                                   "1", "--timeout", "120", "--no-report"), cluster=two_nodes)
    assert rc == 0, stdout[-2000:] + err[-3000:]
    (dp2,) = [row for row in rows(out) if row["dp"] == "2"]
    assert dp2["status"] == "ok" and dp2["parity_verdict"] == "exact", dp2
    assert nodes_of((out / "logs" / f"{dp2['config_id']}.log").read_text()) == ["n1", "n2"]


def rank_on(node: str, token: str) -> int:
    """The PID of a rank (not its agent) running on ``node``."""
    for pid in processes_with(token):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURMD_NODENAME") == node.encode() and b"LOCAL_RANK" in env:
            return pid
    return 0


def test_fsdp2_tp2_across_two_nodes_a_killed_rank_and_its_checkpoint_resumed_on_one_node(two_nodes, tmp_path):
    """fsdp2 x tp2 (4 ranks, 2 per node) across the two nodes, checkpointing every 2 steps, ranks 1-3 parked
    before step 4 (LLMOPT_FAIL_AT park: outside any collective, rank 0 in one with them; the single-process
    baseline, rank 0 alone, runs through): a rank on n2 is SIGKILLed, as the OOM killer would. Its row fails
    naming the rank and n2 (not a rank its agent then stopped), nothing stays queued, and the checkpoint the two
    nodes wrote after 4 steps is kept. Resumed (--resume --retry) with all 4 ranks on one node, the config
    continues from it and ends ok, its curve exact against the single process: steps 0-3 computed across the two
    nodes, 4 and 5 on one."""
    m = tmp_path / "m.toml"
    m.write_text(BASE + "[matrix]\nseed = [1]\ndp = [2]\ndp_mode = [\"fsdp\"]\ntp = [2]\n")
    out, token = tmp_path / "o", uuid.uuid4().hex
    p = sweep(two_nodes, "--matrix", m, "--out", out, "--executor", "slurm", "--ranks-per-node", "2",
              "--checkpoint-every", "2", "--timeout", "120", "--no-report",
              env={"LLMOPT_FAIL_AT": "1:4:park:1,2:4:park:1,3:4:park:1", "LLMOPT_TEST_TOKEN": token})

    def parked() -> bool:
        logs = out / "logs"
        return logs.is_dir() and any((logs / n).read_text().count("waiting for a stop signal") == 3
                                     for n in os.listdir(logs))

    wait_for("ranks 1-3 parked before step 4", parked, 120)
    victim = rank_on("n2", token)
    assert victim, "no rank of the config on n2"
    os.kill(victim, signal.SIGKILL)
    rc, stdout, err = finish(p, cluster=two_nodes)
    assert rc == 0, stdout[-2000:] + err[-3000:]  # an oom row is a result (the layout did not fit), not a failure
    killed = {row["tp"]: row for row in rows(out)}["2"]
    assert nodes_of((out / "logs" / f"{killed['config_id']}.log").read_text()) == ["n1", "n2"]
    assert killed["status"] == "oom", killed
    assert " on node n2 failed: killed by SIGKILL" in killed["error"] and killed["error"].startswith("error: rank ")
    assert [n for n in os.listdir(out / "checkpoints" / killed["config_id"]) if n != ".lock"] == ["step-00000004"]
    wait_for("an empty queue and no process left", lambda: two_nodes.squeue() == [] and not processes_with(token), 30)

    rc, stdout, err = finish(sweep(two_nodes, "--resume", "--out", out, "--retry", "oom", "--executor", "slurm",
                                   "--ranks-per-node", "4", "--checkpoint-every", "2", "--timeout", "120"),
                             cluster=two_nodes)
    assert rc == 0, stdout[-2000:] + err[-3000:]
    resumed = {(row["seed"], row["tp"]): row for row in rows(out)}[("1", "2")]
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == "4", resumed
    assert resumed["parity_verdict"] == "exact", resumed
    assert len(set(nodes_of((out / "logs" / f"{resumed['config_id']}.log").read_text()))) == 1
    with open(out / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["config_id"] == resumed["config_id"]] == list(range(6))
    assert not os.path.exists(out / "checkpoints" / resumed["config_id"])
    assert json.loads((out / "env.json").read_text())["executor"] == "slurm"
