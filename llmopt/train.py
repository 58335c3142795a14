"""``python -m llmopt.train``: flags -> config -> checks -> (launch ranks) -> the run -> metrics JSON.

This module is the command line: the flags (one per TrainConfig field, and the run's own), every check that
can be made before any work (one ``error:`` line and exit 2 otherwise), and where the ranks come from. Run
with more than one rank (``--dp/--tp/--pp``) and no launcher, it starts the ranks itself (llmopt.launch:
forked on CPU, torch's elastic launcher on CUDA). Run under ``torchrun`` it uses the world it is given, so
multi-node runs need nothing but torchrun's own flags (see the README and scripts/). The run itself (the timed
steps and what is measured after them) is ``llmopt.loop``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from llmopt.core.config import CHECKPOINT, TrainConfig, init_path, validate
from llmopt.launch import LAUNCH_T0_ENV, under_launcher


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per TrainConfig field (its type, default, choices and help come from the field), then the
    run's own (outputs, the timing warm-up, quiet)."""
    from dataclasses import fields

    from llmopt.core import cli
    from llmopt.core.config import choices

    p = cli.parser("python -m llmopt.train", "Train a GPT for a few steps with one configuration.")
    for f in fields(TrainConfig):
        meta, name = f.metadata, "--" + f.name.replace("_", "-")
        kind = {"bool": bool, "int": int, "float": float}.get(str(f.type))
        extra = f"{meta['help']} (default: {f.default})" if f.default not in (None, False) else meta["help"]
        if f.name == "preset":  # with --init the shape is the checkpoint's, so its default is decided later
            p.add_argument(name, default=None, choices=[c for c in choices(f.name) if c != CHECKPOINT],
                           help=f"{meta['help']} (default: {f.default}, or the checkpoint's shape with --init)")
        elif kind is bool:
            p.add_argument(name, action="store_true", help=meta["help"])
        else:
            p.add_argument(name, type=kind or str, default=None if meta["given_positive"] else f.default,
                           choices=choices(f.name), metavar=meta.get("metavar"), help=extra)
    a = p.add_argument
    a("--config", default=None, metavar="FILE.json",
      help="the whole config as one JSON object of the fields above (what the harness hands each config); no "
           "field's flag may be given beside it")
    a("--save", default=None, metavar="DIR", help="write the trained model (and tokenizer) here, Hugging Face format")
    a("--metrics-out", default=None, metavar="FILE.json", help="write the metrics JSON here")
    a("--timing-warmup", type=int, default=1,
      help="steps left out of the tokens/s figure (default: 1); not the learning-rate warm-up (--lr-warmup)")
    a("--memory-breakdown", action="store_true",
      help="after the timed steps, one untimed step under torch's MemTracker: memory by category")
    a("--profile", default=None, metavar="DIR",
      help="after training, profile 2 more untimed steps: each rank's Chrome trace and operator table in DIR")
    a("--quiet", action="store_true", help="no per-step lines")
    c = p.add_argument_group("checkpoints (llmopt.dcp: torch.distributed.checkpoint, resumable under any layout)")
    c.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="write training checkpoints here (DIR/step-NNNNNNNN); a DIR already holding one is resumed")
    c.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="a checkpoint every N steps (default 0: after the last step only)")
    c.add_argument("--checkpoint-keep", type=int, default=2, metavar="K", help="keep the last K (default: 2)")
    c.add_argument("--no-final-checkpoint", dest="final_checkpoint", action="store_false",
                   help="no checkpoint after the last step: only every N steps and when SIGTERM or SIGUSR2 stops "
                        "the run (bench.run's SLURM configs: their checkpoints are for requeues)")
    a("--log-dir", default=None, metavar="DIR",
      help="TensorBoard event files here (rank 0; torchtitan's metric names), continued across a resume")
    n = p.add_argument_group("nodes (a run across nodes: start the same command on each; bench.run's SLURM jobs "
                             "do, see --ranks-per-node there)")
    n.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="nodes the ranks span (default 1); each starts dp x tp x pp / N ranks through torch's "
                        "elastic agent (torchrun's), which meets the others by c10d rendezvous at --rdzv-endpoint")
    n.add_argument("--node-rank", type=int, default=0, metavar="K", help="this node's index, 0 to N-1 (0 hosts "
                   "the rendezvous and writes the run's outputs)")
    n.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's address and a free port")
    n.add_argument("--rdzv-id", default="llmopt", metavar="ID", help="the same on every node of one run")
    c.add_argument("--resume-from", default=None, metavar="DIR",
                   help="continue from this checkpoint (a step-NNNNNNNN directory, or the latest in a checkpoint DIR)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of the flags; a flag whose default stands for "the default" is checked only when given."""
    from llmopt.core.config import check_given

    kw = {k: getattr(args, k) for k in TrainConfig.field_names()}
    for k, v in list(kw.items()):
        if v is None and TrainConfig.__dataclass_fields__[k].metadata["given_positive"]:
            kw[k] = TrainConfig.__dataclass_fields__[k].default
        elif TrainConfig.__dataclass_fields__[k].metadata["given_positive"]:
            check_given(k, v)
    kw["preset"] = args.preset or (CHECKPOINT if args.init else TrainConfig.preset)
    return TrainConfig(**kw)


def config_from_file(path: str, given: set[str]) -> TrainConfig:
    """``--config FILE.json``: the config as it is (``TrainConfig.from_dict``), not rebuilt from flags. The file
    holds every field's value, so a field's flag beside it would be a second, conflicting source."""
    import json

    if given:
        flags = ", ".join(sorted("--" + k.replace("_", "-") for k in given))
        raise ValueError(f"--config {path} holds the whole config; drop {flags} (or edit the file)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"--config {path}: not readable JSON ({e}); pass one JSON object of llmopt.train's "
                         f"fields, as bench.run writes for each config") from None
    return TrainConfig.from_dict(d, f"--config {path}")


def _checked(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig]:
    """The flags, parsed and checked (values, combinations, --data, outputs, devices, the launcher's world)
    before torch is imported; a mistake raises ValueError (the optimizers' registry, read by the parser, too)."""
    args = build_parser().parse_args(argv)
    given = given_flags(argv, TrainConfig.field_names() + RUN_FLAGS)
    fields_given = given - set(RUN_FLAGS)
    if args.config:
        raw = config_from_file(args.config, fields_given)
    else:
        raw = config_from_args(args)
        _refuse_unused(raw, fields_given)  # as given: validate resolves the steps
    _refuse_a_checkpoint_as_init(raw)
    cfg = validate(raw)
    if args.timing_warmup < 0:
        raise ValueError(f"--timing-warmup {args.timing_warmup}: must be 0 or more")
    tokenizer_dir = None
    if cfg.data is not None:
        cfg, tokenizer_dir = _check_data(cfg, raw)
    _check_nodes(cfg, args)
    if _first_process(args):
        _check_outputs(cfg, args, tokenizer_dir)
    args.resume_from = _check_checkpoints(cfg, args, given & set(RUN_FLAGS))
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        if not under_launcher() and cfg.world_size > torch.cuda.device_count():
            raise ValueError(f"--dp x --tp x --pp = {cfg.world_size} ranks but {torch.cuda.device_count()} "
                             f"GPU(s) here; use fewer ranks or launch across nodes with torchrun")
    if under_launcher():
        from llmopt.distributed.dims import ParallelDims

        ParallelDims.from_config(cfg).check_world(int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.init and cfg.init.startswith("ckpt:"):  # last: it takes seconds, and every other mistake is said first
        from llmopt.checkpoint import exported_for_init

        exported_for_init(cfg.init)  # once, before any rank starts: the ranks load the model it writes
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault(LAUNCH_T0_ENV, repr(time.time()))
    return cli.main(lambda: _main(argv))


def _main(argv: list[str]) -> int:
    from llmopt.core import cli

    args, cfg = _checked(argv)
    # the run, and with it torch, is imported only now: a mistake in the flags never waits for that import
    from llmopt.loop import RunOptions, run

    if cfg.world_size > 1 and not under_launcher():
        from llmopt.launch import launch

        nodes = None
        if args.nnodes > 1:
            from llmopt.launch import Nodes

            nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id)
        return launch(cfg.world_size // args.nnodes, argv, cfg.device, main,
                      decided=(cli.USER_ERROR, cli.DIVERGED, cli.PREEMPTED), graceful=args.checkpoint_dir is not None,
                      nodes=nodes)

    rc = run(cfg, RunOptions(timing_warmup=args.timing_warmup, memory_breakdown=args.memory_breakdown,
                             save=args.save, metrics_out=args.metrics_out, profile=args.profile, quiet=args.quiet,
                             checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                             checkpoint_keep=args.checkpoint_keep, final_checkpoint=args.final_checkpoint,
                             resume_from=args.resume_from,
                             log_dir=args.log_dir))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank's work is done and written; leave without interpreter finalization, where gloo's worker
        # threads can still free tensors that need the GIL and abort the process (SIGABRT, "terminate called
        # without an active exception"; seen here after tensor-parallel runs, see pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def given_flags(argv: list[str], names: list[str] | None = None) -> set[str]:
    """The config fields (or ``names``) the command line gave, whatever their value (``--min-lr-ratio 0.1`` is
    given too)."""
    unset = object()  # argparse fills in a default only where the namespace it is handed lacks the attribute
    fields = TrainConfig.field_names() if names is None else names
    ns = build_parser().parse_known_args(argv, namespace=argparse.Namespace(**dict.fromkeys(fields, unset)))[0]
    return {k for k in fields if getattr(ns, k) is not unset}


RUN_FLAGS = ["checkpoint_every", "checkpoint_keep", "final_checkpoint"]
_HELD: dict = {}  # checkpoint directory -> its lock, held by this process (forked ranks inherit it)


def _refuse_a_checkpoint_as_init(cfg: TrainConfig) -> None:
    """``--init hf:DIR`` of a training checkpoint (llmopt.dcp), before Hugging Face reads it as a saved model and
    fails with its own words."""
    from llmopt import dcp

    init = init_path(cfg.init) if cfg.init and cfg.init.startswith("hf:") else None
    if init and os.path.isdir(init) and (os.path.isfile(os.path.join(init, dcp.STATE_FILE)) or dcp.complete(init)):
        raise ValueError(f"--init {cfg.init}: a training checkpoint, not a saved model; start from its model with "
                         f"--init ckpt:{init}, or continue its run with --resume-from {init}")


def _check_checkpoints(cfg: TrainConfig, args, given: set[str]) -> str | None:
    """The checkpoint flags, checked before any work: returns the checkpoint to resume from (``--resume-from``,
    or the latest in a ``--checkpoint-dir`` that holds one), checked against this run (llmopt.dcp), or None.
    The run that writes a directory holds its lock (the launcher's parent, or rank 0 under torchrun)."""
    from llmopt import dcp

    root = args.checkpoint_dir
    if root is None and given:
        name = sorted(given)[0]
        flag = "--no-final-checkpoint" if name == "final_checkpoint" else "--" + name.replace("_", "-")
        raise ValueError(f"{flag} has no effect without --checkpoint-dir DIR; add it or drop {flag}")
    if args.checkpoint_every < 0 or args.checkpoint_keep < 1:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every} / --checkpoint-keep {args.checkpoint_keep}: "
                         f"use 0 or more steps and at least 1 checkpoint kept")
    if (root or args.resume_from) and cfg.engine != "native":
        raise ValueError("--checkpoint-dir/--resume-from: checkpoints are llmopt's own step's; use --engine native")
    resume = args.resume_from
    if resume is None and root is not None and dcp.complete(root):
        resume = root
    if resume is None:
        path = None
    else:
        path = dcp.resolve(resume)
        dcp.check_compatible(cfg, path)
    if root is not None and _first_process(args) and root not in _HELD:
        from llmopt.safe_files import refuse_links
        from llmopt.scratch import check_writable_dir

        refuse_links(root, "--checkpoint-dir")  # saves rename and delete inside it: never through a planted link
        check_writable_dir(root, "--checkpoint-dir", may_exist=True)
        _HELD[root] = dcp.hold(root)
    return path


