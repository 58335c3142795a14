"""Figures in the committed references that must hold on any machine: MFU in (0, 1]."""
import pandas as pd
import pytest

from conftest import REFERENCE_DIR, REFERENCES


@pytest.mark.parametrize("reference", REFERENCES)
def test_mfu_is_a_fraction_of_a_true_peak(reference):
    """MFU recomputed from each ok row's own figures (tokens/s x FLOPs per token over the peak it states):
    above 100% would mean the peak is not an upper bound for the step, as the square-matmul-only peak was
    for fp16 on a CPU without native fp16 kernels."""
    rows = pd.read_csv(REFERENCE_DIR / reference / "results.csv")
    rows = rows[rows.status == "ok"]
    assert len(rows) and rows.peak_flops.notna().all(), "every ok row states the peak its MFU is taken against"
    mfu = rows.tokens_per_s * rows.flops_per_token / rows.peak_flops
    bad = rows.config_id[~((mfu > 0) & (mfu <= 1))]
    assert bad.empty, f"MFU outside (0, 1]: {list(bad)}"
    assert (abs(mfu - rows.mfu) <= 1e-6 * mfu).all(), "the mfu column agrees with its own inputs"
