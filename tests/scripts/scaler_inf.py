"""fp16 steps where one rank's gradient holds an inf after the data-parallel sync. Run as
`python scaler_inf.py NPROC ARGS...`: llmopt.launch forks the ranks, as `llmopt.train --dp 2` does (torchrun
would start NPROC fresh interpreters, seconds each on 2 cores).

argv: OUT_DIR and the layouts, each as comma-separated key=value pairs (dp=2,dp_mode=fsdp, tp=2, pp=2), run in
turn. Writes OUT_DIR/<LAYOUT>/rank<N>.json with each step's skip flag and scale, and a checksum of the
parameters before and after the poisoned step (test_toggles.py reads them)."""
import json
import os
import sys

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from layouts import build_layout  # tests/scripts: the script's own directory is on sys.path
from llmopt.step import train_step

POISONED_STEP = 1


def checksum(model) -> float:
    total = 0.0
    for p in model.parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        total += float(t.double().sum())
    return total


def main(out_dir: str, layouts: list[str]) -> None:
    for layout in layouts:
        os.makedirs(os.path.join(out_dir, layout), exist_ok=True)
        poison(os.path.join(out_dir, layout), layout)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as llmopt.train: skip gloo's teardown


def poison(out: str, spec: str) -> None:
    state = build_layout(spec, precision="fp16")
    rank = dist.get_rank()
    layout, finish = state.layout, state.layout.finish_grads

    def poisoned_finish():
        finish()
        if rank == 1:  # after the sync: only this rank's (local shard of the) gradient holds the inf
            p = next(q for q in layout.parameters() if q.grad is not None)
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.view(-1)[0] = float("inf")

    record = {"steps": []}
    for step in range(3):
        layout.finish_grads = poisoned_finish if step == POISONED_STEP else finish
        scale = state.scaler.get_scale()
        if step == POISONED_STEP:
            record["before"] = checksum(layout.model)
        stats = train_step(state, step)
        if step == POISONED_STEP:
            record["after"] = checksum(layout.model)
        record["steps"].append({"skipped": bool(stats.fp16_skipped), "scale_before": scale,
                                "scale_after": state.scaler.get_scale()})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    from llmopt.core import cli
    from llmopt.launch import launch

    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", lambda argv: main(argv[0], argv[1:]), oom_exit=4))
