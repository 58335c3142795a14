"""A SLURM cluster on this machine (one node, or several sharing it), for the tests that run sweeps through
``--executor slurm``.

Everything lives in one temporary directory: a fresh munge key and munged's socket, a ``slurm.conf`` naming
this host with its CPU count, one partition (``debug``) and free ports, the controller's state and slurmd's
spool. No accounting (``sacct`` then fails, as on many small clusters: what ``bench.executors.SlurmQueue`` is
for) and no cgroups (``proctrack/linuxproc``: containers seldom delegate them). Clients find it through
``SLURM_CONF``. A requeued job may start again after ``cred_expire`` (5 s here, SLURM's default 120) and the
scheduler looks every second (``sched_interval``), so a requeue takes seconds here, not minutes. Needs root
(slurmd starts jobs as their users) and Debian's ``slurmctld slurmd slurm-client munge`` (``.ci/run``
installs them)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

PACKAGES = "slurmctld slurmd slurm-client munge"
PARTITION = "debug"
REQUIRE = "LLMOPT_REQUIRE_SLURM"  # set by .ci/run: there a missing cluster fails, never skips


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    absent = [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
              if shutil.which(p) is None and not os.path.exists(f"/usr/sbin/{p}")]
    if absent:
        return f"no {', '.join(absent)} (apt-get install {PACKAGES})"
    if os.geteuid() != 0:
        return "slurmd needs root"
    return None


def start_or_skip(root: str, nodes: int = 1) -> "Cluster":
    """A started cluster for a test module's fixture; the module is skipped where none can start, failed where
    ``REQUIRE`` says one must."""
    import pytest

    why = missing()
    if why:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set but no SLURM test cluster can start: {why}")
        pytest.skip(f"no SLURM test cluster: {why}")
    return Cluster(root, nodes).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """``start()`` brings munged, slurmctld and slurmd up and waits until ``sinfo`` shows the node idle;
    ``stop()`` cancels its jobs and stops what ``start()`` started. With ``nodes`` > 1, that many nodes
    ``n1``, ``n2``, ... on this one machine: one slurmd each (``slurmd -N n1``), each with its own port, spool
    directory and log, all reached at 127.0.0.1 and each offering all of this machine's CPUs."""

    def __init__(self, root: str, nodes: int = 1):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.nodes = [socket.gethostname()] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.node = self.nodes[0]
        self.cpus = os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def _write_files(self) -> None:
        os.chmod(self.root, 0o700)  # munged refuses a key or socket in a directory others can write
        for sub in ("state", *(f"spool-{n}" for n in self.nodes)):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        key = os.path.join(self.root, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        if len(self.nodes) == 1:
            node_lines = f"NodeName={self.node} CPUs={self.cpus} State=UNKNOWN\n"
        else:
            node_lines = "".join(f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
                                 f"Port={_free_port()} CPUs={self.cpus} State=UNKNOWN\n" for n in self.nodes)
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=llmopt-test
SlurmctldHost={socket.gethostname()}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
{node_lines}PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, *cmd: str) -> None:
        name = os.path.basename(cmd[0]) + (f"-{cmd[cmd.index('-N') + 1]}" if "-N" in cmd else "")
        log = open(os.path.join(self.root, name + ".out"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self, wait_s: float = 60.0) -> "Cluster":
        self._write_files()
        r = self.root
        self._daemon(_exe("munged"), "--foreground", "--force", f"--key-file={r}/munge.key",
                     f"--socket={r}/munge.sock", f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
                     f"--seed-file={r}/munged.seed")
        self._wait(lambda: os.path.exists(f"{r}/munge.sock"), wait_s, "munged's socket")
        self._daemon(_exe("slurmctld"), "-D", "-i", "-f", self.conf)
        for node in self.nodes:
            self._daemon(_exe("slurmd"), "-D", "-N", node, "-f", self.conf)
        self._wait(lambda: self.sinfo() == "idle", wait_s, f"sinfo to show {', '.join(self.nodes)} idle")
        return self

    def sinfo(self) -> str:
        """The nodes' state, one word when they all agree ("idle")."""
        out = subprocess.run(["sinfo", "--noheader", "--format=%T", f"--nodes={','.join(self.nodes)}"],
                             env=self.env, capture_output=True, text=True, check=False).stdout
        return " ".join(sorted(set(out.split())))

    def squeue(self) -> list[str]:
        """The ids of jobs still queued or running."""
        out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env, capture_output=True,
                             text=True, check=False).stdout
        return out.split()

    def _wait(self, ready, wait_s: float, what: str) -> None:
        end = time.monotonic() + wait_s
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                logs = "".join(_tail(os.path.join(self.root, n)) for n in
                               ("munged.out", "slurmctld.out", "slurmctld.log",
                                *(f"slurmd-{node}.{ext}" for node in self.nodes for ext in ("out", "log"))))
                self.stop()
                raise RuntimeError(f"SLURM test cluster: no {what} after {wait_s:.0f} s"
                                   + (f" ({', '.join(dead)} exited)" if dead else "") + f"\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.procs:
            subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env, capture_output=True,
                           check=False)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {os.path.basename(path)}\n" + "".join(f.readlines()[-n:])
    except OSError:
        return ""
