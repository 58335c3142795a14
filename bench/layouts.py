"""The harness's words for layouts, in one place: the layouts every optimizer and toggle is shown on
(``BASE_LAYOUTS``: one process and each 2-rank layout once; the matrices and the convergence follow-ups both
use them), a layout's name in config ids, rows, tables and plots (``layout_name``), and the advisor's longer
label that adds what else shapes a layout's step (``layout_label``)."""
from __future__ import annotations

from dataclasses import asdict, is_dataclass

BASE_LAYOUTS = (dict(), dict(dp=2), dict(dp=2, dp_mode="fsdp"), dict(tp=2), dict(pp=2))


def layout_name(cfg) -> str:
    """e.g. "single", "fsdp2", "ddp2xtp2", "tp2xpp2-1f1b", of a config: a dict, a row or a ``TrainConfig``."""
    if is_dataclass(cfg):
        cfg = asdict(cfg)
    layout = []
    if int(cfg["dp"]) > 1:
        layout.append(f"{cfg['dp_mode']}{cfg['dp']}")
    if int(cfg["tp"]) > 1:
        layout.append(f"tp{cfg['tp']}")
    if int(cfg["pp"]) > 1:
        layout.append(f"pp{cfg['pp']}-{cfg['pp_schedule']}")
    return "x".join(layout) or "single"


def layout_label(cfg) -> str:
    """The advisor's name for a candidate (a ``TrainConfig``): the layout, precision, accumulation, pipeline
    chunks and activation checkpointing, e.g. "fsdp2xpp2-gpipe-bf16-ga2-m4-ac"."""
    parts = [layout_name(cfg), cfg.precision, f"ga{cfg.grad_accum}"]
    if cfg.pp > 1:
        parts.append(f"m{cfg.pp_microbatches}")
    if cfg.activation_checkpointing:
        parts.append("ac")
    return "-".join(parts)
