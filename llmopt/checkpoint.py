"""Keeping the result: the trained model in Hugging Face format, from any layout.

Gathered with torch's distributed-checkpoint state-dict API (``get_model_state_dict`` with
``full_state_dict=True``): DTensor shards (FSDP2, TP) become full tensors, wrapper prefixes (DDP, activation
checkpointing, compile) are dropped. Pipeline stages each hold their own blocks; one rank per stage sends its
part to rank 0, which merges them (the last stage's copy of the tied head is left out), loads them into a
single-device model and writes ``save_pretrained`` (with the tokenizer the data was prepared with, if any)
into a temporary sibling directory renamed into place: the directory is complete or absent.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

SAVE_INFO = "llmopt.json"  # what llmopt adds beside the HF files: the tokenizer spec when there is no HF tokenizer


def check_save_dir(path: str, source_tokenizer: str | None = None) -> None:
    """Refuse before training what would fail after it: a target that exists or cannot be created (tried for
    real), or the data's tokenizer directory missing (``--save`` copies it beside the model)."""
    from llmopt.scratch import check_writable_dir

    check_writable_dir(path, "--save", may_exist=False)
    if source_tokenizer is not None and not os.path.isdir(source_tokenizer):
        raise ValueError(f"--save: the data's tokenizer {source_tokenizer!r} is missing (--save writes it beside the "
                         f"model); prepare the data again, or drop --save")


def full_state_dict(layout) -> dict[str, torch.Tensor] | None:
    """The whole model's parameters as CPU tensors on rank 0 (None elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = layout.module
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    local = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    c = layout.coord
    mine = {k: v.detach().cpu() for k, v in local.items()} if c["dp"] == 0 and c["tp"] == 0 else None
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in parts:
        merged.update(part or {})
    merged.pop("lm_head.weight", None)  # a pipeline's copy of the tied head (GPT's own head is wte)
    return merged


def save_pretrained(state, out_dir: str) -> None:
    """Write the trained model (and tokenizer) to ``out_dir`` in Hugging Face format. Collective."""
    from llmopt.model import GPT

    sd = full_state_dict(state.layout)
    if sd is None:
        return
    cfg = state.cfg
    if cfg.model_impl == "hf":
        from transformers import GPT2LMHeadModel

        from llmopt.model import hf_config

        hf = GPT2LMHeadModel(hf_config(cfg.model_config))
        hf.load_state_dict({k.removeprefix("hf."): v for k, v in sd.items()}, strict=False)
    else:
        model = GPT(cfg.model_config)
        model.load_state_dict(sd)
        hf = model.to_hf()
    from llmopt.scratch import sibling_tmp

    out_dir = os.path.abspath(out_dir)
    tmp = sibling_tmp(out_dir)  # a killed earlier --save of this directory leaves DIR.tmp-PID: removed here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        hf.save_pretrained(tmp)
        tok_dir = tokenizer_dir(state.source)
        if tok_dir is not None:
            for name in os.listdir(tok_dir):
                shutil.copy2(os.path.join(tok_dir, name), tmp)
        with open(os.path.join(tmp, SAVE_INFO), "w") as f:
            json.dump({"tokenizer": "hf" if tok_dir else "bytes" if cfg.data is not None else None,
                       "data": cfg.data, "init": cfg.init, "steps": cfg.steps}, f, indent=1)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_dir(source) -> str | None:
    meta = getattr(source, "meta", None)
    if meta and meta.get("tokenizer_dir"):
        return os.path.join(source.path, meta["tokenizer_dir"])
    return None
