"""This machine and the committed references: the CPU's matmul peaks and gloo link (probed once, cached), the
GPU datasheet figures, the achievable fractions and per-call overhead fitted on measured sweeps, and the time
model checked against a sweep (``check_reference``)."""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.advisor import AdviseError
from bench.advisor.costmodel import (
    ACHIEVABLE,
    GPU_RESERVE_BYTES,
    GPUS,
    Hardware,
    Link,
    predict_step,
)
from bench.hardware import DATASHEET, peak_flops, peak_seconds, write_json
from bench.results import row_config
from llmopt.cpu import cpu_flags, cpu_model
from llmopt.safe_files import makedirs

if TYPE_CHECKING:
    import pandas as pd

REFERENCES = Path(__file__).resolve().parent.parent.parent / "results" / "reference"


def _gpu_key(name: str) -> str | None:
    for key in GPUS:
        if key.lower() in name.lower():
            return key
    return None


UPDATE_REFERENCE = "cpu-optimizers"  # the sweep the CPU's update costs are fitted on (every optimizer and layout)
UPDATE_CONSTANTS = ("op_overhead", "dtensor_call_overhead", "dtensor_op_overhead", "memory_bandwidth",
                    "update_flop_rate")


# ------------------------------------------------------------------------------------- calibration data
@functools.lru_cache(maxsize=None)
def reference_rows() -> "pd.DataFrame":
    """Every ok row of every committed reference, with the reference's name."""
    import pandas as pd

    from bench.noise import steadier

    frames = []
    for path in sorted(REFERENCES.glob("*/results.csv")):
        d = steadier(pd.read_csv(path))[0]  # a re-timed row once, by its steadier timing
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
    less the measured update (``optimizer_ms_p50``, priced on its own: ``costmodel.update_seconds``) = executed
    FLOPs / (peak x fraction) + micro-batches x overhead, by least squares. Where the rows cannot
    separate the two terms (one shape, no accumulation), the overhead is 0 and the fraction the median MFU;
    where there are no rows, the ACHIEVABLE assumption."""
    import numpy as np

    from bench.advisor.costmodel import executed_flops

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
            y.append(c.tokens_per_step / r.tokens_per_s - _measured_update(r))  # the step without its update
        x, y = np.array(x), np.array(y)
        (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
        if np.linalg.matrix_rank(x) < 2 or a <= 0 or b < 0:
            a, b = float(np.median(y / x[:, 0])), 0.0
        out[prec] = (1 / float(a), float(b), f"fitted on {len(group)} measured single-process rows")
    return out


def _measured_update(r) -> float:
    """A row's measured update in seconds (0 where its sweep predates ``optimizer_ms_p50``)."""
    ms = r.get("optimizer_ms_p50")
    return float(ms) / 1e3 if ms is not None and ms == ms else 0.0


def update_features(cfg, profile, link: Link, call_overhead: float) -> tuple[list[float], float]:
    """(the update's time per unit of each of UPDATE_CONSTANTS, in that order (the bandwidth and the rate as
    their inverses), the time of its collectives): ``costmodel.update_seconds`` is linear in those five."""
    from dataclasses import replace

    from bench.advisor.costmodel import update_seconds

    zero = Hardware("cpu", {"fp32": 1.0}, 1.0, 2, 1, link, link, shared=True, call_overhead=call_overhead,
                    update_flop_rate=float("inf"))
    units = [replace(zero, op_overhead=1.0), replace(zero, dtensor_call_overhead=1.0),
             replace(zero, dtensor_op_overhead=1.0), replace(zero, memory_bandwidth=1.0),
             replace(zero, update_flop_rate=1.0)]
    x = [update_seconds(cfg, hw, profile)[0] for hw in units]
    return x, update_seconds(cfg, zero, None)[1]


def calibrate_update(rows, link: Link, call_overhead: float, source: str) -> dict:
    """The CPU's update constants (UPDATE_CONSTANTS) fitted on measured rows' ``optimizer_ms_p50``: the
    update's time is linear in the dispatch costs and the inverses of the bandwidth and the rate
    (``update_features``), fitted by non-negative least squares on the relative error (each row weighed by
    1 / its measured time: small updates count as much as large ones), the collectives priced by the link and
    the per-call overhead, not fitted. A constant the rows cannot see (no DTensor rows) stays at 0 (its
    inverse: unpriced)."""
    import numpy as np
    from scipy.optimize import nnls

    from bench.advisor.update import profiles, sharded

    rows = rows[rows.optimizer_ms_p50.notna() & (rows.optimizer_ms_p50 > 0)]
    x, y = [], []
    for _, r in rows.iterrows():
        cfg = row_config(r)
        profile = profiles(cfg.model_config, cfg.optimizer_impl, sharded(cfg), [cfg.optimizer])[cfg.optimizer]
        if isinstance(profile, str):
            continue
        features, comm = update_features(cfg, profile, link, call_overhead)
        measured = r.optimizer_ms_p50 / 1e3
        x.append([f / measured for f in features])
        y.append((measured - comm) / measured)
    if len(x) < len(UPDATE_CONSTANTS):
        return {"source": "none (too few measured rows)"}
    c, _ = nnls(np.array(x), np.array(y))
    out = dict(zip(UPDATE_CONSTANTS, map(float, c)))
    for k in ("memory_bandwidth", "update_flop_rate"):  # fitted as inverses
        out[k] = 1 / out[k] if out[k] > 0 else (float("inf") if k == "memory_bandwidth" else 0.0)
    out["source"] = f"fitted on {len(x)} rows of {source}"
    return out


