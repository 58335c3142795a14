"""``python -m llmopt.sample DIR --prompt "..."``: generate from a model saved with ``--save`` (or any GPT-2
checkpoint directory in Hugging Face format).

The weights load through ``GPT2LMHeadModel.from_pretrained`` and ``GPT.from_hf``; the tokenizer is the one
saved beside them (``AutoTokenizer``), or UTF-8 bytes (decoded with replacement) when the model was trained on
byte tokens. Sampling is nanoGPT's: temperature, optional top-k, no KV cache (each new token re-runs the
last ``block_size`` tokens; simple and exact, quadratic in the length), seeded so that a seed gives the same
text every time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from llmopt.checkpoint import SAVE_INFO


def load(path: str, device: torch.device):
    """(model, encode, decode) for a saved directory."""
    from transformers import GPT2LMHeadModel

    from llmopt.model import GPT

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} holds no saved model (config.json); pass a directory written by --save")
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    model = GPT.from_hf(hf).to(device).eval()
    info = {}
    if os.path.isfile(os.path.join(path, SAVE_INFO)):
        with open(os.path.join(path, SAVE_INFO)) as f:
            info = json.load(f)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return model, lambda s: tok.encode(s), lambda ids: tok.decode(ids)
    if info.get("tokenizer") == "bytes" or model.config.vocab_size == 256:
        from llmopt.prepare import ByteTokenizer

        tok = ByteTokenizer()
        return model, tok.encode, tok.decode
    raise ValueError(f"{path!r} has no tokenizer and was not trained on bytes; save one beside the model")


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); temperature 0 is greedy."""
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.config.block_size:]
        logits = model(ctx)[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmopt.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a directory written by python -m llmopt.train --save")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    try:
        if args.max_new_tokens < 0 or args.top_k < 0 or not args.temperature >= 0:
            raise ValueError("--max-new-tokens, --top-k and --temperature must be 0 or more")
        from llmopt.config import resolve_device

        device = torch.device(resolve_device(args.device))
        model, encode, decode = load(args.dir, device)
        ids = encode(args.prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens; give some text")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature,
                   args.top_k or None, g)
    print(args.prompt + decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
