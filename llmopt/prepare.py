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

import codecs
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterator

import numpy as np

BUILTIN = ("python-stdlib",)
VAL_FRACTION = 0.005
# The built-in corpus holds out more: at 0.005 one of its 580 modules (15 kB) was the whole validation split,
# fewer tokens than one eval of the convergence studies reads (64 sequences); at 0.02, 9 modules and 205 kB
BUILTIN_VAL_FRACTION = 0.02
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
EOT = "<|endoftext|>"
META = "meta.json"
FORMAT = 1


# ---------------------------------------------------------------------- documents
def stdlib_files() -> list[str]:
    """The standard library's .py files, without its test suites, demos and third-party site-packages."""
    return list(_stdlib_files())


@functools.cache
def _stdlib_files() -> tuple[str, ...]:
    """Walked once per process: the interpreter's own library does not change under it, and the advisor asks
    for the corpus's cache path once per reference row (a walk each was most of an advise)."""
    lib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo", "dist-packages"}
    out = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return tuple(out)


@functools.cache
def _stdlib_signature() -> tuple:
    return tuple((f, os.path.getsize(f), os.path.getmtime(f)) for f in _stdlib_files())


def input_files(source: str, extensions=DEFAULT_EXTENSIONS) -> list[str]:
    """The files a corpus is read from, in a stable order. Every one must be a regular file: a FIFO, socket or
    device could block the read forever, and a dangling or looping symbolic link cannot be read at all."""
    if source == "python-stdlib":
        return stdlib_files()
    if os.path.isdir(source):
        out = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(tuple(extensions))]
        if not out:
            raise ValueError(f"{source!r}: no files ending in {', '.join(extensions)}; pass --ext to choose others")
        for path in out:
            _check_readable(path)
        return out
    if os.path.lexists(source):
        _check_readable(source)
        return [source]
    raise ValueError(f"no such file or directory {source!r}; pass a text file, a directory or one of "
                     f"{', '.join(BUILTIN)}")


def _check_readable(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        what = "a symbolic link loop" if e.errno == errno.ELOOP else (
            "a dangling symbolic link" if os.path.islink(path) else f"unreadable ({e.strerror})")
        raise ValueError(f"{path!r} is {what}; remove it, or leave it out with --ext") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path!r} is not a regular file (a FIFO, socket or device, whose read can block "
                         f"forever); remove it, or leave it out with --ext")


_replaced_bytes = 0


def _count_and_replace(e: UnicodeDecodeError) -> tuple[str, int]:
    """The "replace" error handler (one U+FFFD per invalid sequence), counting the bytes it replaces."""
    global _replaced_bytes
    _replaced_bytes += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("llmopt-count-replace", _count_and_replace)


class Utf8Count:
    """Decodes UTF-8 with invalid bytes replaced by U+FFFD, as Python's "replace" does, and counts them
    (``replaced`` bytes in ``files``) so that prepare says how much of the input was not text rather than
    change it silently."""

    def __init__(self):
        self.replaced, self.files = 0, set()

    def decode(self, data: bytes, name: str) -> str:
        before = _replaced_bytes
        text = data.decode("utf-8", errors="llmopt-count-replace")
        if _replaced_bytes != before:
            self.replaced += _replaced_bytes - before
            self.files.add(name.split("#")[0])
        return text


def documents(source: str, extensions=DEFAULT_EXTENSIONS, utf8: Utf8Count | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) per document, read one at a time. A single file's documents are its paragraphs. Invalid
    UTF-8 becomes U+FFFD, counted in ``utf8``."""
    utf8 = utf8 or Utf8Count()
    files = input_files(source, extensions)
    single = len(files) == 1 and source not in BUILTIN and not os.path.isdir(source)
    root = sysconfig.get_paths()["stdlib"] if source in BUILTIN else source
    for path in files:
        name = os.path.basename(path) if single else os.path.relpath(path, root)  # stable across machines
        if not single:
            with open(path, "rb") as f:
                yield name, utf8.decode(f.read(), name)
            continue
        with open(path, "rb") as f:
            para, i = [], 0
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield f"{name}#{i}", utf8.decode(b"".join(para), name)
                    para, i = [], i + 1
            if para:
                yield f"{name}#{i}", utf8.decode(b"".join(para), name)


# A document longer than this many characters is tokenized (and the BPE trained) a piece at a time, cut
# before a space that starts a word: byte-level BPE's pre-tokenizer never joins across such a point, so the
# tokens are those of the whole document, and memory stays bounded (a 47 MB single line once took 9.1 GB to
# train a BPE on). Only where no such point exists within a piece is it cut at the limit. The BPE trainer
# holds about 300 bytes per character of a piece while it counts it (measured: +50 MB at 16K characters,
# +300 MB at 1M), hence pieces of 64K.
MAX_PIECE_CHARS = 1 << 16


def pieces(text: str, limit: int = MAX_PIECE_CHARS) -> Iterator[str]:
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


# ---------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no end-of-text token)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def tokenizer_vocab_size(spec: str) -> int:
    """The vocabulary a tokenizer spec gives, without tokenizing anything (for planning and validation). For
    ``train:N`` it is N, an upper bound: a corpus may yield fewer merges, and the prepared data's meta.json
    then holds the vocabulary the model gets (``llmopt.core.config.data_vocab_size`` reads it)."""
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


PROBE_TEXT = "def read_config(path):\n    return open(path).read()  # The quick brown fox, 42 times.\n"


def load_hf_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` (offline first, see llmopt.hub), refused unless it is a real
    tokenizer: AutoTokenizer on a model directory without tokenizer files returns one of vocabulary 1, which
    once turned a corpus into all-zero tokens and a model whose loss is 0."""
    from transformers import AutoTokenizer

    from llmopt import hub

    tok = hub.load(AutoTokenizer.from_pretrained, name_or_path, f"--tokenizer {name_or_path}")
    ids = tok.encode(PROBE_TEXT, add_special_tokens=False)
    if len(tok) < 2 or len(set(ids)) < 2:
        raise ValueError(f"--tokenizer {name_or_path}: not a usable tokenizer (vocabulary {len(tok)}, text encodes "
                         f"to {len(set(ids))} distinct token(s)); a model directory without its tokenizer files? "
                         f"Pass a tokenizer's directory or name, bytes, or train:N")
    return tok