UPDATE_FIT = "update-fit.json"  # in UPDATE_REFERENCE: the fitted constants and the link they were fitted with


def fit_update_reference(link: Link) -> dict:
    """UPDATE_CONSTANTS fitted on UPDATE_REFERENCE with ``link`` and the per-call overhead ``cpu_call_overhead``
    fits for it, with what they were fitted with: what ``scripts/fit_update_costs.py`` commits as UPDATE_FIT."""
    path = REFERENCES / UPDATE_REFERENCE
    overhead, source = cpu_call_overhead(link, exclude=UPDATE_REFERENCE)
    fit = calibrate_update(_native_cpu_rows(path), link, overhead, f"results/reference/{UPDATE_REFERENCE}")
    return {**fit, "link_bandwidth": link.bandwidth, "link_latency": link.latency, "call_overhead": overhead,
            "call_overhead_source": source}


@functools.lru_cache(maxsize=None)
def cpu_update_constants() -> dict:
    """This CPU's update constants (UPDATE_CONSTANTS and their source) as committed in UPDATE_FIT; {"source":
    ...} alone where none is committed (the update's operations and bytes are then not priced)."""
    path = REFERENCES / UPDATE_REFERENCE / UPDATE_FIT
    try:
        fit = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"source": f"none ({path.name} not committed)"}
    return {k: fit[k] for k in (*UPDATE_CONSTANTS, "source") if k in fit}


def _hw_calibration(cal: dict) -> dict:
    """Hardware keyword arguments from ``calibrate``'s result."""
    return dict(achievable={p: f for p, (f, _, _) in cal.items()},
                micro_batch_overhead={p: b for p, (_, b, _) in cal.items()},
                calibration={p: s for p, (_, _, s) in cal.items()})


# ---------------------------------------------------------------------------------- this machine's probe
def probe_cache_path() -> Path:
    from llmopt.prepare import cache_dir

    return Path(cache_dir()) / "advise-probe.json"


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
    return Link(bandwidth, latency,
                f"gloo on this machine (probed: {bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.0f} us)")


def cpu_hardware(model, tokens: int, devices: int, memory: float | None, refresh: bool = False,
                 log=print) -> Hardware:
    """This CPU: the matmul peak per precision over the model's GEMMs and an all-reduce probe, cached per
    CPU model, flags, torch version and model width."""
    import torch

    from bench.hardware import CPU_GEMM_TOKENS

    tokens = min(tokens, CPU_GEMM_TOKENS)
    key = (f"{cpu_model()}|{','.join(cpu_flags())}|{os.cpu_count()}|torch {torch.__version__}"
           f"|C{model.n_embd}|V{model.vocab_size}|M{tokens}|{peak_seconds()}s")  # a longer timing, its own entry
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
        makedirs(str(path.parent))
        write_json(str(path), cache)
    c = cache[key]
    link = Link(c["bandwidth"], c["latency"], f"gloo on this machine ({c['bandwidth'] / 1e9:.2f} GB/s, "
                                              f"{c['latency'] * 1e6:.0f} us, probed)")
    kw = _hw_calibration(calibrate("cpu"))
    overhead, source = cpu_call_overhead(link)
    kw["calibration"]["call_overhead"] = source
    kw.update(update_kw(cpu_update_constants(), kw["calibration"]))
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
    kw = _hw_calibration(calibrate(key or name))
    kw.update(gpu_update_kw(key, kw["calibration"]))
    return Hardware(key or name, peaks, memory_bytes=mem - GPU_RESERVE_BYTES, devices_per_node=devices,
                    nodes=nodes, intra=intra, inter=inter, **kw)


def update_kw(constants: dict, calibration: dict) -> dict:
    """Hardware keyword arguments from ``cpu_update_constants``' result (its source noted in ``calibration``)."""
    calibration["update"] = constants.get("source", "")
    return {k: constants[k] for k in UPDATE_CONSTANTS if k in constants}


