import math

import pytest
import torch

from llmopt.data import MarkovSource, TextFileSource, shard


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


def test_entropy_rate_is_the_true_floor():
    """The mean -log p(next | current) under the source's own transition law, over many sampled tokens,
    matches the analytically computed entropy rate."""
    src = MarkovSource(300, seed=0)
    x, y = src.batch(0, 256, 128)
    logp = torch.full((300, 300), 0.0, dtype=torch.float64)
    for j in range(src.succ.size(1)):  # merge repeated successors
        logp.index_put_((torch.arange(300), src.succ[:, j]), src.probs[:, j], accumulate=True)
    empirical = -torch.log(logp[x, y]).mean().item()
    assert 0 < src.entropy_rate < math.log(300)
    assert abs(empirical - src.entropy_rate) < 0.02


def test_text_file_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello world, " * 50)
    x, y = TextFileSource(str(p), seed=1).batch(0, 4, 16)
    assert x.shape == (4, 16) and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="--data"):
        TextFileSource(str(tmp_path / "missing.txt"))
