"""Predicted step time of a layout on hardware the user may not have: compute, communication, pipeline bubble.

Everything here *predicts*; ``bench.advise`` labels each figure as predicted, and ``measured_check`` compares
the predictions with the committed references. Sources and assumptions:

* **Compute**: a framework cost per accumulation micro-batch (kernel launches, Python; fitted with the
  fraction below on CPU, 0 on GPUs where launches are asynchronous), plus model FLOPs per token from
  ``llmopt.core.shapes.flops_per_token`` (PaLM's 6N + 12·L·H·Q·T);
  activation checkpointing runs the forward twice, so it executes 8/6 of them (Chowdhery et al. 2022, app. B,
  count the recomputation as hardware, not model, FLOPs). Time = executed FLOPs of one rank over
  peak × achievable fraction. The peak is the datasheet's dense figure for known GPUs
  (``llmopt.core.peaks.DATASHEET``), or on CPU the matmul peak measured on this machine. The achievable fraction
  per precision and the per-micro-batch cost are fitted (least squares of step time) on the single-process
  rows the committed references hold for the device, else the ``ACHIEVABLE`` assumptions below. On CPU the
  ranks of a config share one CPU (the harness gives each cores / world threads), so the device peak is split
  among them.
  Smaller per-rank GEMMs under tensor parallelism are assumed as efficient as the full ones.
* **Collectives**: ring algorithms in the alpha-beta model (Patarasuk and Yuan 2009; NCCL's "bus bandwidth"
  notes): all-reduce moves 2(n-1)/n of the buffer per rank in 2(n-1) latency steps, all-gather and
  reduce-scatter (n-1)/n in n-1. A group uses the slower inter-node link when it spans nodes. The mesh is
  laid out as llmopt's (pp, dp, tp) with tp innermost, so a tp group of up to a node's devices stays inside it.
* **What each layout moves** per step and rank (``comm_bytes``): DDP all-reduces the fp32 gradients once per
  step (accumulation micro-batches skip the sync); FSDP2 all-gathers the fp32 parameters in forward and again
  in backward for every micro-batch and reduce-scatters the gradients once per step; tensor parallelism
  (Megatron, Shoeybi et al. 2019) all-reduces the block's activations B·T·C twice in forward and twice in
  backward per block and micro-batch, in the compute dtype; a pipeline sends each chunk's activations B·T·C
  forward and their gradients back across each stage boundary.
* **Per call**: each collective call also costs the framework's own work around it (DTensor dispatch, FSDP2's
  hooks, gloo's handshakes): ``Hardware.call_overhead``. On CPU it is calibrated on a measured sweep (the
  median of the unexplained step time per call over its multi-rank rows; ``bench.advise`` uses
  ``results/reference/cpu-extras`` and checks the model on ``cpu``, a different sweep); on GPUs it is taken
  as 0, since launches are asynchronous and NCCL's latency is already counted.
* **Overlap**: on GPUs DDP's and FSDP2's collectives overlap the backward (and FSDP2's forward all-gathers the
  forward): only the part longer than that compute is exposed. Tensor- and pipeline-parallel transfers sit on
  the critical path and are exposed in full. On CPU nothing overlaps: the same cores compute and communicate.
* **Bubble**: GPipe and 1F1B idle (p-1)/(m+p-1) of the time with p stages and m chunks (Narayanan et al. 2021,
  section 2.2): 1F1B saves memory, not time.
* **The optimizer step** (``optimizer_flops``, ``optimizer_comm``): Muon's Newton-Schulz iteration, 5 steps of
  X X^T, then (b A + c A A), then a X + B X on each hidden matrix with m <= n its two sides: 4 m^2 n + 2 m^3
  FLOPs a step, in bf16 (Jordan et al. 2024), run on the whole matrix by every rank (``llmopt.optim``); under
  FSDP2 and TP each matrix is first all-gathered (fp32), as is, for Adafactor, every tensor and its gradient.
  Both sit after the backward, on the critical path. The elementwise updates of every optimizer are
  memory-bound and not priced.

Not modelled: memory-bandwidth-bound ops (LayerNorm, GELU, the optimizer's elementwise update), congestion of
several groups sharing one link, and the compile or AMP casts' own cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from llmopt.core.config import TrainConfig
from llmopt.core.shapes import flops_per_token, stage_params

GIB = 2**30

# Achievable fraction of the dense peak, assumed where no measured rows calibrate it: tensor-core GEMMs of a
# GPT-2-sized model reach about half the datasheet peak in well-tuned training (nanoGPT and llm.c report
# 40-55% MFU on A100/H100); fp32 without TF32 runs on the CUDA cores, closer to their peak.
ACHIEVABLE = {"bf16": 0.45, "fp16": 0.45, "fp32": 0.6}


@dataclass(frozen=True)
class Link:
    """One kind of link: achievable bus bandwidth (bytes/s per rank) and per-step latency (s)."""
    bandwidth: float
    latency: float
    name: str = ""


# Per GPU generation: (memory per device in bytes, intra-node link, inter-node link). Bandwidths are ~80% of
# the nominal per-direction figure (what NCCL's ring reaches in practice); latencies are NCCL's small-message
# ring step times, order of magnitude only.
GPUS = {
    "H200": (141e9, Link(360e9, 10e-6, "NVLink 4 (450 GB/s)"), Link(40e9, 20e-6, "InfiniBand NDR (400 Gb/s per GPU)")),
    "H100": (80 * GIB, Link(360e9, 10e-6, "NVLink 4 (450 GB/s)"),
             Link(40e9, 20e-6, "InfiniBand NDR (400 Gb/s per GPU)")),
    "A100": (80 * GIB, Link(240e9, 10e-6, "NVLink 3 (300 GB/s)"),
             Link(20e9, 20e-6, "InfiniBand HDR (200 Gb/s per GPU)")),
    "L40S": (48e9, Link(25e9, 15e-6, "PCIe 4 x16 (32 GB/s)"), Link(10e9, 30e-6, "100 GbE")),
    "A10G": (24 * GIB, Link(25e9, 15e-6, "PCIe 4 x16 (32 GB/s)"), Link(10e9, 30e-6, "100 GbE")),
    "L4": (24 * GIB, Link(25e9, 15e-6, "PCIe 4 x16 (32 GB/s)"), Link(10e9, 30e-6, "100 GbE")),
}
# Per-device memory the advisor keeps back for the CUDA context, NCCL buffers and allocator fragmentation.
GPU_RESERVE_BYTES = 2 * GIB


@dataclass(frozen=True)
class Hardware:
    name: str                        # "H100", "cpu", ...
    peak_flops: dict                 # precision -> dense peak FLOP/s of one device
    memory_bytes: float              # usable memory per device (rank)
    devices_per_node: int
    nodes: int
    intra: Link
    inter: Link
    achievable: dict = field(default_factory=lambda: dict(ACHIEVABLE))  # precision -> fraction of the peak
    micro_batch_overhead: dict = field(default_factory=dict)  # precision -> framework seconds per micro-batch
    shared: bool = False             # CPU: every rank of a node shares one peak
    call_overhead: float = 0.0       # seconds of framework work per collective call (calibrated on CPU)
    calibration: dict = field(default_factory=dict)  # what each calibrated figure comes from

    @property
    def world(self) -> int:
        return self.devices_per_node * self.nodes


@dataclass(frozen=True)
class StepPrediction:
    compute_s: float                 # forward and backward
    bubble_s: float
    comm_s: float                    # exposed communication, the optimizer's gathers included
    optimizer_s: float               # the optimizer's own compute (Muon's Newton-Schulz)
    step_s: float
    tokens_per_s: float
    mfu: float
    bottleneck: str                  # compute, communication, bubble or optimizer


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _params_per_rank(cfg: TrainConfig) -> float:
    """Parameters one rank holds before FSDP sharding: the model over tp and pp (embeddings on the ends)."""

    return max(stage_params(cfg, s) for s in range(cfg.pp))


def comm_bytes(cfg: TrainConfig) -> list[tuple]:
    """What one rank sends per optimizer step: (dimension, collective, group size, buffer bytes of one call,
    calls per step). FSDP2 gathers and reduces one unit at a time (each block, and the root's embeddings
    and head); the wire bytes of a ring collective follow from ``ring_factor``."""
    m = cfg.model_config
    out = []
    n = _params_per_rank(cfg)
    if cfg.dp > 1 and cfg.dp_mode == "ddp":
        out.append(("dp", "all_reduce", cfg.dp, 4 * n, 1))
    elif cfg.dp > 1:
        units = -(-m.n_layer // cfg.pp) + 1
        out.append(("dp", "all_gather", cfg.dp, 4 * n / units, 2 * cfg.grad_accum * units))
        out.append(("dp", "reduce_scatter", cfg.dp, 4 * n / units, units))
    act = cfg.micro_batch * cfg.seq_len * m.n_embd * _bytes(cfg.precision)  # B·T·C of one micro-batch
    if cfg.tp > 1:
        layers = -(-m.n_layer // cfg.pp)
        out.append(("tp", "all_reduce", cfg.tp, act, 4 * layers * cfg.grad_accum))
    if cfg.pp > 1:
        # each boundary: forward activations and backward gradients of every chunk
        chunks = cfg.pp_microbatches or cfg.pp
        out.append(("pp", "send_recv", 2, act / chunks, 2 * chunks * cfg.grad_accum))
    return out


def _stages(cfg: TrainConfig) -> list:
    """Each pipeline stage as its optimizer sees it (``llmopt.optimizers.Stage``)."""
    from llmopt.optimizers import stage_view

    return [stage_view(cfg, s, stage_params(cfg, s)) for s in range(cfg.pp)]


def optimizer_flops(cfg: TrainConfig) -> float:
    """FLOPs of one rank's optimizer step beyond the elementwise update, on its most loaded stage: the
    optimizer's own formula (its spec's ``update_flops``: Muon's Newton-Schulz on every hidden matrix, whole)."""
    from llmopt.optimizers import spec

    return max(float(spec(cfg.optimizer).update_flops(st)) for st in _stages(cfg))


