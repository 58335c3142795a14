import math

import pytest
import torch

from llmopt.data import MarkovSource, TextFileSource, shard, shard_rows


def test_global_batch_depends_only_on_seed_and_step():
    a = MarkovSource(200, seed=3).batch(5, 8, 16)
    b = MarkovSource(200, seed=3).batch(5, 8, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], MarkovSource(200, seed=3).batch(6, 8, 16)[0])
    # targets are the inputs shifted by one
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])
    # slicing the global batch for ranks/micro-batches loses and repeats nothing
    parts = torch.cat([shard(a[0], i, 4) for i in range(4)])
    assert torch.equal(parts, a[0])


@pytest.mark.parametrize("make", [lambda p: MarkovSource(200, seed=3), lambda p: TextFileSource(p, seed=3)])
def test_a_rank_builds_exactly_its_rows(tmp_path, make):
    """Asking for rows 2..5 gives rows 2..5 of the global batch: a rank never builds the others."""
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 20)
    src = make(str(path))
    x, y = src.batch(7, 8, 16)
    rows = shard_rows(8, 1, 2)
    xs, ys = src.batch(7, 8, 16, rows=range(2, 6))
    assert torch.equal(xs, x[2:6]) and torch.equal(ys, y[2:6])
    assert list(rows) == [4, 5, 6, 7]


def test_seeds_sample_one_task():
    """Runs of different seeds learn the same chain (same floor, same transitions) from different sequences:
    once the chain was drawn from the run's seed, the convergence matrices' seeds had floors 0.4 nats apart
    and their losses could not be averaged."""
    a, b = MarkovSource(200, seed=0), MarkovSource(200, seed=5)
    assert a.entropy_rate == b.entropy_rate and torch.equal(a.perm, b.perm) and torch.equal(a.offsets, b.offsets)
    xa, ya = a.batch(0, 8, 16)
    xb, yb = b.batch(0, 8, 16)
    assert not torch.equal(xa, xb)
    assert torch.isfinite(a.transition_logprob(xb, yb)).all()  # seed 5's transitions are seed 0's chain's
    assert MarkovSource(200, chain_seed=1).entropy_rate != a.entropy_rate


def test_held_out_split_is_disjoint_and_independent_of_batch_size():
    src = MarkovSource(200, seed=0)
    train = src.batch(0, 8, 32)[0]
    val = src.batch(0, 8, 32, split="val")[0]
    assert not any(torch.equal(t, v) for t in train for v in val)
    # eval batch i of size B holds held-out sequences i*B .. i*B+B-1, whatever B is
    flat8 = torch.cat([src.batch(i, 8, 32, split="val")[0] for i in range(2)])
    flat4 = torch.cat([src.batch(i, 4, 32, split="val")[0] for i in range(4)])
    assert torch.equal(flat8, flat4)


def test_entropy_rate_is_the_true_floor():
    """The empirical conditional entropy of next token given current, counted from many sampled tokens
    (no use of the source's parameters), matches the analytically computed entropy rate; the unigram
    distribution is the uniform stationary one."""
    V = 64
    src = MarkovSource(V, seed=0)
    x, y = src.batch(0, 512, 256)
    counts = torch.zeros(V, V, dtype=torch.float64).index_put_((x.flatten(), y.flatten()),
                                                               torch.ones(x.numel(), dtype=torch.float64),
                                                               accumulate=True)
    p_next = counts / counts.sum(1, keepdim=True)
    p_cur = counts.sum(1) / counts.sum()
    h = -(p_cur[:, None] * torch.where(counts > 0, p_next * p_next.log(), torch.zeros(()))).sum().item()
    assert 0 < src.entropy_rate < math.log(V)
    assert abs(h - src.entropy_rate) < 0.01
    assert (p_cur - 1 / V).abs().max() < 0.2 / V
    assert int((counts > 0).sum(1).max()) == src.offsets.numel()  # each token has exactly `fanout` successors
    # and the source's own log-probability agrees with the counts
    assert abs(-src.transition_logprob(x, y).mean().item() - src.entropy_rate) < 0.01


def test_text_file_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello world, " * 50)
    x, y = TextFileSource(str(p), seed=1).batch(0, 4, 16)
    assert x.shape == (4, 16) and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="--data"):
        TextFileSource(str(tmp_path / "missing.txt"))


def test_text_file_validation_split_is_the_tail(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"a" * 900 + b"b" * 100)
    src = TextFileSource(str(p), seed=0)
    assert set(src.batch(0, 8, 16)[0].unique().tolist()) == {ord("a")}
    assert set(src.batch(0, 8, 16, split="val")[0].unique().tolist()) == {ord("b")}