def gpu_update_kw(key: str | None, calibration: dict) -> dict:
    """A GPU's update constants: its HBM bandwidth at HBM_ACHIEVABLE (datasheet), the matmuls at the bf16 peak's
    achievable fraction, and the dispatch costs of this machine's CPU fit, assumed for the GPU's host (each
    operation is dispatched by the host; a kernel longer than its dispatch hides it, so this is an upper
    bound). No GPU sweep with optimizer_ms calibrates them yet."""
    from bench.advisor.costmodel import HBM_ACHIEVABLE, HBM_BANDWIDTH

    cpu = cpu_update_constants()
    out = {k: cpu[k] for k in ("op_overhead", "dtensor_call_overhead", "dtensor_op_overhead") if k in cpu}
    if key in HBM_BANDWIDTH:
        out["memory_bandwidth"] = HBM_BANDWIDTH[key] * HBM_ACHIEVABLE
    calibration["update"] = (f"assumed: HBM at {HBM_ACHIEVABLE:.0%} of the datasheet, the host's dispatch costs "
                             f"from this CPU ({cpu.get('source', 'none')})")
    return out


def cached_link() -> Link:
    """gloo's link on this machine, probed once (``allreduce_probe``) and cached per CPU model and torch."""
    import importlib.metadata as md

    path = probe_cache_path().with_name("gloo-link.json")
    key = f"{cpu_model()}|{os.cpu_count()}|torch {md.version('torch')}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        link = allreduce_probe()
        cache[key] = {"bandwidth": link.bandwidth, "latency": link.latency}
        makedirs(str(path.parent))
        write_json(str(path), cache)
    c = cache[key]
    return Link(c["bandwidth"], c["latency"], f"gloo on this machine ({c['bandwidth'] / 1e9:.2f} GB/s, "
                                              f"{c['latency'] * 1e6:.0f} us, probed)")


# ------------------------------------------------------------------------- the model against references
CALIBRATION_REFERENCE = "cpu-extras"  # the sweep the CPU's per-call overhead is fitted on


def _native_cpu_rows(path: Path) -> "pd.DataFrame":
    import pandas as pd

    if not (path / "results.csv").exists():
        raise AdviseError(f"{path}: no results.csv there; pass a sweep directory, e.g. results/reference/cpu")
    from bench.noise import steadier

    rows = steadier(pd.read_csv(path / "results.csv"))[0]  # a re-timed row once, by its steadier timing
    rows = rows[(rows.status == "ok") & (rows.engine == "native") & (rows.model_impl == "llmopt")]
    if rows.empty or not rows.device.eq("cpu").all():
        raise AdviseError(f"{path}: needs ok native rows of a CPU sweep")
    return rows


def _row_prediction(r, cal: dict, link: Link, overhead: float, update: dict | None = None):
    """(config, StepPrediction) of a CPU row, with its own measured peak; ``update``: the update's constants
    (``cpu_update_constants``) to price it with its counted step, else its FLOPs and collectives alone."""
    from bench.advisor.update import profiles, sharded

    cfg = row_config(r)
    hw = Hardware("cpu", {cfg.precision: r.peak_flops}, memory_bytes=float("inf"), devices_per_node=os.cpu_count() or 1,
                  nodes=1, intra=link, inter=link, shared=True, call_overhead=overhead, **_hw_calibration(cal),
                  **update_kw(update or {}, {}))
    profile = None
    if update and "op_overhead" in update:
        counted = profiles(cfg.model_config, cfg.optimizer_impl, sharded(cfg), [cfg.optimizer])[cfg.optimizer]
        profile = None if isinstance(counted, str) else counted
    return cfg, predict_step(cfg, hw, profile)