# A flag with no effect in its combination: (field, when it has none, why). Given on the command line, it is
# refused, never silently ignored. A ``--config`` file holds every field whatever its effect (a matrix's cross
# product makes these combinations on purpose), so this is about flags only.
UNUSED = (("min_lr_ratio", lambda c: c.lr_schedule == "constant", "--lr-schedule constant has no decay to floor"),
          ("lr_decay_fraction", lambda c: c.lr_schedule != "wsd", "it shapes --lr-schedule wsd only"),
          ("steps", lambda c: bool(c.max_tokens) and c.steps != c.resolved().steps,
           "--max-tokens sets another count"),
          ("pp_schedule", lambda c: c.pp == 1, "there is no pipeline without --pp 2 or more"),
          ("pp_microbatches", lambda c: c.pp == 1, "there is no pipeline without --pp 2 or more"),
          ("dp_mode", lambda c: c.dp == 1, "there is no data parallelism without --dp 2 or more"),
          ("eval_batches", lambda c: not c.eval_every, "no eval runs without --eval-every"),
          ("tokenizer", lambda c: c.data is None, "the generated data has no text to tokenize; add --data"))


def _refuse_unused(cfg: TrainConfig, given: set[str]) -> None:
    for field, unused, why in UNUSED:
        if field in given and unused(cfg):
            flag = "--" + field.replace("_", "-")
            raise ValueError(f"{flag} has no effect here ({why}); drop {flag}")


