"""Count the collectives of one optimizer step under sharded layouts with DTensor's CommDebugMode, beside what
the cost model says the step makes (``bench.advisor.costmodel.optimizer_comm``). Run as `python
update_collectives.py NPROC OUT_DIR LAYOUT...`, llmopt.launch forking the ranks; each LAYOUT is built and
stepped once per whole-tensor optimizer (Muon, Adafactor, SOAP) and LAMB, whose norms are reduced over shards,
and rank 0 writes OUT_DIR/<LAYOUT>.json: {optimizer: {"counted": n, "predicted": n}}."""
import json
import os
import sys

import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from layouts import build_layout  # tests/scripts: the script's own directory is on sys.path
from llmopt.step import train_step

OPTIMIZERS = ("muon", "adafactor", "soap", "lamb")


def main(out_dir: str, layouts: list[str]) -> None:
    from bench.advisor.costmodel import optimizer_comm

    for layout in layouts:
        got = {}
        for name in OPTIMIZERS:
            state = build_layout(layout, optimizer=name)
            train_step(state, 0)  # the optimizer's state exists: the next step is a steady one
            train_step(state, 1)
            with CommDebugMode() as comm:
                state.optimizer.step()
            got[name] = {"counted": comm.get_total_counts(),
                         "predicted": sum(calls for *_, calls in optimizer_comm(state.cfg))}
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"{layout}.json"), "w") as f:
                json.dump(got, f)
    dist.barrier()
    os._exit(0)  # as llmopt.train: skip gloo's teardown


if __name__ == "__main__":
    from llmopt.core import cli
    from llmopt.launch import launch

    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", lambda argv: main(argv[0], argv[1:]), oom_exit=4))
