import math

import numpy as np
import pytest
from scipy import stats

from clx_core import metrics

R = np.array([[0.9, 0.1, 0.2], [0.6, 0.95, 0.3], [0.5, 0.7, 0.99]])


def test_average_bwt_forgetting_fwt():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.99) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.95)) / 2)
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.95 - 0.7)) / 2)
    assert metrics.forward_transfer(R, [0.1, 0.1, 0.1]) == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    np.testing.assert_allclose(metrics.seen_average(R), [0.9, (0.6 + 0.95) / 2, (0.5 + 0.7 + 0.99) / 3])


def test_metrics_over_seeds():
    stack = np.stack([R, R * 0.5])
    np.testing.assert_allclose(
        metrics.average_accuracy(stack), [metrics.average_accuracy(R), metrics.average_accuracy(R * 0.5)]
    )
    with pytest.raises(ValueError, match="shape"):
        metrics.average_accuracy(np.zeros((2, 3)))


def test_summary_matches_scipy():
    v = np.array([0.91, 0.93, 0.92, 0.95, 0.90])
    s = metrics.summarize(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert s.mean == pytest.approx(v.mean()) and s.sem == pytest.approx(stats.sem(v))
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))
    assert math.isnan(metrics.summarize([0.5]).sem)
    assert "±" in s.fmt(100)


def test_band_and_paired_test():
    curves = np.array([[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]])
    mean, lo, hi = metrics.band(curves)
    np.testing.assert_allclose(mean, [2.0, 3.0])
    assert (lo < mean).all() and (hi > mean).all()
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    t = metrics.paired_test(a + 1.0, a)
    assert t["mean_diff"] == pytest.approx(1.0) and math.isnan(t["p_t"])  # constant difference: undefined
    b = a + 0.5 + rng.normal(scale=0.1, size=30)
    t = metrics.paired_test(b, a)
    assert t["p_t"] < 1e-6 and t["cohen_dz"] > 1


def test_holm_adjustment():
    adj = metrics.holm([0.01, 0.04, 0.03, float("nan")])
    np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])
    assert math.isnan(adj[3])
