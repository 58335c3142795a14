"""Tokenize a corpus once into memmaps: ``python -m llmopt.data prepare INPUT --tokenizer T --out DIR``.

nanoGPT's ``prepare.py`` convention: ``train.bin`` and ``val.bin`` hold the token ids back to back (the
smallest unsigned dtype that holds the vocabulary), and ``meta.json`` says how they were made (tokenizer,
vocabulary, token counts, sources, a content hash). Training reads windows from the memmaps
(``llmopt.data.PreparedSource``); nothing is held in memory, here or there, beyond one document at a time.

INPUT is a text file (documents: paragraphs separated by blank lines), a directory (documents: its files with
the given extensions, recursively, in sorted order) or a built-in corpus name (``python-stdlib``: the Python
standard library's own source files, which ship with every Python; nothing is downloaded). The tokenizer is
``bytes`` (UTF-8 bytes, vocabulary 256), a Hugging Face tokenizer name or local path (``AutoTokenizer``), or
``train:N`` (a byte-level BPE of N tokens trained on INPUT with the ``tokenizers`` library and saved in Hugging
Face format in DIR/tokenizer). Documents go to the validation split by a hash of their source and index, so
the split is stable and independent of order. Each document ends with the tokenizer's end-of-text token where
it has one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator

import numpy as np

BUILTIN = ("python-stdlib",)
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
EOT = "<|endoftext|>"
META = "meta.json"
FORMAT = 1


# ---------------------------------------------------------------------- documents
def stdlib_files() -> list[str]:
    """The standard library's .py files, without its test suites, demos and third-party site-packages."""
    lib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo", "dist-packages"}
    out = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def input_files(source: str, extensions=DEFAULT_EXTENSIONS) -> list[str]:
    if source == "python-stdlib":
        return stdlib_files()
    if os.path.isdir(source):
        out = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(tuple(extensions))]
        if not out:
            raise ValueError(f"{source!r}: no files ending in {', '.join(extensions)}; pass --ext to choose others")
        return out
    if os.path.isfile(source):
        return [source]
    raise ValueError(f"no such file or directory {source!r}; pass a text file, a directory or one of "
                     f"{', '.join(BUILTIN)}")


def documents(source: str, extensions=DEFAULT_EXTENSIONS) -> Iterator[tuple[str, str]]:
    """(name, text) per document, read one at a time. A single file's documents are its paragraphs."""
    files = input_files(source, extensions)
    single = len(files) == 1 and source not in BUILTIN and not os.path.isdir(source)
    root = sysconfig.get_paths()["stdlib"] if source in BUILTIN else source
    for path in files:
        name = os.path.basename(path) if single else os.path.relpath(path, root)  # stable across machines
        if not single:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield name, f.read()
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            para, i = [], 0
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield f"{name}#{i}", "".join(para)
                    para, i = [], i + 1
            if para:
                yield f"{name}#{i}", "".join(para)


# ---------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no end-of-text token)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tokenizer_vocab_size(spec: str) -> int:
    """The vocabulary a tokenizer spec gives, without tokenizing anything (for planning and validation)."""
    if spec == "bytes":
        return 256
    if spec.startswith("train:"):
        return _train_size(spec)
    return len(load_hf_tokenizer(spec))


def _train_size(spec: str) -> int:
    n = spec.split(":", 1)[1]
    if not n.isdigit() or not 257 <= int(n) <= 2**20:
        raise ValueError(f"--tokenizer {spec}: train:N needs a vocabulary N between 257 and 1048576, e.g. train:4096")
    return int(n)


def load_hf_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained``; offline and not cached is one clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {name_or_path}: cannot load it ({str(e).splitlines()[0][:160]}); offline, "
                         f"point at a local copy (a directory saved with save_pretrained), or use bytes or "
                         f"train:N") from None


