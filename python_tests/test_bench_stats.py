"""The statistics bench/cpu_peers.py prints beside its ratios: the median interval of the
per-round ratios, per-token scaling of interleaved timings, and the fixed share of a width sweep."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import cpu_peers  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 9, 10, 15, 21, 40])
def test_median_interval_is_the_widest_order_statistic_pair_that_reaches_the_coverage(n):
    stats = pytest.importorskip("scipy.stats")
    values = [float(v) for v in range(n, 0, -1)]  # unsorted input
    lo, hi, cov = common.median_interval(values)
    k = int(lo)  # values are 1..n, so x_(k) = k
    assert hi == n + 1 - k and lo <= hi
    assert cov == pytest.approx(1 - 2 * stats.binom.cdf(k - 1, n, 0.5))
    if n >= 6:
        assert cov >= 0.95
        if k + 1 <= (n + 1) // 2:  # one rank further in would fall below 95 %
            assert 1 - 2 * stats.binom.cdf(k, n, 0.5) < 0.95
    else:
        assert (lo, hi) == (1.0, float(n))


def test_median_interval_rejects_no_values():
    with pytest.raises(ValueError, match="no values"):
        common.median_interval([])


def test_timings_keep_rounds_and_scale_them():
    t = common.Timings({"a": [3.0, 1.0, 2.0], "b": [4.0, 8.0, 6.0]})
    assert dict(t) == {"a": 2.0, "b": 6.0} and t.rounds["a"] == [3.0, 1.0, 2.0]
    s = t.scaled({"a": 0.5, "b": 0.25})
    assert dict(s) == {"a": 1.0, "b": 1.5} and s.rounds["b"] == [1.0, 2.0, 1.5]


def test_add_reports_the_ratio_of_medians_and_the_paired_interval(capsys):
    rounds = {"ours": [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 1.05], "peer": [1.0, 1.0, 1.0, 1.1, 1.0, 0.95, 1.0]}
    out = []
    cpu_peers._add(out, "row", common.Timings(rounds), "ours", "peer", target=1.0)
    row = out[0]
    assert row["ratio"] == pytest.approx(1.0 / 1.0)
    per_round = sorted(a / b for a, b in zip(rounds["ours"], rounds["peer"]))
    assert row["ratio_interval"] == [per_round[0], per_round[-1]]  # 7 rounds: (min, max), 98.4 %
    assert row["interval_coverage"] == pytest.approx(1 - 2 / 2 ** 7)
    assert "within the noise" in capsys.readouterr().out


def test_fixed_fraction_is_the_intercept_of_the_width_line():
    # time(w) = 0.2 + 0.8 w of full: 20 % of the full-width time does not scale with the width
    m = {str(w): 10.0 * (0.2 + 0.8 * w) for w in (*cpu_peers.WIDTHS, 1.0)}
    assert cpu_peers._fixed_fraction(m) == pytest.approx(0.2)


def test_results_table_states_each_row_as_measured():
    results = {"date": "2026-12-02 01:00:00.0", "reps": 9, "loadavg_1min": {"start": 0.5, "end": 0.7},
               "env": {"cpu": {"model": "Some CPU", "cpus": 2, "flags": ["avx2"]}},
               "results": [
                   dict(name="a", ratio=0.5, target=0.8, ratio_interval=[0.4, 0.6], interval_coverage=0.96),
                   dict(name="b", ratio=1.02, target=1.0, ratio_interval=[0.9, 1.1], interval_coverage=0.96),
                   dict(name="c", ratio=1.3, target=1.0, ratio_interval=[1.2, 1.4], interval_coverage=0.96,
                        floor=0.34, fixed=0.23),
                   dict(name="d", ratio=0.7, target=None),
                   dict(name="e", skipped="torchao is not installed")]}
    lines = cpu_peers.table(results).splitlines()
    assert lines[0].startswith("Run: 2026-12-02 01:00, Some CPU, 2 CPUs, flags avx2; 9 interleaved rounds")
    rows = {line.split(" | ")[0][2:]: line for line in lines[4:]}
    assert rows["a"] == "| a | 0.50 | [0.40, 0.60] (96%) | <= 0.80 | holds |  |"
    assert rows["b"] == "| b | 1.02 | [0.90, 1.10] (96%) | <= 1.00 | misses (within the noise) |  |"
    assert rows["c"].endswith("| misses | floor 0.34 / fixed 0.23 |")
    assert rows["d"] == "| d | 0.70 |  |  |  |  |"
    assert "skipped: torchao is not installed" in rows["e"]
