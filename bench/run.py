"""``python -m bench.run``: sweep a matrix, each config in its own processes, into a results directory.

    python -m bench.run [--matrix NAME|FILE.toml] [--device auto|cpu|cuda] [--out DIR] [--resume]
                        [--filter key=value,...] [--steps N] [--timeout S]

Each config runs as ``python -m llmopt.train`` (which starts its own ranks), with a timeout, its output in
DIR/logs/<config_id>.log and its figures in DIR/metrics/<config_id>.json; the row is built from that JSON,
never from log text (only a failure's last ``error:`` line is read from the log). Whatever one config does,
its processes are gone afterwards and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.hardware import environment, peak_flops, write_json
from bench.matrix import NAMED, MatrixError, baseline_of, config_id, expand, parse_filter, rank_budget
from bench.results import OK_METRIC_COLUMNS, RUN_METRIC_COLUMNS, STATUSES, ResultFiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "results", "runs")
LATEST = os.path.join(REPO, "results", "latest")
MAX_CONFIGS = 10_000
EXACT = 1e-4         # nats: "exact" parity (fp32 layouts agree to ~1e-6; this leaves room for reduction order)
AMP_TOLERANCE = 5e-2  # nats: a bf16/fp16 curve within this of the fp32 baseline is "within AMP tolerance"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", default=None, help=f"{', '.join(NAMED)}, or a .toml file (default: default)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--out", default=None, help="results directory (default: results/runs/<UTC time>-<matrix>)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep in --out (default: results/latest)")
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
    return p


def status_of(rc: int, timed_out: bool) -> str:
    from llmopt.train import EXIT_DIVERGED, EXIT_OOM

    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == EXIT_DIVERGED:
        return "diverged"
    if rc in (EXIT_OOM, -signal.SIGKILL, 128 + signal.SIGKILL):
        return "oom"  # a SIGKILL the harness did not send is the kernel's OOM killer
    return "failed"


def last_error_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return ""
    lines = [l for l in lines if not l.startswith("$ ")]  # the harness's own command line is never the error
    errors = [l for l in lines if l.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


def run_config(entry: dict, out_dir: str, timeout: float, warmup: int) -> tuple[str, str, dict | None, float]:
    """Run one config in its own process group; returns (status, error, metrics or None, wall seconds)."""
    cfg, cid = entry["config"], entry["config_id"]
    metrics_path = os.path.join(out_dir, "metrics", f"{cid}.json")
    log_path = os.path.join(out_dir, "logs", f"{cid}.log")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)  # a rerun after resume must not read a stale file
    argv = [sys.executable, "-m", "llmopt.train", "--quiet", "--memory-breakdown",
            "--timing-warmup", str(warmup), "--metrics-out", metrics_path]
    for k, v in cfg.items():
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            argv += [flag] if v else []
        elif v is not None:
            argv += [flag, str(v)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg["dp"] * cfg["tp"] * cfg["pp"] > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (cfg["dp"] * cfg["tp"] * cfg["pp"])))
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv[1:]) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = None
        except BaseException:  # Ctrl-C: take the config's processes down with us
            _kill_group(proc)
            raise
        _kill_group(proc)
        rc = proc.wait() if rc is None else rc
    wall = time.monotonic() - t0
    status = status_of(rc, timed_out)
    metrics, unreadable = read_metrics(metrics_path)
    if status == "ok" and metrics is None:
        status = "failed"
    error = unreadable
    if status == "timeout":
        error = f"killed after {timeout:.0f} s (--timeout)"
    elif status != "ok":
        error = error or last_error_line(log_path) or f"exit code {rc}"
        if status == "oom" and rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
            error = f"killed by SIGKILL (the kernel's OOM killer?); {error}"
    return status, error, metrics, wall


def read_metrics(path: str) -> tuple[dict | None, str]:
    """(metrics, "") or (None, why): a full disk can leave an empty file, which fails this config, not the sweep."""
    if not os.path.exists(path):
        return None, ""
    try:
        with open(path) as f:
            return json.load(f), ""
    except (OSError, ValueError) as e:
        return None, f"metrics JSON unreadable ({e}); is the disk full?"


def _kill_group(proc: subprocess.Popen) -> None:
    """Every process of the config (launcher agent, ranks, their children) is gone after this."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: an unreaped (zombie) leader still counts as a member of its group
            if not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def parity_verdict(max_abs: float | None, precision: str, is_baseline: bool) -> str:
    if is_baseline:
        return "baseline"
    if max_abs is None:
        return ""
    if max_abs <= EXACT:
        return "exact"
    if precision != "fp32" and max_abs <= AMP_TOLERANCE:
        return "within AMP tolerance"
    return "drifted"