def _check_data(cfg: TrainConfig, raw: TrainConfig) -> tuple[TrainConfig, str | None]:
    """Raw text is prepared once, before any rank starts (cached for the next run), and the config validated
    again: its vocabulary is now the prepared data's (a trained BPE may learn fewer tokens than train:N asks
    for). The token files are read once against their meta.json. Returns the config and the data's tokenizer
    directory (None for bytes)."""
    from llmopt.data import check_tokens, is_prepared
    from llmopt.prepare import cached_path, ensure_prepared

    if os.path.isfile(cfg.data) and cfg.tokenizer == "bytes":
        from llmopt.data import TextFileSource

        _check_eval_batches(cfg, int(os.path.getsize(cfg.data) * TextFileSource.val_fraction))
        return cfg, None
    if not under_launcher():
        ensure_prepared(cfg.data, cfg.tokenizer)
        cfg = validate(raw)
    path = cfg.data if is_prepared(cfg.data) else cached_path(cfg.data, cfg.tokenizer)
    meta = check_tokens(path) if int(os.environ.get("RANK", "0")) == 0 else {}
    if meta:
        _check_eval_batches(cfg, int(meta["val_tokens"]))
    return cfg, meta.get("tokenizer_dir") and os.path.join(path, meta["tokenizer_dir"])


