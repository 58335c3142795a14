"""``python -m llmopt.train``: flags -> config -> (launch ranks) -> steps -> metrics JSON.

Run with more than one rank (``--dp/--tp/--pp``) and no launcher, it starts the ranks itself through torch's
elastic launcher (the machinery behind ``torchrun --standalone``). Run under ``torchrun`` it uses the world it
is given, so multi-node runs need nothing but torchrun's own flags (see the README and scripts/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import uuid

from llmopt.config import (DEVICES, DP_MODES, MODEL_IMPLS, OPTIMIZER_IMPLS, OPTIMIZERS, PP_SCHEDULES,
                           PRECISIONS, TrainConfig, validate)
from llmopt.model import PRESETS

# Test hook for fault handling: LLMOPT_FAIL_AT="RANK:STEP:raise" or "RANK:STEP:exit" makes that rank fail.
FAIL_ENV = "LLMOPT_FAIL_AT"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="python -m llmopt.train", description="Train a GPT for a few steps with one configuration.")
    a = p.add_argument
    a("--preset", default=d.preset, choices=list(PRESETS), help="model size (default: %(default)s)")
    a("--model-impl", default=d.model_impl, choices=MODEL_IMPLS, help="llmopt's GPT or HF's GPT2LMHeadModel")
    a("--dp", type=int, default=d.dp, help="data-parallel degree")
    a("--dp-mode", default=d.dp_mode, choices=DP_MODES, help="ddp or fsdp (FSDP2)")
    a("--tp", type=int, default=d.tp, help="tensor-parallel degree")
    a("--pp", type=int, default=d.pp, help="pipeline-parallel degree")
    a("--pp-schedule", default=d.pp_schedule, choices=PP_SCHEDULES, help="pipeline schedule")
    a("--pp-microbatches", type=int, default=d.pp_microbatches,
      help="pipeline chunks per accumulation micro-batch (default: --pp)")
    a("--precision", default=d.precision, choices=PRECISIONS, help="fp32, bf16 or fp16 (with loss scaling)")
    a("--grad-accum", type=int, default=d.grad_accum, help="accumulation micro-batches per step")
    a("--global-batch", type=int, default=d.global_batch, help="sequences per step over all ranks")
    a("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    a("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    a("--optimizer-impl", default=d.optimizer_impl, choices=OPTIMIZER_IMPLS, help="torch kernel family")
    a("--lr", type=float, default=d.lr, help="learning rate (default: per optimizer)")
    a("--weight-decay", type=float, default=d.weight_decay, help="on 2-D+ tensors only")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="global-norm clipping; 0 disables")
    a("--steps", type=int, default=d.steps)
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, choices=DEVICES)
    a("--data", default=None, help="a text file to train on (byte tokens); default: generated Markov data")
    a("--metrics-out", default=None, metavar="FILE.json", help="write the metrics JSON here")
    a("--warmup-steps", type=int, default=1, help="steps left out of the tokens/s figure (default: 1)")
    a("--quiet", action="store_true", help="no per-step lines")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.field_names()})


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        cfg = validate(config_from_args(args))
        if args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps {args.warmup_steps}: must be 0 or more")
        if args.metrics_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.metrics_out))):
            raise ValueError(f"--metrics-out: directory of {args.metrics_out!r} does not exist; create it first")
        if cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
            if not _under_launcher() and cfg.world_size > torch.cuda.device_count():
                raise ValueError(f"--dp x --tp x --pp = {cfg.world_size} ranks but {torch.cuda.device_count()} "
                                 f"GPU(s) here; use fewer ranks or launch across nodes with torchrun")
        if _under_launcher():
            from llmopt.distributed.dims import ParallelDims

            ParallelDims.from_config(cfg).check_world(int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.world_size > 1 and not _under_launcher():
        return launch(cfg.world_size, argv)
    return run(cfg, args)


def launch(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` local ranks of this same command with torch's elastic launcher (c10d rendezvous on a
    free port). If a rank fails, the agent stops the others; its error is printed as the last line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"llmopt-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "llmopt.train", *argv)
    except ChildFailedError as e:
        rank, line, code = root_cause(e.failures)
        print(f"error: rank {rank} failed: {line}", file=sys.stderr)
        return code
    return 0


# Errors a rank raises because *another* rank went away: never the root cause when a real error exists.
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
              "Socket Timeout", "SIGTERM")


def root_cause(failures: dict) -> tuple[int, str, int]:
    """(rank, last error line, exit code) of the rank that failed first for a reason of its own."""

    def last_line(f) -> str:
        msg = f.message.get("message", "") if isinstance(f.message, dict) else str(f.message or "")
        line = (msg.strip().splitlines() or [""])[-1]
        if not line or "To enable traceback" in line:  # no Python error recorded: it died
            line = f"exit code {f.exitcode}" + (f" ({f.signal_name()})" if f.exitcode < 0 else "")
        return line

    def key(item):
        rank, f = item
        return (any(s in last_line(f) for s in _SECONDARY), f.timestamp, rank)

    rank, f = min(failures.items(), key=key)
    return rank, last_line(f), (f.exitcode if f.exitcode > 0 else 1)


def _maybe_fail(rank: int, step: int) -> None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    r, s, mode = spec.split(":")
    if int(r) == rank and int(s) == step:
        if mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure on rank {rank} at step {step} ({FAIL_ENV})")


def _record(fn):
    """torch elastic's @record writes a worker's exception where the launcher can read it."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    return _record(_run)(cfg, args)


