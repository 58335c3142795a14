"""Keeping the result: the trained model in Hugging Face format, from any layout.

Gathered with torch's distributed-checkpoint state-dict API (``get_model_state_dict`` with
``full_state_dict=True``): DTensor shards (FSDP2, TP) become full tensors, wrapper prefixes (DDP, activation
checkpointing, compile) are dropped. Pipeline stages each hold their own blocks; one rank per stage sends its
part to rank 0, which merges them (the last stage's copy of the tied head is left out), loads them into a
single-device model and writes ``save_pretrained`` (with the tokenizer the data was prepared with, if any)
into a temporary sibling directory renamed into place: the directory is complete or absent. And the other way:
``--init ckpt:DIR``'s model, a training checkpoint's exported once per run (``exported_for_init``).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import torch
import torch.distributed as dist

from llmopt.safe_files import open_file

SAVE_INFO = "llmopt.json"  # what llmopt adds beside the HF files: the tokenizer spec when there is no HF tokenizer


def check_save_dir(path: str, source_tokenizer: str | None = None) -> None:
    """Refuse before training what would fail after it: a target that exists or cannot be created (tried for
    real), or the data's tokenizer directory missing (``--save`` copies it beside the model)."""
    from llmopt.scratch import check_writable_dir

    check_writable_dir(path, "--save", may_exist=False)
    if source_tokenizer is not None:
        tokenizer_files(source_tokenizer)


# What a Hugging Face tokenizer directory holds (``save_pretrained`` of a fast tokenizer, GPT-2's included): the
# only files ``--save`` copies beside the model. A prepared data directory may come from someone else; a
# ``model.safetensors`` or a link to a secret planted in its tokenizer/ must not end up in the saved model.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"})


def tokenizer_files(tok_dir: str) -> list[str]:
    """The tokenizer files of a prepared data directory's ``tokenizer_dir`` (sorted), refused unless it is a real
    directory holding only regular files of ``TOKENIZER_FILES``: checked before training, so a save never
    fails (or copies something else) after it."""
    what = f"--save: the data's tokenizer directory {tok_dir!r}"
    if os.path.islink(tok_dir) or not os.path.isdir(tok_dir):
        raise ValueError(f"{what} is missing or a link (--save writes the tokenizer beside the model); prepare "
                         f"the data again, or drop --save")
    names = sorted(os.listdir(tok_dir))
    for name in names:
        full = os.path.join(tok_dir, name)
        if name not in TOKENIZER_FILES or os.path.islink(full) or not os.path.isfile(full):
            kind = ("a link" if os.path.islink(full) else "a directory" if os.path.isdir(full)
                    else "not a tokenizer file")
            raise ValueError(f"{what} holds {name!r} ({kind}; a tokenizer directory holds only "
                             f"{', '.join(sorted(TOKENIZER_FILES))}); prepare the data again, or drop --save")
    return names


