"""``python -m bench.advise``: which layout should I use? Predicted memory and step time for every layout llmopt
supports on the hardware you name (yours or one you don't have yet), then, on this machine, a measurement of
the best few.

    python -m bench.advise --preset gpt2-xl --device H100 --devices 8 --global-batch 64 --seq-len 1024
    python -m bench.advise --preset tiny --device cpu --devices 2 --measure 3
    python -m bench.advise --check results/reference/cpu      # the time model against a committed sweep

Memory comes from ``llmopt.memory`` (the harness's own prediction) with the error band it showed on the
committed references; time from ``bench.costmodel`` (its docstring holds the model and its sources). Every
figure in the output is a prediction unless its column says "measured".
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.costmodel import ACHIEVABLE, GIB, GPU_RESERVE_BYTES, GPUS, Hardware, Link, predict_step, with_links
from bench.hardware import DATASHEET, peak_flops, write_json
from llmopt.cpu import cpu_flags, cpu_model
from bench.markdown import fmt, md_table
from bench.results import row_config

REFERENCES = Path(__file__).resolve().parent.parent / "results" / "reference"
LAYOUT_FIELDS = ("dp", "dp_mode", "tp", "pp", "pp_schedule", "pp_microbatches", "precision", "grad_accum",
                 "activation_checkpointing")
MAX_GRAD_ACCUM = 64


class AdviseError(ValueError):
    """A request the advisor cannot answer: printed as one ``error:`` line, exit 2."""


# ------------------------------------------------------------------------------------------- the request
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


def _gpu_key(name: str) -> str | None:
    for key in GPUS:
        if key.lower() in name.lower():
            return key
    return None


# ------------------------------------------------------------------------------------- calibration data
@functools.lru_cache(maxsize=None)
def reference_rows() -> "pd.DataFrame":
    """Every ok row of every committed reference, with the reference's name."""
    import pandas as pd

    frames = []
    for path in sorted(REFERENCES.glob("*/results.csv")):
        d = pd.read_csv(path)
        frames.append(d[d.status == "ok"].assign(reference=path.parent.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@functools.lru_cache(maxsize=None)
def memory_band() -> tuple[float, float, int]:
    """(lowest, highest) of predicted / measured - 1 over the committed references' rows, and the row count:
    the measured peak of a layout is expected within predicted / (1 + highest) .. predicted / (1 + lowest)."""
    from llmopt.memory import predict_memory

    rows = reference_rows()
    errs = [predict_memory(row_config(r)).total / r.peak_memory_bytes - 1 for _, r in rows.iterrows()]
    return (min(errs), max(errs), len(errs)) if errs else (-0.15, 0.15, 0)


def calibrate(device: str, rows=None) -> dict:
    """precision -> (achievable fraction of the peak, framework seconds per micro-batch, source), fitted on
    the single-process llmopt rows measured on ``device`` in the committed references (or ``rows``): step time
    = executed FLOPs / (peak x fraction) + micro-batches x overhead, by least squares. Where the rows cannot
    separate the two terms (one shape, no accumulation), the overhead is 0 and the fraction the median MFU;
    where there are no rows, the ACHIEVABLE assumption."""
    import numpy as np

    from bench.costmodel import executed_flops

    rows = reference_rows() if rows is None else rows
    out = {p: (f, 0.0, "assumed (no measured rows)") for p, f in ACHIEVABLE.items()}
    if rows.empty:
        return out
    mine = rows[rows.peak_flops_source.astype(str).str.contains("measured:cpu" if device == "cpu" else device,
                                                                regex=False)]
    mine = mine[(mine.dp == 1) & (mine.tp == 1) & (mine.pp == 1) & (mine.model_impl == "llmopt")
                & (mine.engine == "native")]
    for prec, group in mine.groupby("precision"):
        x, y = [], []
        for _, r in group.iterrows():
            c = row_config(r)
            x.append([executed_flops(c) / r.peak_flops, c.grad_accum])  # seconds at the peak, micro-batches
            y.append(c.tokens_per_step / r.tokens_per_s)                 # measured step seconds
        x, y = np.array(x), np.array(y)
        (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
        if np.linalg.matrix_rank(x) < 2 or a <= 0 or b < 0:
            a, b = float(np.median(y / x[:, 0])), 0.0
        out[prec] = (1 / float(a), float(b), f"fitted on {len(group)} measured single-process rows")
    return out


def _hw_calibration(cal: dict) -> dict:
    """Hardware keyword arguments from ``calibrate``'s result."""
    return dict(achievable={p: f for p, (f, _, _) in cal.items()},
                micro_batch_overhead={p: b for p, (_, b, _) in cal.items()},
                calibration={p: s for p, (_, _, s) in cal.items()})


# ---------------------------------------------------------------------------------- this machine's probe
def probe_cache_path() -> Path:
    root = os.environ.get("LLMOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmopt")
    return Path(root) / "advise-probe.json"


def _allreduce_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    times = {}
    for size, reps in ((256, 50), (4 * 2**20, 10)):  # 1 KiB (latency) and 16 MiB (bandwidth) of fp32
        t = torch.ones(size)
        dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):  # a fixed count: every rank must make the same calls
            dist.all_reduce(t)
        times[size * 4] = (time.perf_counter() - t0) / reps
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    os._exit(0)  # as llmopt.train's ranks: skip gloo's teardown, whose threads can abort the process


def allreduce_probe(world: int = 2) -> Link:
    """gloo all-reduce between ``world`` local processes: latency from 1 KiB, bus bandwidth from 16 MiB."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.json")
        mp.start_processes(_allreduce_worker, args=(world, f"file://{tmp}/store", out), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            t = {int(k): v for k, v in json.load(f).items()}
    small, big = min(t), max(t)
    steps, frac = 2 * (world - 1), 2 * (world - 1) / world
    latency = t[small] / steps
    bandwidth = frac * big / max(t[big] - steps * latency, 1e-9)
    return Link(bandwidth, latency, f"gloo on this machine (probed: {bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.0f} us)")


def cpu_hardware(model, tokens: int, devices: int, memory: float | None, refresh: bool = False,
                 log=print) -> Hardware:
    """This CPU: the matmul peak per precision over the model's GEMMs and an all-reduce probe, cached per
    CPU model, flags, torch version and model width."""
    import torch

    from bench.hardware import CPU_GEMM_TOKENS

    tokens = min(tokens, CPU_GEMM_TOKENS)
    key = f"{cpu_model()}|{','.join(cpu_flags())}|{os.cpu_count()}|torch {torch.__version__}|C{model.n_embd}|V{model.vocab_size}|M{tokens}"
    path = probe_cache_path()
    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except ValueError:
            cache = {}
    if refresh or key not in cache:
        log(f"advise: probing this CPU (matmul peaks, gloo all-reduce); cached in {path}")
        measured: dict = {}  # the sweep's rule, and fp32 measured once for all three
        peaks = {p: peak_flops("cpu", p, measured, model.n_embd, model.vocab_size, tokens)[0]
                 for p in ("fp32", "bf16", "fp16")}
        link = allreduce_probe()
        cache[key] = {"peaks": peaks, "bandwidth": link.bandwidth, "latency": link.latency}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(str(path), cache)
    c = cache[key]
    link = Link(c["bandwidth"], c["latency"], f"gloo on this machine ({c['bandwidth'] / 1e9:.2f} GB/s, "
                                              f"{c['latency'] * 1e6:.0f} us, probed)")
    kw = _hw_calibration(calibrate("cpu"))
    overhead, source = cpu_call_overhead(link)
    kw["calibration"]["call_overhead"] = source
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(devices, 1)
    return Hardware("cpu", c["peaks"], memory_bytes=memory, devices_per_node=devices, nodes=1, intra=link,
                    inter=link, shared=True, call_overhead=overhead, **kw)


def gpu_hardware(name: str, devices: int, nodes: int, memory: float | None, peak_tflops: float | None) -> Hardware:
    """A GPU of the datasheet table, or any GPU given its memory and bf16 dense peak (links then default to
    PCIe within a node and 100 GbE between nodes, and the fp32 peak to an eighth of bf16's)."""
    key = _gpu_key(name)
    if key is None and (memory is None or peak_tflops is None):
        raise AdviseError(f"--device {name}: not in the datasheet table ({', '.join(GPUS)}); pick one of them, "
                          f"or give --device-memory and --peak-tflops for it")
    if key is None:
        _, intra, inter = GPUS["L40S"]
        peaks = {"bf16": peak_tflops * 1e12, "fp16": peak_tflops * 1e12, "fp32": peak_tflops * 1e12 / 8}
        mem = memory
    else:
        mem, intra, inter = GPUS[key]
        peaks = dict(DATASHEET[key])
        if memory is not None:
            mem = memory
        if peak_tflops is not None:
            peaks.update(bf16=peak_tflops * 1e12, fp16=peak_tflops * 1e12)
    return Hardware(key or name, peaks, memory_bytes=mem - GPU_RESERVE_BYTES, devices_per_node=devices,
                    nodes=nodes, intra=intra, inter=inter, **_hw_calibration(calibrate(key or name)))


# ------------------------------------------------------------------------------------------ candidates
def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, by trial division up to sqrt(n) (a global batch of 10^12 once
    took minutes, counting to n)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def candidates(base: dict, world: int, precisions, allow_ac: bool = True) -> tuple[list, int]:
    """Every valid layout on ``world`` ranks: (list of resolved configs, number refused by validation)."""
    from llmopt.config import TrainConfig, validate

    out, refused = [], 0
    for dp, tp in itertools.product(_divisors(world), repeat=2):
        if world % (dp * tp):
            continue
        pp = world // (dp * tp)
        for mode, sched, prec, ga, ac in itertools.product(
                ("ddp", "fsdp") if dp > 1 else ("ddp",), ("gpipe", "1f1b") if pp > 1 else ("1f1b",), precisions,
                [g for g in _divisors(base["global_batch"]) if g <= MAX_GRAD_ACCUM], (False, True) if allow_ac else (False,)):
            micro = base["global_batch"] // ga
            if micro % dp:
                continue
            for chunks in sorted({pp, 2 * pp, 4 * pp}) if pp > 1 else [0]:
                try:
                    out.append(validate(TrainConfig(**base, dp=dp, dp_mode=mode, tp=tp, pp=pp, pp_schedule=sched,
                                                    pp_microbatches=chunks, precision=prec, grad_accum=ga,
                                                    activation_checkpointing=ac)))
                except ValueError:
                    refused += 1
    return out, refused


def layout_label(cfg) -> str:
    from bench.matrix import layout_name

    parts = [layout_name(asdict(cfg)), cfg.precision, f"ga{cfg.grad_accum}"]
    if cfg.pp > 1:
        parts.append(f"m{cfg.pp_microbatches}")
    if cfg.activation_checkpointing:
        parts.append("ac")
    return "-".join(parts)


def layout_memory(cfg) -> tuple[int, float, float]:
    """(predicted peak bytes per rank, low, high): the harness's own prediction (``llmopt.memory``) and the
    range the measured peak fell in around it on the committed references."""
    from llmopt.memory import predict_memory

    lo, hi, _ = memory_band()
    total = predict_memory(cfg).total
    return total, total / (1 + hi), total / (1 + lo)


def advise_table(cands, hw: Hardware) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for cfg in cands:
        mem, lower, upper = layout_memory(cfg)
        fits = "yes" if upper <= hw.memory_bytes else ("marginal" if mem <= hw.memory_bytes else "no")
        p = predict_step(cfg, hw)
        rows.append({"layout": layout_label(cfg), **{f: getattr(cfg, f) for f in LAYOUT_FIELDS},
                     "micro_batch": cfg.micro_batch,
                     "pred_memory_gib": mem / GIB, "pred_memory_low_gib": lower / GIB,
                     "pred_memory_high_gib": upper / GIB, "fits": fits,
                     "pred_tokens_per_s": p.tokens_per_s, "pred_step_ms": p.step_s * 1e3, "pred_mfu": p.mfu,
                     "pred_compute_ms": p.compute_s * 1e3, "pred_comm_ms": p.comm_s * 1e3,
                     "pred_bubble_ms": p.bubble_s * 1e3,
                     "bottleneck": p.bottleneck if fits != "no" else "memory"})
    t = pd.DataFrame(rows)
    order = t.fits.map({"yes": 0, "marginal": 1, "no": 2})
    # ties (the model does not price accumulation or checkpointing beyond their FLOPs and calls): prefer fewer
    # micro-batches, no recomputation, then less memory
    return (t.assign(_o=order, _t=t.pred_tokens_per_s.round(-1))
            .sort_values(["_o", "_t", "grad_accum", "activation_checkpointing", "pred_memory_gib"],
                         ascending=[True, False, True, True, True]).drop(columns=["_o", "_t"]))


def best_distinct(t, k: int):
    """The k best rows with different parallel layouts or precisions (the best accumulation and
    checkpointing choice of each): measuring five accumulation variants of one layout teaches little."""
    return t.drop_duplicates(["dp", "dp_mode", "tp", "pp", "pp_schedule", "precision"]).head(k)


def advice(t, hw: Hardware, preset: str, batch: int, seq: int) -> str:
    """One paragraph computed from the table."""
    where = (f"on {hw.nodes} node{'s' * (hw.nodes > 1)} of {hw.devices_per_node} {hw.name}"
             f" ({hw.memory_bytes / GIB:.0f} GiB usable each)")
    fit = t[t.fits == "yes"]
    if fit.empty:
        smallest = t.loc[t.pred_memory_gib.idxmin()]
        return (f"{where}, {preset} at {batch} x {seq} tokens fits in no layout: the leanest, {smallest.layout}, "
                f"needs about {smallest.pred_memory_gib:.3g} GiB per rank; add devices or memory.")
    best = fit.iloc[0]
    s = (f"{where}, {preset} at a global batch of {batch} x {seq} tokens fits in {len(fit)} of {len(t)} layouts; "
         f"the fastest predicted is {best.layout} ({best.pred_tokens_per_s:,.0f} tokens/s, MFU {best.pred_mfu:.0%}, "
         f"{best.pred_memory_gib:.3g} GiB per rank, bound by {best.bottleneck}).")
    no_pp, with_pp = fit[fit.pp == 1], fit[fit.pp > 1]
    if no_pp.empty and not with_pp.empty:
        s += " Pipeline parallelism is needed here: no layout without it fits."
    elif not with_pp.empty:
        r = no_pp.pred_tokens_per_s.max() / with_pp.pred_tokens_per_s.max()
        s += (f" Pipeline parallelism does not pay: the best layout without it is {r:.2f}x the best with it "
              "(it pays only when a model does not fit otherwise, or the data-parallel gradient traffic crosses "
              "a slow link)." if r >= 1 else
              f" Pipeline parallelism pays here: the best layout with it is {1 / r:.2f}x the best without.")
    no_ac = fit[~fit.activation_checkpointing]
    if no_ac.empty:
        s += " Activation checkpointing is required to fit."
    return s


def plot(t, hw: Hardware, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(8, 5))
    sns.scatterplot(data=t, x="pred_memory_gib", y="pred_tokens_per_s", hue="precision", style="fits", ax=ax)
    ax.axvline(hw.memory_bytes / GIB, color="k", ls="--", lw=1, label="usable device memory")
    ax.set_xlabel("predicted memory per rank (GiB)")
    ax.set_ylabel("predicted tokens/s")
    ax.set_title(f"Predicted, not measured: every layout on {hw.world} x {hw.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- measurement and matrices
def emit_matrix(top, base: dict, path: str, steps: int) -> None:
    """Write ``top``'s layouts as a matrix file for ``bench.run --matrix``."""
    def value(v):
        return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else str(v))

    lines = [f"# {len(top)} layouts predicted fastest by python -m bench.advise; run with",
             f"#   python -m bench.run --matrix {path}", "[base]"]
    lines += [f"{k} = {value(v)}" for k, v in {**base, "steps": steps}.items()]
    for _, r in top.iterrows():
        lines += ["", "[[config]]"] + [f"{f} = {value(r[f].item() if hasattr(r[f], 'item') else r[f])}"
                                      for f in LAYOUT_FIELDS]
    Path(path).write_text("\n".join(lines) + "\n")


def measure(top, base: dict, out: Path, steps: int, log=print):
    """Run ``top`` through the harness on this machine; the table with measured tokens/s beside each prediction."""
    import pandas as pd

    matrix = out / "measure.toml"
    emit_matrix(top, base, str(matrix), steps)
    log(f"advise: measuring {len(top)} layouts through bench.run -> {out / 'measure'}")
    r = subprocess.run([sys.executable, "-m", "bench.run", "--matrix", str(matrix), "--out", str(out / "measure"),
                        "--device", base["device"], "--no-report"], cwd=Path(__file__).resolve().parent.parent)
    results = out / "measure" / "results.csv"
    if not results.exists():
        raise AdviseError(f"--measure: the harness wrote no results (exit {r.returncode}); see its output above")
    got = pd.read_csv(results)
    got = got[got.added_as_baseline.astype(str) != "True"]
    keys = list(LAYOUT_FIELDS)
    merged = top.merge(got[keys + ["status", "tokens_per_s", "peak_memory_bytes", "parity_verdict"]], on=keys, how="left")
    merged = merged.rename(columns={"tokens_per_s": "measured_tokens_per_s", "status": "measured_status",
                                    "parity_verdict": "measured_parity"})
    merged["measured_memory_gib"] = merged.pop("peak_memory_bytes") / GIB
    merged["measured_rank"] = merged.measured_tokens_per_s.rank(ascending=False)
    return merged.sort_values("measured_tokens_per_s", ascending=False)


# ------------------------------------------------------------------------- the model against references
CALIBRATION_REFERENCE = "cpu-extras"  # the sweep the CPU's per-call overhead is fitted on


def _native_cpu_rows(path: Path) -> "pd.DataFrame":
    import pandas as pd

    if not (path / "results.csv").exists():
        raise AdviseError(f"{path}: no results.csv there; pass a sweep directory, e.g. results/reference/cpu")
    rows = pd.read_csv(path / "results.csv")
    rows = rows[(rows.status == "ok") & (rows.engine == "native") & (rows.model_impl == "llmopt")]
    if rows.empty or not rows.device.eq("cpu").all():
        raise AdviseError(f"{path}: needs ok native rows of a CPU sweep")
    return rows


def _row_prediction(r, cal: dict, link: Link, overhead: float):
    cfg = row_config(r)
    hw = Hardware("cpu", {cfg.precision: r.peak_flops}, memory_bytes=float("inf"), devices_per_node=os.cpu_count() or 1,
                  nodes=1, intra=link, inter=link, shared=True, call_overhead=overhead, **_hw_calibration(cal))
    return cfg, predict_step(cfg, hw)


def calibrate_call_overhead(rows, cal: dict, link: Link) -> float:
    """Seconds per collective call that the compute and wire model leave unexplained: the median over the
    multi-rank rows of (measured step - predicted step) / calls, at least 0."""
    from bench.costmodel import comm_bytes, optimizer_comm

    per_call = []
    for _, r in rows.iterrows():
        cfg, p = _row_prediction(r, cal, link, 0.0)
        calls = sum(c[-1] for c in comm_bytes(cfg) + optimizer_comm(cfg))
        if calls:
            measured = cfg.tokens_per_step / r.tokens_per_s
            per_call.append((measured - p.step_s) / calls)
    per_call.sort()
    return max(0.0, per_call[len(per_call) // 2]) if per_call else 0.0


def cpu_call_overhead(link: Link, exclude: str | None = None) -> tuple[float, str]:
    """(per-call overhead, where it comes from), fitted on CALIBRATION_REFERENCE (or ``cpu`` when that is the
    sweep being checked), so a check is never scored on the sweep it was fitted on."""
    name = CALIBRATION_REFERENCE if exclude != CALIBRATION_REFERENCE else "cpu"
    path = REFERENCES / name
    if not (path / "results.csv").exists():
        return 0.0, "none (no calibration sweep committed)"
    rows = _native_cpu_rows(path)
    return calibrate_call_overhead(rows, calibrate("cpu", rows), link), f"fitted on results/reference/{name}"


def check_reference(ref_dir: str, link: Link | None = None) -> tuple["pd.DataFrame", dict]:
    """Predicted against measured tokens/s for every ok native llmopt row of a committed CPU sweep: the
    per-row table and {spearman, median_abs_error, rows, ...}. Each row is predicted with its own sweep's
    measured peak for its dtype, the achievable fraction of the sweep's single-process rows, the link probed
    on this machine (or ``link``) and the per-call overhead fitted on another sweep."""
    import pandas as pd

    path = Path(ref_dir)
    rows = _native_cpu_rows(path)
    cal = calibrate("cpu", rows)
    if link is None:
        link = allreduce_probe()
    overhead, source = cpu_call_overhead(link, exclude=path.resolve().name)
    out = []
    for _, r in rows.iterrows():
        _, p = _row_prediction(r, cal, link, overhead)
        out.append({"config_id": r.config_id, "measured_tokens_per_s": r.tokens_per_s,
                    "pred_tokens_per_s": p.tokens_per_s, "bottleneck": p.bottleneck})
    t = pd.DataFrame(out)
    t["error"] = t.pred_tokens_per_s / t.measured_tokens_per_s - 1
    # Spearman's rho as the Pearson correlation of the (average) ranks: pandas' method="spearman" needs scipy,
    # which is not a dependency (a clean install failed here on the torch 2.11 check)
    rho = t.pred_tokens_per_s.rank().corr(t.measured_tokens_per_s.rank())
    stats = {"rows": len(t), "spearman": float(rho),
             "median_abs_error": float(t.error.abs().median()), "call_overhead_s": overhead,
             "call_overhead_source": source}
    return t, stats


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv):
    from llmopt.config import OPTIMIZERS, PRECISIONS
    from llmopt.model import PRESETS

    from llmopt import cli

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
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="its state and, for Muon, its Newton-Schulz and gathers are priced (default adamw)")
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


def _custom_preset(text: str, seq_len: int) -> str:
    """Register ``--shape`` as a preset of this process and return its name."""
    from llmopt.model import PRESETS, GPTConfig

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
    from llmopt.config import PRECISIONS, TrainConfig, validate

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
    from llmopt.config import TrainConfig

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
            os.makedirs(a.out, exist_ok=True)
            t.to_csv(os.path.join(a.out, "check.csv"), index=False)
        return 0
    base, precisions = _request(a)
    world = a.devices * a.nodes
    cands, refused = candidates(base, world, precisions)  # before any probe of this machine: it takes a while
    if not cands:
        raise AdviseError(f"no layout of {a.preset} runs on {world} ranks ({refused} refused by llmopt's checks: "
                          f"e.g. tp must divide the heads, pp at most the layers, dp x grad_accum must divide "
                          f"--global-batch {a.global_batch}); change --devices or --global-batch")
    hw = _hardware(a, base)
    t = advise_table(cands, hw)
    out = Path(a.out or os.path.join("results", "runs", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-advise"))
    out.mkdir(parents=True, exist_ok=True)
    text = advice(t, hw, a.preset, a.global_batch, a.seq_len)
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


def _shown(t):
    import pandas as pd

    return pd.DataFrame({
        "layout": t.layout, "pred GiB/rank": [f"{m:.3g} ({lo:.3g}-{hi:.3g})" for m, lo, hi in
                                              zip(t.pred_memory_gib, t.pred_memory_low_gib, t.pred_memory_high_gib)],
        "fits": t.fits, "pred tokens/s": t.pred_tokens_per_s.map(lambda v: fmt(v, ",.0f")),
        "pred MFU": t.pred_mfu.map(lambda v: fmt(v, ".0%")), "pred step ms": t.pred_step_ms.map(lambda v: fmt(v, ".1f")),
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
    t.to_csv(out / "advise.csv", index=False)
    (out / "plots").mkdir(exist_ok=True)
    plot(t, hw, out / "plots" / "advise.png")
    L = [f"# Layout advice: {a.preset} on {hw.nodes} x {hw.devices_per_node} {hw.name}", "",
         f"Command: `python -m bench.advise {' '.join(sys.argv[1:])}`", "", text, "",
         "Every figure below is **predicted** (bench/costmodel.py), except the columns marked measured.", "",
         "- Peak FLOP/s per device: " + ", ".join(f"{p} {v / 1e12:.3g} TFLOP/s" for p, v in hw.peak_flops.items()),
         "- Achievable fraction of the peak, and framework time per micro-batch: "
         + ", ".join(f"{p} {f:.2f} and {hw.micro_batch_overhead.get(p, 0) * 1e3:.2f} ms "
                     f"({hw.calibration.get(p, 'assumed')})" for p, f in hw.achievable.items()),
         f"- Links: intra-node {hw.intra.name or hw.intra}; inter-node {hw.inter.name or hw.inter}",
         f"- Usable memory per rank: {hw.memory_bytes / GIB:.1f} GiB"
         + (f" (device memory less {GPU_RESERVE_BYTES / GIB:.0f} GiB for the CUDA context and NCCL)" if hw.name != "cpu" else ""),
         f"- Memory band: measured peaks on the {n} committed reference rows were {lo:+.0%} to {hi:+.0%} off the "
         "prediction; 'fits' = yes when even the high end fits, marginal when only the prediction does.", "",
         md_table(_shown(t)), ""]
    if measured is not None:
        L += ["## Measured on this machine", "", md_table(_measured_shown(measured)), ""]
    L += ["![predicted tokens/s against memory per rank](plots/advise.png)", ""]
    (out / "advise.md").write_text("\n".join(L))


def main(argv: list[str] | None = None) -> int:
    from llmopt import cli

    a = parse_args(argv)
    return cli.main(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