def train_bpe(spec: str, source: str, extensions, out_dir: str):
    """A byte-level BPE of at most N tokens (the end-of-text token included), as GPT-2's: bytes as the initial
    alphabet, GPT-2's pre-tokenizer. Trained on the corpus a bounded piece at a time (``pieces``) and saved in
    Hugging Face format (``PreTrainedTokenizerFast.save_pretrained``) in ``out_dir``. A small corpus may learn
    fewer than N tokens: the tokenizer's length is the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_train_size(spec), min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((p for _, text in documents(source, extensions) for p in pieces(text)), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, unk_token=EOT)
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


def encode(tok, text: str, eos: int | None, dtype: str) -> np.ndarray:
    """A document's token ids (then ``eos``, if given) as an array of ``dtype``, a bounded piece at a time (see
    ``pieces``): a Python list of a large document's ids would take about 30 bytes a token. Special tokens as
    the tokenizer adds them to a whole text, once."""
    if isinstance(tok, ByteTokenizer):
        parts = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]
    else:
        parts = [np.asarray(tok.encode(piece, add_special_tokens=i == 0), dtype=np.int64)
                 for i, piece in enumerate(pieces(text))]
    parts.append(np.asarray([] if eos is None else [eos], dtype=np.int64))
    return np.concatenate(parts).astype(dtype)


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


def prepare(source: str, tokenizer: str, out_dir: str, val_fraction: float = VAL_FRACTION,
            extensions=DEFAULT_EXTENSIONS, quiet: bool = False) -> dict:
    """Write train.bin, val.bin, meta.json (and tokenizer/) into ``out_dir``, which must not exist yet; the
    files are made in a temporary sibling directory and renamed into place, so ``out_dir`` is either
    complete or absent (a leftover of a killed earlier attempt is removed: ``llmopt.scratch``). Another
    process that finishes the same ``out_dir`` first wins: its complete directory is used. Returns the meta
    dict."""
    from llmopt import scratch

    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        raise ValueError(f"--out {out_dir!r} already exists; remove it or choose another directory")
    input_files(source, extensions)  # fail early on a missing or unreadable input
    tmp = _make_dir(scratch.sibling_tmp(out_dir), out_dir)
    try:
        meta = _write(source, tokenizer, tmp, val_fraction, extensions, quiet)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, META)):
                raise
            meta = json.load(open(os.path.join(out_dir, META)))  # lost the race: the winner's copy is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _make_dir(path: str, out_dir: str, exist_ok: bool = False) -> str:
    """Create ``path`` (and its parents): a file in the way, /proc or a read-only mount is one ValueError."""
    try:
        os.makedirs(path, exist_ok=exist_ok)
    except OSError as e:
        raise ValueError(f"--out {out_dir!r}: cannot create a directory there ({e.strerror}); choose another "
                         f"place") from None
    return path


def _write(source, spec, tmp, val_fraction, extensions, quiet) -> dict:
    tok, tok_dir = build_tokenizer(spec, source, extensions, tmp)
    vocab = len(tok) if tok_dir else tok.vocab_size
    dtype = dtype_for(vocab)
    eos = tok.eos_token_id
    counts, docs, digest, sources = {"train": 0, "val": 0}, {"train": 0, "val": 0}, hashlib.sha256(), set()
    progress = None if quiet else _Progress()
    utf8 = Utf8Count()
    files = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in ("train", "val")}
    pending = None  # the last document is held back so that the validation split is never empty

    def flush(split, ids):
        ids.tofile(files[split])
        counts[split] += len(ids)
        docs[split] += 1

    try:
        for i, (name, text) in enumerate(documents(source, extensions, utf8)):
            digest.update(name.encode() + b"\0" + text.encode("utf-8", errors="replace"))
            sources.add(name.split("#")[0])
            ids = encode(tok, text, eos, dtype)
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
            "sources": sorted(sources)[:1000], "source_count": len(sources), "content_sha256": digest.hexdigest(),
            "replaced_bytes": utf8.replaced, "files_with_replaced_bytes": sorted(utf8.files)[:100]}
    meta["seal"] = {s: token_seal(os.path.join(tmp, f"{s}.bin"), meta, s) for s in ("train", "val")}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def token_seal(path: str, meta: dict, split: str) -> int:
    """CRC-32 of what a split's token file means: the meta.json fields that say how to read it (format,
    dtype, vocabulary, token count), then its bytes. Written by prepare; a meta.json edited afterwards, or
    token files from another preparation, no longer match it."""
    crc = zlib.crc32(f"{meta.get('format')}|{meta['dtype']}|{meta['vocab_size']}|{meta[f'{split}_tokens']}|".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def cache_dir() -> str:
    return os.environ.get("LLMOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmopt")


@functools.lru_cache(maxsize=None)
def default_val_fraction(source: str) -> float:
    return BUILTIN_VAL_FRACTION if source in BUILTIN else VAL_FRACTION


def cached_path(source: str, tokenizer: str) -> str:
    """Where ``--data SOURCE --tokenizer T`` is prepared in the cache: keyed by the input's files, their sizes
    and modification times, T and the held-out fraction."""
    if source in BUILTIN:
        key = _builtin_key(source, tokenizer)
    else:
        key = _key(source, tokenizer, [(f, os.path.getsize(f), os.path.getmtime(f)) for f in input_files(source)])
    name = os.path.basename(os.path.normpath(source)) or "data"
    return os.path.join(cache_dir(), "prepared", f"{name}-{tokenizer.replace(':', '')}-{key}")


def _key(source: str, tokenizer: str, files) -> str:
    return hashlib.sha256(json.dumps([tokenizer, source, default_val_fraction(source)] + list(files)
                                     ).encode()).hexdigest()[:16]


@functools.cache
def _builtin_key(source: str, tokenizer: str) -> str:
    """A built-in corpus's key, once per process (its files' signature is read once too): a config's model shape
    asks for it each time (``TrainConfig.model_config``), thousands of times where the advisor predicts memory
    for every committed row."""
    return _key(source, tokenizer, _stdlib_signature())


def ensure_prepared(source: str, tokenizer: str) -> str:
    """A prepared directory for ``--data SOURCE --tokenizer T``: SOURCE itself when it is one, else a copy
    prepared once into the cache. Runs preparing the same copy at once (``bench.run --jobs 2``) take turns on
    a lock in the cache's ``locks/``: the first prepares, the others wait and use its directory."""
    if os.path.isfile(os.path.join(source, META)):
        return source
    out = cached_path(source, tokenizer)
    if os.path.isfile(os.path.join(out, META)):
        return out
    locks = os.path.join(cache_dir(), "locks")
    _make_dir(locks, out, exist_ok=True)  # two runs starting together both find it missing
    with open(os.path.join(locks, os.path.basename(out) + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prepare: another run is preparing {out}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, META)):
            report(prepare(source, tokenizer, out, default_val_fraction(source)), out)
    return out


