"""The rank scripts' shared set-up: a gloo process group and the `tiny` step built for a layout given on the
command line as comma-separated key=value pairs (tp=2, dp=2,dp_mode=fsdp, ...). A script takes several
layouts of one world size and builds each in turn in one set of ranks, so a test pays the ranks' start-up
once, not once per layout."""
import os

import torch
import torch.distributed as dist

from llmopt.core.config import TrainConfig, validate
from llmopt.step import build


def rank_setup() -> None:
    """One thread per rank, each rank held to one core (round robin over the cores this process may use), and
    the process group (once). The tests' 4 and 8 ranks share 2 cores: left to move, the ranks migrate between
    them on every wait of a collective, and the worlds ran measurably slower (never faster) than pinned ones."""
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ["RANK"]) % len(cores)]})
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def build_layout(layout: str, **fields):
    """``rank_setup``, and the built TrainState of tiny (8 x 32) under the layout ("tp=2", "dp=2,dp_mode=fsdp")."""
    rank_setup()
    kw = {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=") for p in layout.split(","))}
    cfg = validate(TrainConfig(preset="tiny", global_batch=8, seq_len=32, device="cpu", **fields, **kw))
    return build(cfg, torch.device("cpu"))
