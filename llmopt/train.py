"""``python -m llmopt.train``: flags -> config -> (launch ranks) -> steps -> metrics JSON.

Run with more than one rank (``--dp/--tp/--pp``) and no launcher, it starts the ranks itself (llmopt.launch:
forked on CPU, torch's elastic launcher on CUDA). Run under ``torchrun`` it uses the world it is given, so multi-node runs need nothing but torchrun's own flags (see the README and scripts/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from llmopt.config import CHECKPOINT, TrainConfig, validate

# Test hook for fault handling: LLMOPT_FAIL_AT="RANK:STEP:raise", "RANK:STEP:exit" or "RANK:STEP:kill" makes that
# rank fail.
FAIL_ENV = "LLMOPT_FAIL_AT"
# Epoch seconds when the config was started (set by the harness, else at main's entry): start-up is measured
# from it to the rank's first line of work, so it covers imports and rank start-up.
LAUNCH_T0_ENV = "LLMOPT_LAUNCH_T0"
# Exit codes the harness maps to row statuses (2 is a user error, 1 any other failure).
EXIT_DIVERGED = 3
EXIT_OOM = 4


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per TrainConfig field (its type, default, choices and help come from the field), then the
    run's own (outputs, the timing warm-up, quiet)."""
    from dataclasses import fields

    from llmopt import cli
    from llmopt.config import choices

    p = cli.parser("python -m llmopt.train", "Train a GPT for a few steps with one configuration.")
    for f in fields(TrainConfig):
        meta, name = f.metadata, "--" + f.name.replace("_", "-")
        kind = {"bool": bool, "int": int, "float": float}.get(str(f.type))
        extra = f"{meta['help']} (default: {f.default})" if f.default not in (None, False) else meta["help"]
        if f.name == "preset":  # with --init the shape is the checkpoint's, so its default is decided later
            p.add_argument(name, default=None, choices=[c for c in choices(f.name) if c != CHECKPOINT],
                           help=f"{meta['help']} (default: {f.default}, or the checkpoint's shape with --init)")
        elif kind is bool:
            p.add_argument(name, action="store_true", help=meta["help"])
        else:
            p.add_argument(name, type=kind or str, default=f.default, choices=choices(f.name),
                           metavar=meta.get("metavar"), help=extra)
    a = p.add_argument
    a("--save", default=None, metavar="DIR", help="write the trained model (and tokenizer) here, Hugging Face format")
    a("--metrics-out", default=None, metavar="FILE.json", help="write the metrics JSON here")
    a("--timing-warmup", type=int, default=1,
      help="steps left out of the tokens/s figure (default: 1); not the learning-rate warm-up (--lr-warmup)")
    a("--memory-breakdown", action="store_true",
      help="after the timed steps, one untimed step under torch's MemTracker: memory by category")
    a("--profile", default=None, metavar="DIR",
      help="after training, profile 2 more untimed steps: each rank's Chrome trace and operator table in DIR")
    a("--quiet", action="store_true", help="no per-step lines")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {k: getattr(args, k) for k in TrainConfig.field_names()}
    kw["preset"] = args.preset or (CHECKPOINT if args.init else TrainConfig.preset)
    return TrainConfig(**kw)


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault(LAUNCH_T0_ENV, repr(time.time()))
    args = build_parser().parse_args(argv)
    try:
        cfg = validate(config_from_args(args))
        if args.timing_warmup < 0:
            raise ValueError(f"--timing-warmup {args.timing_warmup}: must be 0 or more")
        tokenizer_dir = None
        if cfg.data is not None:
            cfg, tokenizer_dir = _check_data(cfg, args)
        if int(os.environ.get("RANK", "0")) == 0:  # once: the launcher's parent, or rank 0 under torchrun
            _check_outputs(cfg, args, tokenizer_dir)
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
        from llmopt.launch import launch

        return launch(cfg.world_size, argv, cfg.device, main, EXIT_OOM)
    rc = run(cfg, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank's work is done and written; leave without interpreter finalization, where gloo's worker
        # threads can still free tensors that need the GIL and abort the process (SIGABRT, "terminate called
        # without an active exception"; seen here after tensor-parallel runs, see pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _check_data(cfg: TrainConfig, args) -> tuple[TrainConfig, str | None]:
    """Raw text is prepared once, before any rank starts (cached for the next run), and the config validated
    again: its vocabulary is now the prepared data's (a trained BPE may learn fewer tokens than train:N asks
    for). The token files are read once against their meta.json. Returns the config and the data's tokenizer
    directory (None for bytes)."""
    from llmopt.data import check_tokens, is_prepared
    from llmopt.prepare import cached_path, ensure_prepared

    if os.path.isfile(cfg.data) and cfg.tokenizer == "bytes":
        return cfg, None
    if not _under_launcher():
        ensure_prepared(cfg.data, cfg.tokenizer)
        cfg = validate(config_from_args(args))
    path = cfg.data if is_prepared(cfg.data) else cached_path(cfg.data, cfg.tokenizer)
    meta = check_tokens(path) if int(os.environ.get("RANK", "0")) == 0 else {}
    return cfg, meta.get("tokenizer_dir") and os.path.join(path, meta["tokenizer_dir"])


def _check_outputs(cfg: TrainConfig, args, tokenizer_dir: str | None) -> None:
    """Every output the run will write, tried before any training: a failure after it would lose the run."""
    if args.metrics_out:
        from llmopt.scratch import check_writable_file

        check_writable_file(args.metrics_out, "--metrics-out", [cfg.data, cfg.init and cfg.init[3:]])
    if args.profile:
        from llmopt.metrics import check_profile_dir

        check_profile_dir(args.profile)
    if args.save:
        from llmopt.checkpoint import check_save_dir

        check_save_dir(args.save, tokenizer_dir)


def _maybe_fail(rank: int, step: int, seed: int) -> None:
    """The fault-injection hook (tests only): LLMOPT_FAIL_AT="RANK:STEP:MODE[:SEED],...", a spec with SEED
    applying only to configs of that seed (so one sweep can hold healthy and faulty configs)."""
    for spec in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        r, s, mode, *only = spec.split(":")
        if int(r) != rank or int(s) != step or (only and int(only[0]) != seed):
            continue
        if mode == "exit":
            os._exit(17)
        if mode == "kill":  # as the kernel's OOM killer would
            os.kill(os.getpid(), 9)
        if mode == "segv":  # a real segmentation fault: read address 0
            import ctypes

            ctypes.string_at(0)
        if mode == "hang":
            import time

            while True:
                time.sleep(1)
        if mode == "alloc":  # allocate until killed: 1 GiB in 64 MiB chunks, then SIGKILL as the OOM killer would
            hoard: list[bytearray] = []
            while len(hoard) < 16:
                hoard.append(bytearray(64 << 20))
            os.kill(os.getpid(), 9)
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

    from llmopt.model import param_count
    from llmopt.step import build

    distributed = _under_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if _under_launcher():
        from llmopt.launch import die_with_parent

        die_with_parent()
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
        t_build = time.time()
        startup = t_build - float(os.environ.get(LAUNCH_T0_ENV, t_build))
        state = build(cfg, device)
        build_s = time.time() - t_build
        log = rank == 0 and not args.quiet
        if log:
            print(f"llmopt: {cfg.preset} ({param_count(cfg.model_config):,} params) on {device.type} x{cfg.world_size} "
                  f"[dp={cfg.dp}/{cfg.dp_mode} tp={cfg.tp} pp={cfg.pp}/{cfg.pp_schedule}] {cfg.precision} "
                  f"{cfg.optimizer} grad_accum={cfg.grad_accum} data={state.source.describe()}", flush=True)
        def save():  # before any extra step (the memory breakdown's, the profile's): the model the losses describe
            from llmopt.checkpoint import save_pretrained

            save_pretrained(state, args.save)
            if log:
                print(f"saved: {args.save} (Hugging Face format; python -m llmopt.sample {args.save})", flush=True)

        metrics = run_steps(state, rank, local_rank, args.timing_warmup, args.memory_breakdown, log,
                            trained=save if args.save else None)
        metrics.update(startup_s=startup, build_s=build_s)  # rank 0's: where a config's wall time goes
        if rank == 0:
            if args.metrics_out:
                with open(args.metrics_out, "w") as f:
                    json.dump(metrics, f, indent=1)
            if not args.quiet:
                print(f"done: {metrics['tokens_per_s']:,.0f} tok/s (after {metrics['timing_warmup']} warm-up steps), "
                      f"p50 {metrics['step_time_ms_p50']:.1f} ms, peak memory "
                      f"{metrics['peak_memory_bytes'] / 2**20:,.1f} MiB ({metrics['peak_memory_kind']}), "
                      f"final loss {metrics['losses'][-1]:.4f}"
                      + (f", fp16 skipped {metrics['fp16_skipped_steps']}" if cfg.precision == "fp16" else "")
                      + _target_line(metrics), flush=True)
        if args.profile and metrics["diverged_at_step"] is None:  # untimed steps, after --save
            from llmopt.metrics import profiled_steps
            from llmopt.step import train_step

            table = profiled_steps(state, lambda i: train_step(state, i), args.profile, rank, cfg.steps + 1)
            if log:
                print(f"profile: {table} (each rank's operator table and trace.json are in {args.profile})",
                      flush=True)
        if metrics["diverged_at_step"] is not None:
            if rank == 0:
                print(f"error: diverged at step {metrics['diverged_at_step']}: {metrics['diverged_reason']}; "
                      f"lower --lr (or use fp32)", file=sys.stderr)
            return EXIT_DIVERGED
    except (torch.OutOfMemoryError, MemoryError) as e:
        print(f"error: out of memory on rank {rank}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return EXIT_OOM
    except ValueError as e:  # a problem only found once the data is read (e.g. a split shorter than a sequence)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        print(f"error: out of memory on rank {rank}: {str(e).splitlines()[0]}", file=sys.stderr)  # CPU allocator
        return EXIT_OOM
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _target_line(m: dict) -> str:
    if m["target_loss"] is None:
        return f", final eval loss {m['final_eval_loss']:.4f}" if m["final_eval_loss"] is not None else ""
    if m["steps_to_target"] is None:
        return f", target {m['target_loss']:.4f} not reached (best eval {m['best_eval_loss']:.4f})"
    return (f", target {m['target_loss']:.4f} reached after {m['steps_to_target']} steps, "
            f"{m['tokens_to_target']:,} tokens, {m['seconds_to_target']:.1f} s")


def run_steps(state, rank: int, local_rank: int, warmup: int, memory_breakdown: bool, log: bool,
              trained=None) -> dict:
    """The timed steps, then ``trained()`` if they ended without diverging, then (optionally) one untimed step
    under MemTracker. Returns the metrics dict (meaningful on rank 0; collectives make every rank take part)."""
    import torch

    from llmopt.convergence import Convergence
    from llmopt.memory import predict_memory
    from llmopt.metrics import (EnergyMeter, StepTimer, measured_steps, peak_memory_bytes, peak_rss_bytes,
                                percentile, reset_peak_memory, tracked_memory_step)
    from llmopt.model import flops_per_token, param_count
    from llmopt.step import train_step

    cfg, device, layout = state.cfg, state.device, state.layout
    timer, energy = StepTimer(device), EnergyMeter(device, local_rank)
    conv = Convergence(cfg, state.source.entropy_rate)
    warmup = min(warmup, cfg.steps - 1)  # at least one timed step; the metrics say how many were left out
    losses, grad_norms, skipped, diverged, why = [], [], 0, None, None
    reset_peak_memory(device)
    stop = conv.due(0) and conv.evaluate(state, 0, 0.0)
    for step in range(cfg.steps):
        if stop and step > 0:  # at least one step, even when the target is met before training
            break
        _maybe_fail(rank, step, cfg.seed)
        if step == warmup:
            energy.start()
        with timer:
            stats = train_step(state, step)
            loss = stats.loss.item()  # the per-step line and the divergence check need it: one host sync a step
        losses.append(loss)
        grad_norms.append(stats.grad_norm.item())
        skipped += int(stats.fp16_skipped)
        if log:
            ms = timer.times_ms[-1]
            print(f"step {step:4d} | loss {loss:.4f} | {ms:8.1f} ms | {stats.tokens / ms * 1e3:10,.0f} tok/s"
                  + (" | fp16 skipped" if stats.fp16_skipped else ""), flush=True)
        why = conv.divergence(step, loss)
        if why is not None:
            diverged = step
            break
        if conv.due(step + 1):
            stop = conv.evaluate(state, step + 1, sum(timer.times_ms) / 1e3)
            if log:
                e = conv.evals[-1]
                print(f"eval after {e.step} steps | loss {e.loss:.4f} | lr {e.lr:.3g}"
                      + (f" | B_simple {e.gns_b_simple:.1f}" if e.gns_b_simple else "")
                      + (" | target reached" if stop else ""), flush=True)
    power = energy.stop()
    peak = peak_memory_bytes(device)
    if trained is not None and diverged is None:
        trained()
    t_memory = time.time()
    breakdown = (tracked_memory_step(state, lambda: train_step(state, cfg.steps))
                 if memory_breakdown and diverged is None else None)
    memory_step_s = time.time() - t_memory
    kind = "cuda_allocator" if device.type == "cuda" else "process_rss"
    if breakdown is not None and device.type != "cuda":
        peak, kind = breakdown["total"], "tracked_tensors"
    per_rank = layout.gather_object({"peak": peak, "rss": peak_rss_bytes(), "breakdown": breakdown,
                                     "energy_j": power["energy_j"], "gpu_util": power["gpu_util_mean"],
                                     "gpu_power": power["gpu_power_w_mean"]})
    times = measured_steps(timer.times_ms, warmup)
    tokens = cfg.global_batch * cfg.seq_len
    energies = [r["energy_j"] for r in per_rank if r["energy_j"] is not None]
    worst = max(per_rank, key=lambda r: r["peak"])
    predicted = predict_memory(cfg)

    def mean_of(key):
        vals = [r[key] for r in per_rank if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "config": cfg.to_dict(),
        "losses": losses,
        "grad_norms": grad_norms,
        "step_time_ms": timer.times_ms,
        "timing_warmup": warmup,
        "step_time_ms_p50": percentile(times, 50),
        "step_time_ms_p90": percentile(times, 90),
        "tokens_per_s": tokens * len(times) / (sum(times) / 1e3),
        "peak_memory_bytes": worst["peak"],
        "peak_memory_kind": kind,
        "peak_memory_bytes_per_rank": [r["peak"] for r in per_rank],
        "peak_rss_bytes": max(r["rss"] for r in per_rank),
        "memory_breakdown": worst["breakdown"],
        "memory_breakdown_per_rank": [r["breakdown"] for r in per_rank],
        "predicted_memory": predicted.to_dict(),
        "memory_step_s": memory_step_s if breakdown is not None else None,
        "fp16_skipped_steps": skipped,
        "diverged_at_step": diverged,
        "diverged_reason": why,
        **conv.to_metrics(),
        "energy_j_per_token": sum(energies) / (tokens * len(times)) if energies and diverged is None else None,
        "gpu_util_mean": mean_of("gpu_util"),
        "gpu_power_w_mean": mean_of("gpu_power"),
        "entropy_floor_nats": state.source.entropy_rate,
        "data_description": state.source.describe(),
        "num_params": param_count(cfg.model_config),
        "flops_per_token": flops_per_token(cfg.model_config, cfg.seq_len),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