def train_bpe(spec: str, source: str, extensions, out_dir: str):
    """A byte-level BPE of N tokens (the end-of-text token included) trained on the corpus, saved in Hugging
    Face format (``PreTrainedTokenizerFast.save_pretrained``) in ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((text for _, text in documents(source, extensions)), vocab_size=_train_size(spec),
                            min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOT, bos_token=EOT, unk_token=EOT)
    tok.save_pretrained(out_dir)
    return tok


def build_tokenizer(spec: str, source: str, extensions, out_dir: str):
    """(tokenizer, saved tokenizer directory or None)."""
    if spec == "bytes":
        return ByteTokenizer(), None
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok = train_bpe(spec, source, extensions, tok_dir) if spec.startswith("train:") else load_hf_tokenizer(spec)
    if not spec.startswith("train:"):
        tok.save_pretrained(tok_dir)  # the run directory carries the tokenizer it was made with
    return tok, "tokenizer"


def dtype_for(vocab_size: int) -> str:
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size <= np.iinfo(name).max + 1:
            return name
    raise ValueError(f"vocabulary {vocab_size} does not fit in uint32")


# ---------------------------------------------------------------------- prepare
def in_val(name: str, index: int, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{name}\0{index}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


class _Progress:
    def __init__(self, every: float = 2.0):
        self.t0 = self.last = time.monotonic()
        self.every, self.tty = every, sys.stderr.isatty()

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        rate = tokens / max(now - self.t0, 1e-9)
        end = "\n" if final or not self.tty else ""
        print(f"\rprepare: {docs:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s", end=end, file=sys.stderr,
              flush=True)


def prepare(source: str, tokenizer: str, out_dir: str, val_fraction: float = 0.005,
            extensions=DEFAULT_EXTENSIONS, quiet: bool = False) -> dict:
    """Write train.bin, val.bin, meta.json (and tokenizer/) into ``out_dir``, which must not exist yet; the
    files are made in a temporary sibling directory and renamed into place, so ``out_dir`` is either
    complete or absent. Returns the meta dict."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise ValueError(f"--out {out_dir!r} already exists; remove it or choose another directory")
    input_files(source, extensions)  # fail early on a missing input
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        meta = _write(source, tokenizer, tmp, val_fraction, extensions, quiet)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write(source, spec, tmp, val_fraction, extensions, quiet) -> dict:
    tok, tok_dir = build_tokenizer(spec, source, extensions, tmp)
    vocab = len(tok) if tok_dir else tok.vocab_size
    dtype = dtype_for(vocab)
    eos = tok.eos_token_id
    counts, docs, digest, sources = {"train": 0, "val": 0}, {"train": 0, "val": 0}, hashlib.sha256(), set()
    progress = None if quiet else _Progress()
    files = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in ("train", "val")}
    pending = None  # the last document is held back so that the validation split is never empty

    def flush(split, ids):
        np.asarray(ids, dtype=dtype).tofile(files[split])
        counts[split] += len(ids)
        docs[split] += 1

    try:
        for i, (name, text) in enumerate(documents(source, extensions)):
            digest.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace"))
            sources.add(name.split("#")[0])
            ids = tok.encode(text) + ([eos] if eos is not None else [])
            if pending is not None:
                flush(*pending)
            pending = ("val" if in_val(name, i, val_fraction) else "train", ids)
            if progress:
                progress.update(sum(docs.values()), sum(counts.values()))
        if pending is None:
            raise ValueError(f"{source!r} holds no text")
        flush("val" if docs["val"] == 0 else pending[0], pending[1])
    finally:
        for f in files.values():
            f.close()
    if progress:
        progress.update(sum(docs.values()), sum(counts.values()), final=True)
    if counts["train"] == 0:
        raise ValueError(f"{source!r} is too small to split: every document went to validation; add text or "
                         f"lower --val-fraction")
    meta = {"format": FORMAT, "source": source, "tokenizer": spec, "tokenizer_dir": tok_dir, "vocab_size": vocab,
            "dtype": dtype, "eos_token_id": eos, "val_fraction": val_fraction,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": docs,
            "sources": sorted(sources)[:1000], "source_count": len(sources), "content_sha256": digest.hexdigest()}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def cache_dir() -> str:
    return os.environ.get("LLMOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmopt")


def ensure_prepared(source: str, tokenizer: str) -> str:
    """A prepared directory for ``--data SOURCE --tokenizer T``: SOURCE itself when it is one, else a copy
    prepared once into the cache (keyed by the input's files, sizes and modification times, and T)."""
    if os.path.isfile(os.path.join(source, META)):
        return source
    files = input_files(source)
    key = hashlib.sha256(json.dumps([tokenizer, source] + [(f, os.path.getsize(f), os.path.getmtime(f))
                                                           for f in files]).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(source)) or "data"
    out = os.path.join(cache_dir(), "prepared", f"{name}-{tokenizer.replace(':', '')}-{key}")
    if not os.path.isfile(os.path.join(out, META)):
        try:
            prepare(source, tokenizer, out)
        except ValueError:
            if not os.path.isfile(os.path.join(out, META)):  # another process won the race: use its copy
                raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmopt.data prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help=f"a text file, a directory, or {', '.join(BUILTIN)}")
    p.add_argument("--tokenizer", default="bytes", help="bytes, a Hugging Face name or path, or train:N")
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="documents held out (default: %(default)s)")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="file extensions read from a directory")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.input, args.tokenizer, args.out, args.val_fraction,
                       tuple(e if e.startswith(".") else "." + e for e in args.ext.split(",") if e), args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, vocabulary "
          f"{meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}")
    return 0
