"""The rank scripts' shared set-up: a gloo process group and the `tiny` step built for a layout given on the
command line as comma-separated key=value pairs (tp=2, dp=2,dp_mode=fsdp, ...). A script takes several
layouts of one world size and builds each in turn in one set of ranks, so a test pays the ranks' start-up
once, not once per layout."""
import torch
import torch.distributed as dist

from llmopt.config import TrainConfig, validate
from llmopt.step import build


def build_layout(layout: str, **fields):
    """One thread per rank, the process group (once), and the built TrainState of tiny (8 x 32) under the
    layout ("tp=2", "dp=2,dp_mode=fsdp")."""
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    kw = {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=") for p in layout.split(","))}
    cfg = validate(TrainConfig(preset="tiny", global_batch=8, seq_len=32, device="cpu", **fields, **kw))
    return build(cfg, torch.device("cpu"))
