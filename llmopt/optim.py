"""What the optimizers of ``llmopt.optimizers`` are built from: ``build_optimizer`` (the spec's builder), the
parameter groups and kernel choice they share, LAMB (You et al. 2019: torch has none), Muon beside AdamW, the
optimizers for DTensor shards (``OnShards``, ``ShardedMuon``, ``ShardedAdafactor``, ``WholeTensors``), the
weights a schedule-free optimizer evaluates (``eval_weights``), and the learning-rate schedule (linear
warm-up, then constant, cosine or linear decay, or wsd) as torch's ``LambdaLR``.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") orthogonalises the momentum
of each hidden weight matrix with a Newton-Schulz iteration; it is meant for those matrices only, so
``--optimizer muon`` is torch's Muon on the attention and MLP projections and torch's AdamW on everything else
(embeddings and the tied head, LayerNorm gains, biases), as one optimizer (``MuonAdamW``): one schedule, one
loss scaler, one ``zero_grad``. Choices, and why:

* the learning rate is adjusted by Moonlight's rule (``adjust_lr_fn="match_rms_adamw"``: 0.2 sqrt(max(A, B))),
  which gives Muon's update the RMS of AdamW's, so one ``--lr`` (AdamW's) serves both sides; it is also
  symmetric in the matrix's shape, so HF's transposed Conv1D weights get the same update as llmopt's Linear;
* the fused QKV projection is orthogonalised as one (3C x C) matrix: it is one linear map in both models, and
  every layout sees the same matrix (Moonlight and modded-nanogpt orthogonalise q, k and v separately; not
  done here);
* torch's defaults otherwise: momentum 0.95 with Nesterov, 5 Newton-Schulz steps in bf16; decoupled weight
  decay ``--weight-decay`` on the matrices, AdamW's on the other 2-D tensors.

Adafactor (Shazeer & Stern 2018) is torch's, with torch's defaults (``beta2_decay`` -0.8, ``eps`` (None, 1e-3),
``d`` 1.0): factored second moments (a row and a column statistic per matrix), no first moment, and a step
relative to the parameter's RMS, ``--lr`` capping it (torch's ``lr``, 1e-2 by default).

Sharded parameters (FSDP2, TP: DTensors). An elementwise optimizer's update of a shard is the shard of its
update, but stepped on the DTensors themselves every operator of every tensor pays DTensor's dispatch (most of
AdamW's sharded update on CPU ranks: results/README.md, "Sharded updates on the shards"): ``OnShards`` steps
torch's (or a package's) optimizer on the local shards as plain tensors, fused kernels included, and shows
its state as DTensors. LAMB (llmopt's own) does its arithmetic on the shards too and reduces every tensor's
norms together (``whole_norms``). Neither torch's Muon nor its Adafactor computes the whole tensor's update on
shards (torch 2.13): Muon runs, but its Newton-Schulz then runs as DTensor matmuls whose bf16 partial products are
reduced across ranks, and the update drifted 4e-3 from the whole matrix's within two steps at lr 0.1 (2 gloo
ranks); Adafactor raises (an in-place ``pow_`` on a partial norm). So Muon is wrapped, not forked:
``ShardedMuon`` keeps the momentum sharded, gathers each matrix's Nesterov momentum, has torch's Muon
orthogonalise the whole matrix and keeps this rank's shard of the update; on a 1-D mesh it splits the
Newton-Schulz work across the ranks, each momentum's pieces sent to its owner and the update's pieces back
(``ShardedMuon._owned_updates``, as Moonlight's distributed Muon). Adafactor on
a 1-D mesh is computed from the shards (``ShardedAdafactor``: its row and column sums summed over the ranks,
two all-reduces per step); elsewhere ``WholeTensors`` gathers each tensor and its gradient, steps torch's
optimizer on the whole tensor (Adafactor's statistics, SOAP's preconditioners) and keeps this rank's shard.
The gathers go in buckets (``size_buckets``, ``gather_wholes``: one all-gather per bucket and mesh dimension,
not one per tensor), so the transient memory stays a small multiple of the largest tensor's.
"""
from __future__ import annotations

import collections.abc
import contextlib
import functools
import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from llmopt.optimizers import bucket_indices, ns_flops, spec

# The hidden weight matrices Muon updates (names in llmopt's GPT and in HF's GPT2LMHeadModel alike)
HIDDEN_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MUON_ADJUST_LR = "match_rms_adamw"


