"""``python -m llmopt.export CHECKPOINT OUT``: a training checkpoint (``--checkpoint-dir``, llmopt.dcp) written
as a model in Hugging Face format, without training: what ``--save`` writes at the end of a run, from any step
a checkpoint holds, whatever layout saved it.

The checkpoint is loaded into one process (its config with every parallel degree 1: DCP reshards the saved
shards into whole tensors) and written by ``llmopt.checkpoint.save_pretrained``: the weights the optimizer
evaluates (a schedule-free optimizer's average), the data's tokenizer beside them. The result is what
``llmopt.sample`` and ``--init hf:OUT`` read; ``llmopt.sample`` and ``--init ckpt:DIR`` also take a checkpoint
directly (they export into a temporary directory first).
"""
from __future__ import annotations

import sys


def single_process(info: dict, path: str):
    """The checkpoint's config, validated, in one process on the CPU, at the steps the checkpoint holds."""
    from dataclasses import replace

    from llmopt.core.config import TrainConfig, validate
    from llmopt.dcp import CheckpointError

    try:
        cfg = TrainConfig.from_dict(info["config"], f"checkpoint {path}")
        return validate(replace(cfg, dp=1, tp=1, pp=1, pp_microbatches=0, grad_accum=1, device="cpu",
                                steps=info["step"], max_tokens=0, compile=False, activation_checkpointing=False,
                                eval_every=0, target_loss=0.0, target_gap=0.0, gns=False, lr_warmup=0,
                                optimizer_impl="auto"))
    except ValueError as e:  # e.g. its --data is gone: the tokenizer and vocabulary come from there
        raise CheckpointError(f"checkpoint {path}: its config cannot be built here ({e})") from None


def export(path: str, out_dir: str) -> str:
    """Write the checkpoint at ``path`` (a step directory, or the latest in a checkpoint directory) to
    ``out_dir`` in Hugging Face format; returns the step directory read."""
    import torch

    from llmopt import dcp
    from llmopt.checkpoint import save_pretrained
    from llmopt.convergence import Convergence
    from llmopt.loop import Timed
    from llmopt.step import build

    step = dcp.resolve(path, "checkpoint")
    cfg = single_process(dcp.read_info(step), step)
    state = build(cfg, torch.device("cpu"))
    dcp.load(state, step, Timed(warmup=0, conv=Convergence(cfg, None)))
    save_pretrained(state, out_dir)
    return step


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m llmopt.export", __doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step-NNNNNNNN directory, or a --checkpoint-dir (its latest)")
    p.add_argument("out", help="the directory to write (must not exist)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        from llmopt.checkpoint import check_save_dir

        check_save_dir(args.out)
        step = export(args.checkpoint, args.out)
        print(f"exported: {step} -> {args.out} (Hugging Face format; python -m llmopt.sample {args.out})")
        return 0

    return cli.main(body)


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
