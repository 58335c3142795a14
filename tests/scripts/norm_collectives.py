"""Count the collectives of one gradient-norm computation (Layout.grad_norm) with DTensor's CommDebugMode.
Run as `python norm_collectives.py NPROC OUT_DIR LAYOUT...`: llmopt.launch forks the ranks, as `llmopt.train
--dp 2` does (torchrun would start NPROC fresh interpreters, seconds each on 2 cores). Each LAYOUT (comma-
separated key=value pairs, e.g. tp=2 or dp=2,dp_mode=fsdp) is counted in turn; rank 0 writes
OUT_DIR/<LAYOUT>.json."""
import json
import os
import sys

import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from layouts import build_layout  # tests/scripts: the script's own directory is on sys.path
from llmopt.step import train_step


def main(out_dir: str, layouts: list[str]) -> None:
    for layout in layouts:
        state = build_layout(layout)
        train_step(state, 0)
        with CommDebugMode() as comm:
            norm = state.layout.grad_norm()
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"{layout}.json"), "w") as f:
                json.dump({"collectives": comm.get_total_counts(), "norm": float(norm),
                           "parameters": sum(1 for _ in state.layout.parameters())}, f)
    dist.barrier()
    os._exit(0)  # as llmopt.train: skip gloo's teardown


if __name__ == "__main__":
    from llmopt.core import cli
    from llmopt.launch import launch

    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", lambda argv: main(argv[0], argv[1:]), oom_exit=4))