def optimizer_comm(cfg: TrainConfig) -> list[tuple]:
    """The optimizer's gathers (as ``comm_bytes``' tuples): under FSDP2 (dp) and TP the whole of each tensor it
    needs, fp32, on its most loaded stage (its spec's ``gathers``: Muon each hidden matrix's momentum,
    Adafactor each tensor and its gradient). A tensor sharded over both is gathered over tp, then dp (its
    buffers are the shard of dp's, then the whole)."""
    from llmopt.optimizers import spec

    fsdp = cfg.dp > 1 and cfg.dp_mode == "fsdp"
    opt = spec(cfg.optimizer)
    tensors = max((opt.gathers(st) for st in _stages(cfg)), key=lambda ts: sum(math.prod(t) for t in ts))
    if not tensors or not (fsdp or cfg.tp > 1):
        return []
    per_tensor = opt.gathered_per_tensor
    whole = 4 * sum(math.prod(t) for t in tensors)
    out = []
    if cfg.tp > 1:
        out.append(("tp", "all_gather", cfg.tp, whole / len(tensors) / (cfg.dp if fsdp else 1),
                    per_tensor * len(tensors)))
    if fsdp:
        out.append(("dp", "all_gather", cfg.dp, whole / len(tensors), per_tensor * len(tensors)))
    return out