# Buffers transformers keeps in a GPT-2 state dict in some versions (the causal mask); not weights
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def expected_weights(hf_config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a GPT2LMHeadModel of this config holds (built on the meta device: no
    memory), the tied head left out."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith(_BUFFERS) and k != "lm_head.weight"}


def weight_problems(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint's weights (name -> shape, HF's ``transformer.`` prefix optional) are not those of the
    GPT-2 its config describes, or None."""
    found = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in found.items()
             if not k.endswith(_BUFFERS)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    shapes = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                              (shapes, "of another shape")) if v]
    return "its weights are not those of the GPT-2 in its config.json: " + ", ".join(parts)


def check_weights(path: str, hf_config) -> None:
    """A local checkpoint directory's weight file(s) against its config, from their headers alone (safetensors)
    or a memory-mapped load (a pickled ``pytorch_model.bin``): one ValueError when a file is missing,
    unreadable, truncated or holds another model's weights. Cheap, so it runs before any rank starts."""
    import json as _json

    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = [os.path.join(path, "model.safetensors")] if os.path.isfile(os.path.join(path, "model.safetensors")) else []
    if not files and os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in _json.load(f).get("weight_map", {}).values()})
    found: dict[str, tuple[int, ...]] = {}
    try:
        if files:
            for file in files:
                with safe_open(file, framework="pt") as f:
                    found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            sd = _load_pickled(os.path.join(path, "pytorch_model.bin"))
            if not isinstance(sd, dict):
                raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
            found = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        else:
            raise ValueError("no weights file (model.safetensors, its index, or pytorch_model.bin)")
    except pickle.UnpicklingError:
        raise ValueError("its pytorch_model.bin is a pickle that is not a state dict of tensors (torch loads "
                         "only those, weights_only); save the model again with save_pretrained") from None
    except Exception as e:  # noqa: BLE001 -- safetensors' own error type, torch's: the user's file
        raise ValueError(f"its weights cannot be read ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    problem = weight_problems(found, expected_weights(hf_config))
    if problem:
        raise ValueError(problem)


def _load_pickled(path: str):
    """A pickled state dict, tensors only (``weights_only``): memory-mapped when it is in torch's zip format,
    read whole when it is the legacy one (which cannot be mapped)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's advice on pickle protocols: the error, if any, says enough
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def load_gpt2(name_or_path: str, what: str):
    """``GPT2LMHeadModel.from_pretrained`` in fp32 with dropout off (llmopt's GPT has none, so both compute the
    same function), offline first (``llmopt.hub``); refused (one ValueError starting with ``what``) when its config is
    not a GPT-2 llmopt computes exactly or any weight is missing or left over: transformers would initialise the
    missing ones at random and train on (a config.json beside another model's weights once loaded with every
    weight missing)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    from llmopt import hub
    from llmopt.model import config_from_hf

    if os.path.isdir(name_or_path):  # the config and the weights' headers first: a clearer error, and cheaper
        config = hub.load(AutoConfig.from_pretrained, name_or_path, what)
        try:
            if getattr(config, "model_type", None) != "gpt2":
                raise ValueError(f"a {getattr(config, 'model_type', '?')} checkpoint; llmopt trains GPT-2 models")
            config_from_hf(config)
            check_weights(name_or_path, config)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    model, info = hub.load(GPT2LMHeadModel.from_pretrained, name_or_path, what, dtype=torch.float32,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, output_loading_info=True)
    try:
        config_from_hf(model.config)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    missing = {k for k in info.get("missing_keys", ()) if not k.endswith(_BUFFERS) and k != "lm_head.weight"}
    unexpected = {k for k in info.get("unexpected_keys", ()) if not k.endswith(_BUFFERS)}
    if missing or unexpected or info.get("mismatched_keys"):
        found = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in missing}
        found.update({k: (0,) for k in unexpected})
        problem = weight_problems(found, expected_weights(model.config)) or "its weights do not match its config"
        raise ValueError(f"{what}: {problem}")
    return model


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
    """Write the trained model (and tokenizer) to ``out_dir`` in Hugging Face format, at the weights the
    optimizer evaluates (``llmopt.optim.eval_weights``: a schedule-free optimizer's average; the whole write
    inside it, since on one CPU process the state dict's tensors are the parameters themselves). Collective."""
    from llmopt.optim import eval_weights

    with eval_weights(state.optimizer):
        _save_pretrained(state, out_dir)


def _save_pretrained(state, out_dir: str) -> None:
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
            for name in tokenizer_files(tok_dir):  # checked again: the directory may have changed since the start
                with open(os.path.join(tok_dir, name), "rb") as src, open_file(os.path.join(tmp, name), "xb") as dst:
                    shutil.copyfileobj(src, dst)
        with open_file(os.path.join(tmp, SAVE_INFO), "x") as f:
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


# Set by the process that exported ``--init ckpt:DIR`` (``exported_for_init``): "<init>\n<model directory>". Its
# ranks, forked or exec'd, inherit it and load that directory instead of exporting again.
INIT_EXPORT_ENV = "LLMOPT_INIT_EXPORTED"


def exported_for_init(init: str) -> str:
    """``--init ckpt:DIR``: the checkpoint's model in Hugging Face format, written once per run (by the process
    that checks the flags, before any rank exists) into a private directory removed when that process exits;
    its ranks find it through ``INIT_EXPORT_ENV``. The export runs in a process of its own (``python -m
    llmopt.export``): torch ops here would start OpenMP's threads in a process that then forks its ranks, and
    DCP's reader would meet this process's process group, if it had one. So ``--init ckpt:DIR`` is exactly
    ``python -m llmopt.export DIR OUT`` then ``--init hf:OUT``."""
    import atexit
    import subprocess

    from llmopt.scratch import private_dir

    said = os.environ.get(INIT_EXPORT_ENV, "").split("\n")
    if len(said) == 2 and said[0] == init and os.path.isdir(said[1]):
        return said[1]
    tmp = private_dir("llmopt-init-")
    atexit.register(shutil.rmtree, tmp, True)
    out = os.path.join(tmp, "model")
    # absolute: a path from a file someone handed us never reaches the command line as an option (``-x``)
    path = os.path.abspath(init.removeprefix("ckpt:"))
    r = subprocess.run([sys.executable, "-m", "llmopt.export", path, out], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")] or r.stderr.splitlines()[-1:]
        raise ValueError(f"--init {init}: " + (lines[-1].removeprefix("error: ") if lines else f"exit {r.returncode}"))
    os.environ[INIT_EXPORT_ENV] = f"{init}\n{out}"
    return out