@dataclass(frozen=True)
class RowContext:
    """What a row needs beyond the config's own metrics: the sweep's timing warm-up, the loss curve of the
    config's baseline when it has run (None otherwise) and the peak FLOP/s of one device for its dtype
    (value, source), or None when there is none."""
    timing_warmup: int
    baseline_losses: tuple[float, ...] | None = None
    peak: tuple[float, str] | None = None


def build_row(entry: dict, status: str, error: str, metrics: dict | None, wall: float,
              ctx: RowContext) -> tuple[dict, dict]:
    """The results row and the per-config detail rows ({"steps": [...], "evals": [...]}) of one config: a
    pure function of the config's entry, its outcome and metrics, and ``ctx``."""
    from llmopt.config import TrainConfig
    from llmopt.metrics import mfu

    cfg = entry["config"]
    tc = TrainConfig(**cfg)
    row = dict(cfg)
    row.update(config_id=entry["config_id"], status=status, error=error, engine=cfg.get("engine", "native"),
               world_size=tc.world_size, micro_batch=tc.micro_batch, timing_warmup=ctx.timing_warmup,
               added_as_baseline=entry["added_as_baseline"], wall_s=round(wall, 2))
    details = {"steps": [], "evals": []}
    if metrics is None:
        return row, details
    resolved = metrics["config"]
    cid = entry["config_id"]
    row.update({k: resolved[k] for k in ("lr", "pp_microbatches", "device", "steps")})
    losses = metrics["losses"]
    details["steps"] = [{"config_id": cid, "step": i, "loss": l, "step_time_ms": t}
                        for i, (l, t) in enumerate(zip(losses, metrics["step_time_ms"]))]
    details["evals"] = [{"config_id": cid, **e} for e in metrics.get("evals", [])]
    row.update({k: metrics.get(k) for k in RUN_METRIC_COLUMNS})
    row.update(steps_run=len(losses), tokens_seen=len(losses) * tc.tokens_per_step,
               train_seconds=sum(metrics["step_time_ms"]) / 1e3)
    if status != "ok":
        row["final_loss"] = losses[-1] if losses else None
        return row, details
    row.update({k: metrics[k] for k in OK_METRIC_COLUMNS})
    peak, pred = metrics["peak_memory_bytes"], metrics["predicted_memory"]
    breakdown = metrics.get("memory_breakdown") or {}
    row.update(predicted_memory_bytes=pred["total"], final_loss=losses[-1],
               memory_prediction_error=(pred["total"] - peak) / peak if peak else None)
    for cat in ("parameters", "gradients", "optimizer_state", "activations", "other"):
        row[f"memory_{cat}_bytes"] = breakdown.get(cat)
        if cat != "other":
            row[f"predicted_{cat}_bytes"] = pred[cat]
    if ctx.peak is not None:
        n_devices = tc.world_size if resolved["device"] == "cuda" else 1  # CPU ranks share one CPU
        value, source = ctx.peak
        row.update(peak_flops=value * n_devices, peak_flops_source=source,
                   mfu=mfu(metrics["tokens_per_s"], metrics["flops_per_token"], value * n_devices))
    if entry.get("compare_with_baseline", True):
        row.update(_parity(entry, cfg, losses, ctx.baseline_losses))
    return row, details


def _parity(entry: dict, cfg: dict, losses: list[float], baseline_losses) -> dict:
    base_id = config_id(baseline_of(cfg))
    is_baseline = base_id == entry["config_id"]
    ref = losses if is_baseline else baseline_losses
    out = {"baseline_id": base_id}
    if ref is not None and len(ref) == len(losses):
        out["loss_parity_max_abs"] = max((abs(a - b) for a, b in zip(losses, ref)), default=0.0)
    out["parity_verdict"] = parity_verdict(out.get("loss_parity_max_abs"), cfg["precision"], is_baseline)
    return out


