"""The latency statistics on synthetic timings: median, spread, pairing, speedups, bound."""
import math

import numpy as np
import pytest

from sparse_runtime.measure.stats import (bandwidth_bound, interleaved_order, median, paired_speedups, speedup,
                                        summarize)


def test_median_and_quartiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6, 11):
        xs = rng.uniform(1, 10, n).tolist()
        s = summarize(xs)
        assert s.n == n
        assert s.median == pytest.approx(np.median(xs))
        assert s.q1 == pytest.approx(np.quantile(xs, 0.25))
        assert s.q3 == pytest.approx(np.quantile(xs, 0.75))
        assert (s.min, s.max) == (min(xs), max(xs))
        assert s.iqr == pytest.approx(s.q3 - s.q1)


def test_median_is_robust_to_one_outlier():
    assert median([10, 11, 12, 13, 1000]) == 12
    with pytest.raises(ValueError):
        summarize([])


def test_interleaved_order_rotates_and_covers_every_model_each_round():
    order = interleaved_order(["dense", "s50", "s70"], 5)
    assert len(order) == 5
    assert all(sorted(r) == ["dense", "s50", "s70"] for r in order)
    assert [r[0] for r in order] == ["dense", "s50", "s70", "dense", "s50"]


def test_pairwise_speedups_pair_rounds_not_sorted_values():
    dense = [10.0, 20.0, 10.0, 20.0, 10.0]  # the machine got slow in rounds 1 and 3
    sparse = [5.0, 10.0, 5.0, 10.0, 5.0]    # and the sparse model with it: a steady 2x
    assert paired_speedups(dense, sparse) == [2.0] * 5
    sp = speedup(dense, sparse)
    assert sp.speedup == pytest.approx(10.0 / 5.0)
    assert (sp.paired_median, sp.paired_q1, sp.paired_q3) == (2.0, 2.0, 2.0)
    assert sp.verdict == "faster"
    with pytest.raises(ValueError):
        paired_speedups([1.0, 2.0], [1.0])


def test_verdicts():
    base = [10.0, 10.2, 9.8, 10.1, 9.9]
    assert speedup(base, [b * 1.01 for b in base]).verdict == "no speedup"
    assert speedup(base, [b / 1.5 for b in base]).verdict == "faster"
    assert speedup(base, [b * 1.5 for b in base]).verdict == "slower"
    noisy = speedup(base, [5.0, 20.0, 5.0, 20.0, 10.0])  # ratios 2, .51, 1.96, .51, .99
    assert noisy.verdict == "no speedup"


def test_bandwidth_bound_matches_protocols_md():
    # docs/protocols.md: fp32 values + 1-bit bitmask at 70 %: 4 / (0.3*4 + 0.125) = 3.0x on the pruned matrices
    n = 1000 * 1000
    b = bandwidth_bound([(n, int(0.3 * n))])
    assert b["pruned_layers"] == pytest.approx(4 / (0.3 * 4 + 0.125))
    assert b["model"] == pytest.approx(b["pruned_layers"])
    # a dense lm_head as large as the pruned weights pulls the whole-model bound down
    b2 = bandwidth_bound([(n, int(0.3 * n))], dense_extra=n)
    assert b2["model"] == pytest.approx(8 / (0.3 * 4 + 0.125 + 4))
    # a dense matrix is never "encoded" larger than dense: bound 1.0
    assert bandwidth_bound([(n, n)])["pruned_layers"] == pytest.approx(1.0)
    assert math.isnan(bandwidth_bound([])["pruned_layers"])
