"""Training data: a seeded synthetic source with a known entropy floor, or a user's text file.

Every sequence is a function of ``(seed, split, step, row)`` alone: row ``r`` of the global batch of step
``s``. A rank asks only for its own rows (``rows=``), so it never builds the rest of the global batch, and
the tokens a step sees never depend on how the batch is split over ranks and micro-batches: that is what
makes every parallel layout comparable with the single-process step. ``split="val"`` is a held-out stream
that training never sees (a disjoint seed stream for generated data, the tail of a text file).

torch is imported where a batch is made, not with the module: checking a prepared directory and
``python -m llmopt.data prepare`` need none, so a mistake there is reported without waiting for its import.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val")
_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def row_seed(seed: int, split: str, step: int, row: int) -> int:
    """A generator seed for one sequence; distinct keys give unrelated 64-bit seeds."""
    h = 0
    for key in (seed, SPLITS.index(split), step, row):
        h = _splitmix64(h ^ (key & _MASK))
    return h


def row_uniforms(seed: int, split: str, step: int, rows, n: int) -> torch.Tensor:
    """(len(rows), n) uniforms in [0, 1), each row from its own generator. One generator per row costs a
    few microseconds; it is what lets a rank draw its rows without drawing anyone else's."""
    import torch

    rows = list(rows)
    u = torch.empty(len(rows), n)
    for i, r in enumerate(rows):
        torch.rand(n, generator=torch.Generator().manual_seed(row_seed(seed, split, step, r)), out=u[i])
    return u


def _flat_val(step: int, batch_size: int, rows, split: str) -> tuple[int, list[int]]:
    """Training rows are keyed (step, row). The held-out split is one flat stream of sequences, batch ``i``
    holding sequences i*B .. i*B+B-1, so an eval of K batches of B sequences reads the same K*B sequences
    whatever B is: runs with different batch sizes are scored on the same held-out set."""
    rows = range(batch_size) if rows is None else rows
    if split == "train":
        return step, rows
    return 0, [step * batch_size + r for r in rows]


