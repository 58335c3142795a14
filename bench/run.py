"""``python -m bench.run``: sweep a matrix, each config in its own processes, into a results directory.

    python -m bench.run [--matrix NAME|FILE.toml] [--device auto|cpu|cuda] [--out DIR] [--resume]
                        [--filter key=value,...] [--steps N] [--timeout S] [--jobs N|auto]
                        [--executor local|submitit-local|slurm]

Each config runs ``llmopt.train``'s main in processes of its own (bench.executors: forked from a pre-imported
launcher, or a submitit job), with a timeout, its output in DIR/logs/<config_id>.log and its figures in
DIR/metrics/<config_id>.json; the row is built from that JSON, never from log text (only a failure's last
``error:`` line is read from the log). Whatever one config does, its processes are gone afterwards and the
sweep goes on. With ``--jobs`` above 1, configs run concurrently on disjoint devices; rows are still written
in plan order, so the CSVs and ``--resume`` are those of a one-at-a-time sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from bench.executors import EXECUTORS, MAX_REQUEUES, PENDING_TIMEOUT_S, ExecutorError, Outcome, Pool, signals_held
from bench.hardware import environment, peak_seconds, row_peak
from bench.matrix import NAMED, MatrixError, check_slurm_options, expand, parse_filter, rank_budget
from bench.noise import NOISY_CV, NOISY_P90_P50, RETIME, RETIME_SUFFIX
from bench.plan import PlanEntry, PlanError, SweepPlan
from bench.results import STATUSES, ResultFiles, Row, Unreadable, read_env
from llmopt.safe_files import UnsafePath, hold_lock, makedirs, refuse_links, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "results", "runs")
LATEST = os.path.join(REPO, "results", "latest")
MAX_CONFIGS = 10_000
# "0" turns --warm-up and --retime off by default (the tests' sweeps: their row counts and times must not
# depend on how loaded the machine is; the tests of these two features turn them on by flag)
STEADY_ENV = "LLMOPT_SWEEP_STEADY"


def build_parser() -> argparse.ArgumentParser:
    from llmopt.core import cli

    p = cli.parser("python -m bench.run", __doc__.split("\n\n")[0])
    p.add_argument("--matrix", default=None, help=f"{', '.join(NAMED)}, or a .toml file (default: default)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--out", default=None, help="results directory (default: results/runs/<UTC time>-<matrix>)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted sweep in --out (default: results/latest)")
    p.add_argument("--retry", default="", metavar="STATUS,...",
                   help="with --resume: run again the configs that ended with these statuses (e.g. failed,timeout)")
    p.add_argument("--repair", action="store_true",
                   help="with --resume: move unreadable CSV lines into <file>.rejected instead of stopping")
    p.add_argument("--max-configs", type=int, default=MAX_CONFIGS,
                   help="refuse a matrix with more combinations than this (default: %(default)s)")
    p.add_argument("--filter", default=None, help="keep configs matching key=value[,key=value...]")
    p.add_argument("--steps", type=int, default=None, help="steps per config (default: the device's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per config before it is killed")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots at the end")
    steady = os.environ.get(STEADY_ENV, "1") != "0"
    p.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=steady,
                   help="local executor: run the first config once, untimed, before timing anything, so the first "
                        "row is not taken on a cold machine (default: on)")
    p.add_argument("--retime", action=argparse.BooleanOptionalAction, default=steady,
                   help=f"local executor: time a noisy row (step-time cv > {NOISY_CV:g} or p90/p50 > "
                        f"{NOISY_P90_P50:g}) once more at the end of the sweep; the report uses the steadier "
                        f"(default: on)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="each config checkpoints every N steps into OUT/checkpoints/<id> (0: only when SIGTERM or "
                        "SIGUSR2 stops it); a config stopped or killed resumes from it when run again (--resume); an "
                        "ok row's are removed. Default: off, except under --executor slurm (0: a requeued job "
                        "resumes)")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="TensorBoard event files of each config in DIR/<config id> (llmopt.train --log-dir)")
    p.add_argument("--jobs", default="auto", metavar="N|auto",
                   help="configs at once on disjoint devices (default auto: 1 on CPU, every GPU busy on CUDA)")
    p.add_argument("--executor", default=None, choices=EXECUTORS,
                   help="local (default), submitit-local (the same jobs through submitit), slurm (one job per config)")
    s = p.add_argument_group("slurm (also from the matrix TOML's [slurm] table; flags win)")
    s.add_argument("--slurm-partition", default=None, help="the partition each config's job is submitted to")
    s.add_argument("--slurm-account", default=None, help="the account each config's job is charged to")
    s.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per SLURM node (default: 8)")
    s.add_argument("--cpus-per-node", type=int, default=None, help="CPUs a config's job asks for per node")
    s.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (e.g. constraint=h100, qos=high)")
    s.add_argument("--pending-timeout", type=float, default=PENDING_TIMEOUT_S, metavar="S",
                   help="fail a config whose job is still queued after S seconds (default: %(default).0f, a day); a "
                        "pending reason that can never clear (PartitionConfig, ...) fails it at once")
    s.add_argument("--slurm-time-limit", type=int, default=None, metavar="MIN",
                   help="each job's time limit in minutes (default: --timeout plus 2); a config that runs longer is "
                        "stopped with a checkpoint before it, requeued and resumed")
    s.add_argument("--max-requeues", type=int, default=None, metavar="N",
                   help=f"fail a config whose job was requeued more than N times (default: {MAX_REQUEUES})")
    s.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                   help="CPU configs: ranks per node; a config of more ranks spans nodes (torch's elastic agent, "
                        "c10d rendezvous on the first node). Default: every rank on one node")
    s.add_argument("--slurm-share", action="store_true", default=None,
                   help="let configs' jobs share nodes (default: each job has its nodes to itself, --exclusive, "
                        "so its timings are its own; shared, the report says how many ran at once)")
    return p


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def headline(row: dict) -> str:
    if row["status"] != "ok":
        return row.get("error", "") or ""
    if row.get("target_loss") not in (None, ""):
        reached = row.get("tokens_to_target") not in (None, "")
        return (f"lr {float(row['lr']):.3g}  eval {float(row['final_eval_loss']):.4f}  "
                + (f"target after {int(float(row['tokens_to_target'])):,} tokens" if reached else "target not reached"))
    parts = [f"{float(row['tokens_per_s']):>9,.0f} tok/s", f"p50 {float(row['step_time_ms_p50']):7.1f} ms",
             f"mem {float(row['peak_memory_bytes']) / 2**20:6.1f} MiB "
             f"(pred {float(row['predicted_memory_bytes']) / 2**20:.1f})",
             f"loss {float(row['final_loss']):.4f}"]
    if row.get("parity_verdict"):
        parts.append(str(row["parity_verdict"]))
    if row.get("noisy") is True:
        parts.append(f"NOISY (cv {row['step_time_cv']:.2f}, p90/p50 {row['step_time_p90_p50']:.2f})")
    return "  ".join(parts)


class CodeChanged(Exception):
    """llmopt's or bench's sources changed under a running sweep (the file named)."""


def code_signature() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every source file of llmopt and bench. A config's process imports some of them when it
    starts (the launcher preloads the rest), so a sweep whose sources change under it runs later configs, or
    parts of one, on the new code: an edit beside a sweep once failed 200 configs (a field one module passed
    and the other, preloaded, lacked); a subtler one would mix results without a sign."""
    import bench
    import llmopt

    sig = {}
    for pkg in (llmopt, bench):
        for folder, _, files in os.walk(os.path.dirname(pkg.__file__)):
            for name in files:
                if name.endswith(".py"):
                    st = os.stat(path := os.path.join(folder, name))
                    sig[path] = (st.st_size, st.st_mtime_ns)
    return sig


