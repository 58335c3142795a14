"""The update of a sharded tensor is the whole tensor's: llmopt's ShardedMuon, WholeTensors (Adafactor, SOAP) and
ShardedAdafactor (on a 1-D mesh) on DTensor shards against torch's Muon and Adafactor and pytorch-optimizer's
SOAP on the whole tensors, given the same gradients.

    python tests/scripts/whole_tensor_update.py NPROC OUT.json

The ranks (forked by llmopt.launch) shard seeded whole matrices and vectors as FSDP2 does (Shard(0)), as
tensor parallelism's row split does (Shard(1)) and, with 4 ranks, both at once on a 2-D mesh; three steps with
seeded gradients; rank 0 writes, per optimizer and placement, the largest difference between the gathered
result and torch's own optimizer run on the whole tensors in one process. Also written: the same difference
for torch's Muon run directly on the DTensors (no gather), which is what the wrapper exists to avoid.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from layouts import rank_setup
from llmopt.core import cli
from llmopt.launch import launch
from llmopt.optim import MUON_ADJUST_LR, ShardedAdafactor, ShardedMuon, WholeTensors

SHAPES = [(48, 32), (32, 96), (50, 30), (96,)]  # a tall and a wide matrix (Muon transposes the tall one), one
# that splits unevenly over 4 ranks (torch.chunk: 13, 13, 13, 11 rows; 8, 8, 8, 6 columns), a vector
LR = 0.05


def whole_tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
    return weights, grads


def make(name: str, params, sharded: bool):
    matrices = [p for p in params if p.ndim == 2]
    if name == "muon":
        cls = ShardedMuon if sharded else torch.optim.Muon
        return cls(matrices, lr=LR, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR), matrices
    if name == "muon-no-gather":  # torch's Muon on the DTensors themselves
        return torch.optim.Muon(matrices, lr=LR, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR), matrices
    groups = [{"params": params, "weight_decay": 0.1}]
    if name == "soap":  # its eigenbasis refreshed every second step, so that three steps refresh it once
        from pytorch_optimizer import SOAP

        kw = dict(lr=LR, precondition_frequency=2)
        return (WholeTensors(SOAP, groups, **kw) if sharded else SOAP(groups, **kw)), params
    if name == "adafactor-shards":  # its statistics summed from the shards
        return (ShardedAdafactor(groups, lr=LR) if sharded else torch.optim.Adafactor(groups, lr=LR)), params
    if sharded:
        return WholeTensors(torch.optim.Adafactor, groups, lr=LR), params
    return torch.optim.Adafactor(groups, lr=LR), params


def steps(name: str, weights, grads, placements=None, mesh=None) -> list[torch.Tensor]:
    """Three steps of ``name`` from ``weights`` with ``grads``: on whole tensors (no ``mesh``) or on shards."""
    def shard(t):
        if mesh is None:
            return t.clone()
        # a vector is split along its one dimension over the mesh's first dimension, replicated over the rest
        where = placements if t.ndim == 2 else [Shard(0)] + [Replicate()] * (len(placements) - 1)
        return distribute_tensor(t.clone(), mesh, where, src_data_rank=None)

    params = [torch.nn.Parameter(shard(w)) for w in weights]
    opt, updated = make(name, params, sharded=mesh is not None)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = shard(g)
        opt.step()
    return [p.full_tensor() if mesh is not None else p.detach() for p in params if any(p is u for u in updated)]


def ranks(argv: list[str]) -> int:
    rank_setup()
    world = dist.get_world_size()
    weights, grads = whole_tensors(0)
    meshes = {"Shard(0)": (init_device_mesh("cpu", (world,)), [Shard(0)]),
              "Shard(1)": (init_device_mesh("cpu", (world,)), [Shard(1)])}
    if world == 4:
        meshes["Shard(0),Shard(1)"] = (init_device_mesh("cpu", (2, 2)), [Shard(0), Shard(1)])
    out = {}
    for name in ("muon", "adafactor", "soap", "muon-no-gather", "adafactor-shards"):
        reference = steps(name.split("-")[0], weights, grads)
        for where, (mesh, placements) in meshes.items():
            if name == "adafactor-shards" and mesh.ndim > 1:
                continue  # a 2-D mesh gathers (WholeTensors)
            got = steps(name, weights, grads, placements, mesh)
            out[f"{name} {where}"] = max((a - b).abs().max().item() for a, b in zip(got, reference))
    if dist.get_rank() == 0:
        with open(argv[0], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()  # as llmopt.loop does: a rank that leaves first must not abort the others
    return 0


if __name__ == "__main__":
    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", ranks, oom_exit=4))