def closure_loss(closure):
    """torch's optimizer contract: ``step(closure)`` re-evaluates the loss, with gradients, before stepping."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def grad_as_param(p: torch.Tensor) -> torch.Tensor | None:
    """``p``'s gradient laid out as ``p`` is (a DTensor's may come back in other placements), so that the local
    shards of the two line up: what every optimizer that steps local shards reads."""
    grad = p.grad
    if isinstance(grad, DTensor) and grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad


def local_sq_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t) ** 2


def whole_norms(parts: list[tuple[DTensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The whole tensors' 2-norms, given for each a DTensor laid out as it is (mesh, placements) and this rank's
    sum of squares of its shard (``local_sq_norm``): the sums of the tensors sharded over the same mesh
    dimensions (whichever tensor dimension each splits) are reduced over them in one collective (a 0-dim
    ``full_tensor`` per tensor was one collective per tensor: LAMB's two norms per parameter made it the
    slowest optimizer under sharded layouts)."""
    norms = [sq for _, sq in parts]
    groups: dict[tuple, list[int]] = {}
    for i, (like, _) in enumerate(parts):  # tensors summed over the same mesh dimensions share a collective
        summed = tuple(Replicate() if p.is_replicate() else Partial("sum") for p in like.placements)
        groups.setdefault((like.device_mesh, summed), []).append(i)
    for (mesh, summed), idx in groups.items():
        local = torch.stack([norms[i] for i in idx])
        whole = DTensor.from_local(local, mesh, summed, run_check=False).full_tensor().sqrt()
        for j, i in enumerate(idx):
            norms[i] = whole[j]
    return norms


class Lamb(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2019, "Large Batch Optimization for Deep Learning" (arXiv:1904.00962),
    with the identity scaling function phi and no clipping inside:

        m = b1*m + (1-b1)*g            v = b2*v + (1-b2)*g^2
        m_hat = m/(1-b1^t)             v_hat = v/(1-b2^t)
        r = m_hat/(sqrt(v_hat)+eps) + wd*w
        ratio = ||w|| / ||r||  (1 where either norm is 0)
        w <- w - lr*ratio*r

    The norms are over the whole tensor. A plain tensor is updated in one pass. DTensor parameters (TP or
    FSDP shards) take two, on the local shards as plain tensors (DTensor's per-operator cost was most of the
    sharded step): the first updates the moments, computes each r and the local parts of every ||w|| and
    ||r||, reduced over the mesh together (``whole_norms``); the second updates each shard with the whole
    tensor's trust ratio. Every r is held between the passes: a transient copy of the rank's parameters
    (``llmopt.optimizers.lamb``), where recomputing r instead cost a second pass of the moments' arithmetic.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lamb: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        sharded, parts = [], []  # every group's norms in one reduction: a collective costs its latency
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = grad_as_param(p)
                # on the shards: the moments are laid out as p, and DTensor's per-operator cost was most of the step
                m, v, grad = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(grad)
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                if isinstance(p, DTensor):  # the rest is elementwise on shards but for the norms
                    r = _direction(p.to_local(), state, group)
                    sharded.append((p, r, group["lr"]))
                    parts += [(p, local_sq_norm(p.to_local())), (p, local_sq_norm(r))]
                else:
                    r = _direction(p, state, group)
                    ratio = _trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(r))
                    p.sub_(r * (group["lr"] * ratio))
        norms = whole_norms(parts)
        for j, (p, r, lr) in enumerate(sharded):
            ratio = _trust_ratio(norms[2 * j], norms[2 * j + 1])
            p.to_local().sub_(r.mul_(lr * ratio))
        return loss


def _direction(w: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """r = m_hat / (sqrt(v_hat) + eps) + wd * w from the moments already updated for this step; w and the
    moments both whole tensors or both this rank's shards."""
    (b1, b2), t = group["betas"], state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if not isinstance(w, DTensor) and isinstance(m, DTensor):
        m, v = m.to_local(), v.to_local()
    r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
    if group["weight_decay"]:
        r.add_(w, alpha=group["weight_decay"])
    return r


def _trust_ratio(w_norm: torch.Tensor, r_norm: torch.Tensor) -> torch.Tensor:
    return torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))