class MarkovSource:
    """A random walk on a randomly labelled cycle of the vocabulary: a sparse first-order Markov chain.

    Hidden state y in Z_V; each step adds one of ``fanout`` distinct offsets o_k (drawn once per seed) with
    probabilities p ~ Dirichlet(``concentration``), and the token emitted is ``perm[y]`` for a random
    permutation, so each token has ``fanout`` successors scattered over the vocabulary. The transition
    matrix is doubly stochastic, so the stationary distribution is uniform; sequences start from it, and
    every predicted token has the same expected cross-entropy floor, the entropy rate
    H = sum_i pi_i H(P_i) = H(p) (Cover & Thomas, Theorem 4.2.4), in nats/token. A model that has learned
    the chain reaches it; none can go below it.

    Why this chain: the offsets are drawn independently of the state, so a whole sequence is one vectorised
    cumulative sum (no Python loop over positions), which keeps making a batch far below 1% of a step.

    The chain itself (offsets, labels, probabilities) comes from ``chain_seed``, not from the run's ``seed``:
    runs with different seeds learn the same task (the same floor) from different samples of it, so their
    losses can be averaged and tested against each other. The run's seed draws which sequences it sees.
    """

    def __init__(self, vocab_size: int, seed: int = 0, fanout: int = 4, concentration: float = 1.0,
                 chain_seed: int = 0):
        import torch
        from torch.distributions import Dirichlet

        V = vocab_size
        if not 1 <= fanout < V:
            raise ValueError(f"MarkovSource: fanout {fanout} must be between 1 and vocab_size - 1 = {V - 1}")
        g = torch.Generator().manual_seed(chain_seed)
        self.vocab_size, self.seed = V, seed
        self.offsets = torch.randperm(V - 1, generator=g)[:fanout] + 1  # distinct, so successors are distinct
        self.perm = torch.randperm(V, generator=g)
        with torch.random.fork_rng(devices=[]):  # torch.distributions draws from the global generator
            torch.manual_seed(chain_seed)
            self.probs = Dirichlet(torch.full((fanout,), concentration, dtype=torch.float64)).sample()
        self.cum = self.probs.cumsum(0).float()
        self.cum[-1] = 1.0
        self.entropy_rate = float(-(self.probs * self.probs.clamp_min(1e-300).log()).sum())  # nats/token

    def batch(self, step: int, batch_size: int, seq_len: int, rows=None,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rows`` (default: all) of the global batch of ``step``: inputs and next-token targets,
        each (len(rows), seq_len) int64."""
        import torch

        step, rows = _flat_val(step, batch_size, rows, split)
        u = row_uniforms(self.seed, split, step, rows, seq_len + 1)
        start = (u[:, 0] * self.vocab_size).long().clamp_max(self.vocab_size - 1)      # (B,) ~ stationary
        choice = torch.searchsorted(self.cum, u).clamp_max_(self.offsets.numel() - 1)  # column 0 unused
        walk = torch.cat([start[:, None], self.offsets[choice[:, 1:]]], dim=1).cumsum(1)  # (B, T+1)
        tokens = self.perm[walk.remainder_(self.vocab_size)]
        return tokens[:, :-1], tokens[:, 1:]

    def transition_logprob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log P(y | x) under the chain (-inf where y is not a successor of x); for tests and checks."""
        import torch

        inv = torch.argsort(self.perm)
        step = (inv[y] - inv[x]).remainder(self.vocab_size)
        p = torch.zeros(self.vocab_size, dtype=torch.float64).index_add_(0, self.offsets, self.probs)
        return p[step].log()

    def describe(self) -> str:
        return f"markov(vocab={self.vocab_size}, entropy={self.entropy_rate:.4f} nats/token)"


class _Windows:
    """Token windows at seeded random offsets of a split (``self.splits``: 1-D arrays or memmaps)."""

    entropy_rate = None  # unknown for real text
    splits: dict
    path: str
    seed: int

    def batch(self, step: int, batch_size: int, seq_len: int, rows=None,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        data = self.splits[split]
        n = data.shape[0] - seq_len - 1
        if n < 1:
            raise ValueError(f"--data: the {split} split of {self.path!r} has {data.shape[0]} tokens, fewer than "
                             f"--seq-len + 2 ({seq_len + 2}); use more text or a smaller --seq-len")
        step, rows = _flat_val(step, batch_size, rows, split)
        starts = (row_uniforms(self.seed, split, step, rows, 1)[:, 0] * n).long().numpy()
        tokens = torch.from_numpy(data[starts[:, None] + np.arange(seq_len + 1)].astype("int64"))
        return tokens[:, :-1], tokens[:, 1:]


class TextFileSource(_Windows):
    """Byte-level tokens (vocabulary 256) from a user's file. The last ``val_fraction`` of the file is the
    validation split, never drawn for training."""

    vocab_size = 256
    val_fraction = 0.1

    def __init__(self, path: str, seed: int = 0):
        if not os.path.isfile(path):
            raise ValueError(f"--data: no such file {path!r}; pass an existing text file or omit --data")
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        cut = data.shape[0] - int(data.shape[0] * self.val_fraction)
        self.splits = {"train": data[:cut], "val": data[cut:]}
        self.path, self.seed, self.size = path, seed, data.shape[0]

    def describe(self) -> str:
        return f"bytes({self.path}, {self.size} tokens, last {self.val_fraction:.0%} held out)"


class PreparedSource(_Windows):
    """Token windows from a prepared directory (``python -m llmopt.data prepare``): train.bin / val.bin read
    as memmaps, the held-out split from val.bin."""

    def __init__(self, path: str, seed: int = 0):
        self.meta = read_meta(path)
        self.path, self.seed, self.vocab_size = path, seed, self.meta["vocab_size"]
        self.splits = {s: np.memmap(os.path.join(path, f"{s}.bin"), dtype=self.meta["dtype"], mode="r")
                       for s in SPLITS}

    def describe(self) -> str:
        m = self.meta
        return f"{m['source']} ({m['tokenizer']}, vocab {m['vocab_size']}, {m['train_tokens']:,} train tokens)"


def read_meta(path: str) -> dict:
    """meta.json of a prepared directory, checked against its files: a truncated, mismatched or incomplete
    directory is one ValueError naming what is wrong."""
    import json

    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        vocab, dtype = int(meta["vocab_size"]), str(meta["dtype"])
        counts = {s: int(meta[f"{s}_tokens"]) for s in SPLITS}
    except FileNotFoundError:
        raise ValueError(f"--data {path}: no meta.json; prepare it with python -m llmopt.data prepare") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--data {path}: meta.json is malformed ({e}); prepare the directory again") from None
    if dtype not in ("uint8", "uint16", "uint32") or np.iinfo(dtype).max + 1 < vocab:
        raise ValueError(f"--data {path}: dtype {dtype!r} cannot hold a vocabulary of {vocab}; prepare it again")
    if vocab < 2:
        raise ValueError(f"--data {path}: a vocabulary of {vocab} (every token the same: a model's loss would be 0); "
                         f"prepare it again with a real tokenizer")
    tok_dir = meta.get("tokenizer_dir")
    if tok_dir is not None and (not isinstance(tok_dir, str) or os.path.isabs(tok_dir)
                                or os.path.normpath(tok_dir) != tok_dir or tok_dir.startswith("..")):
        raise ValueError(f"--data {path}: meta.json's tokenizer_dir {tok_dir!r} is not a directory inside it "
                         f"(--save copies it beside the model); prepare it again")
    for s in SPLITS:
        f = os.path.join(path, f"{s}.bin")
        if not os.path.isfile(f):
            raise ValueError(f"--data {path}: {s}.bin is missing; prepare the directory again")
        size = os.path.getsize(f)
        if size != counts[s] * np.dtype(dtype).itemsize:
            raise ValueError(f"--data {path}: {s}.bin holds {size} bytes, meta.json says {counts[s]} {dtype} "
                             f"tokens ({counts[s] * np.dtype(dtype).itemsize} bytes): truncated or mismatched; "
                             f"prepare it again")
    return meta


def check_tokens(path: str) -> dict:
    """read_meta, and the token files read once against it: the seal prepare wrote (``token_seal``) and every
    id below the vocabulary (a larger one would index past the embedding). One ValueError otherwise. Reads
    each file once (about a second a GB): run it once per run, before training. Returns the meta dict."""
    from llmopt.prepare import token_seal

    meta = read_meta(path)
    for s in SPLITS:
        f = os.path.join(path, f"{s}.bin")
        seal = (meta.get("seal") or {}).get(s)
        if seal is not None and token_seal(f, meta, s) != seal:
            raise ValueError(f"--data {path}: meta.json does not describe {s}.bin (its dtype, vocabulary or counts "
                             f"were edited, or the file comes from another preparation); prepare it again")
        ids = np.memmap(f, dtype=meta["dtype"], mode="r")
        top = int(ids.max()) if len(ids) else 0
        if top >= int(meta["vocab_size"]):
            raise ValueError(f"--data {path}: {s}.bin holds token id {top}, not below the vocabulary of "
                             f"{meta['vocab_size']} in meta.json: the two disagree; prepare the directory again")
    return meta


def is_prepared(data: str | None) -> bool:
    return data is not None and os.path.isfile(os.path.join(data, "meta.json"))


def build_source(data: str | None, vocab_size: int, seed: int, tokenizer: str = "bytes"):
    """The generated chain; a text file as bytes; else a prepared directory (raw text and built-in corpora
    are prepared once into the cache, see llmopt.prepare.ensure_prepared)."""
    if data is None:
        return MarkovSource(vocab_size, seed=seed)
    if os.path.isfile(data) and tokenizer == "bytes":
        return TextFileSource(data, seed=seed)
    from llmopt.prepare import ensure_prepared

    return PreparedSource(ensure_prepared(data, tokenizer), seed=seed)


def shard_rows(n: int, index: int, parts: int) -> range:
    """The ``index``-th of ``parts`` equal, consecutive slices of ``n`` rows (ranks, then micro-batches)."""
    size = n // parts
    return range(index * size, (index + 1) * size)


def shard(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Rows ``index``-th of ``parts`` equal slices of the batch dimension."""
    r = shard_rows(t.size(0), index, parts)
    return t[r.start : r.stop]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print("usage: python -m llmopt.data prepare INPUT --tokenizer T --out DIR\n\n"
              "prepare: tokenize a corpus once into train.bin / val.bin memmaps (python -m llmopt.data prepare -h)")
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] != "prepare":
        from llmopt.core import cli

        cli.exit(cli.error("python -m llmopt.data takes the command prepare: python -m llmopt.data prepare INPUT "
                           "--tokenizer T --out DIR (see python -m llmopt.data prepare --help)"))
    from llmopt.core import cli
    from llmopt.prepare import main

    cli.exit(main(sys.argv[2:]))
