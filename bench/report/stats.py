"""The statistics a convergence report's claims rest on, each small enough to check by hand.

* ``tokens_to_target``: tokens at which a run would reach a target loss, from losses measured at the end of
  completed schedules of several budgets (a ladder): log-linear interpolation between the two budgets that
  bracket the target; below the smallest budget or above the largest it is not guessed.
* ``paired``: Student's paired t-test on per-seed differences, for runs that share their seeds (a seed draws the
  same initial weights and data whatever the optimizer, so what a seed makes easy or hard cancels).
* ``welch``: Welch's unequal-variance t-test (Welch 1947), for runs without common seeds. Both are scipy's
  (``scipy.stats.ttest_rel``, ``ttest_ind(equal_var=False)``), two-sided, with the cases scipy leaves undefined
  (no variance at all) decided here; scipy is imported when a test is made, so a sweep's report without a
  convergence section does not need it.
* ``paired_speedup``: a speed-up as the geometric mean of per-seed ratios with its 95% confidence interval (t on
  the log ratios): the interval a paired test's verdict rests on, not an unpaired spread of a ratio of means.
* ``holm``: Holm's step-down adjustment of the p-values of the tests behind one verdict (Holm 1979).
* ``lead_tests``: a verdict's tests: the optimizer with the fewest tokens to target against every other, on log
  tokens, paired by seed, Holm-adjusted (the report words them; the sweep adds seeds where they are close).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

REACHED = "interpolated"        # between two budgets of the ladder
AT_FIRST = "by the smallest budget"  # already at or below the target at the smallest budget: an upper bound
AFTER_DIVERGED = "after a diverged budget"  # reached at a budget whose smaller neighbour diverged: an upper bound
NOT_REACHED = "not reached"     # above the target at every budget (or diverged)


class Crossing(NamedTuple):
    tokens: float | None        # None when not reached
    status: str                 # REACHED, AT_FIRST or NOT_REACHED


def tokens_to_target(budgets: list[float], losses: list[float], target: float) -> Crossing:
    """Where the end-of-budget loss crosses ``target``: between consecutive budgets B_i < B_j with
    L_i > target >= L_j, log B = log B_i + (L_i - target) / (L_i - L_j) (log B_j - log B_i). The first such pair
    of budgets counts. At or below the target already at the smallest budget: that budget, marked AT_FIRST (an
    upper bound, not an estimate). Above it at every budget: NOT_REACHED.

    A budget whose run diverged has a loss of None (or NaN): it did not reach the target there, and nothing is
    interpolated across or from it (a diverged run has no end-of-budget loss). When the first budget at or below
    the target follows a diverged one, the crossing is that budget, marked AFTER_DIVERGED: an upper bound that
    charges the optimizer the whole budget (the issue 34 review found two diverged budgets interpolated over,
    which read Adafactor's tokens 2.3x too few)."""
    pts = sorted((b, None if loss is None or math.isnan(loss) else loss) for b, loss in zip(budgets, losses))
    if not pts:
        return Crossing(None, NOT_REACHED)
    if pts[0][1] is not None and pts[0][1] <= target:
        return Crossing(pts[0][0], AT_FIRST)
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if l1 is None or l1 > target:
            continue
        if l0 is None:
            return Crossing(b1, AFTER_DIVERGED)
        if l0 > target:
            frac = (l0 - target) / (l0 - l1)
            return Crossing(math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))), REACHED)
    return Crossing(None, NOT_REACHED)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is 0 for a single value."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its confidence interval (Student's t, n - 1 degrees of freedom; NaN
    bounds for a single value)."""
    m, sd = mean_std(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    from scipy.stats import t as student_t

    half = float(student_t.ppf((1 + level) / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return m, m - half, m + half


@dataclass(frozen=True)
class TTest:
    t: float                    # (mean a - mean b) / standard error
    df: float                   # degrees of freedom (Welch-Satterthwaite's, or pairs - 1)
    p: float                    # two-sided
    kind: str = "Welch"         # "Welch" or "paired"


def paired(a: list[float], b: list[float]) -> TTest:
    """Student's paired t-test of mean(a - b) != 0 over pairs (a_i, b_i): t = mean(d) / (sd(d) / sqrt(n)),
    n - 1 degrees of freedom. With no variance in the differences the test is undefined unless their mean is
    not 0 (then p = 0) or is (p = 1)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired t-test needs at least two pairs")
    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(d)
    if sd == 0:
        return TTest(math.copysign(math.inf, m) if m else 0.0, len(d) - 1, 0.0 if m else 1.0, "paired")
    from scipy.stats import ttest_rel

    r = ttest_rel(a, b)
    return TTest(float(r.statistic), float(r.df), float(r.pvalue), "paired")