def param_groups(model: nn.Module, weight_decay: float, exclude=frozenset()) -> list[dict]:
    """Weight decay on matrices and embeddings (2+ dims) only; never on biases or LayerNorm gains."""
    groups: dict[bool, list] = {}
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if p.requires_grad and p not in exclude:
            groups.setdefault(p.dim() >= 2, []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0}
            for decay, ps in sorted(groups.items(), reverse=True)]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The attention and MLP projection weights: what Muon updates."""
    return [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and n.endswith(HIDDEN_MATRICES)]


def impl_kwargs(impl: str, fused_ok: bool) -> dict:
    """torch's keyword for --optimizer-impl: auto takes the fused kernels unless the step's loss scaler rules
    them out (``fused_ok``). Sharded parameters step their local shards as plain tensors (``OnShards``), so
    the fused kernels apply to them too."""
    if impl == "for-loop":
        return {"foreach": False}
    if impl == "foreach" or (impl == "auto" and not fused_ok):
        return {"foreach": True}
    return {"fused": True}


def torch_optimizer(cls, model: nn.Module, lr: float, weight_decay: float, impl: str, fused_ok: bool,
                    **kw) -> torch.optim.Optimizer:
    """torch's optimizer ``cls`` over ``model``'s parameter groups (``param_groups``), with --optimizer-impl's
    kernels (``impl_kwargs``): what the specs of SGD, Adam and AdamW build."""
    groups = param_groups(model, weight_decay)
    return shard_optimizer(cls, groups, lr=lr, **impl_kwargs(impl, fused_ok), **kw)


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    impl: str = "auto", fused_ok: bool = True, adamw_lr: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``llmopt.optimizers``) on ``model``'s parameters. ``fused_ok=False`` keeps
    ``auto`` off the fused kernels (see ``llmopt.precision.fused_optimizer_ok``). ``adamw_lr``: the rate of an
    optimizer's AdamW part (0: ``lr``), for one that has one (``OptimizerSpec.adamw_part``)."""
    s = spec(name)
    if not s.adamw_part:
        if adamw_lr:
            raise ValueError(f"--adamw-lr: --optimizer {name} has no AdamW part; drop --adamw-lr")
        return s.build(model, lr, weight_decay, impl, fused_ok)
    return s.build(model, lr, weight_decay, impl, fused_ok, adamw_lr=adamw_lr or lr)


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer):
    """The weights to evaluate and save while inside: a schedule-free optimizer (Defazio et al. 2024) trains at
    one point and evaluates at another, and switches the model's parameters between them with ``eval()`` and
    ``train()`` (schedulefree's API); other optimizers have one point and nothing to switch."""
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon on the hidden matrices and torch's AdamW on every other parameter, as one optimizer: its
    param_groups are the two optimizers' own (the same dicts), so a learning-rate schedule, a loss scaler and
    ``zero_grad`` reach both, and its ``state`` holds both optimizers' state (for memory accounting)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, impl: str = "auto", fused_ok: bool = True,
                 adamw_lr: float | None = None):
        matrices = hidden_matrices(model)
        if not matrices:
            raise ValueError("--optimizer muon: the model has no hidden 2-D weight matrix for Muon to update; "
                             "use another --optimizer")
        rest = param_groups(model, weight_decay, exclude=set(matrices))
        muon_cls = ShardedMuon if any(isinstance(p, DTensor) for p in matrices) else torch.optim.Muon
        self.muon = muon_cls(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn=MUON_ADJUST_LR)
        adamw_impl = "for-loop" if impl == "for-loop" else "auto"
        self.adamw = shard_optimizer(torch.optim.AdamW, rest, lr=adamw_lr or lr, **impl_kwargs(adamw_impl, fused_ok))
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self.muon.step()
        self.adamw.step()
        self.state.update(self.muon.state)
        self.state.update(self.adamw.state)
        return loss


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor, sharded as ``like`` (a DTensor) is, with no communication: every
    rank holds ``full``. Plain ``Shard``/``Replicate`` placements are sliced here (torch.chunk's pieces, mesh
    dimension 0 first, as DTensor nests them: ``distribute_tensor``'s dispatch cost per tensor was most of a
    bucketed Adafactor step); any other (a strided shard) through ``distribute_tensor`` with
    ``src_data_rank=None``, which slices the local copy too. A plain ``like`` takes it whole."""
    if not isinstance(like, DTensor):
        return full
    mesh, placements = like.device_mesh, like.placements
    if any(type(p) not in (Shard, Replicate) for p in placements):
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    piece = full
    for dim_i, (p, c) in enumerate(zip(placements, mesh.get_coordinate())):
        if p.is_shard():
            sizes = _chunk_sizes(piece.shape[p.dim], mesh.size(dim_i))
            piece = piece.narrow(p.dim, sum(sizes[:c]), sizes[c])
    return piece


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (all-gathered over the mesh); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _chunk_sizes(size: int, parts: int) -> list[int]:
    """How ``Shard`` splits ``size`` elements over ``parts`` ranks: torch.chunk's pieces (ceil-sized, the last
    ones shorter or empty), as DTensor does."""
    step = -(-size // parts)
    return [max(0, min(step, size - i * step)) for i in range(parts)]


def gather_wholes(tensors: list[torch.Tensor], like: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``[_whole(t) for t in tensors]`` in one all-gather per mesh dimension for each group of DTensors that share
    a mesh and placements, instead of one per tensor (a gloo or NCCL collective costs its latency whatever its
    size, and Adafactor's model-wide gathers were a collective per parameter). Each rank's pieces are flattened,
    padded to the largest piece and gathered together; each tensor is then put back together along its
    sharded dimension, the last mesh dimension first (a dimension split twice is split by mesh dimension 0
    first, as DTensor nests it). Plain tensors come back as they are. With ``like``, ``tensors`` are local
    shards laid out as the DTensors in ``like`` are (math on the shards skips DTensor's per-operator cost)."""
    like = tensors if like is None else like
    out: list[torch.Tensor | None] = [t if not isinstance(l, DTensor) else None for t, l in zip(tensors, like)]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(like):
        if isinstance(t, DTensor):  # one flat buffer per dtype too: a bf16 gradient must not come back fp32
            groups.setdefault((t.device_mesh, tuple(t.placements), tensors[i].dtype), []).append(i)
    for (mesh, placements, _), idx in groups.items():
        if any(p.is_partial() for p in placements):
            raise ValueError("gather_wholes: a Partial DTensor has no whole value until it is reduced")
        if any(type(p) not in (Shard, Replicate) for p in placements):
            # a subclass of Shard (FSDP2 over TP shards the TP shard again, strided: torch's _StridedShard)
            # nests in another order than plain Shard: gathered by DTensor itself, one tensor at a time
            for i in idx:
                t = tensors[i]
                out[i] = (t if isinstance(t, DTensor) else DTensor.from_local(
                    t, mesh, placements, run_check=False, shape=like[i].shape, stride=like[i].stride())).full_tensor()
            continue
        coords = mesh.get_coordinate()
        pieces = [_local(tensors[i]) for i in idx]
        # the shape before each mesh dimension's split, for this rank (mesh dimension 0 splits the whole shape)
        parents = []
        for i in idx:
            shape = list(like[i].shape)
            before = []
            for dim_i, p in enumerate(placements):
                before.append(list(shape))
                if p.is_shard():
                    shape[p.dim] = _chunk_sizes(shape[p.dim], mesh.size(dim_i))[coords[dim_i]]
            parents.append(before)
        for dim_i in reversed(range(mesh.ndim)):
            p = placements[dim_i]
            if not p.is_shard():
                continue  # replicated over this mesh dimension: every rank's piece is already the same
            k = mesh.size(dim_i)
            shapes = []  # per tensor: the k pieces' shapes along this mesh dimension
            for j in range(len(idx)):
                parent = parents[j][dim_i]
                shapes.append([parent[:p.dim] + [s] + parent[p.dim + 1:] for s in _chunk_sizes(parent[p.dim], k)])
            width = sum(max(math.prod(s) for s in shp) for shp in shapes)
            send = torch.zeros(width, dtype=pieces[0].dtype, device=pieces[0].device)
            at = 0
            for j, piece in enumerate(pieces):
                send[at:at + piece.numel()] = piece.reshape(-1)
                at += max(math.prod(s) for s in shapes[j])
            recv = [torch.empty_like(send) for _ in range(k)]
            torch.distributed.all_gather(recv, send, group=mesh.get_group(dim_i))
            at = 0
            for j in range(len(idx)):
                span = max(math.prod(s) for s in shapes[j])
                parts = [recv[r][at:at + math.prod(shapes[j][r])].view(shapes[j][r]) for r in range(k)]
                pieces[j] = torch.cat(parts, dim=p.dim)
                at += span
        for j, i in enumerate(idx):
            out[i] = pieces[j]
    return out