def _check_eval_batches(cfg: TrainConfig, val_tokens: int) -> None:
    """An eval reads --eval-batches global batches of held-out windows: more tokens than the held-out split has
    only reads the same text again (and 100,000 batches once ran with no end in sight)."""
    per = cfg.global_batch * cfg.seq_len
    most = max(1, val_tokens // per)
    if cfg.eval_every and cfg.eval_batches > most:
        raise ValueError(f"--eval-batches {cfg.eval_batches}: the held-out split of --data has {val_tokens:,} "
                         f"tokens, {most} global batch(es) of {per:,}; use --eval-batches {most} or fewer")


def _first_process(args) -> bool:
    """The one process that checks the run's outputs and holds its checkpoint lock: node 0's llmopt.train
    (whose launcher starts the ranks), or rank 0 under torchrun."""
    from llmopt.launch import LAUNCHED_ENV

    return int(os.environ.get("RANK", "0")) == 0 and args.node_rank == 0 and not os.environ.get(LAUNCHED_ENV)


def _check_nodes(cfg: TrainConfig, args) -> None:
    """--nnodes and its companions: the ranks must divide evenly between the nodes, and node 0 be reachable."""
    given = [f for f in ("--node-rank", "--rdzv-endpoint") if getattr(args, f[2:].replace("-", "_")) not in (0, None)]
    if args.nnodes < 1:
        raise ValueError(f"--nnodes {args.nnodes}: must be at least 1")
    if args.nnodes == 1:
        if given:
            raise ValueError(f"{given[0]} has no effect without --nnodes 2 or more; drop it")
        return
    if cfg.world_size % args.nnodes:
        raise ValueError(f"--nnodes {args.nnodes}: dp x tp x pp = {cfg.world_size} ranks do not divide evenly "
                         f"between {args.nnodes} nodes; use a node count that divides it")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank {args.node_rank}: must be 0 to {args.nnodes - 1}")
    host, sep, port = (args.rdzv_endpoint or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--rdzv-endpoint {args.rdzv_endpoint!r}: give node 0's HOST:PORT (the same on every node)")


def _check_outputs(cfg: TrainConfig, args, tokenizer_dir: str | None) -> None:
    """Every output the run will write, tried before any training: a failure after it would lose the run."""
    if args.metrics_out:
        from llmopt.scratch import check_writable_file

        check_writable_file(args.metrics_out, "--metrics-out", [cfg.data, cfg.init and init_path(cfg.init)])
    if args.log_dir:
        from llmopt.scratch import check_writable_dir

        check_writable_dir(args.log_dir, "--log-dir", may_exist=True)
    if args.profile:
        from llmopt.instruments import check_profile_dir

        check_profile_dir(args.profile)
    if args.save:
        from llmopt.checkpoint import check_save_dir

        check_save_dir(args.save, tokenizer_dir)


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
