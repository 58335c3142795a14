"""The rank scripts' shared set-up: a gloo process group and the `tiny` step built for the layout given on the
command line as key=value pairs (tp=2, dp=2 dp_mode=fsdp, ...)."""
import torch
import torch.distributed as dist

from llmopt.config import TrainConfig, validate
from llmopt.step import build


def build_layout(pairs: list[str], **fields):
    """One thread per rank, the process group, and the built TrainState of tiny (8 x 32) under the layout."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    kw = {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=") for p in pairs)}
    cfg = validate(TrainConfig(preset="tiny", global_batch=8, seq_len=32, device="cpu", **fields, **kw))
    return build(cfg, torch.device("cpu"))
