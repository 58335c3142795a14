"""Training data: a seeded synthetic source with a known entropy floor, or a user's text file.

Both sources produce the *global* batch of step ``s`` as a function of ``(seed, s)`` alone. Ranks and
micro-batches take slices of it (``shard``), so the tokens a step sees never depend on how the batch is
split: that is what makes every parallel layout comparable with the single-process step.
"""
from __future__ import annotations

import os

import torch

_STEP_STRIDE = 1_000_003  # a prime: (seed, step) -> a distinct generator seed


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _STEP_STRIDE + step)


class MarkovSource:
    """A random sparse first-order Markov chain over the vocabulary.

    Each token has ``fanout`` possible successors with Dirichlet(``concentration``) probabilities. Sequences
    start from the stationary distribution pi, so every predicted token has the same expected cross-entropy
    floor, the chain's entropy rate  H = sum_i pi_i * H(P_i)  (Cover & Thomas, Theorem 4.2.4), in nats/token.
    A model that has learned the chain reaches it; none can go below it.
    """

    def __init__(self, vocab_size: int, seed: int = 0, fanout: int = 4, concentration: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        V = vocab_size
        self.vocab_size = V
        self.seed = seed
        # successor 0 of token i is i+1 (mod V): every token is reachable, so the chain is irreducible.
        rand = torch.randint(0, V, (V, fanout - 1), generator=g)
        self.succ = torch.cat([(torch.arange(V) + 1).remainder(V)[:, None], rand], dim=1)  # (V, fanout)
        gamma = torch._standard_gamma(torch.full((V, fanout), concentration, dtype=torch.float64), generator=g)
        self.probs = gamma / gamma.sum(1, keepdim=True)                                      # (V, fanout)
        self.cum = self.probs.cumsum(1).float()
        self.cum[:, -1] = 1.0
        self.stationary = self._stationary()
        # Random successors can repeat within a row; the entropy is that of the merged distribution.
        p = self.probs
        same = self.succ[:, :, None] == self.succ[:, None, :]           # (V, fanout, fanout)
        merged = (same * p[:, None, :]).sum(-1)                           # prob of each entry's successor
        row_entropy = -(p * torch.log(merged)).sum(1)
        self.entropy_rate = float((self.stationary * row_entropy).sum())  # nats/token

    def _stationary(self, iters: int = 10_000, tol: float = 1e-13) -> torch.Tensor:
        V = self.vocab_size
        pi = torch.full((V,), 1.0 / V, dtype=torch.float64)
        src = self.succ.reshape(-1)
        for _ in range(iters):
            # lazy step (I + P)/2: same stationary distribution, and convergence even for a periodic chain
            flow = (pi[:, None] * self.probs).reshape(-1)
            new = 0.5 * pi + 0.5 * torch.zeros(V, dtype=torch.float64).index_add_(0, src, flow)
            if (new - pi).abs().sum() < tol:
                return new
            pi = new
        return pi

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step``: inputs and next-token targets, each (batch_size, seq_len) int64."""
        g = _generator(self.seed, step)
        u = torch.rand(seq_len, batch_size, 1, generator=g)
        cur = torch.multinomial(self.stationary.float(), batch_size, replacement=True, generator=g)
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = cur
        for t in range(seq_len):
            choice = torch.searchsorted(self.cum[cur], u[t]).squeeze(1)
            cur = self.succ[cur, choice.clamp_max(self.succ.size(1) - 1)]
            tokens[:, t + 1] = cur
        return tokens[:, :-1], tokens[:, 1:]

    def describe(self) -> str:
        return f"markov(vocab={self.vocab_size}, entropy={self.entropy_rate:.4f} nats/token)"


class TextFileSource:
    """Byte-level tokens (vocabulary 256) from a user's file; windows drawn at seeded random offsets."""

    vocab_size = 256
    entropy_rate = None  # unknown for real text

    def __init__(self, path: str, seed: int = 0):
        if not os.path.isfile(path):
            raise ValueError(f"--data: no such file {path!r}; pass an existing text file or omit --data")
        with open(path, "rb") as f:
            self.data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        self.path, self.seed = path, seed

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.data.numel() - seq_len - 1
        if n < 1:
            raise ValueError(f"--data: {self.path!r} has {self.data.numel()} bytes, fewer than --seq-len + 2 "
                             f"({seq_len + 2}); use a longer file or a smaller --seq-len")
        starts = torch.randint(0, n, (batch_size,), generator=_generator(self.seed, step))
        idx = starts[:, None] + torch.arange(seq_len + 1)
        tokens = self.data[idx].long()
        return tokens[:, :-1], tokens[:, 1:]

    def describe(self) -> str:
        return f"bytes({self.path}, {self.data.numel()} tokens)"


def build_source(data: str | None, vocab_size: int, seed: int):
    if data is None:
        return MarkovSource(vocab_size, seed=seed)
    return TextFileSource(data, seed=seed)


def shard(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Rows ``index``-th of ``parts`` equal slices of the batch dimension (ranks, then micro-batches)."""
    n = t.size(0) // parts
    return t[index * n : (index + 1) * n]