def report(meta: dict, out: str) -> None:
    """The prepared directory in one line, and (on stderr) the invalid UTF-8 that was replaced, if any."""
    print(f"{out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, vocabulary "
          f"{meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}", flush=True)
    if meta.get("replaced_bytes"):
        files = meta["files_with_replaced_bytes"]
        print(f"prepare: {meta['replaced_bytes']:,} invalid UTF-8 byte(s) replaced with U+FFFD, in "
              f"{len(files)}{'+' if len(files) == 100 else ''} file(s) (first: {files[0]}); meta.json records "
              f"them", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from llmopt.core import cli

    p = cli.parser("python -m llmopt.data prepare", __doc__.split("\n\n")[0])
    p.add_argument("input", help=f"a text file, a directory, or {', '.join(BUILTIN)}")
    p.add_argument("--tokenizer", default="bytes", help="bytes, a Hugging Face name or path, or train:N")
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"documents held out (default: {VAL_FRACTION}; {BUILTIN_VAL_FRACTION} for "
                        f"{', '.join(BUILTIN)})")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="file extensions read from a directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)

    def body() -> int:
        ext = tuple(e if e.startswith(".") else "." + e for e in args.ext.split(",") if e)
        fraction = default_val_fraction(args.input) if args.val_fraction is None else args.val_fraction
        meta = prepare(args.input, args.tokenizer, args.out, fraction, ext, args.quiet)
        report(meta, args.out)
        return 0

    return cli.main(body)
