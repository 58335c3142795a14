"""The statistics a convergence report's claims rest on, each small enough to check by hand.

* ``tokens_to_target``: tokens at which a run would reach a target loss, from losses measured at the end of
  completed schedules of several budgets (a ladder): log-linear interpolation between the two budgets that
  bracket the target; below the smallest budget or above the largest it is not guessed.
* ``paired``: Student's paired t-test on per-seed differences, for runs that share their seeds (a seed draws the
  same initial weights and data whatever the optimizer, so what a seed makes easy or hard cancels).
* ``welch``: Welch's unequal-variance t-test (Welch 1947), for runs without common seeds; the two-sided p-value
  of both from Student's t
  distribution (its CDF through the regularized incomplete beta function, evaluated by Lentz's continued
  fraction as in Press et al., "Numerical Recipes", 6.4), so that no dependency beyond the standard library
  is needed.
* ``ratio``: a ratio of two means and its standard deviation by first-order error propagation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

REACHED = "interpolated"        # between two budgets of the ladder
AT_FIRST = "by the smallest budget"  # already at or below the target at the smallest budget: an upper bound
NOT_REACHED = "not reached"     # above the target at every budget


class Crossing(NamedTuple):
    tokens: float | None        # None when not reached
    status: str                 # REACHED, AT_FIRST or NOT_REACHED


def tokens_to_target(budgets: list[float], losses: list[float], target: float) -> Crossing:
    """Where the end-of-budget loss crosses ``target``: between consecutive budgets B_i < B_j with
    L_i > target >= L_j, log B = log B_i + (L_i - target) / (L_i - L_j) (log B_j - log B_i). The first such pair
    of budgets counts. At or below the target already at the smallest budget: that budget, marked AT_FIRST (an
    upper bound, not an estimate). Above it at every budget: NOT_REACHED."""
    pts = sorted(zip(budgets, losses))
    if not pts:
        return Crossing(None, NOT_REACHED)
    if pts[0][1] <= target:
        return Crossing(pts[0][0], AT_FIRST)
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if l0 > target >= l1:
            frac = (l0 - target) / (l0 - l1)
            return Crossing(math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))), REACHED)
    return Crossing(None, NOT_REACHED)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is 0 for a single value."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


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
    t = m / (sd / math.sqrt(len(d)))
    return TTest(t, len(d) - 1, student_t_two_sided(t, len(d) - 1), "paired")


def welch(a: list[float], b: list[float]) -> TTest:
    """Welch's t-test of mean(a) != mean(b). Needs two values in each sample; with no variance at all the
    test is undefined unless the means differ (then p = 0) or not (p = 1)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values in each sample")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    if va + vb == 0:
        return TTest(math.copysign(math.inf, ma - mb) if ma != mb else 0.0, math.inf, 0.0 if ma != mb else 1.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    return TTest(t, df, student_t_two_sided(t, df))


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if math.isinf(df):  # the normal limit
        return math.erfc(abs(t) / math.sqrt(2))
    return betainc(df / 2, 0.5, df / (df + t * t))


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Numerical Recipes' betai)."""
    if not 0 <= x <= 1:
        raise ValueError(f"betainc: x = {x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float, eps: float = 1e-15, tiny: float = 1e-300) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method."""
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(mean a / mean b, its standard deviation) from (mean, std) pairs, to first order:
    sd(r) = r sqrt((sd_a / a)^2 + (sd_b / b)^2)."""
    (ma, sa), (mb, sb) = a, b
    r = ma / mb
    return r, abs(r) * math.sqrt((sa / ma) ** 2 + (sb / mb) ** 2)