class ShardedMuon(torch.optim.Optimizer):
    """torch's Muon for matrices that are DTensors (FSDP2 and TP shards; see the module docstring for why the
    wrapper). The momentum buffer stays sharded as the matrix is; per step and matrix:

        buf = lerp(buf, g, 1 - momentum); m = lerp(g, buf, momentum) if nesterov else buf    (on the shard)
        M = gather(m)                  (the whole matrix, on its owner rank on a 1-D mesh, else on every rank;
                                        a bucket of matrices per collective)
        U = torch.optim.Muon's update of a zero matrix with gradient M (momentum 0, no decay): -lr' NS(M)
        w = w (1 - lr wd) + shard(U)   (each rank's shard of U, sent by the owner on a 1-D mesh)

    which is torch's Muon step on the whole matrix (the same momentum lines, then its own Newton-Schulz and
    learning-rate adjustment); tests/test_parity.py holds every sharded layout to the single-process curve of
    torch's Muon, and fails without the gather."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95, nesterov: bool = True,
                 adjust_lr_fn: str | None = MUON_ADJUST_LR):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      adjust_lr_fn=adjust_lr_fn))
        self._proxy = nn.Parameter(torch.empty(1, 1))  # torch's Muon wants a 2-D parameter to exist
        self._orthogonalise = torch.optim.Muon([self._proxy], lr=lr, weight_decay=0.0, momentum=0.0,
                                               nesterov=False, adjust_lr_fn=adjust_lr_fn)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        inner = self._orthogonalise.param_groups[0]
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            inner.update(lr=lr, adjust_lr_fn=group["adjust_lr_fn"])
            todo = [p for p in group["params"] if p.grad is not None]
            ranks = todo[0].device_mesh.size() if todo and isinstance(todo[0], DTensor) else 1
            for bucket in size_buckets(todo, times=spec("muon").bucket_times(ranks)):
                momenta = []  # on the shards: DTensor's per-operator cost was most of the sharded step
                for p in bucket:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf, g = _local(state["momentum_buffer"]), _local(p.grad)
                    buf.lerp_(g, 1 - mu)
                    momenta.append(g.lerp(buf, mu) if group["nesterov"] else buf)
                mesh = _split_mesh(bucket, momenta)
                if mesh is not None:
                    pieces = self._owned_updates(bucket, momenta, mesh)
                else:  # every rank orthogonalises every matrix, gathered whole
                    wholes = gather_wholes(momenta, like=bucket)  # the gathers, together
                    pieces = [_shard_of(self._orthogonalised(w), p) for p, w in zip(bucket, wholes)]
                for p, piece in zip(bucket, pieces):
                    _local(p).mul_(1 - lr * wd).add_(piece)
        return loss

    def _orthogonalised(self, whole: torch.Tensor) -> torch.Tensor:
        """torch's Muon update of a zero matrix whose gradient is ``whole``: -lr' NS(whole)."""
        self._proxy.data = torch.zeros_like(whole)
        self._proxy.grad = whole
        self._orthogonalise.step()
        self._orthogonalise.state.clear()                       # its zero momentum buffer, for this matrix only
        update = self._proxy.data
        self._proxy.grad, self._proxy.data = None, torch.empty(1, 1)
        return update

    def _owned_updates(self, bucket: list[torch.Tensor], momenta: list[torch.Tensor], mesh) -> list[torch.Tensor]:
        """This rank's piece of each of the bucket's updates, the Newton-Schulz work split over a 1-D mesh (FSDP2
        or TP alone; Moonlight's distributed Muon): each matrix has one owner (``owners``: balanced by the
        iteration's FLOPs). One all-to-all hands each owner every rank's piece of its matrices' momenta, the
        owner orthogonalises them whole, and one more hands every rank its piece of each update. Each rank
        receives only what it computes with or keeps: all-gathers of the whole momenta and updates moved the
        mesh's size times as much (most of the sharded update's time on gloo)."""
        k, me = mesh.size(), mesh.get_local_rank()
        shapes = [tuple(p.shape) for p in bucket]
        dims = [p.placements[0].dim for p in bucket]
        owner = owners(shapes, k)
        chunks = [_chunk_sizes(sh[d], k) for sh, d in zip(shapes, dims)]  # torch.chunk's split of each matrix
        # the element count of rank r's piece of matrix i
        piece = [[c * math.prod(sh) // sh[d] for c in cs] for sh, d, cs in zip(shapes, dims, chunks)]
        mine = [i for i in range(len(bucket)) if owner[i] == me]
        got = _all_to_all(
            [[momenta[i].reshape(-1) for i in range(len(bucket)) if owner[i] == q] for q in range(k)],
            [[piece[i][r] for i in mine] for r in range(k)], mesh, momenta[0])
        updates = []
        for j, i in enumerate(mine):
            sh, d, cs = shapes[i], dims[i], chunks[i]
            whole = torch.cat([got[r][j].view(*sh[:d], cs[r], *sh[d + 1:]) for r in range(k)], dim=d)
            updates.append(torch.split(self._orthogonalised(whole), cs, dim=d))
        back = _all_to_all([[u[r].reshape(-1) for u in updates] for r in range(k)],
                           [[piece[i][me] for i in range(len(bucket)) if owner[i] == q] for q in range(k)], mesh,
                           momenta[0])
        at = [0] * k
        out = []
        for i, m in enumerate(momenta):
            out.append(back[owner[i]][at[owner[i]]].view(m.shape))
            at[owner[i]] += 1
        return out


def _split_mesh(bucket: list[torch.Tensor], momenta: list[torch.Tensor]):
    """The 1-D mesh of more than one rank over which ``ShardedMuon`` splits a bucket's Newton-Schulz work, or
    None: every matrix a DTensor on that one mesh, sharded along one dimension (FSDP2, or TP alone), and the
    momenta of one dtype (they travel in one buffer)."""
    first = bucket[0]
    if not isinstance(first, DTensor) or first.device_mesh.ndim != 1 or first.device_mesh.size() == 1:
        return None
    if any(not isinstance(p, DTensor) or p.device_mesh != first.device_mesh or type(p.placements[0]) is not Shard
           for p in bucket) or len({m.dtype for m in momenta}) != 1:
        return None
    return first.device_mesh


def _all_to_all(send: list[list[torch.Tensor]], receive: list[list[int]], mesh, like: torch.Tensor
                ) -> list[list[torch.Tensor]]:
    """One all-to-all over a 1-D mesh: ``send[q]``, flat tensors, go to rank q; from each rank r come flat
    tensors of the element counts ``receive[r]``, returned as ``[r][j]`` views of one buffer (``like``'s dtype
    and device)."""
    flat = [t for ts in send for t in ts]
    inp = torch.cat(flat) if flat else like.new_empty(0)
    out = like.new_empty(sum(map(sum, receive)))
    torch.distributed.all_to_all_single(out, inp, output_split_sizes=[sum(n) for n in receive],
                                        input_split_sizes=[sum(t.numel() for t in ts) for ts in send],
                                        group=mesh.get_group(0))
    views, at = [], 0
    for counts in receive:
        views.append([])
        for n in counts:
            views[-1].append(out[at:at + n])
            at += n
    return views


def owners(shapes: list[tuple[int, ...]], ranks: int) -> list[int]:
    """Which rank orthogonalises each matrix, the same on every rank: the costliest first (``ns_flops``), each to
    the rank with the fewest matrices so far, then the fewest FLOPs (ties to the lower rank). Counts first: on
    small matrices each orthogonalisation costs about its call (torch's Muon step), not its FLOPs."""
    count, load = [0] * ranks, [0] * ranks
    out = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i]), i)):
        r = min(range(ranks), key=lambda r: (count[r], load[r], r))
        out[i] = r
        count[r] += 1
        load[r] += ns_flops(shapes[i])
    return out


