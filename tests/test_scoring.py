"""Pooling rules on error maps with known answers; threshold rules against numpy/scipy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from stethoscope.errors import DataError
from stethoscope.scoring import Threshold, parse_threshold, pool_scores

MELS, FRAMES = 8, 100


@pytest.fixture
def spike_maps() -> np.ndarray:
    """Clip 0: constant error 1. Clip 1: the same plus one frame with error 101."""
    maps = np.ones((2, MELS, FRAMES), dtype=np.float32)
    maps[1, :, 37] = 101.0
    return maps


def test_mean_is_mean_of_all_cells() -> None:
    maps = np.random.default_rng(0).random((5, MELS, FRAMES))
    np.testing.assert_allclose(pool_scores(maps, "mean"), maps.reshape(5, -1).mean(axis=1))


def test_single_spike_frame_raises_max_and_topk_but_barely_the_mean(spike_maps) -> None:
    mean = pool_scores(spike_maps, "mean")
    peak = pool_scores(spike_maps, "max")
    top = pool_scores(spike_maps, "topk:0.1")
    assert mean[1] == pytest.approx(1 + 100 / FRAMES)  # the spike is diluted 100×
    assert peak[1] == pytest.approx(101.0)
    assert top[1] == pytest.approx((101 + 9 * 1) / 10)  # top 10 of 100 frames
    assert peak[0] == top[0] == mean[0] == pytest.approx(1.0)
    assert peak[1] / peak[0] > 50 * (mean[1] / mean[0])


def test_median_ignores_spike_and_percentiles_follow_numpy(spike_maps) -> None:
    assert pool_scores(spike_maps, "median") == pytest.approx([1.0, 1.0])
    frames = spike_maps.mean(axis=1)
    for q in (50, 95, 99.5):
        np.testing.assert_allclose(pool_scores(spike_maps, f"p{q:g}"),
                                   np.percentile(frames, q, axis=1))


def test_frame_error_is_mean_over_mels() -> None:
    maps = np.zeros((1, 4, 3))
    maps[0, 0, 1] = 8.0  # one loud band in frame 1 → frame error 8 / 4 mels
    assert pool_scores(maps, "max")[0] == pytest.approx(2.0)


def test_topk_keeps_at_least_one_frame() -> None:
    maps = np.arange(10, dtype=float).reshape(1, 1, 10)
    assert pool_scores(maps, "topk:0.01")[0] == pytest.approx(9.0)
    assert pool_scores(maps, "topk:1")[0] == pytest.approx(4.5)


def test_torch_input_gives_numpy(spike_maps) -> None:
    out = pool_scores(torch.from_numpy(spike_maps).requires_grad_(), "max")
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    assert out[1] == pytest.approx(101.0)


@pytest.mark.parametrize("rule", ["sum", "topk:0", "topk:2", "topk:x", "p101", "pxx", ""])
def test_bad_pooling_rule_lists_valid_rules(spike_maps, rule) -> None:
    with pytest.raises(ValueError, match="valid rules.*mean.*max.*topk"):
        pool_scores(spike_maps, rule)


def test_error_map_must_be_3d() -> None:
    with pytest.raises(DataError, match="shape"):
        pool_scores(np.ones((3, 4)), "mean")


# ---- thresholds -----------------------------------------------------------------------


@pytest.fixture
def normal_scores() -> np.ndarray:
    return np.random.default_rng(1).gamma(3.0, 2.0, size=60) + 5.0


def test_meanstd_threshold(normal_scores) -> None:
    t = Threshold("meanstd", k=2.0).fit(normal_scores)
    assert t.value_ == pytest.approx(normal_scores.mean() + 2 * normal_scores.std())
    assert t.stats_["n"] == 60
    assert t.stats_["min"] == normal_scores.min() and t.stats_["max"] == normal_scores.max()
    assert t.describe() == f"mean + 2·std of 60 normal training scores = {t.value_:.4g}"


def test_percentile_threshold(normal_scores) -> None:
    t = Threshold("percentile", q=99.5).fit(normal_scores)
    assert t.value_ == pytest.approx(np.percentile(normal_scores, 99.5))
    assert Threshold("percentile").quantile == 95 and Threshold("percentile").q is None


def test_gamma_threshold_matches_dcase_baseline(normal_scores) -> None:
    t = Threshold("gamma").fit(normal_scores)
    shape, loc, scale = scipy.stats.gamma.fit(normal_scores)
    assert t.quantile == 0.9 and t.q is None  # q=None: the rule's default, kept for clone
    assert t.value_ == pytest.approx(scipy.stats.gamma.ppf(0.9, shape, loc=loc, scale=scale))
    assert t.stats_["gamma_shape"] == pytest.approx(shape)


def test_fixed_threshold_needs_no_fit() -> None:
    t = Threshold("fixed", value=3.0)
    np.testing.assert_array_equal(t.predict([2.9, 3.0, 3.1]), [0, 0, 1])


def test_predict_is_strictly_greater(normal_scores) -> None:
    t = Threshold("meanstd").fit(normal_scores)
    v = t.value_
    pred = t.predict([v - 1e-9, v, v + 1e-9])
    assert pred.dtype.kind == "i"
    np.testing.assert_array_equal(pred, [0, 0, 1])


def test_predict_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        Threshold().predict([1.0])


@pytest.mark.parametrize("bad", [[1.0], [], [1.0, np.nan, 2.0], [1.0, np.inf]])
def test_fit_rejects_too_few_or_nan_scores(bad) -> None:
    with pytest.raises(DataError):
        Threshold().fit(np.array(bad))


def test_to_dict_round_trips_through_json(normal_scores) -> None:
    t = Threshold("gamma", q=0.95).fit(normal_scores)
    back = Threshold.from_dict(json.loads(json.dumps(t.to_dict())))
    assert (back.rule, back.q, back.value_) == ("gamma", 0.95, t.value_)
    assert back.stats_ == t.stats_
    np.testing.assert_array_equal(back.predict(normal_scores), t.predict(normal_scores))


@pytest.mark.parametrize("spec, rule, attr, expected", [
    ("mean+2std", "meanstd", "k", 2.0),
    ("mean+3std", "meanstd", "k", 3.0),
    ("mean + 2.5std", "meanstd", "k", 2.5),
    ("p95", "percentile", "q", 95.0),
    ("p99.5", "percentile", "q", 99.5),
    ("gamma", "gamma", "quantile", 0.9),
    ("fpr:0.01", "fpr", "q", 0.01),
    ("gamma:0.95", "gamma", "q", 0.95),
    ("value:12.5", "fixed", "value", 12.5),
])
def test_parse_threshold(spec, rule, attr, expected) -> None:
    t = parse_threshold(spec)
    assert t.rule == rule and getattr(t, attr) == expected
    assert parse_threshold(t.spec()).to_dict() == t.to_dict()


@pytest.mark.parametrize("spec", ["mean", "p", "p101", "gamma:1.5", "value:abc", "2std", "x"])
def test_parse_threshold_rejects_garbage(spec) -> None:
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(spec)
