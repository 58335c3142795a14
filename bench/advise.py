"""``python -m bench.advise``: which layout should I use? Predicted memory and step time for every layout llmopt
supports on the hardware you name (yours or one you don't have yet), then, on this machine, a measurement of
the best few.

    python -m bench.advise --preset gpt2-xl --device H100 --devices 8 --global-batch 64 --seq-len 1024
    python -m bench.advise --preset tiny --device cpu --devices 2 --measure 3
    python -m bench.advise --check results/reference/cpu      # the time model against a committed sweep

Memory comes from ``llmopt.memory`` (the harness's own prediction) with the error band it showed on the
committed references; time from ``bench.advisor.costmodel`` (its docstring holds the model and its sources). Every
figure in the output is a prediction unless its column says "measured".
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

from bench.advisor import AdviseError
from bench.advisor.costmodel import GIB, GPU_RESERVE_BYTES, GPUS, Hardware, Link, with_links
from bench.advisor.layouts import (
    advice,
    advise_table,
    best_distinct,
    candidates,
    emit_matrix,
    measure,
    plot,
)
from bench.advisor.probe import check_reference, cpu_hardware, gpu_hardware, memory_band
from bench.report.markdown import fmt, md_table
from llmopt.safe_files import makedirs, open_file, refuse_links


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '141e9', '512MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*(KiB|MiB|GiB|TiB|KB|MB|GB|TB|B)?\s*", text)
    units = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    try:
        value = float(m.group(1)) * units[m.group(2)] if m else float("nan")
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise AdviseError(f"--device-memory {text!r}: not a size; write e.g. 80GiB, 24GB or 141e9")
    return value


def parse_link(text: str, flag: str) -> Link:
    """'BANDWIDTH_GBps[,LATENCY_us]' -> Link, e.g. '400,10' (400 GB/s, 10 microseconds)."""
    try:
        parts = [float(x) for x in text.split(",")]
        bw, lat = parts[0], (parts[1] if len(parts) > 1 else 10.0)
        if len(parts) > 2 or not (math.isfinite(bw) and math.isfinite(lat)) or bw <= 0 or lat < 0:
            raise ValueError
    except ValueError:
        raise AdviseError(f"{flag} {text!r}: write GB/s[,latency in microseconds], e.g. {flag} 400,10") from None
    return Link(bw * 1e9, lat * 1e-6, f"{bw:g} GB/s, {lat:g} us (given)")


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv):
    from llmopt.core import cli
    from llmopt.core.config import PRECISIONS
    from llmopt.core.shapes import PRESETS
    from llmopt.optimizers import names as optimizer_names

    p = cli.parser("python -m bench.advise", __doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="model shape (default gpt2)")
    p.add_argument("--shape", metavar="LAYERS,HEADS,WIDTH[,VOCAB]",
                   help="a model shape instead of a preset, e.g. 32,32,4096,50257 (advice only: the harness "
                        "runs presets, so --measure and --emit-matrix need --preset)")
    p.add_argument("--device", default="H100", help=f"a GPU of the datasheet table ({', '.join(GPUS)}) or cpu")
    p.add_argument("--devices", type=int, default=8, help="devices (ranks) per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--device-memory", help="memory per device, e.g. 80GiB (default: the GPU's datasheet figure; "
                                           "on cpu this machine's RAM over --devices)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one device in TFLOP/s (for a GPU not in "
                                                    "the table, or to override the datasheet)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step (default 16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--optimizer", default="adamw", choices=optimizer_names(),
                   help="its state, update FLOPs and whole-tensor gathers are priced from its spec "
                        "(llmopt/optimizers/; default adamw)")
    p.add_argument("--tokens", metavar="N",
                   help="tokens to train: adds hours per layout (e.g. 2.5e9, 2.5B, 300M, or 20x: tokens per "
                        "parameter). With --speedup-from: AdamW's tokens to your target, divided by --optimizer's "
                        "token speed-up measured there")
    p.add_argument("--speedup-from", metavar="DIR",
                   help="a convergence reference (e.g. results/reference/cpu-convergence) whose token speed-up of "
                        "--optimizer over AdamW scales --tokens")
    p.add_argument("--speedup-batch", type=int, metavar="B",
                   help="the reference's batch size to read the speed-up at (default: its longest horizon)")
    p.add_argument("--precisions", default="bf16,fp32", help=f"comma-separated, of {', '.join(PRECISIONS)} "
                                                             "(default bf16,fp32)")
    p.add_argument("--intra", help="intra-node link: GB/s[,latency us] (default: per GPU generation, stated)")
    p.add_argument("--inter", help="inter-node link: GB/s[,latency us] (default: per GPU generation, stated)")
    p.add_argument("--top", type=int, default=15, help="rows of the table printed on the terminal (default 15)")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="run the K best predicted layouts that fit through bench.run on this machine")
    p.add_argument("--measure-steps", type=int, default=8, help="steps per measured layout (default 8)")
    p.add_argument("--emit-matrix", metavar="FILE.toml", help="write the K (--measure, else 5) best as a matrix")
    p.add_argument("--refresh-probe", action="store_true", help="probe this CPU again instead of the cached figures")
    p.add_argument("--check", metavar="DIR", help="compare the time model with a measured CPU sweep and exit")
    p.add_argument("--out", help="output directory (default results/runs/<UTC>-advise)")
    return p.parse_args(argv)


SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(text: str, params: int) -> float:
    """--tokens: a count (2.5e9, 2.5B, 300M) or tokens per parameter (20x: Chinchilla's compute-optimal ratio)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?|[xX])\s*", text)
    try:
        value = float(m.group(1)) if m else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise AdviseError(f"--tokens {text!r}: give a positive count (2.5e9, 2.5B, 300M) or tokens per parameter "
                          "(20x)")
    unit = m.group(2).lower()
    return value * params if unit == "x" else value * SUFFIXES[unit]


def _target(a, base: dict):
    """(tokens to train with --optimizer, the reference's TokenSpeedup or None) from --tokens/--speedup-from."""
    from llmopt.core.config import TrainConfig
    from llmopt.core.shapes import param_count

    if a.tokens is None:
        if a.speedup_from or a.speedup_batch is not None:
            raise AdviseError("--speedup-from/--speedup-batch scale --tokens: give --tokens too (AdamW's tokens to "
                              "your target, e.g. --tokens 20x)")
        return None, None
    tokens = parse_tokens(a.tokens, param_count(TrainConfig(**base).model_config))
    if not a.speedup_from:
        if a.speedup_batch is not None:
            raise AdviseError("--speedup-batch reads a batch of --speedup-from DIR: give that too")
        return tokens, None
    from bench.report import load_all
    from bench.report.quality import token_speedup

    path = Path(a.speedup_from) / "results.csv"
    if not path.is_file():
        raise AdviseError(f"--speedup-from {a.speedup_from}: no results.csv there; name a convergence sweep, e.g. "
                          "results/reference/cpu-convergence")
    if a.optimizer == "adamw":
        raise AdviseError("--speedup-from with --optimizer adamw: the speed-up is over AdamW's tokens; name the "
                          "optimizer to compare (e.g. --optimizer muon), or drop --speedup-from")
    try:
        # read as the report reads a sweep: a line no run could have written is left out, not taken as a figure
        sp = token_speedup(load_all(a.speedup_from)[0], a.optimizer, a.speedup_batch)
    except (ValueError, KeyError) as e:
        raise AdviseError(f"--speedup-from {a.speedup_from}: {e}") from None
    return tokens / sp.speedup, sp


def _custom_preset(text: str, seq_len: int) -> str:
    """Register ``--shape`` as a preset of this process and return its name."""
    from llmopt.core.shapes import PRESETS, GPTConfig

    try:
        parts = [int(x) for x in text.split(",")]
        if len(parts) not in (3, 4) or min(parts) < 1:
            raise ValueError
    except ValueError:
        raise AdviseError(f"--shape {text!r}: write LAYERS,HEADS,WIDTH[,VOCAB] with positive integers, "
                          "e.g. --shape 32,32,4096,50257") from None
    L, H, C, V = (parts + [50257])[:4]
    if C % H:
        raise AdviseError(f"--shape {text}: the width {C} is not a multiple of the {H} heads")
    name = f"shape-{L}x{H}x{C}x{V}"
    PRESETS[name] = GPTConfig(n_layer=L, n_head=H, n_embd=C, vocab_size=V, block_size=max(1024, seq_len))
    return name


def _request(a):
    """(base config, precisions) from the flags, every one checked; no probe, no hardware yet."""
    from llmopt.core.config import PRECISIONS, TrainConfig, validate

    if a.peak_tflops is not None and not (math.isfinite(a.peak_tflops) and a.peak_tflops > 0):
        raise AdviseError(f"--peak-tflops {a.peak_tflops}: must be a positive, finite number of TFLOP/s")
    if a.emit_matrix:
        from llmopt.scratch import check_writable_file

        check_writable_file(a.emit_matrix, "--emit-matrix")
    if a.out:
        from llmopt.scratch import check_writable_dir

        check_writable_dir(a.out, "--out", may_exist=True)
    for flag in ("intra", "inter"):
        if getattr(a, flag):
            parse_link(getattr(a, flag), f"--{flag}")
    if a.shape:
        if a.measure or a.emit_matrix:
            raise AdviseError("--shape with --measure or --emit-matrix: the harness runs presets only; pick the "
                              "nearest --preset to measure, or drop --measure/--emit-matrix for advice alone")
        a.preset = _custom_preset(a.shape, a.seq_len)
    if a.devices < 1 or a.nodes < 1:
        raise AdviseError(f"--devices {a.devices} --nodes {a.nodes}: need at least one device on one node")
    precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad or not precisions:
        raise AdviseError(f"--precisions {a.precisions!r}: use a comma-separated list of {', '.join(PRECISIONS)}")
    device = "cpu" if a.device.lower() == "cpu" else "cuda"
    if device == "cpu" and a.nodes > 1:
        raise AdviseError("--device cpu --nodes: the CPU model describes this machine; use --nodes 1")
    base = dict(preset=a.preset, global_batch=a.global_batch, seq_len=a.seq_len, optimizer=a.optimizer, device=device)
    validate(TrainConfig(**base))  # a bad batch or sequence length: its own one-line error
    if a.device_memory:
        parse_bytes(a.device_memory)
    return base, precisions


def _hardware(a, base: dict):
    """The hardware the flags name: a GPU of the datasheet table (or given), or this CPU (probed once)."""
    from llmopt.core.config import TrainConfig

    memory = parse_bytes(a.device_memory) if a.device_memory else None
    if base["device"] == "cpu":
        model = TrainConfig(preset=a.preset).model_config
        hw = cpu_hardware(model, a.global_batch * a.seq_len, a.devices, memory, a.refresh_probe)
    else:
        hw = gpu_hardware(a.device, a.devices, a.nodes, memory, a.peak_tflops)
    hw = with_links(hw, a.intra and parse_link(a.intra, "--intra"), a.inter and parse_link(a.inter, "--inter"))
    if hw.memory_bytes <= 0:
        raise AdviseError(f"--device-memory {a.device_memory}: less than the {GPU_RESERVE_BYTES / GIB:.0f} GiB kept "
                          "back per GPU for the CUDA context and NCCL; give the device's real memory")
    return hw


def run(a) -> int:
    if a.check:
        t, stats = check_reference(a.check)
        print(f"time model against {a.check}: {stats['rows']} rows, Spearman {stats['spearman']:.2f} between predicted "
              f"and measured tokens/s, median |error| {stats['median_abs_error']:.0%} (per-call overhead "
              f"{stats['call_overhead_s'] * 1e3:.2f} ms, {stats['call_overhead_source']})")
        if a.out:
            refuse_links(a.out, "--out")
            makedirs(a.out)
            with open_file(os.path.join(a.out, "check.csv"), newline="") as f:
                t.to_csv(f, index=False)
        return 0
    base, precisions = _request(a)
    world = a.devices * a.nodes
    cands, refused = candidates(base, world, precisions)  # before any probe of this machine: it takes a while
    if not cands:
        raise AdviseError(f"no layout of {a.preset} runs on {world} ranks ({refused} refused by llmopt's checks: "
                          f"e.g. tp must divide the heads, pp at most the layers, dp x grad_accum must divide "
                          f"--global-batch {a.global_batch}); change --devices or --global-batch")
    tokens, speedup = _target(a, base)  # a bad target is refused before this machine is probed
    hw = _hardware(a, base)
    t = advise_table(cands, hw)
    if tokens is not None:
        t["pred_hours"] = tokens / t.pred_tokens_per_s / 3600
    out = Path(a.out or os.path.join("results", "runs", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-advise"))
    refuse_links(str(out), "--out")
    makedirs(str(out))
    text = advice(t, hw, a.preset, a.global_batch, a.seq_len)
    if tokens is not None:
        text += " " + hours_sentence(t, tokens, a.optimizer, speedup)
    k = a.measure or 5
    top = best_distinct(t[t.fits == "yes"], k)
    measured = None
    if a.measure:
        if top.empty:
            raise AdviseError(f"--measure: no layout fits on {hw.world} x {hw.name}, nothing to measure")
        here = "cpu" if hw.name == "cpu" else None
        if here is None:
            import torch

            if not (torch.cuda.is_available() and hw.name in torch.cuda.get_device_name()):
                raise AdviseError(f"--measure runs on this machine, which is not a {hw.name}; use --emit-matrix "
                                  "FILE.toml and run it there with python -m bench.run --matrix FILE.toml")
        measured = measure(top, base, out, a.measure_steps)
    if a.emit_matrix:
        emit_matrix(top, base, a.emit_matrix, a.measure_steps)
    write_outputs(out, t, hw, text, measured, a)
    show = t.head(a.top)
    print(md_table(_shown(show)))
    print()
    print(text)
    if measured is not None:
        print()
        print(md_table(_measured_shown(measured)))
    print(f"\nadvise: {len(t)} layouts ({refused} refused by llmopt's checks) -> {out}")
    if (t.fits == "no").all():
        raise AdviseError(f"{a.preset} fits in no layout on {hw.world} x {hw.name} "
                          f"({hw.memory_bytes / GIB:.3g} GiB usable per rank); add devices or memory (table in {out})")
    return 0


def hours_sentence(t, tokens: float, optimizer: str, speedup) -> str:
    """The hours to the target on the fastest layout that fits, and where the tokens come from."""
    fit = t[t.fits == "yes"]
    where = (f"{tokens * speedup.speedup:,.3g} AdamW tokens over {speedup.optimizer}'s {speedup.speedup:.2f}x = "
             if speedup is not None else "")
    s = (f"Training {optimizer} for {where}{tokens:,.3g} tokens takes {fit.pred_hours.iloc[0]:,.3g} hours on "
         f"{fit.layout.iloc[0]}" if not fit.empty else f"Training {optimizer} for {tokens:,.3g} tokens fits no layout")
    s += " (predicted, the update included)."
    if speedup is not None:
        s += " " + speedup.caveat()[0].upper() + speedup.caveat()[1:] + "."
    return s


def _shown(t):
    import pandas as pd

    hours = ({"pred hours": t.pred_hours.map(lambda v: fmt(v, ",.3g"))} if "pred_hours" in t else {})
    return pd.DataFrame({
        "layout": t.layout, "pred GiB/rank": [f"{m:.3g} ({lo:.3g}-{hi:.3g})" for m, lo, hi in
                                              zip(t.pred_memory_gib, t.pred_memory_low_gib, t.pred_memory_high_gib)],
        "fits": t.fits, "pred tokens/s": t.pred_tokens_per_s.map(lambda v: fmt(v, ",.0f")),
        "pred MFU": t.pred_mfu.map(lambda v: fmt(v, ".0%")),
        "pred step ms": t.pred_step_ms.map(lambda v: fmt(v, ".1f")),
        "pred update ms": t.pred_update_ms.map(lambda v: fmt(v, ".1f")), **hours,
        "bottleneck": t.bottleneck})


def _measured_shown(m):
    import pandas as pd

    return pd.DataFrame({"layout": m.layout, "pred tokens/s": m.pred_tokens_per_s.map(lambda v: fmt(v, ",.0f")),
                         "measured tokens/s": m.measured_tokens_per_s.map(lambda v: fmt(v, ",.0f")),
                         "measured rank": m.measured_rank.map(lambda v: fmt(v, ".0f")),
                         "pred GiB": m.pred_memory_gib.map(lambda v: fmt(v, ".3f")),
                         "measured GiB": m.measured_memory_gib.map(lambda v: fmt(v, ".3f")),
                         "status": m.measured_status, "parity": m.measured_parity})


def write_outputs(out: Path, t, hw: Hardware, text: str, measured, a) -> None:
    lo, hi, n = memory_band()
    with open_file(str(out / "advise.csv"), newline="") as f:
        t.to_csv(f, index=False)
    makedirs(str(out / "plots"))
    plot(t, hw, out / "plots" / "advise.png")
    L = [f"# Layout advice: {a.preset} on {hw.nodes} x {hw.devices_per_node} {hw.name}", "",
         f"Command: `python -m bench.advise {' '.join(sys.argv[1:])}`", "", text, "",
         "Every figure below is **predicted** (bench/advisor/costmodel.py), except the columns marked measured.", "",
         "- Peak FLOP/s per device: " + ", ".join(f"{p} {v / 1e12:.3g} TFLOP/s" for p, v in hw.peak_flops.items()),
         "- Achievable fraction of the peak, and framework time per micro-batch: "
         + ", ".join(f"{p} {f:.2f} and {hw.micro_batch_overhead.get(p, 0) * 1e3:.2f} ms "
                     f"({hw.calibration.get(p, 'assumed')})" for p, f in hw.achievable.items()),
         f"- Links: intra-node {hw.intra.name or hw.intra}; inter-node {hw.inter.name or hw.inter}",
         f"- The optimizer's update ({a.optimizer}): its step counted (bench/advisor/update.py), priced at "
         f"{hw.op_overhead * 1e6:.2g} us per operation, {hw.dtensor_call_overhead * 1e6:.2g} us per DTensor call "
         f"+ {hw.dtensor_op_overhead * 1e6:.2g} us per DTensor in it, {hw.memory_bandwidth / 1e9:,.0f} GB/s "
         f"({hw.calibration.get('update', 'assumed')})",
         f"- Usable memory per rank: {hw.memory_bytes / GIB:.1f} GiB"
         + (f" (device memory less {GPU_RESERVE_BYTES / GIB:.0f} GiB for the CUDA context and NCCL)"
            if hw.name != "cpu" else ""),
         f"- Memory band: measured peaks on the {n} committed reference rows were {lo:+.0%} to {hi:+.0%} off the "
         "prediction; 'fits' = yes when even the high end fits, marginal when only the prediction does.", "",
         md_table(_shown(t)), ""]
    if measured is not None:
        L += ["## Measured on this machine", "", md_table(_measured_shown(measured)), ""]
    L += ["![predicted tokens/s against memory per rank](plots/advise.png)", ""]
    with open_file(str(out / "advise.md")) as f:
        f.write("\n".join(L))


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    return cli.main(lambda: run(parse_args(argv)))  # the parser reads the optimizers' registry: a check too


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
