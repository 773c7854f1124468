"""Statistics helpers against textbook values (Newcombe 1998; exact binomial sums by hand)."""
import math

import numpy as np
import pytest

from elastic_kernels.infer.stats import (accuracy_summary, compare_paired, intervals_overlap, mcnemar_exact,
                                         min_detectable_difference, paired_bootstrap, wilson_interval)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I, method 3
@pytest.mark.parametrize("k,n,lo,hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                       (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombe(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_closed_form_and_bounds():
    k, n, z = 37, 50, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(20, 20)[1] == pytest.approx(1.0)
    lo99, hi99 = wilson_interval(k, n, 0.99)
    assert lo99 < centre - half and hi99 > centre + half


@pytest.mark.parametrize("args", [(5, 0), (-1, 10), (11, 10), (True, 10), (1.5, 10)])
def test_wilson_rejects_bad_counts(args):
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(*args)


def test_accuracy_summary():
    s = accuracy_summary([1] * 81 + [0] * 182)
    assert s["accuracy"] == pytest.approx(81 / 263) and s["n"] == 263 and s["correct"] == 81
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    with pytest.raises(ValueError, match="0/1"):
        accuracy_summary([0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        accuracy_summary([])


def test_mcnemar_exact_by_hand():
    # 2 problems only a solves, 9 only b solves, 30 both, 5 neither
    a = [1] * 2 + [0] * 9 + [1] * 30 + [0] * 5
    b = [0] * 2 + [1] * 9 + [1] * 30 + [0] * 5
    m = mcnemar_exact(a, b)
    assert (m["a_only"], m["b_only"]) == (2, 9)
    assert m["p_value"] == pytest.approx(2 * (1 + 11 + 55) / 2 ** 11, rel=1e-12)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(m["p_value"], rel=1e-12)
    # 0 vs 6 discordant: p = 2 / 2**6
    assert mcnemar_exact([0] * 6 + [1] * 4, [1] * 6 + [1] * 4)["p_value"] == pytest.approx(2 / 64)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same problems"):
        mcnemar_exact([1, 0], [1, 0, 1])


def test_paired_bootstrap_interval_and_determinism():
    rng = np.random.default_rng(3)
    a = (rng.random(800) < 0.75).astype(int)
    b = a.copy()
    flip = rng.choice(800, 60, replace=False)
    b[flip[:48]] = 0
    b[flip[48:]] = 1
    r = paired_bootstrap(a, b, seed=1)
    d = a - b
    se = d.std(ddof=0) / math.sqrt(len(d))
    assert r["diff"] == pytest.approx(d.mean())
    # percentile interval ~ normal interval for n=800
    assert r["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.4 * se)
    assert r["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.4 * se)
    assert r == paired_bootstrap(a, b, seed=1)
    assert r["p_value"] < 0.05
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_compare_paired_keys_and_agreement():
    a = [1] * 40 + [0] * 60
    b = [0] * 10 + [1] * 30 + [0] * 60
    c = compare_paired(a, b)
    assert c["diff"] == pytest.approx(0.1) and (c["a_only"], c["b_only"]) == (10, 0)
    assert c["mcnemar_p"] == pytest.approx(2 / 2 ** 10)
    assert c["bootstrap_ci"][0] > 0 and c["bootstrap_p"] < 0.05


def test_min_detectable_difference_and_overlap():
    # unpaired at p = 0.5, n = 1067: the classic +-3 points survey margin (times sqrt 2 for a difference)
    assert min_detectable_difference(1067, 0.5) == pytest.approx(0.03 * math.sqrt(2), rel=2e-3)
    assert min_detectable_difference(1000, 0.8, discordant=0.09) == pytest.approx(1.959964 * 0.3 / math.sqrt(1000))
    x = {"ci_low": 0.1, "ci_high": 0.3}
    assert intervals_overlap(x, {"ci_low": 0.3, "ci_high": 0.5})
    assert not intervals_overlap(x, {"ci_low": 0.31, "ci_high": 0.5})


def test_closed_forms_and_bootstrap_equal_scipy():
    """The closed forms and the bootstrap give scipy.stats' numbers (which they replace to keep
    scipy.stats, about 0.8 s, out of every run's start-up)."""
    sps = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 1), (0, 20), (20, 20), (81, 263), (1, 29), (1000, 2048), (3, 7)]:
        for conf in (0.5, 0.9, 0.95, 0.99):
            ci = sps.binomtest(k, n).proportion_ci(conf, method="wilson")
            assert wilson_interval(k, n, conf) == pytest.approx((ci.low, ci.high), rel=1e-13, abs=1e-15)
    rng = np.random.default_rng(0)
    for n, p_a, p_b in [(1, 0.5, 0.5), (12, 0.3, 0.6), (200, 0.5, 0.5), (2048, 0.7, 0.68), (2048, 0.05, 0.3)]:
        a, b = (rng.random(n) < p_a).astype(int), (rng.random(n) < p_b).astype(int)
        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        want = sps.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert mcnemar_exact(a, b)["p_value"] == pytest.approx(want, rel=1e-12, abs=1e-300)
        d = (a - b).astype(float)
        if np.all(d == d[0]):
            continue
        for seed, conf in ((0, 0.95), (3, 0.9)):
            res = sps.bootstrap((d,), lambda v, axis=-1: v.mean(axis=axis), vectorized=True, method="percentile",
                                n_resamples=2000, confidence_level=conf, rng=np.random.default_rng(seed))
            got = paired_bootstrap(a, b, seed=seed, confidence=conf)
            assert (got["ci_low"], got["ci_high"]) == pytest.approx(
                (res.confidence_interval.low, res.confidence_interval.high), rel=1e-12, abs=1e-15)
            dist = res.bootstrap_distribution
            assert got["p_value"] == min(1.0, 2.0 * min(float((dist <= 0).mean()), float((dist >= 0).mean())))
    for conf in (0.9, 0.95, 0.99):
        z = float(sps.norm.ppf(0.5 + conf / 2))
        assert min_detectable_difference(500, 0.3, confidence=conf) == pytest.approx(
            z * math.sqrt(2 * 0.3 * 0.7 / 500), rel=1e-13)