def ring_factor(kind: str, n: int) -> tuple[float, int]:
    """(fraction of the buffer each rank sends, latency steps) of a ring collective over n ranks."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n, 2 * (n - 1)
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n, n - 1
    return 1.0, 1  # point to point


def wire_bytes(cfg: TrainConfig) -> dict:
    """Bytes one rank sends per step, per parallel dimension (dp, tp, pp)."""
    total: dict = {}
    for dim, kind, n, size, calls in comm_bytes(cfg):
        total[dim] = total.get(dim, 0.0) + ring_factor(kind, n)[0] * size * calls
    return total


def _link(cfg: TrainConfig, hw: Hardware, dim: str) -> Link:
    """The link a group of dimension ``dim`` crosses: the mesh is (pp, dp, tp) with tp innermost."""
    stride = {"tp": 1, "dp": cfg.tp, "pp": cfg.tp * cfg.dp}[dim]
    size = {"tp": cfg.tp, "dp": cfg.dp, "pp": cfg.pp}[dim]
    return hw.inter if stride * size > hw.devices_per_node else hw.intra


def model_flops(cfg: TrainConfig) -> float:
    """Model FLOPs of one optimizer step (PaLM's convention)."""
    return flops_per_token(cfg.model_config, cfg.seq_len) * cfg.global_batch * cfg.seq_len


def executed_flops(cfg: TrainConfig) -> float:
    """FLOPs the hardware executes in one step: checkpointing runs each block's forward twice."""
    return model_flops(cfg) * (8 / 6 if cfg.activation_checkpointing else 1)


def predict_step(cfg: TrainConfig, hw: Hardware) -> StepPrediction:
    """Predicted time of one optimizer step of a validated, resolved config on ``hw``."""
    world = cfg.world_size
    rate = hw.peak_flops[cfg.precision] * hw.achievable[cfg.precision]
    per_rank_rate = rate / world if hw.shared else rate
    compute = executed_flops(cfg) / world / per_rank_rate
    compute += cfg.grad_accum * hw.micro_batch_overhead.get(cfg.precision, 0.0)
    chunks = cfg.pp_microbatches or cfg.pp
    m = chunks * cfg.grad_accum if cfg.pp > 1 else 1
    bubble = compute * (cfg.pp - 1) / m if cfg.pp > 1 else 0.0
    exposed = dp_time = 0.0
    for dim, kind, n, size, calls in comm_bytes(cfg):
        t = _comm_time(cfg, hw, dim, kind, n, size, calls)
        if dim == "dp":
            dp_time += t
        else:
            exposed += t
    # DDP's buckets reduce during the backward (2/3 of the compute), FSDP2's gathers also during the forward;
    # on a CPU the same cores compute and communicate, so nothing overlaps
    overlappable = 0.0 if hw.shared else compute * (1.0 if cfg.dp_mode == "fsdp" else 2 / 3)
    exposed += max(0.0, dp_time - overlappable)
    exposed += sum(_comm_time(cfg, hw, *c) for c in optimizer_comm(cfg))  # after the backward: nothing to hide in
    bf16 = hw.peak_flops.get("bf16", hw.peak_flops[cfg.precision]) * hw.achievable.get("bf16", ACHIEVABLE["bf16"])
    optimizer = optimizer_flops(cfg) / (bf16 / world if hw.shared else bf16)
    step = compute + bubble + exposed + optimizer
    tokens = cfg.global_batch * cfg.seq_len
    devices = 1 if hw.shared else world
    mfu = model_flops(cfg) / step / (hw.peak_flops[cfg.precision] * devices)
    parts = {"compute": compute, "communication": exposed, "bubble": bubble, "optimizer": optimizer}
    return StepPrediction(compute, bubble, exposed, optimizer, step, tokens / step, mfu, max(parts, key=parts.get))


def _comm_time(cfg: TrainConfig, hw: Hardware, dim: str, kind: str, n: int, size: float, calls: int) -> float:
    frac, steps = ring_factor(kind, n)
    link = _link(cfg, hw, dim)
    return calls * (frac * size / link.bandwidth + steps * link.latency + hw.call_overhead)


def with_links(hw: Hardware, intra: Link | None = None, inter: Link | None = None) -> Hardware:
    return replace(hw, intra=intra or hw.intra, inter=inter or hw.inter)
