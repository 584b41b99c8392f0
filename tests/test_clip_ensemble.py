"""clip-ensemble: the feature-agnostic clip Gaussian ensemble, and the Gumbel threshold."""

from __future__ import annotations

import numpy as np
import pytest

from stethoscope import Detector
from stethoscope.metrics import auc_pauc
from stethoscope.models import build
from stethoscope.models.clip_ensemble import chooses_log
from stethoscope.scoring import Threshold, gumbel_threshold, parse_threshold


def test_the_transform_is_chosen_from_the_training_data():
    rng = np.random.default_rng(0)
    linear = np.exp(rng.normal(0, 1, size=(30, 1, 6, 8)))  # log-normal magnitudes
    assert chooses_log(linear)[0]
    assert not chooses_log(np.log(linear) * 10 - 60)[0]  # dB-like: negative values, kept


def test_a_short_last_axis_is_feature_positions_and_a_long_one_is_time():
    cells = build("clip-ensemble", (1, 60, 8)).fit(
        np.random.default_rng(1).gamma(2.0, size=(40, 1, 60, 8)))
    frames = build("clip-ensemble", (1, 16, 64)).fit(
        np.random.default_rng(2).normal(-40, 5, size=(40, 1, 16, 64)))
    assert list(cells.members) == ["gauss_cells"]
    assert list(frames.members) == ["gauss_spectrum", "gauss_peaks"]
    many = build("clip-ensemble", (1, 6, 8)).fit(
        np.random.default_rng(3).gamma(2.0, size=(120, 1, 6, 8)))
    assert list(many.members) == ["gauss_cells", "gmm_cells"]  # the mixture from 100 clips


def test_held_out_scores_are_out_of_sample():
    specs = np.random.default_rng(4).normal(-40, 5, size=(30, 1, 16, 64))
    model = build("clip-ensemble", (1, 16, 64)).fit(specs)
    held_out, _ = model.held_out_scores(specs)
    in_sample = model.clip_scores(specs)
    assert held_out.mean() > in_sample.mean()


@pytest.mark.parametrize("machine", ["fan4", "pump6", "ToyCar1"])
def test_real_modulation_spectra_beat_the_old_default_and_match_the_baseline(machine):
    from tests.conftest import shared_path

    folder = shared_path("dcase2020_modspec")
    [train] = folder.glob(f"{machine}_X_train_*.npy")
    X = np.load(train)
    X_test = np.load(str(train).replace("_X_train_", "_X_test_"))
    y = np.load(str(train).replace("_X_train_", "_y_test_"))
    new, _ = auc_pauc(y, Detector("clip-ensemble").fit(X).score_samples(X_test))
    old, _ = auc_pauc(y, Detector("clip-stats").fit(X).score_samples(X_test))
    assert new > old + 0.05
    from sklearn.covariance import LedoitWolf

    rows = np.log(np.maximum(X, X[X > 0].min())).reshape(len(X), -1)
    baseline = LedoitWolf().fit(rows)
    test_rows = np.log(np.maximum(X_test, X[X > 0].min())).reshape(len(X_test), -1)
    base, _ = auc_pauc(y, baseline.mahalanobis(test_rows))
    assert new >= base - 0.01


def test_gumbel_threshold_is_a_moment_fit_cut_at_the_false_alarm_rate():
    scores = np.random.default_rng(5).gumbel(2.0, 0.5, size=20000)
    value = gumbel_threshold(scores, 0.03)
    assert np.mean(scores > value) == pytest.approx(0.03, abs=0.005)
    rule = parse_threshold("gumbel:0.05")
    assert rule.rule == "gumbel" and rule.spec() == "gumbel:0.05"
    assert Threshold.from_dict(rule.fit(scores).to_dict()).value_ == pytest.approx(
        gumbel_threshold(scores, 0.05))
    with pytest.raises(ValueError):
        Threshold("gumbel", q=1.5)


def test_the_quantile_map_gaussianises_and_keeps_far_values_far():
    from scipy.stats import skew

    from stethoscope.models.clip_ensemble import fit_quantile_map, quantile_map

    rng = np.random.default_rng(6)
    rows = np.c_[rng.lognormal(0, 1, 500), rng.uniform(-1, 1, 500), np.full(500, 3.0)]
    m = fit_quantile_map(rows)
    mapped = quantile_map(rows, m)
    assert skew(rows[:, 0]) > 3 and abs(skew(mapped[:, 0])) < 0.5  # the log-normal
    assert np.corrcoef(np.sort(mapped[:, 1]), np.sort(rng.standard_normal(500)))[0, 1] > 0.99
    assert np.all(np.diff(quantile_map(np.sort(rows, 0), m)[:, :2], axis=0) >= 0)  # monotone
    assert np.all(mapped[:, 2] == 0)  # constant in training: no information
    far = quantile_map(np.array([[rows[:, 0].max() * 10, 50.0, 3.0]]), m)[0]
    assert far[0] > mapped[:, 0].max() + 1 and far[1] > 20  # beyond the range: not clipped


def test_the_mixture_averages_several_starts_and_old_files_still_load():
    from stethoscope.models.clip_ensemble import MIXTURE_STARTS

    X = np.random.default_rng(7).gamma(2.0, size=(150, 1, 6, 8))
    model = build("clip-ensemble", (1, 6, 8)).fit(X)
    mixture = model.members["gmm_cells"]
    assert len(mixture["log_weights"]) == MIXTURE_STARTS * 3  # k = 150 // 50 per start
    assert np.exp(mixture["log_weights"]).sum() == pytest.approx(1.0)
    state = {k: v for k, v in model.state_dict().items() if ".qt_" not in k}  # before the map
    old = build("clip-ensemble", (1, 6, 8))
    old.load_state_dict(state)
    assert "qt_x" not in old.members["gmm_cells"]
    assert np.isfinite(old.clip_scores(X[:5])).all()