def calibrate_call_overhead(rows, cal: dict, link: Link) -> float:
    """Seconds per collective call of the forward and backward that the compute and wire model leave
    unexplained: the median over the multi-rank rows of (measured step - measured update - predicted step
    without its update) / calls, at least 0 (the update is priced on its own)."""
    from bench.advisor.costmodel import comm_bytes

    per_call = []
    for _, r in rows.iterrows():
        cfg, p = _row_prediction(r, cal, link, 0.0)
        calls = sum(c[-1] for c in comm_bytes(cfg))
        if calls:
            measured = cfg.tokens_per_step / r.tokens_per_s - _measured_update(r)
            per_call.append((measured - (p.step_s - p.update_s)) / calls)
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
    on this machine (or ``link``), the per-call overhead fitted on another sweep, and its update priced from
    its counted step at the committed update fit (``cpu_update_constants``, fitted on cpu-optimizers: that
    sweep's own check is in-sample for the update)."""
    import pandas as pd

    path = Path(ref_dir)
    rows = _native_cpu_rows(path)
    cal = calibrate("cpu", rows)
    if link is None:
        link = allreduce_probe()
    overhead, source = cpu_call_overhead(link, exclude=path.resolve().name)
    out = []
    update = cpu_update_constants()
    for _, r in rows.iterrows():
        _, p = _row_prediction(r, cal, link, overhead, update)
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


# ------------------------------------------------------------------- a sweep's rows, their update predicted
def fill_predicted_updates(files, log=print) -> None:
    """Every ok row's ``predicted_optimizer_ms`` (``predicted_update_ms``) and its error against the measured
    ``optimizer_ms_p50``, written into a sweep's results.csv (``bench.results.ResultFiles``)."""
    import pandas as pd

    from bench.report import load_all

    rows = load_all(os.path.dirname(files.results_path))[0]  # as the report reads it: a bad line left out
    if rows.empty:
        return
    predicted = predicted_update_ms(rows, log)
    measured = dict(zip(rows.config_id, pd.to_numeric(rows.optimizer_ms_p50, errors="coerce")))
    files.fill({cid: {"predicted_optimizer_ms": ms,
                      "optimizer_ms_prediction_error": ms / measured[cid] - 1 if measured[cid] > 0 else None}
                for cid, ms in predicted.items()})


def predicted_update_ms(rows, log=print) -> dict[str, float]:
    """config_id -> the cost model's ``optimizer_ms`` for every ok row of a sweep (a data frame of results.csv)
    that measured one: on CPU with this machine's constants (``probe.cpu_update_constants``, fitted on a
    committed sweep; the row's own measured peak; gloo's link, probed once where a row's update has
    collectives), on a GPU of the datasheet table with ``probe.gpu_update_kw``'s. Rows it cannot price (another
    device, an optimizer that could not be counted) are left out."""
    import pandas as pd

    from bench.advisor.costmodel import optimizer_comm, update_seconds
    from bench.advisor.update import profiles, sharded

    NO_LINK = Link(1.0, 0.0, "none: no row's update has collectives")
    rows = rows[(rows.status == "ok") & pd.to_numeric(rows.optimizer_ms_p50, errors="coerce").notna()]
    configs = {r.config_id: row_config(r) for _, r in rows.iterrows()}
    if not configs:
        return {}
    link = cached_link() if any(optimizer_comm(c) for c in configs.values()) else None
    wanted: dict[tuple, set] = {}  # what is not cached yet is counted in one subprocess per group, not per row
    for cfg in configs.values():
        wanted.setdefault((cfg.model_config, cfg.optimizer_impl, sharded(cfg)), set()).add(cfg.optimizer)
    try:
        for (model, impl, on_shards), names in wanted.items():
            profiles(model, impl, on_shards, sorted(names), log)
    except (RuntimeError, OSError, ValueError) as e:  # the counting subprocess failed or timed out
        log(f"optimizer_ms not predicted: {e}")
        return {}
    cpu_kw: dict | None = None
    out = {}
    for _, r in rows.iterrows():
        cfg = configs[r.config_id]
        profile = profiles(cfg.model_config, cfg.optimizer_impl, sharded(cfg), [cfg.optimizer])[cfg.optimizer]
        if isinstance(profile, str):
            log(f"optimizer_ms of {r.config_id} not predicted: {cfg.optimizer}'s step could not be counted "
                f"({profile})")
            continue
        source = str(r.get("peak_flops_source", ""))
        if cfg.device == "cpu" or r.get("device") == "cpu":
            if cpu_kw is None:
                constants = cpu_update_constants()
                if "op_overhead" not in constants:
                    return out  # nothing calibrated: no prediction rather than one that prices half the update
                cpu_kw = {**update_kw(constants, {}), "call_overhead": cpu_call_overhead(link)[0] if link else 0.0}
            hw = Hardware("cpu", {cfg.precision: float(r.peak_flops or 0) or 1.0}, float("inf"), 1, 1,
                          link or NO_LINK, link or NO_LINK, shared=True, **cpu_kw)
        elif source.startswith("datasheet:") and _gpu_key(source) is not None:
            from bench.advisor.costmodel import GPUS

            key = _gpu_key(source)
            _, intra, inter = GPUS[key]
            kw = _hw_calibration(calibrate(key))
            kw.update(gpu_update_kw(key, kw["calibration"]))
            hw = Hardware(key, {cfg.precision: float(r.peak_flops) / cfg.world_size}, float("inf"), cfg.world_size,
                          1, intra, inter, **kw)  # a GPU row's peak_flops is its devices' together
        else:
            continue
        own, comm = update_seconds(cfg, hw, profile)
        out[r.config_id] = (own + comm) * 1e3
    return out