def size_buckets(params: list[torch.Tensor], times: int = 1) -> list[list[torch.Tensor]]:
    """``params`` in order, cut into buckets of at most ``times`` the largest one's element count (the largest
    alone; ``llmopt.optimizers.bucket_indices``): a bucket gathered whole with its gradients holds no more than
    twice that, the transient ``llmopt.memory`` predicts (``times`` 1), in a handful of collectives instead of
    one per tensor."""
    return [[params[i] for i in idx] for idx in bucket_indices([p.numel() for p in params], times)]


def whole_tensor_optimizer(cls, groups: list[dict], **kw) -> torch.optim.Optimizer:
    """``cls(groups, **kw)``, wrapped in ``WholeTensors`` where any parameter is a DTensor."""
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return WholeTensors(cls, groups, **kw)
    return cls(groups, **kw)


class WholeTensors(torch.optim.Optimizer):
    """An optimizer whose update needs whole tensors (torch's Adafactor, SOAP), for DTensor parameters (see the
    module docstring): per step and bucket of tensors (``size_buckets``), the whole tensors and their gradients
    are gathered together (``gather_wholes``: one all-gather per mesh dimension and placement), the bucket's
    inner optimizer steps the whole tensors (its state, the whole tensor's, lives here on every rank), and each
    rank keeps its shards. One inner optimizer per bucket, each stepped once per step: SOAP counts its steps
    per parameter group, so one optimizer stepped once per bucket would count a step several times."""

    def __init__(self, cls, params, **kw):
        super().__init__(params, kw)
        self._proxies = {p: nn.Parameter(torch.empty(0)) for g in self.param_groups for p in g["params"]}
        self._buckets = size_buckets([p for g in self.param_groups for p in g["params"]])
        self._inners = []  # per bucket: (its optimizer, the index of each of its groups among self.param_groups)
        for bucket in self._buckets:
            members = set(bucket)
            groups = [(i, [p for p in g["params"] if p in members]) for i, g in enumerate(self.param_groups)]
            groups = [(i, ps) for i, ps in groups if ps]
            inner = cls([{**{k: v for k, v in self.param_groups[i].items() if k != "params"},
                          "params": [self._proxies[p] for p in ps]} for i, ps in groups], **kw)
            self._inners.append((inner, [i for i, _ in groups]))

    def inner_groups(self):
        """(index of its group among ``param_groups``, group) of every inner optimizer's groups: where SOAP keeps
        its step count (llmopt.dcp saves and restores them with the outer group's)."""
        for inner, where in self._inners:
            yield from zip(where, inner.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for bucket, (inner, where) in zip(self._buckets, self._inners):
            for i, g in zip(where, inner.param_groups):
                g["lr"], g["weight_decay"] = self.param_groups[i]["lr"], self.param_groups[i]["weight_decay"]
            bucket = [p for p in bucket if p.grad is not None]
            wholes = gather_wholes(bucket + [p.grad for p in bucket])  # the gathers, together
            for p, w, g in zip(bucket, wholes, wholes[len(bucket):]):
                proxy = self._proxies[p]
                proxy.data = w if isinstance(p, DTensor) else w.clone()  # a plain tensor came back as itself
                proxy.grad = g
            inner.step()
            for p in bucket:
                proxy = self._proxies[p]
                _local(p).copy_(_shard_of(proxy.data, p))
                proxy.grad, proxy.data = None, torch.empty(0)
                self.state[p] = inner.state[proxy]
        return loss


def on_one_mesh_dim(groups: list[dict]) -> bool:
    """Whether every DTensor among ``groups``' parameters is a vector or a matrix on one 1-D mesh, placed plainly
    (``Shard`` or ``Replicate``): FSDP2 or TP alone, where ``ShardedAdafactor`` computes from the shards."""
    ds = [p for g in groups for p in g["params"] if isinstance(p, DTensor)]
    return len({p.device_mesh for p in ds}) == 1 and all(
        p.device_mesh.ndim == 1 and type(p.placements[0]) in (Shard, Replicate) and p.dim() <= 2 for p in ds)


class ShardedAdafactor(torch.optim.Optimizer):
    """torch's Adafactor (``torch.optim.Adafactor``'s single-tensor algorithm, its settings and its state) on
    the shards of a 1-D mesh (FSDP2 or TP alone: ``on_one_mesh_dim``), computed from the shards. Per step, for
    every tensor together (one all-reduce over the mesh each, not a gather per tensor):

        1. each parameter's sum of squares, and each matrix's row and column sums of g^2: a sum across the
           sharded dimension is this rank's part, summed over the ranks; one along it is this rank's rows (or
           columns), complete, placed at their offset among zeros, so the sum hands every rank every row
        2. the row and column statistics (whole, on every rank, as ``WholeTensors`` keeps them: a checkpoint
           reads the same under every layout), the shard's update from its rows and columns of their outer
           product (a vector's second moment: elementwise, laid out as the vector), and its sum of squares
        3. the update's whole RMS (clipped by ``d``) and the parameter's (the step size), then the shard

    A sum across a sharded dimension adds the ranks' parts, so the update is torch's to rounding
    (``tests/test_parity.py`` holds it to the whole tensor's), not to the bit as ``WholeTensors``' is. Every
    update is held between the two all-reduces: a transient copy of the rank's parameters."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                                      foreach=foreach, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        todo = []  # (parameter, its group, this rank's gradient, its state)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = grad_as_param(p)
                state = self.state[p]
                if not state:  # torch's Adafactor's state, the statistics of the whole tensor
                    state["step"] = torch.tensor(0.0)
                    if p.dim() > 1:
                        state["row_var"] = _local(grad).new_zeros(p.shape[:-1] + (1,))
                        state["col_var"] = _local(grad).new_zeros(p.shape[:-2] + (1, p.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(grad)  # laid out as the parameter
                state["step"] += 1
                g = _local(grad)
                todo.append((p, group, -g if group["maximize"] else g, state))
        params = [p for p, *_ in todo]
        first = _summed(params, [_first_sums(p, g) for p, _, g, _ in todo])
        updates = [_factored_update(p, group, g, state, sums) for (p, group, g, state), sums in zip(todo, first)]
        second = _summed(params, [[_square_sum(p, u)] for p, u in zip(params, updates)])
        for (p, group, _, state), u, (x_sq, *_), (u_sq,) in zip(todo, updates, first, second):
            # host numbers per tensor (.item()), as torch's Adafactor takes them: its step size is a Python float
            lr, eps2, n = float(group["lr"]), group["eps"][1], p.numel()
            alpha = max(eps2, x_sq.sqrt().item() / n**0.5) * min(lr, 1 / state["step"].item() ** 0.5)
            denom = max(1.0, u_sq.sqrt().item() / (n**0.5 * group["d"]))
            x = _local(p)
            if group["weight_decay"] != 0:
                x.mul_(1 - lr * group["weight_decay"])
            x.add_(u, alpha=-alpha / denom)
        return loss


def _split_dim(p: torch.Tensor) -> int | None:
    """The dimension a parameter is sharded along on its 1-D mesh (None: plain or replicated)."""
    if isinstance(p, DTensor) and p.placements[0].is_shard():
        return p.placements[0].dim
    return None


def _offset(p: DTensor, dim: int) -> tuple[int, int]:
    """(offset, length) of this rank's piece of ``p`` along ``dim``: torch.chunk's, as DTensor splits."""
    sizes = _chunk_sizes(p.shape[dim], p.device_mesh.size())
    me = p.device_mesh.get_local_rank()
    return sum(sizes[:me]), sizes[me]


def _square_sum(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor's sum of squares: a shard's to be summed over the mesh, a whole
    tensor's as torch's Adafactor computes it (its norm, squared)."""
    return (t.square().sum() if _split_dim(p) is not None else t.norm(2).square()).reshape(1)


def _first_sums(p: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Step 1 of ``ShardedAdafactor``: [the parameter's sum of squares] and, for a matrix, [rows' sums of g^2
    (R, 1), columns' (1, C)], this rank's part of each (see the class)."""
    out = [_square_sum(p, _local(p))]
    if p.dim() < 2:
        return out
    rows = torch.norm(g, dim=-1, keepdim=True).square_()  # as torch's: (g * g).sum(-1) without a g-sized temporary
    cols = torch.norm(g, dim=-2, keepdim=True).square_()
    dim = _split_dim(p)
    if dim is not None:  # the pieces along the split dimension go to their place among zeros
        at, n = _offset(p, dim)
        whole = (rows if dim == 0 else cols).new_zeros(p.shape[:-1] + (1,) if dim == 0 else (1, p.shape[-1]))
        whole.narrow(dim, at, n).copy_(rows if dim == 0 else cols)
        rows, cols = (whole, cols) if dim == 0 else (rows, whole)
    return out + [rows, cols]


def _factored_update(p: torch.Tensor, group: dict, g: torch.Tensor, state: dict, sums: list) -> torch.Tensor:
    """Step 2 of ``ShardedAdafactor``: the statistics updated from the whole sums, and this rank's shard of
    torch's unscaled update rsqrt(V) g."""
    t = state["step"].item()
    beta = t ** group["beta2_decay"]
    eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(p.dtype).eps
    if p.dim() > 1:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(sums[1].div_(p.shape[-1]), beta)
        col_var.lerp_(sums[2].div_(p.shape[-2]), beta)
        rows, cols, dim = row_var, col_var, _split_dim(p)
        if dim is not None:  # this rank's rows (or columns) of the statistic along the split dimension
            rows, cols = (_shard_of(rows, p), cols) if dim == 0 else (rows, _shard_of(cols, p))
        var = (rows @ cols).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = _local(state["variance"])
        variance.lerp_(g * g, beta)
        var = variance.clone()
    return var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)


def _summed(params: list[torch.Tensor], parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``parts`` (per parameter, its pieces) summed over the mesh for the sharded parameters, all in one
    all-reduce; a plain or replicated parameter's as they are."""
    sharded = [i for i, p in enumerate(params) if _split_dim(p) is not None]
    if not sharded:
        return parts
    flat = torch.cat([x.reshape(-1) for i in sharded for x in parts[i]])
    torch.distributed.all_reduce(flat, group=params[sharded[0]].device_mesh.get_group(0))
    at = 0
    for i in sharded:
        pieces = []
        for x in parts[i]:
            pieces.append(flat[at:at + x.numel()].view(x.shape))
            at += x.numel()
        parts[i] = pieces
    return parts


def shard_optimizer(cls, groups: list[dict], **kw) -> torch.optim.Optimizer:
    """``cls(groups, **kw)`` for an optimizer whose update is elementwise, wrapped in ``OnShards`` where any
    parameter is a DTensor."""
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return OnShards(cls, groups, **kw)
    return cls(groups, **kw)


class OnShards(torch.optim.Optimizer):
    """An elementwise optimizer (SGD, Adam, AdamW, Lion, Schedule-Free AdamW) stepped on the local shards of
    DTensor parameters as plain tensors. Elementwise, each rank's shard of the update is the update of its
    shard, so nothing is gathered; stepping the DTensors themselves gives the same numbers but pays DTensor's
    dispatch on every operator of every tensor, most of the sharded update on CPU ranks (results/README.md,
    "Sharded updates on the shards"), and rules out torch's fused kernels.

    The inner optimizer ``cls`` steps proxies: parameters that alias each DTensor's local shard, their
    gradients the gradient's local shard (laid out as the parameter first, should it not be). Its state is
    plain tensors on the shards; ``state`` shows it as the DTensors the parameters are (``ShardState``), so a
    checkpoint (``llmopt.dcp``) writes and reshards it as it does any sharded state, and the memory tracker
    sees it. A schedule-free optimizer's ``eval()``/``train()`` (which move the parameters between its two
    points) and its own group settings (``inner_groups``) are the inner's."""

    def __init__(self, cls, params, **kw):
        super().__init__(params, kw)
        self._proxies = {p: nn.Parameter(_local(p).detach()) for g in self.param_groups for p in g["params"]}
        self.inner = cls([{**{k: v for k, v in g.items() if k != "params"},
                           "params": [self._proxies[p] for p in g["params"]]} for g in self.param_groups], **kw)
        if callable(getattr(self.inner, "eval", None)) and callable(getattr(self.inner, "train", None)):
            self.eval = functools.partial(self._switch, "eval")
            self.train = functools.partial(self._switch, "train")

    def inner_groups(self):
        """(index of its group among ``param_groups``, group) of the inner optimizer's groups: where a
        schedule-free optimizer keeps its averaging weights (llmopt.dcp saves them with the outer group's)."""
        yield from enumerate(self.inner.param_groups)

    def _point(self) -> None:
        """Each proxy at its parameter's local shard (a resharded or reloaded parameter may have moved)."""
        for p, proxy in self._proxies.items():
            local = _local(p)
            if proxy.data_ptr() != local.data_ptr() or proxy.shape != local.shape:
                proxy.data = local

    @torch.no_grad()
    def _switch(self, mode: str) -> None:
        self._point()
        getattr(self.inner, mode)()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self._point()
        for g, inner in zip(self.param_groups, self.inner.param_groups):
            inner["lr"], inner["weight_decay"] = g["lr"], g["weight_decay"]
        for p, proxy in self._proxies.items():
            grad = grad_as_param(p)
            proxy.grad = None if grad is None else _local(grad)
        self.inner.step()
        for p, proxy in self._proxies.items():
            proxy.grad = None  # the gradient is the step's own: zero_grad frees it
            held = self.inner.state.get(proxy)
            if held is not None and getattr(self.state.get(p), "inner", self.state.get(p)) is not held:
                self.state[p] = ShardState(held, p) if isinstance(p, DTensor) else held
        return loss


class ShardState(collections.abc.MutableMapping):
    """One parameter's state in ``OnShards``' inner optimizer, read as the parameter is laid out: a tensor the
    shape of the local shard reads as the DTensor it is a shard of (the same storage: a checkpoint loads into it
    in place), anything else (a step count, a scalar) as it is; a DTensor written back is stored as its shard."""

    def __init__(self, inner: dict, like: DTensor):
        self.inner, self.like = inner, like

    def __getitem__(self, key):
        value = self.inner[key]
        local = _local(self.like)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == local.shape:
            with torch.no_grad():
                return DTensor.from_local(value, self.like.device_mesh, self.like.placements, run_check=False,
                                          shape=self.like.shape, stride=self.like.stride())
        return value

    def __setitem__(self, key, value):
        if isinstance(value, DTensor):
            value = value.to_local()
            held = self.inner.get(key)
            if isinstance(held, torch.Tensor) and held.data_ptr() == value.data_ptr() and held.shape == value.shape:
                return  # this state's own storage (a checkpoint was loaded into it in place)
        self.inner[key] = value

    def __delitem__(self, key):
        del self.inner[key]

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float,
              decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``, as a fraction of the peak.

    Linear warm-up over the first ``warmup`` steps, reaching the peak at step ``warmup - 1``; then
    ``constant`` stays at the peak, ``cosine`` follows min + (1 - min) * (1 + cos(pi * p)) / 2 (Loshchilov &
    Hutter 2017, without restarts) and ``linear`` min + (1 - min) * (1 - p), where p runs from 0 at the first
    step after warm-up to 1 at the last step, so the last step uses min_ratio * peak. ``wsd`` (warm-up,
    stable, decay: Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations") stays at the peak, then decays linearly over its last round(decay_fraction * total) steps,
    the first of them already below the peak and the last at min_ratio * peak.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, round(decay_fraction * total))
        into = step - (total - decay)  # 0 at the first decay step
        return 1.0 if into < 0 else 1.0 - (1 - min_ratio) * (into + 1) / decay
    p = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    raise ValueError(f"--lr-schedule: unknown value {schedule!r}; choose one of constant, cosine, linear, wsd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over ``lr_factor``; stepped once per optimizer step, after it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.lr_schedule, cfg.lr_warmup, cfg.steps, cfg.min_lr_ratio,
                                       cfg.lr_decay_fraction))
