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
* **The optimizer step** (``update_seconds``: what ``optimizer_ms`` measures): the operations and bytes of one
  step, counted on a stand-in of the model (``bench.advisor.update``: on plain tensors, and on FSDP2's DTensor
  shards), at the hardware's dispatch cost per operation (plain, per DTensor call, per DTensor in a foreach
  call), its memory bandwidth and its matmul rate; plus the spec's ``update_flops`` (Muon's Newton-Schulz, 5
  steps of 4 m^2 n + 2 m^3 FLOPs on each hidden matrix, Jordan et al. 2024; SOAP's projections), divided among
  the ranks of a 1-D mesh where the optimizer splits that work (Muon, one owner per matrix); plus its
  collectives (``optimizer_comm``: gathers per bucket and placement, LAMB's norms), after the backward, on the
  critical path. On CPU the five costs are fitted on a committed sweep of every optimizer and layout
  (``probe.cpu_update_constants``); on GPUs the bandwidth is the datasheet's HBM at HBM_ACHIEVABLE and the
  dispatch costs are the CPU's (the host dispatches; it overlaps the device's work, so the slower counts).

Not modelled: memory-bandwidth-bound ops of the forward and backward (LayerNorm, GELU), congestion of several
groups sharing one link, the compile or AMP casts' own cost, and the step-time fit's double count of the update
on CPU (the per-micro-batch cost fitted on single-process rows includes their AdamW-sized updates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from llmopt.core.config import TrainConfig
from llmopt.core.shapes import flops_per_token, stage_params, stage_tensors, tp_split

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
# Per GPU generation: HBM bandwidth in bytes/s (datasheet: H100 SXM 3.35 TB/s, H200 4.8, A100 80GB 2.0, L40S
# 0.864, A10G 0.6, L4 0.3), of which an elementwise kernel reaches about 80% (STREAM-like copies on H100).
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10G": 0.6e12, "L4": 0.3e12}
HBM_ACHIEVABLE = 0.8
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
    # the optimizer's update (``update_seconds``): seconds per operation on plain tensors, per DTensor call and
    # per DTensor in a call, memory bytes/s, and the matmul FLOP/s of one rank (0: the bf16 peak's share)
    op_overhead: float = 0.0
    dtensor_call_overhead: float = 0.0
    dtensor_op_overhead: float = 0.0
    memory_bandwidth: float = float("inf")
    update_flop_rate: float = 0.0

    @property
    def world(self) -> int:
        return self.devices_per_node * self.nodes


@dataclass(frozen=True)
class StepPrediction:
    compute_s: float                 # forward and backward
    bubble_s: float
    comm_s: float                    # exposed communication, the optimizer's gathers included
    optimizer_s: float               # the optimizer's own work (operations, bytes, Muon's Newton-Schulz)
    update_s: float                  # the whole update, its collectives included: what optimizer_ms measures
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


def _busiest(cfg: TrainConfig):
    """The ``Stage`` of the pipeline stage with the most parameter values: the one the update waits for."""
    return max(_stages(cfg), key=lambda st: sum(math.prod(t) for t in st.tensors))


def _split(cfg: TrainConfig) -> int:
    """Ranks the whole-tensor work is divided over: a mesh's ranks when the optimizer splits it (its spec's
    ``splits_work``: Muon's Newton-Schulz, one owner per matrix) and the parameters' mesh is 1-D (FSDP2 or TP
    alone; DDP beside TP replicates the TP shards over a 2-D mesh, ``apply_replicate``)."""
    from llmopt.optimizers import param_mesh_dims, spec

    fsdp = cfg.dp if cfg.dp > 1 and cfg.dp_mode == "fsdp" else 1
    return fsdp * cfg.tp if spec(cfg.optimizer).splits_work and param_mesh_dims(cfg) == 1 else 1


def optimizer_flops(cfg: TrainConfig) -> float:
    """FLOPs of one rank's optimizer step beyond the elementwise update, on its most loaded stage: the
    optimizer's own formula (its spec's ``update_flops``: Muon's Newton-Schulz on every hidden matrix, whole),
    divided among the ranks where the optimizer splits that work (``_split``)."""
    from llmopt.optimizers import spec

    return max(float(spec(cfg.optimizer).update_flops(st)) for st in _stages(cfg)) / _split(cfg)


def _placements(cfg: TrainConfig, stage: int) -> list[tuple]:
    """Per parameter tensor of ``stage`` (``stage_tensors``' order), how its DTensor is laid out, as the mesh
    dimensions it is sharded over: () replicated, ("dp",) FSDP2's dim-0 shard, ("tp",) a TP shard, ("dp",
    "tp") both, and the TP dimension it is sharded along (to tell groups of one placement apart). FSDP2 over a
    TP shard of dim 0 shards dim 0 again: torch's strided shard, marked "strided" (DTensor gathers it itself)."""
    fsdp = cfg.dp > 1 and cfg.dp_mode == "fsdp"
    out = []
    for split in tp_split(cfg, stage):
        dims = (("dp",) if fsdp else ()) + (("tp",) if cfg.tp > 1 and split is not None else ())
        strided = fsdp and cfg.tp > 1 and split == 0
        out.append((dims, split if cfg.tp > 1 else None, strided))
    return out


def optimizer_comm(cfg: TrainConfig) -> list[tuple]:
    """The optimizer's collectives per step (as ``comm_bytes``' tuples) on its most loaded stage, as
    ``llmopt.optim`` makes them. Whole-tensor optimizers (their spec's ``gathers``: Muon each hidden matrix's
    momentum, Adafactor and SOAP each tensor and its gradient) gather in buckets (``bucket_indices`` with the
    spec's ``bucket_times``, in the parameter groups' order: matrices and embeddings, then the rest): per bucket,
    one all-gather per placement and mesh dimension it is sharded over (a tensor and its gradient together),
    and two per tensor FSDP2 shards strided (DTensor gathers those itself, one at a time). Where the optimizer
    splits the work (``_split``: Muon's owners on a 1-D mesh) a bucket is instead two all-to-alls, each rank's
    pieces of the momenta to their owners and the updates' pieces back, each leaving a rank with about its
    share of the bucket. Norms over shards (the
    spec's ``reductions``: LAMB's) are one all-reduce per set of mesh dimensions tensors are sharded over, and
    per such dimension; sums over a 1-D mesh (``mesh_reductions``: Adafactor's statistics, every tensor's in one) one
    all-reduce each. ``tests/test_costmodel_update.py`` holds the counts to the collectives a real step makes."""
    from llmopt.optimizers import bucket_indices, spec, stage_view

    fsdp = cfg.dp > 1 and cfg.dp_mode == "fsdp"
    if not (fsdp or cfg.tp > 1):
        return []
    opt = spec(cfg.optimizer)
    s = max(range(cfg.pp), key=lambda i: sum(math.prod(t) for t in stage_tensors(cfg, i)))
    tensors, layout = stage_tensors(cfg, s), _placements(cfg, s)
    ranks = {"tp": cfg.tp, "dp": cfg.dp}
    calls: dict[tuple, list[float]] = {}  # (dimension, kind) -> per call, the bytes one rank ends up with

    def collect(kind: str, group_keys, size: float) -> None:
        for dims, _split, _ in group_keys:
            for d in dims:
                calls.setdefault((d, kind), []).append(size / max(len(group_keys), 1))

    summed = sorted({p[0] for p in layout if p[0]})  # the sets of mesh dimensions tensors are sharded over
    for _ in range(opt.reductions):
        for dims in summed:
            for d in dims:
                calls.setdefault((d, "all_reduce"), []).append(8.0 * len(tensors) / len(summed))
    view = stage_view(cfg, s, stage_params(cfg, s))
    if opt.mesh_reductions and view.mesh_dims == 1 and any(p[0] for p in layout):
        dim = "dp" if fsdp else "tp"  # per tensor its sum of squares, a matrix's rows and columns: 4 bytes each
        sums = sum(4 * (1 + (sum(t) if len(t) == 2 else 0)) for t, p in zip(tensors, layout) if p[0])
        calls.setdefault((dim, "all_reduce"), []).extend(
            [sums] + [4.0 * sum(1 for p in layout if p[0])] * (opt.mesh_reductions - 1))  # then one sum each
    gathered = set(map(tuple, opt.gathers(view)))
    order = sorted((i for i, t in enumerate(tensors) if t in gathered), key=lambda i: len(tensors[i]) < 2)
    if order:
        mesh = cfg.dp * cfg.tp  # the parameters' mesh: DDP beside TP replicates over dp (``apply_replicate``)
        split = _split(cfg)
        for idx in bucket_indices([math.prod(tensors[i]) for i in order], opt.bucket_times(mesh)):
            members = [order[j] for j in idx]
            size = sum(4 * opt.gathered_per_tensor * math.prod(tensors[i]) for i in members)
            if split > 1:
                calls.setdefault((("dp", "tp")[cfg.tp > 1], "all_to_all"), []).extend([size / split] * 2)
                continue
            for i in members:
                if layout[i][2]:  # strided: DTensor's full_tensor, the tensor and its gradient apart
                    for d in layout[i][0]:
                        calls.setdefault((d, "all_gather"), []).extend(
                            [4 * math.prod(tensors[i])] * opt.gathered_per_tensor)
            keys = {layout[i] for i in members if layout[i][0] and not layout[i][2]}
            collect("all_gather", sorted(keys, key=str), size)
    return [(d, kind, ranks[d], sum(sizes) / len(sizes), len(sizes)) for (d, kind), sizes in calls.items()]


def update_seconds(cfg: TrainConfig, hw: "Hardware", profile) -> tuple[float, float]:
    """(the update's own time, its collectives' time) on one rank of the most loaded stage: what
    ``optimizer_ms`` measures. The own time is the counted operations (``bench.advisor.update``'s profile: per
    parameter tensor, on plain tensors and on DTensors) at the hardware's dispatch cost each, the bytes they
    move at its memory bandwidth, and the spec's ``update_flops`` at its matmul rate; work on whole tensors (an
    optimizer that gathers them) is divided where the optimizer splits it (``_split``), the rest (on shards,
    plain or DTensor) by the ranks a tensor is sharded over. On a
    CPU the dispatch and the work add up (the same cores); on a GPU the host dispatches ahead of the device, so
    the slower of the two counts. Without a profile (None) only the FLOPs and collectives are priced."""
    from llmopt.optimizers import spec

    stage, split = _busiest(cfg), _split(cfg)
    whole = sum(math.prod(t) for t in stage.tensors)
    device = optimizer_flops(cfg) / update_flop_rate(cfg, hw)
    host = 0.0
    if profile is not None:
        n = len(stage.tensors)
        host = n * (profile.plain_ops / split * hw.op_overhead + profile.dtensor_calls * hw.dtensor_call_overhead
                    + profile.dtensor_ops * hw.dtensor_op_overhead)
        # plain work is on whole tensors where the optimizer gathers them, else on the rank's shards
        plain_share = split if spec(cfg.optimizer).gathers(stage) else stage.shards
        moved = profile.plain_bytes * whole / plain_share + profile.dtensor_bytes * whole / stage.shards
        device += moved / hw.memory_bandwidth
    # a CPU dispatches and computes on the same cores; a GPU's host dispatches ahead while the device works
    own = host + device if hw.shared else max(host, device)
    comm = sum(_comm_time(cfg, hw, *c) for c in optimizer_comm(cfg))
    return own, comm


def update_flop_rate(cfg: TrainConfig, hw: "Hardware") -> float:
    """FLOP/s of the update's matmuls on one rank (Muon's Newton-Schulz runs in bf16): the calibrated rate where
    there is one (CPU: fitted on a measured sweep), else the bf16 peak at its achievable fraction, shared among
    the ranks of a CPU."""
    if hw.update_flop_rate:
        return hw.update_flop_rate
    bf16 = hw.peak_flops.get("bf16", hw.peak_flops[cfg.precision]) * hw.achievable.get("bf16", ACHIEVABLE["bf16"])
    return bf16 / cfg.world_size if hw.shared else bf16


def ring_factor(kind: str, n: int) -> tuple[float, int]:
    """(fraction of the buffer each rank sends, latency steps) of a ring collective over n ranks."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n, 2 * (n - 1)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):  # all-to-all: n - 1 pairwise exchanges
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


def predict_step(cfg: TrainConfig, hw: Hardware, update=None) -> StepPrediction:
    """Predicted time of one optimizer step of a validated, resolved config on ``hw``; ``update``: the
    optimizer's counted step (``bench.advisor.update.UpdateProfile``; None prices its FLOPs and collectives
    only)."""
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
    optimizer, optimizer_comm_s = update_seconds(cfg, hw, update)
    exposed += optimizer_comm_s  # after the backward: nothing to hide in
    step = compute + bubble + exposed + optimizer
    tokens = cfg.global_batch * cfg.seq_len
    devices = 1 if hw.shared else world
    mfu = model_flops(cfg) / step / (hw.peak_flops[cfg.precision] * devices)
    parts = {"compute": compute, "communication": exposed, "bubble": bubble, "optimizer": optimizer}
    return StepPrediction(compute, bubble, exposed, optimizer, optimizer + optimizer_comm_s, step, tokens / step, mfu,
                          max(parts, key=parts.get))


def _comm_time(cfg: TrainConfig, hw: Hardware, dim: str, kind: str, n: int, size: float, calls: int) -> float:
    frac, steps = ring_factor(kind, n)
    link = _link(cfg, hw, dim)
    return calls * (frac * size / link.bandwidth + steps * link.latency + hw.call_overhead)


def with_links(hw: Hardware, intra: Link | None = None, inter: Link | None = None) -> Hardware:
    return replace(hw, intra=intra or hw.intra, inter=inter or hw.inter)
