"""Statistics of exact-match accuracies on one shared set of test problems.

Every accuracy the reports print comes with a 95% Wilson score interval; two models evaluated on
the *same* problems are compared with paired tests, which use that the problems are shared:

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion (no continuity
  correction; Newcombe 1998, method 3).
- :func:`mcnemar_exact`: McNemar's exact test. Only discordant problems (one model right, the
  other wrong) carry information; under "both models are equally accurate" each discordant
  problem is a fair coin, so the two-sided p-value is the binomial test of ``b`` successes in
  ``b + c`` trials at ``1/2``.
- :func:`paired_bootstrap`: a percentile bootstrap interval of the accuracy difference, resampling
  problems (both models' outcomes of a problem stay together).

The interval and the test are closed forms: Wilson's formula with the normal quantile of
:class:`statistics.NormalDist`, and the binomial tail summed exactly over integers (``math.comb``).
The bootstrap is the one of ``scipy.stats.bootstrap(method="percentile")``, drawn the same way
(``numpy.random.Generator.integers``, linear quantiles), so it gives scipy's numbers for the same
seed (``python_tests/test_stats.py`` checks both against scipy) without importing
:mod:`scipy.stats`, which costs about 0.8 s of every run's start-up.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["wilson_interval", "accuracy_summary", "mcnemar_exact", "paired_bootstrap", "compare_paired",
           "min_detectable_difference", "intervals_overlap"]


def _check_level(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _z(confidence: float) -> float:
    """The two-sided normal quantile ``Phi^-1((1 + confidence) / 2)`` (1.959964 at 0.95)."""
    return NormalDist().inv_cdf(0.5 + 0.5 * confidence)


def _outcomes(x: Sequence, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-d sequence of per-problem outcomes, got shape {a.shape}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or bool) outcomes, got values {sorted(set(a.tolist()))[:5]}")
    return a.astype(np.float64)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of ``successes`` out of ``n``.

    Newcombe (1998) table I: 81/263 -> (0.2553, 0.3662); 0/20 -> (0, 0.1611).
    """
    _check_level(confidence)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"wilson_interval: n must be an int >= 1, got {n!r}")
    if isinstance(successes, bool) or not isinstance(successes, (int, np.integer)) or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be an int in [0, n={n}], got {successes!r}")
    k, n = int(successes), int(n)
    z, p = _z(confidence), k / n
    denom = 2 * (n + z * z)
    centre = (2 * n * p + z * z) / denom
    half = z / denom * math.sqrt(4 * n * p * (1 - p) + z * z)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def accuracy_summary(correct: Sequence, confidence: float = 0.95) -> dict:
    """``{"accuracy", "n", "correct", "ci_low", "ci_high"}`` of per-problem 0/1 outcomes."""
    a = _outcomes(correct, "accuracy_summary: correct")
    if a.size == 0:
        raise ValueError("accuracy_summary: correct must not be empty")
    k = int(a.sum())
    lo, hi = wilson_interval(k, int(a.size), confidence)
    return {"accuracy": k / a.size, "n": int(a.size), "correct": k, "ci_low": lo, "ci_high": hi}


def _pair(a: Sequence, b: Sequence, fn: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _outcomes(a, f"{fn}: a"), _outcomes(b, f"{fn}: b")
    if x.shape != y.shape:
        raise ValueError(f"{fn}: a and b must be outcomes on the same problems, got {x.size} and {y.size} entries")
    if x.size == 0:
        raise ValueError(f"{fn}: a and b must not be empty")
    return x, y


def mcnemar_exact(a: Sequence, b: Sequence) -> dict:
    """McNemar's exact two-sided test of two models' 0/1 outcomes on the same problems.

    Returns ``{"a_only": b, "b_only": c, "p_value"}`` where ``b`` counts problems only ``a`` got
    right and ``c`` those only ``b`` got right; ``p_value`` is 1 without discordant problems.
    Example: 2 against 9 discordant problems gives ``p = 2 * (1 + 11 + 55) / 2**11 = 0.0654``.
    """
    x, y = _pair(a, b, "mcnemar_exact")
    only_a = int(((x == 1) & (y == 0)).sum())
    only_b = int(((x == 0) & (y == 1)).sum())
    n = only_a + only_b
    k = min(only_a, only_b)
    # two-sided at 1/2: both tails as far out as k, i.e. 2 P(X <= k), in exact integers
    p = 1.0 if 2 * k == n else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": only_a, "b_only": only_b, "p_value": p}


def paired_bootstrap(a: Sequence, b: Sequence, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Percentile bootstrap of ``mean(a) - mean(b)`` over problems (paired resampling).

    Returns ``{"diff", "ci_low", "ci_high", "p_value"}``; ``p_value`` is the two-sided bootstrap
    p-value ``min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` of the resampled differences ``d``.
    Deterministic for a given ``seed``: ``n_resamples`` resamples of the problems drawn by
    ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``, the interval their linear
    quantiles at ``(1 -/+ confidence) / 2``, as ``scipy.stats.bootstrap(..., method="percentile")``.
    """
    _check_level(confidence)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"paired_bootstrap: n_resamples must be an int >= 100, got {n_resamples!r}")
    x, y = _pair(a, b, "paired_bootstrap")
    diff = float(x.mean() - y.mean())
    d = x - y
    if np.all(d == d[0]):  # no variation: every resample gives the same difference
        return {"diff": diff, "ci_low": diff, "ci_high": diff, "p_value": 1.0 if diff == 0 else 0.0}
    dist = d[np.random.default_rng(seed).integers(0, d.size, (n_resamples, d.size))].mean(axis=-1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha])
    p = min(1.0, 2.0 * min(float((dist <= 0).mean()), float((dist >= 0).mean())))
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_value": p}


def compare_paired(a: Sequence, b: Sequence, *, seed: int = 0, confidence: float = 0.95) -> dict:
    """Both paired tests of ``a`` against ``b``: ``{"diff", "mcnemar_p", "a_only", "b_only",
    "bootstrap_ci": [low, high], "bootstrap_p"}``."""
    m = mcnemar_exact(a, b)
    bs = paired_bootstrap(a, b, seed=seed, confidence=confidence)
    return {"diff": bs["diff"], "mcnemar_p": m["p_value"], "a_only": m["a_only"], "b_only": m["b_only"],
            "bootstrap_ci": [bs["ci_low"], bs["ci_high"]], "bootstrap_p": bs["p_value"]}


def min_detectable_difference(n: int, accuracy: float, *, discordant: float | None = None,
                              confidence: float = 0.95) -> float:
    """The smallest accuracy difference a two-sided test at ``confidence`` resolves on ``n`` problems.

    Unpaired (``discordant`` None): ``z * sqrt(2 p (1 - p) / n)``. Paired (McNemar, normal
    approximation): ``z * sqrt(discordant / n)`` where ``discordant`` is the expected share of
    problems on which the two models disagree. Used to size the test split.
    """
    _check_level(confidence)
    if n < 1 or not 0 <= accuracy <= 1:
        raise ValueError(f"min_detectable_difference: need n >= 1 and accuracy in [0, 1], got {n}, {accuracy}")
    z = _z(confidence)
    if discordant is None:
        return z * math.sqrt(2 * accuracy * (1 - accuracy) / n)
    if not 0 <= discordant <= 1:
        raise ValueError(f"min_detectable_difference: discordant must be in [0, 1], got {discordant}")
    return z * math.sqrt(discordant / n)


def intervals_overlap(a: dict, b: dict) -> bool:
    """Whether two :func:`accuracy_summary` intervals overlap."""
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]
