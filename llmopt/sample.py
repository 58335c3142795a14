"""``python -m llmopt.sample DIR --prompt "..."``: generate from a model saved with ``--save`` (or any GPT-2
checkpoint directory in Hugging Face format).

The weights load through ``llmopt.checkpoint.load_gpt2`` (refused unless they are the GPT-2 of their config)
and ``GPT.from_hf``; the tokenizer is the one saved beside them (``AutoTokenizer``), or UTF-8 bytes (decoded
with replacement) when the model was trained on byte tokens. Sampling is nanoGPT's: temperature, optional
top-k, no KV cache (each new token re-runs the last ``block_size`` tokens; simple and exact), seeded so that a
seed gives the same text every time. Text is printed as it is made, so Ctrl-C keeps what was printed.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator

import torch

from llmopt.checkpoint import SAVE_INFO


def load_any(path: str, device: torch.device):
    """``load``, of a saved model or of a training checkpoint (llmopt.dcp), exported first into a temporary
    directory (``llmopt.export``)."""
    from llmopt import dcp

    if os.path.isfile(os.path.join(path, "config.json")) or not (os.path.isfile(os.path.join(path, dcp.STATE_FILE))
                                                                 or dcp.complete(path)):
        return load(path, device)
    import tempfile

    from llmopt.export import export

    with tempfile.TemporaryDirectory() as tmp:
        export(path, os.path.join(tmp, "model"))
        return load(os.path.join(tmp, "model"), device)


def load(path: str, device: torch.device):
    """(model, encode, decode) for a saved directory."""
    from llmopt.checkpoint import load_gpt2
    from llmopt.model import GPT

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} holds no saved model (config.json); pass a directory written by --save")
    model = GPT.from_hf(load_gpt2(path, path)).to(device).eval()
    info = {}
    if os.path.isfile(os.path.join(path, SAVE_INFO)):
        with open(os.path.join(path, SAVE_INFO)) as f:
            info = json.load(f)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from llmopt.prepare import load_hf_tokenizer

        tok = load_hf_tokenizer(path)
        if len(tok) > model.config.vocab_size:
            raise ValueError(f"{path!r}: its tokenizer has {len(tok)} tokens, its model {model.config.vocab_size}; "
                             f"save them together (llmopt.train --save)")
        return model, lambda s: tok.encode(s), lambda ids: tok.decode(ids)
    if info.get("tokenizer") == "bytes" or model.config.vocab_size == 256:
        from llmopt.prepare import ByteTokenizer

        tok = ByteTokenizer()
        return model, tok.encode, tok.decode
    raise ValueError(f"{path!r} has no tokenizer and was not trained on bytes; save one beside the model")


@torch.no_grad()
def tokens(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Sample ``max_new_tokens`` tokens after ``idx`` (1, T), one at a time; temperature 0 is greedy. Only the
    last ``block_size`` tokens are kept, so memory stays bounded however many are asked for."""
    for _ in range(max_new_tokens):
        idx = idx[:, -model.config.block_size:]
        logits = model(idx)[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        yield int(nxt)


def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``idx`` (1, T) with ``max_new_tokens`` sampled tokens appended."""
    new = list(tokens(model, idx, max_new_tokens, temperature, top_k, generator))
    return torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)


def stream(ids: Iterator[int], decode: Callable[[list[int]], str], write: Callable[[str], None],
           hold: int = 8) -> None:
    """Write the text of ``ids`` as they come. A token may end inside a character (byte tokens, byte-level
    BPE): its text is held back, up to ``hold`` tokens, until the character is whole (no trailing U+FFFD)."""
    pending: list[int] = []
    for i in ids:
        pending.append(i)
        text = decode(pending)
        if not text.endswith("\ufffd") or len(pending) >= hold:
            write(text)
            pending = []
    if pending:
        write(decode(pending))


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m llmopt.sample", __doc__.split("\n\n")[0])
    p.add_argument("dir", help="a directory written by python -m llmopt.train --save, or a training checkpoint "
                               "(--checkpoint-dir, or one step-NNNNNNNN in it)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2^63 - 1")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default: auto)")
    args = p.parse_args(argv)

    def body() -> int:
        if args.max_new_tokens < 0 or args.top_k < 0 or not 0 <= args.temperature < float("inf"):
            raise ValueError("--max-new-tokens, --top-k and --temperature must be 0 or more (and finite)")
        if not 0 <= args.seed < 2**63:
            raise ValueError(f"--seed {args.seed}: must be between 0 and 2^63 - 1")
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
            raise ValueError(f"--prompt holds a byte that is not UTF-8 text (at character {e.start}); "
                             f"pass text") from None
        from llmopt.core.config import resolve_device

        device = torch.device(resolve_device(args.device))
        model, encode, decode = load_any(args.dir, device)
        ids = encode(args.prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens; give some text")
        g = torch.Generator(device=device).manual_seed(args.seed)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        new = tokens(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature,
                     args.top_k or None, g)
        stream(new, decode, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        return 0

    try:
        return cli.main(body)
    except KeyboardInterrupt:  # what was printed stays printed
        sys.stdout.write("\n")
        return 130


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