def row_peak(entry: dict, metrics: dict | None, cache: dict) -> tuple[float, str] | None:
    """The peak FLOP/s a finished config's MFU is stated against (measured on first use, kept in ``cache``)."""
    if metrics is None or "flops_per_token" not in metrics:
        return None
    from llmopt.config import TrainConfig

    tc, resolved = TrainConfig(**entry["config"]), metrics["config"]
    mc = tc.model_config
    value, source = peak_flops(resolved["device"], tc.precision, cache, mc.n_embd, mc.vocab_size,
                               tc.micro_batch * tc.seq_len // resolved["pp_microbatches"])
    return (value, source) if value else None


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
             f"mem {float(row['peak_memory_bytes']) / 2**20:6.1f} MiB (pred {float(row['predicted_memory_bytes']) / 2**20:.1f})",
             f"loss {float(row['final_loss']):.4f}"]
    if row.get("parity_verdict"):
        parts.append(str(row["parity_verdict"]))
    return "  ".join(parts)


class Stopped(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so the running config's processes are killed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return sweep(args, argv)
    except MatrixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a vanished directory while writing the sweep's own files
        print(f"error: cannot write the sweep's files ({e}); free space or fix the directory, then --resume",
              file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _resolve_out(args) -> tuple[str, dict | None]:
    """The sweep directory (absolute: configs run from the repository root) and, on resume, its plan."""
    if args.resume:
        out = os.path.abspath(args.out) if args.out else LATEST
        plan_path = os.path.join(out, "plan.json")
        if not os.path.exists(plan_path):
            raise MatrixError(f"--resume: {out!r} holds no sweep (no plan.json); pass the --out of the sweep to finish")
        try:
            with open(plan_path) as f:
                saved = json.load(f)
            saved["plan"], saved["device"], saved["matrix"]
        except (ValueError, KeyError, TypeError) as e:
            raise MatrixError(f"--resume: {plan_path} is corrupt ({e}); it cannot be finished, start a new sweep") from None
        return os.path.realpath(out), saved
    if args.out:
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise MatrixError(f"--out {args.out!r} is a file; pass a directory")
        if os.path.exists(os.path.join(out, "results.csv")):
            raise MatrixError(f"--out {args.out!r} already holds results; add --resume to finish it or pick a new --out")
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
    if args.max_configs < 1:
        raise MatrixError(f"--max-configs {args.max_configs}: must be at least 1")
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


def _new_plan(args) -> tuple[list[dict], str, str, int]:
    from bench.matrix import WARMUP_STEPS
    from llmopt.config import resolve_device

    device = resolve_device(args.device or "auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MatrixError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    matrix = args.matrix or "default"
    plan = expand(matrix, device, rank_budget(device), args.steps, parse_filter(args.filter), args.max_configs)
    warmup = min(WARMUP_STEPS[device], max(0, plan[0]["config"]["steps"] - 1))
    return plan, device, matrix, warmup


def _lock(out: str):
    """One writer per sweep directory: an advisory lock held for the whole sweep (resumes included)."""
    import fcntl

    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise MatrixError(f"--out {out}: another bench.run (PID {holder}) is writing this sweep; wait for it to end "
                          f"or stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def sweep(args, argv) -> int:
    retry = _check_args(args)
    out, saved = _resolve_out(args)
    if saved is not None:
        plan, device, matrix = saved["plan"], saved["device"], saved["matrix"]
        warmup = saved.get("timing_warmup", saved.get("warmup_steps"))
    else:
        plan, device, matrix, warmup = _new_plan(args)
    for sub in ("logs", "metrics"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    with _lock(out):  # held for the whole sweep; closing the file releases it
        return _run_sweep(args, argv, out, saved, retry, plan, device, matrix, warmup)


def _run_sweep(args, argv, out, saved, retry, plan, device, matrix, warmup) -> int:
    from bench.tuning import followups

    def save_plan():
        write_json(os.path.join(out, "plan.json"), {"matrix": matrix, "device": device, "timing_warmup": warmup,
                                                    "plan": plan})

    if saved is None:
        save_plan()
        write_json(os.path.join(out, "env.json"), environment(argv))
        if not args.out:
            _point_latest(out)
    files = ResultFiles(out)
    try:
        done_rows, details = files.load(repair=True, reject=args.repair)
    except ValueError as e:
        raise MatrixError(f"--resume: {e}") from None
    if retry:
        files.drop({r["config_id"] for r in done_rows if r["status"] in retry})
        done_rows, details = files.load()
    t_start = time.monotonic()
    runner = _Runner(out, files, warmup, args.timeout, done_rows, details["steps"])
    try:
        while True:
            runner.run(plan)
            # Adaptive matrices (convergence) add configs computed from the rows so far: a learning-rate grid
            # widened at its edge, the winner in another precision. Stored in plan.json, so resume sees them.
            more = followups(matrix, plan, runner.rows)
            if not more:
                break
            plan += more
            save_plan()
            print(f"bench: {len(more)} follow-up configs added ({', '.join(sorted({e['phase'] for e in more}))})",
                  flush=True)
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name}): the running config was stopped, finished rows are "
              f"kept; finish with  python -m bench.run --resume --out {out}", file=sys.stderr)
        return 128 + signum
    env_path = os.path.join(out, "env.json")
    with open(env_path) as f:
        env = json.load(f)
    env["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["sweep_seconds"] = env.get("sweep_seconds", 0.0) + (time.monotonic() - t_start)  # summed over resumes
    write_json(env_path, env)
    if not args.no_report:
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


class _Runner:
    """Runs the plan's entries that have no row yet, appending each row as it ends, with progress lines."""

    def __init__(self, out: str, files: ResultFiles, warmup: int, timeout: float, done_rows: list[dict],
                 done_steps: list[dict]):
        self.out, self.files, self.warmup, self.timeout = out, files, warmup, timeout
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
                raise MatrixError(f"{self.peak_cache_path} is corrupt ({e}); delete it (the peak is measured again)") from None
        self.t_start, self.ran = time.monotonic(), 0

    def run(self, plan: list[dict]) -> None:
        done = {r["config_id"] for r in self.rows}
        todo = [e for e in plan if e["config_id"] not in done]
        total = len(plan)
        if not todo:
            return
        print(f"bench: {len(todo)} of {total} configs to run -> {self.out}"
              + (f" ({len(done)} already done)" if done else ""), flush=True)
        for i, entry in enumerate(todo):
            if entry["skipped"] is not None:
                status, error, metrics, wall = "skipped", entry["skipped"], None, 0.0
            else:
                status, error, metrics, wall = run_config(entry, self.out, self.timeout, self.warmup)
                self.ran += 1
            base = self.baselines.get(config_id(baseline_of(entry["config"])))
            ctx = RowContext(self.warmup, None if base is None else tuple(base),
                             row_peak(entry, metrics, self.peak_cache) if status == "ok" else None)
            row, details = build_row(entry, status, error, metrics, wall, ctx)
            if status == "ok" and row.get("baseline_id") == entry["config_id"]:
                self.baselines[entry["config_id"]] = [d["loss"] for d in details["steps"]]
            self.files.append(row, details)
            self.rows.append(row)
            write_json(self.peak_cache_path, self.peak_cache)
            n_done = total - len(todo) + i + 1
            elapsed = time.monotonic() - self.t_start
            runnable_left = sum(1 for e in todo[i + 1:] if e["skipped"] is None)
            eta = elapsed / self.ran * runnable_left if self.ran else 0.0
            print(f"{_bar(n_done, total)} {n_done:>4}/{total} {_fmt_s(elapsed)} ETA {_fmt_s(eta)}  "
                  f"{row['status']:<8} {entry['config_id']:<42} {headline(row)}", flush=True)


def _point_latest(out: str) -> None:
    try:
        if os.path.islink(LATEST) or os.path.exists(LATEST):
            os.remove(LATEST)
        os.symlink(os.path.relpath(out, os.path.dirname(LATEST)), LATEST)
    except OSError:
        pass  # a filesystem without symlinks: the run directory is printed anyway


if __name__ == "__main__":
    sys.exit(main())
