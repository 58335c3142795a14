"""ParallelDims: the degrees of data, tensor and pipeline parallelism, and the DeviceMesh they make.

Mesh layout (outermost first): ``("pp", "dp", "tp")``. Tensor parallelism exchanges activations in every
layer, so its ranks are adjacent (same node); pipeline stages exchange only boundary activations, so they are
outermost. The object is passed explicitly to whatever needs it: there is no global state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_mode: str = "ddp"

    @classmethod
    def from_config(cls, cfg) -> "ParallelDims":
        return cls(dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, dp_mode=cfg.dp_mode)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp > 1 and self.dp_mode == "fsdp"

    @property
    def ddp_enabled(self) -> bool:
        return self.dp > 1 and self.dp_mode == "ddp"

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"the launcher started {world_size} ranks but --dp x --tp x --pp = {self.world_size}; "
                             f"launch {self.world_size} ranks (torchrun --nproc-per-node) or change the degrees")

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The 3-D mesh over the current process group, or None for a single process. Built once per shape and
        process group: each build creates a process group per mesh dimension (seconds with gloo on a busy
        CPU), and a process that builds several layouts of one world (tests/scripts/parity_runs.py) reuses it."""
        if not dist.is_initialized():
            return None
        self.check_world(dist.get_world_size())
        key = (device_type, self.pp, self.dp, self.tp, id(dist.group.WORLD))
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS)
        return _MESHES[key]


_MESHES: dict[tuple, DeviceMesh] = {}