class Stopped(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so the running config's processes are killed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    from bench.executors import remove_dead_forkserver_dirs
    from llmopt.core import cli
    from llmopt.optimizers import registry as optimizer_registry

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        optimizer_registry()  # a bad LLMOPT_OPTIMIZERS file: one line before anything is planned or written
    except ValueError as e:
        return cli.error(str(e))
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    remove_dead_forkserver_dirs()
    try:
        return sweep(args, argv)
    except (MatrixError, PlanError, ExecutorError, Unreadable, UnsafePath) as e:
        return cli.error(str(e))
    except OSError as e:  # a full disk or a vanished directory while writing the sweep's own files
        return cli.error(f"cannot write the sweep's files ({e}); free space or fix the directory, then --resume")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _resolve_out(args) -> tuple[str, SweepPlan | None]:
    """The sweep directory (absolute: configs run from the repository root) and, on resume, its plan."""
    if args.resume:
        out = os.path.abspath(args.out) if args.out else LATEST
        plan_path = os.path.join(out, "plan.json")
        if not os.path.exists(plan_path):
            raise MatrixError(f"--resume: {out!r} holds no sweep (no plan.json); pass the --out of the sweep to finish")
        refuse_links(out, "--resume")
        saved = SweepPlan.load(plan_path)
        return os.path.realpath(out), saved
    if args.out:
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise MatrixError(f"--out {args.out!r} is a file; pass a directory")
        if os.path.exists(os.path.join(out, "results.csv")):
            raise MatrixError(f"--out {args.out!r} already holds results; add --resume to finish it or pick a "
                              f"new --out")
        refuse_links(out, "--out")
    else:
        name = os.path.splitext(os.path.basename(args.matrix or "default"))[0]
        out = os.path.join(RUNS, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{name}")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise MatrixError(f"--out {out!r}: {parent!r} is not writable; choose another directory")
    return out, None


def _check_args(args) -> set[str]:
    """Refuse bad flags before any work; returns the statuses to retry."""
    if args.steps is not None and args.steps < 1:
        raise MatrixError(f"--steps {args.steps}: must be at least 1")
    if not args.timeout > 0 or args.timeout == float("inf"):
        raise MatrixError(f"--timeout {args.timeout}: must be a positive number of seconds")
    if not args.pending_timeout > 0 or args.pending_timeout == float("inf"):
        raise MatrixError(f"--pending-timeout {args.pending_timeout}: must be a positive number of seconds")
    if args.max_configs < 1:
        raise MatrixError(f"--max-configs {args.max_configs}: must be at least 1")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise MatrixError(f"--checkpoint-every {args.checkpoint_every}: must be 0 (only when stopped by a signal) "
                          f"or more steps")
    try:
        peak_seconds()
    except ValueError as e:
        raise MatrixError(str(e)) from None
    retry = {s for s in args.retry.split(",") if s}
    if retry and (not args.resume or retry - set(STATUSES) or "ok" in retry):
        raise MatrixError(f"--retry {args.retry}: use with --resume and statuses among "
                          f"{', '.join(s for s in STATUSES if s != 'ok')}")
    if args.repair and not args.resume:
        raise MatrixError("--repair: use with --resume")
    if args.resume:
        given = [f for f, v in (("--matrix", args.matrix), ("--filter", args.filter), ("--steps", args.steps),
                                ("--device", args.device)) if v is not None]
        if given:
            raise MatrixError(f"--resume finishes the sweep as planned in its plan.json; drop {', '.join(given)} "
                              f"(or start a new sweep with them)")
    return retry


def _new_plan(args) -> SweepPlan:
    from bench.matrix import WARMUP_STEPS, study_of
    from llmopt.core.config import resolve_device

    device = resolve_device(args.device or "auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MatrixError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    matrix = args.matrix or "default"
    entries = expand(matrix, device, rank_budget(device), args.steps, parse_filter(args.filter), args.max_configs)
    warmup = min(WARMUP_STEPS[device], max(0, entries[0].config.steps - 1))
    study = study_of(matrix, device)
    return SweepPlan(matrix, device, warmup, entries, study[0] if study else None)


def _lock(out: str):
    """One writer per sweep directory: an advisory lock held for the whole sweep (resumes included)."""
    f, holder = hold_lock(os.path.join(out, ".lock"))
    if f is None:
        raise MatrixError(f"--out {out}: another bench.run (PID {holder}) is writing this sweep; wait for it to end "
                          f"or stop it first")
    return f


def _slurm_settings(args, matrix: str) -> dict:
    """SLURM settings: the matrix TOML's [slurm] table, overridden by the flags."""
    from bench.matrix import slurm_table

    settings = slurm_table(matrix) if matrix.endswith(".toml") else {}
    for key in ("partition", "account", "share"):
        if getattr(args, f"slurm_{key}"):
            settings[key] = getattr(args, f"slurm_{key}")
    flags = {"gpus_per_node": args.gpus_per_node, "cpus_per_node": args.cpus_per_node,
             "ranks_per_node": args.ranks_per_node, "time_limit": args.slurm_time_limit,
             "max_requeues": args.max_requeues}
    for key, value in flags.items():
        if value is not None:
            flag = "--slurm-time-limit" if key == "time_limit" else "--" + key.replace("_", "-")
            if value < (0 if key == "max_requeues" else 1):
                raise MatrixError(f"{flag} {value}: must be at least {0 if key == 'max_requeues' else 1}")
            settings[key] = value
    options = dict(settings.get("options") or {})
    for opt in args.slurm_option:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise MatrixError(f"--slurm-option {opt!r}: use KEY=VALUE, e.g. --slurm-option constraint=h100")
        options[key] = value
    settings["options"] = check_slurm_options(options, "--slurm-option / [slurm] options")
    for key in ("partition", "account"):
        if settings.get(key) is not None and not str(settings[key]).isprintable():
            raise MatrixError(f"--slurm-{key} {settings[key]!r}: must be one line of printable text")
    if (args.executor or "local") != "slurm" and any(settings.get(k) for k in ("partition", "account", "options",
                                                                              "share")):
        if args.slurm_partition or args.slurm_account or args.slurm_option or args.slurm_share:
            raise MatrixError("--slurm-partition/--slurm-account/--slurm-option/--slurm-share: use with "
                              "--executor slurm")
    if (args.executor or "local") != "slurm" and any(v is not None for k, v in flags.items() if k not in
                                                      ("gpus_per_node", "cpus_per_node")):
        raise MatrixError("--slurm-time-limit/--max-requeues/--ranks-per-node: use with --executor slurm")
    return settings


def alone_phases(plan: SweepPlan, pool: Pool) -> tuple[str, ...]:
    """The phases whose configs run alone on every core while the others run ``--jobs`` at once: a study's timed
    phases (and their re-times) when its CPU configs share the machine. A study's other runs are measured by their
    loss, which concurrency does not change; a timed one's figure is its time, so it waits for the machine."""
    from bench.study import WALL_CLOCK_PHASES

    return (*WALL_CLOCK_PHASES, RETIME) if plan.study is not None and pool.concurrent_cpu else ()


def _note_concurrency(out: str, pool, alone: tuple[str, ...] = ()) -> None:
    """env.json says how the figures were taken: the report warns when CPU configs ran side by side."""
    env_path = os.path.join(out, "env.json")
    env = read_env(out)
    env.update(executor=pool.executor, jobs=max(pool.jobs, env.get("jobs", 1)),  # over resumes: any concurrency
               concurrent_cpu=pool.concurrent_cpu or env.get("concurrent_cpu", False))
    if alone:  # the report says which figures were taken alone
        env["alone_phases"] = sorted(set(env.get("alone_phases", [])) | set(alone))
    if pool.executor == "slurm":
        env["slurm_shared_nodes"] = pool.shared_nodes or env.get("slurm_shared_nodes", False)
        seen = pool.queue.most_per_node
        env["slurm_most_per_node"] = max(seen, env.get("slurm_most_per_node", 0))
    write_json(env_path, env)


@dataclass
class Sweep:
    """One invocation of the harness, resumed or new: its directory, its plan, the executor pool, and what the
    flags ask of it."""
    out: str
    plan: SweepPlan
    pool: Pool
    resumed: bool
    retry: set[str]              # --resume --retry: the statuses to run again
    argv: list[str]
    named_out: bool              # --out given (results/latest is pointed only at a default directory)
    warm_up: bool                # run the first config once, untimed, before timing anything
    retime: bool                 # time a noisy row once more at the end
    repair: bool                 # move unreadable CSV lines aside instead of stopping
    report: bool


def sweep(args, argv) -> int:
    retry = _check_args(args)
    if args.log_dir is not None:  # the configs' event files: DIR/<config id>, from wherever the configs run
        from llmopt.scratch import check_writable_dir

        check_writable_dir(args.log_dir, "--log-dir", may_exist=True)
        args.log_dir = os.path.abspath(args.log_dir)
    out, saved = _resolve_out(args)
    plan = saved if saved is not None else _new_plan(args)
    # the executor's choices are checked before anything is written
    pool = Pool(args.executor or "local", args.jobs, plan.device, out, args.timeout, plan.timing_warmup,
                _slurm_settings(args, plan.matrix), args.pending_timeout, args.checkpoint_every, args.log_dir)
    for sub in ("logs", "metrics", "configs") + (("checkpoints",) if pool.checkpoints else ()):
        makedirs(os.path.join(out, sub))
    if args.log_dir is not None:
        makedirs(args.log_dir)
    local = pool.executor == "local"
    s = Sweep(out, plan, pool, resumed=saved is not None, retry=retry, argv=argv, named_out=bool(args.out),
              warm_up=args.warm_up and local, retime=args.retime and local, repair=args.repair,
              report=not args.no_report)
    with _lock(out):  # held for the whole sweep; closing the file releases it
        return _run_sweep(s)


def _run_sweep(s: Sweep) -> int:
    from bench.tuning import followups

    out, plan, pool = s.out, s.plan, s.pool
    if not s.resumed:
        plan.save(out)
        if pool.jobs == 1:
            # the launcher imports what a config needs while this process imports torch for the environment
            # (one core each); with several jobs the peaks are measured first, with nothing beside them
            pool.ready()
        write_json(os.path.join(out, "env.json"), environment(s.argv))
        if not s.named_out:
            _point_latest(out)
    files = ResultFiles(out)
    try:
        done_rows, details = files.load(repair=True, reject=s.repair)
    except ValueError as e:
        raise MatrixError(f"--resume: {e}") from None
    if s.retry:
        files.drop({r["config_id"] for r in done_rows if r["status"] in s.retry})
        done_rows, details = files.load()
    t_start = time.monotonic()
    alone = alone_phases(plan, pool)
    _note_concurrency(out, pool, alone)
    runner = _Runner(out, files, plan.timing_warmup, pool, done_rows, details["steps"], warm_up=s.warm_up,
                     alone_phases=alone)
    try:
        while True:
            runner.run(plan.entries)
            # Adaptive matrices (convergence) add configs computed from the rows so far: a learning-rate grid
            # widened at its edge, the winner in another precision. Stored in plan.json, so resume sees them.
            more = (followups(plan.study, plan.entries, runner.rows)
                    or (retimes(plan.entries, runner.rows) if s.retime else []))
            if not more:
                break
            plan.entries += more
            plan.save(out)
            print(f"bench: {len(more)} follow-up configs added ({', '.join(sorted({e.phase for e in more}))})",
                  flush=True)
    except CodeChanged as e:
        from llmopt.core import cli

        return cli.error(f"{e} changed under this sweep, so no config was started after that (the ones running "
                         f"then finished, their rows kept); finish with  python -m bench.run --resume --out {out}  "
                         f"(on the sources as they are now), and leave llmopt and bench alone while it runs")
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name}): the running config was stopped, finished rows are "
              f"kept; finish with  python -m bench.run --resume --out {out}", file=sys.stderr)
        return 128 + signum
    finally:
        _note_concurrency(out, pool)  # again: on SLURM, how many configs were seen at once on one node
    # the predicted updates count the optimizers' steps in a subprocess: after the last timed config, not beside one
    from bench.advisor.probe import fill_predicted_updates

    fill_predicted_updates(files, log=lambda m: print(f"bench: {m}", flush=True))
    env = read_env(out)
    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["sweep_seconds"] = env.get("sweep_seconds", 0.0) + (time.monotonic() - t_start)  # summed over resumes
    write_json(os.path.join(out, "env.json"), env)
    if s.report:
        from bench.report import write_report

        path = write_report(out)
        print(f"report: {path}", flush=True)
    return _summary(runner.rows)