def _run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from llmopt.metrics import StepTimer, measured_steps, peak_memory_bytes, percentile, reset_peak_memory
    from llmopt.step import build, train_step

    distributed = _under_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    rank = dist.get_rank() if distributed else 0
    try:
        state = build(cfg, device)
        log = rank == 0 and not args.quiet
        if log:
            print(f"llmopt: {cfg.preset} ({_count(cfg):,} params) on {device.type} x{cfg.world_size} "
                  f"[dp={cfg.dp}/{cfg.dp_mode} tp={cfg.tp} pp={cfg.pp}/{cfg.pp_schedule}] {cfg.precision} "
                  f"{cfg.optimizer} grad_accum={cfg.grad_accum} data={state.source.describe()}", flush=True)
        timer = StepTimer(device)
        losses, grad_norms, skipped = [], [], 0
        reset_peak_memory(device)
        for step in range(cfg.steps):
            _maybe_fail(rank, step)
            with timer:
                stats = train_step(state, step)
                loss = stats.loss.item()  # the per-step line needs the value: one host sync per step
            losses.append(loss)
            grad_norms.append(stats.grad_norm.item())
            skipped += int(stats.fp16_skipped)
            if log:
                ms = timer.times_ms[-1]
                print(f"step {step:4d} | loss {loss:.4f} | {ms:8.1f} ms | {stats.tokens / ms * 1e3:10,.0f} tok/s"
                      + (" | fp16 skipped" if stats.fp16_skipped else ""), flush=True)
        peaks = state.layout.gather_peak_memory(peak_memory_bytes(device))
        if rank == 0:
            times = measured_steps(timer.times_ms, args.warmup_steps)
            tokens = cfg.global_batch * cfg.seq_len
            metrics = {
                "config": cfg.to_dict(),
                "losses": losses,
                "grad_norms": grad_norms,
                "step_time_ms": timer.times_ms,
                "warmup_steps": args.warmup_steps,
                "step_time_ms_p50": percentile(times, 50),
                "step_time_ms_p90": percentile(times, 90),
                "tokens_per_s": tokens * len(times) / (sum(times) / 1e3),
                "peak_memory_bytes": max(peaks),
                "peak_memory_bytes_per_rank": peaks,
                "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
                "fp16_skipped_steps": skipped,
                "entropy_floor_nats": state.source.entropy_rate,
                "num_params": _count(cfg),
                "flops_per_token": _flops(cfg),
                "torch_version": torch.__version__,
            }
            if args.metrics_out:
                with open(args.metrics_out, "w") as f:
                    json.dump(metrics, f, indent=1)
            if not args.quiet:
                print(f"done: {metrics['tokens_per_s']:,.0f} tok/s (after {args.warmup_steps} warm-up steps), "
                      f"p50 {metrics['step_time_ms_p50']:.1f} ms, peak memory "
                      f"{metrics['peak_memory_bytes'] / 2**20:,.0f} MiB ({metrics['peak_memory_kind']}), "
                      f"final loss {losses[-1]:.4f}" + (f", fp16 skipped {skipped}" if cfg.precision == "fp16" else ""),
                      flush=True)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _count(cfg: TrainConfig) -> int:
    from llmopt.model import param_count

    return param_count(cfg.model_config)


def _flops(cfg: TrainConfig) -> float:
    from llmopt.model import flops_per_token

    return flops_per_token(cfg.model_config, cfg.seq_len)


if __name__ == "__main__":
    sys.exit(main())