def welch(a: list[float], b: list[float]) -> TTest:
    """Welch's t-test of mean(a) != mean(b). Needs two values in each sample; with no variance at all the
    test is undefined unless the means differ (then p = 0) or not (p = 1)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values in each sample")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa == 0 and sb == 0:
        return TTest(math.copysign(math.inf, ma - mb) if ma != mb else 0.0, math.inf, 0.0 if ma != mb else 1.0)
    from scipy.stats import ttest_ind

    r = ttest_ind(a, b, equal_var=False)
    return TTest(float(r.statistic), float(r.df), float(r.pvalue))


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (scipy's; infinite df: the normal)."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    return float(2 * (norm.sf(abs(t)) if math.isinf(df) else student_t.sf(abs(t), df)))


class Speedup(NamedTuple):
    ratio: float                # the geometric mean of the per-seed ratios
    low: float                  # its confidence interval (NaN with a single seed)
    high: float
    seeds: int


def paired_speedup(base: dict, other: dict, level: float = 0.95) -> Speedup | None:
    """How many times fewer tokens ``other`` needed than ``base`` (seed -> tokens each), over the seeds both
    have: exp(mean of log(base_s / other_s)), and the interval exp(mean ± t_{(1+level)/2, n-1} sd / sqrt(n)) on
    those logs. A ratio is averaged on the log scale (2x and 0.5x cancel) and the interval is the one the
    paired test's verdict rests on: what a seed makes hard for every optimizer cancels. None without a common
    seed."""
    common = sorted(set(base) & set(other))
    if not common:
        return None
    logs = [math.log(base[s] / other[s]) for s in common]
    m, sd = mean_std(logs)
    if len(logs) < 2:
        return Speedup(math.exp(m), math.nan, math.nan, 1)
    from scipy.stats import t as student_t

    half = float(student_t.ppf((1 + level) / 2, len(logs) - 1)) * sd / math.sqrt(len(logs))
    return Speedup(math.exp(m), math.exp(m - half), math.exp(m + half), len(logs))


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest (from 0) times (m - i), each
    at least the one before it, at most 1. A test passes at level a where its adjusted p < a; the family-wise
    error stays at most a over the m tests (Holm 1979), which uncorrected p-values do not."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def geomean(tokens: dict) -> float:
    return math.exp(sum(math.log(t) for t in tokens.values()) / len(tokens))


def compare_tokens(a: dict, b: dict) -> TTest:
    """Tokens to target of two finalists (seed -> tokens) on the log scale (a speed-up is a ratio): paired
    over the seeds both have (a seed draws the same initial weights, training sequences and held-out sample for
    every optimizer, so a seed that is hard for one is hard for all: on real text seed 1's losses were the
    highest for 11 of 12 finalists), else Welch's."""
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        return paired([math.log(a[s]) for s in common], [math.log(b[s]) for s in common])
    return welch([math.log(t) for t in a.values()], [math.log(t) for t in b.values()])


def lead_tests(tokens: dict) -> tuple[str, list[tuple[str, TTest]], list[float]]:
    """(the lead, [(another, the test of the lead against it)], those tests' Holm-adjusted p-values) over
    ``tokens`` (name -> seed -> tokens to target): the lead needs the fewest tokens, geometric mean over seeds."""
    lead = min(tokens, key=lambda n: geomean(tokens[n]))
    tests = [(n, compare_tokens(tokens[lead], t)) for n, t in tokens.items() if n != lead]
    return lead, tests, holm([w.p for _, w in tests])