def _summary(rows: list[dict]) -> int:
    """Counts by status, last; exit 1 when a config failed or timed out (ok, skipped, and the expected
    outcomes diverged and oom keep 0: they are findings, not breakage)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("bench: " + ", ".join(f"{k} {counts[k]}" for k in STATUSES if k in counts), flush=True)
    return 1 if counts.get("failed") or counts.get("timeout") else 0


def retimes(plan: list[PlanEntry], rows: list[dict]) -> list[PlanEntry]:
    """A second timing, at the end of the sweep, of each noisy ok row of a throughput config (not a convergence
    run: its figure is its loss): the same config under the id ``<id>-retime`` and phase ``retime``. Once per
    row; stored in plan.json like any follow-up, so a resume runs what is left of them."""
    have = {e.config_id for e in plan}
    by_id = {e.config_id: e for e in plan}
    out = []
    for r in rows:
        cid = r["config_id"]
        if (r["status"] != "ok" or str(r.get("noisy")) != "True" or (r.get("phase") or "") not in ("", "layouts")
                or cid + RETIME_SUFFIX in have or cid not in by_id):
            continue
        out.append(by_id[cid].retimed())
    return out


class _Runner:
    """Runs the plan's entries that have no row yet, up to ``pool.jobs`` at once, and appends each row in plan
    order as soon as it and every row before it are known, with progress lines."""

    def __init__(self, out: str, files: ResultFiles, warmup: int, pool: "Pool", done_rows: list[dict],
                 done_steps: list[dict], warm_up: bool = False, alone_phases: tuple[str, ...] = ()):
        """``alone_phases``: the plan phases whose configs wait until nothing runs and then run on every core,
        nothing beside them (``alone_phases()``); the warm-up then waits for the first of them."""
        self.out, self.files, self.warmup, self.pool, self.warm_up = out, files, warmup, pool, warm_up
        self.alone_phases = alone_phases
        self.code, self.changed = code_signature(), None  # changed: the first source file found changed
        self.rows = list(done_rows)
        self.baselines: dict[str, list[float]] = {}
        for r in done_rows:
            if r["config_id"] == r.get("baseline_id") and r["status"] == "ok":
                self.baselines[r["config_id"]] = [float(s["loss"]) for s in done_steps
                                                  if s["config_id"] == r["config_id"]]
        self.peak_cache_path = os.path.join(out, "peak_flops.json")
        self.peak_cache = {}
        if os.path.exists(self.peak_cache_path):
            try:
                with open(self.peak_cache_path) as f:
                    self.peak_cache = dict(json.load(f))
            except (ValueError, TypeError) as e:
                raise MatrixError(f"{self.peak_cache_path} is corrupt ({e}); delete it (the peak is measured "
                                  f"again)") from None
        self.t_start, self.ran = time.monotonic(), 0

    def run(self, plan: list[PlanEntry]) -> None:
        done = {r["config_id"] for r in self.rows}
        todo = [e for e in plan if e.config_id not in done]
        if not todo:
            return
        print(f"bench: {len(todo)} of {len(plan)} configs to run -> {self.out}"
              + (f" ({len(done)} already done)" if done else "") + self.pool.describe(), flush=True)
        if self.pool.jobs > 1 and self.pool.local:  # measured now, alone: beside running configs it would be low
            for entry in todo:
                if entry.skipped is None:
                    row_peak(entry.config, None, self.peak_cache)
        worlds = [e.config.world_size for e in todo]
        if self.warm_up and not self.alone_phases:
            self._warm_up(next((e for e, w in zip(todo, worlds) if e.skipped is None
                                and self.pool.slots.too_big(w) is None), None))
        outcomes: dict[int, tuple[Outcome, object]] = {}
        running: dict[int, object] = {}
        start, emitted = 0, 0
        try:
            while emitted < len(todo):
                start = self._start_what_fits(todo, worlds, start, running, outcomes)
                if self.changed and not running:
                    raise CodeChanged(os.path.relpath(self.changed))
                for k, job in list(running.items()):
                    outcome = job.poll()
                    if outcome is not None:
                        if outcome.status == "ok":
                            job.drop_checkpoints()
                        outcomes[k] = (outcome, job.slot)
                        self.pool.slots.give(job.slot)
                        del running[k]
                        self.ran += 1
                progressed = emitted in outcomes
                while emitted in outcomes:
                    self._emit(todo, emitted, *outcomes.pop(emitted), len(plan) - len(todo))
                    emitted += 1
                if not progressed:
                    time.sleep(0.05)
        finally:  # Ctrl-C, SIGTERM or an error here: no config's processes or jobs outlive the sweep
            for job in running.values():
                job.cancel()

    def _warm_up(self, entry: PlanEntry | None) -> None:
        """Before the first timed config: that config run once, untimed, its row not written (its log kept as
        logs/warmup-<id>.log), so that the first row is not the one that pays for a cold machine (CPU clocks,
        caches, the allocator, first-touch pages: MLPerf's timing rules leave a warm-up out for the same reason)."""
        self.warm_up = False
        if entry is None:
            return
        self.pool.ready()
        alone = entry.phase in self.alone_phases
        slot = self.pool.slots.take_whole(0) if alone else self.pool.slots.take(entry.config.world_size, 0)
        with signals_held():
            job = self.pool.start(entry.warm_up(), slot)
        outcome = None
        try:
            while outcome is None:
                outcome = job.poll()
                time.sleep(0.05)
        finally:
            if outcome is None:  # Ctrl-C or SIGTERM during the warm-up
                job.cancel()
            self.pool.slots.give(slot)
        if os.path.exists(job.metrics_path):
            os.remove(job.metrics_path)
        took = f"({outcome.wall:.1f} s, {outcome.status})"
        env = read_env(self.out)  # the report says the first row was taken warm
        env["warm_up"] = f"{entry.config_id} {took}"
        write_json(os.path.join(self.out, "env.json"), env)
        print(f"bench: warm-up: {entry.config_id} run once, untimed {took}; timing starts now", flush=True)

    def _start_what_fits(self, todo, worlds, start, running, outcomes) -> int:
        """Start, in plan order, every config that fits on the free devices (a later, smaller config may start
        before an earlier one that waits for more GPUs). Returns the first index not yet started. Nothing starts
        once the sources have changed."""
        for k in range(start, len(todo)):
            if k in running or k in outcomes:
                continue
            entry = todo[k]
            reason = entry.skipped or self.pool.slots.too_big(worlds[k])
            if reason is not None:
                outcomes[k] = (Outcome("skipped", reason, None, 0.0), None)
                continue
            alone = entry.phase in self.alone_phases
            if alone and self.warm_up and not running:
                self._warm_up(entry)
            slot = (self.pool.slots.take_whole(len(running)) if alone
                    else self.pool.slots.take(worlds[k], len(running)))
            if slot is None:
                if alone or self.pool.slots.device != "cuda":
                    break  # equal slots, or waiting for the whole machine: nothing later starts before it
                continue
            if self.changed or self._sources_changed():
                self.pool.slots.give(slot)
                break
            self.pool.ready()
            with signals_held():  # a stop signal lands after the handle is held, so the config is cancelled
                running[k] = self.pool.start(entry, slot)
        while start < len(todo) and (start in running or start in outcomes):
            start += 1
        return start

    def _sources_changed(self) -> bool:
        """Whether a source file changed since the sweep started (``code_signature``); it is kept in ``changed``."""
        now = code_signature()
        self.changed = next((p for p in sorted(self.code.keys() | now.keys()) if self.code.get(p) != now.get(p)),
                            None)
        return self.changed is not None

    def _emit(self, todo: list[PlanEntry], k: int, outcome: Outcome, slot, n_before: int) -> None:
        entry = todo[k]
        base = self.baselines.get(entry.baseline_id)
        peak = (outcome.peak or row_peak(entry.config, outcome.metrics, self.peak_cache, measure=self.pool.local)
                if outcome.status == "ok" else None)
        if peak is not None and slot is not None and slot.cpus:  # (a config run alone has every core: no share)
            share = len(slot.cpus) / (os.cpu_count() or 1)  # the config had these cores, not the whole CPU
            peak = (peak[0] * share, f"{peak[1]} x {len(slot.cpus)}/{os.cpu_count()} cores (--jobs)")
        row = self.files.append(Row(entry, outcome.status, outcome.error, outcome.wall, outcome.metrics,
                                    self.warmup, None if base is None else tuple(base), peak, outcome.requeues))
        if outcome.status == "ok" and row.get("baseline_id") == entry.config_id:
            self.baselines[entry.config_id] = list(outcome.metrics.losses)
        self.rows.append(row)
        write_json(self.peak_cache_path, self.peak_cache)
        total, n_done = n_before + len(todo), n_before + k + 1
        elapsed = time.monotonic() - self.t_start
        runnable_left = sum(1 for e in todo[k + 1:] if e.skipped is None)
        eta = elapsed / self.ran * runnable_left if self.ran else 0.0  # ran counts completions: concurrency included
        print(f"{_bar(n_done, total)} {n_done:>4}/{total} {_fmt_s(elapsed)} ETA {_fmt_s(eta)}  "
              f"{row['status']:<8} {entry.config_id:<42} {headline(row)}", flush=True)


def _point_latest(out: str) -> None:
    try:
        if os.path.islink(LATEST) or os.path.exists(LATEST):
            os.remove(LATEST)
        os.symlink(os.path.relpath(out, os.path.dirname(LATEST)), LATEST)
    except OSError:
        pass  # a filesystem without symlinks: the run directory is printed anyway


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
