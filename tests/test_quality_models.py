"""The detection-quality models (clip-stats, frame-knn, idnn) on small real recordings.

Real MIMII clips (one normal and one abnormal recording per machine, 8 channels) are cut
into 1 s crops, each channel a recording: crops of the normal clip's first half train,
crops of its second half and of the abnormal clip test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from stethoscope.errors import DataError, ModelFileError
from stethoscope.features import FeatureConfig, extract_features
from stethoscope.models import build, info, names
from stethoscope.models.clip_stats import (
    fit_gaussian,
    ledoit_wolf_covariance,
    ledoit_wolf_shrinkage,
    mahalanobis,
    out_of_sample_distances,
    shrunk,
    time_quantiles,
)
from stethoscope.scoring import check_pooling_rule, pool_scores
from stethoscope.training import TrainConfig, fit

QUALITY_MODELS = ("clip-stats", "frame-knn", "idnn")
CROP = 31  # frames: about 1 s at hop 512


def crops(spec: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Non-overlapping crops ``(K*C, 1, M, CROP)`` of a clip ``(C, M, F)``, frames lo..hi."""
    parts = [spec[:, :, s:s + CROP] for s in range(lo, hi - CROP + 1, CROP)]
    return np.concatenate(parts)[:, None].astype(np.float32)


@pytest.fixture(scope="module")
def mimii_crops(request) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """machine → (train crops, held-out normal crops, abnormal crops), 64-mel log-mel."""
    from tests.conftest import shared_path

    folder = shared_path("mimii_8ch")
    config = FeatureConfig(channels="all")
    out = {}
    for machine in ("pump", "valve"):
        specs = extract_features([folder / f"{machine}_normal.wav",
                                  folder / f"{machine}_abnormal.wav"], config, progress=False)
        normal, abnormal = np.asarray(specs[0]), np.asarray(specs[1])
        half = normal.shape[-1] // 2
        out[machine] = (crops(normal, 0, half), crops(normal, half, normal.shape[-1]),
                        crops(abnormal, 0, abnormal.shape[-1]))
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are small, and the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fitted(name: str, train: np.ndarray, **hparams):
    """Build ``name`` for ``train`` and fit its statistics (idnn keeps its initial weights:
    its training is tested on its own below)."""
    torch.manual_seed(0)
    model = build(name, train.shape[1:], **hparams)
    if model.trainable:
        model.before_training(train)
        return model.eval()
    return model.fit(train)


def scores(model, specs: np.ndarray, pooling: str | None = None) -> np.ndarray:
    rule = pooling or info(model_name(model)).scoring.get("pooling", "mean")
    with torch.no_grad():
        return np.asarray(model.clip_scores(torch.from_numpy(specs),
                                            lambda maps: pool_scores(maps, rule)))


def model_name(model) -> str:
    return {"ClipStatsGaussian": "clip-stats", "FrameKNN": "frame-knn",
            "IDNN": "idnn"}[type(model).__name__]


def test_frame_models_are_registered_with_a_valid_pooling_rule_and_clip_models_with_none():
    for name in QUALITY_MODELS:
        assert name in names()
        model = fitted(name, np.random.default_rng(0).normal(size=(6, 1, 8, 20)).astype("f4"))
        if model.frame_level:
            check_pooling_rule(info(name).scoring["pooling"])
        else:
            assert "pooling" not in info(name).scoring


@pytest.mark.parametrize("name", QUALITY_MODELS)
def test_error_map_shapes(name, mimii_crops):
    train, held_out, _ = mimii_crops["pump"]
    model = fitted(name, train)
    maps = model.error_maps(torch.from_numpy(held_out[:3]))
    expected = {"clip-stats": (3, 64, CROP), "frame-knn": (3, 64, CROP - 4),
                "idnn": (3, 64, CROP - 4)}[name]
    assert tuple(maps.shape) == expected
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("name", QUALITY_MODELS)
def test_state_dict_and_hparams_rebuild_the_same_model(name, mimii_crops):
    train, held_out, _ = mimii_crops["valve"]
    model = fitted(name, train, **({"max_bank": 500} if name == "frame-knn" else {}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = build(name, train.shape[1:], **model.hparams)
    rebuilt.load_state_dict(state)
    if rebuilt.trainable:
        rebuilt.eval()
    np.testing.assert_allclose(scores(rebuilt, held_out), scores(model, held_out), rtol=1e-5)


@pytest.mark.parametrize("machine", ["pump", "valve"])
@pytest.mark.parametrize("name", ["clip-stats", "frame-knn"])
def test_abnormal_recording_scores_higher_than_held_out_normal(name, machine, mimii_crops):
    train, held_out, abnormal = mimii_crops[machine]
    model = fitted(name, train)
    normal_scores, abnormal_scores = scores(model, held_out), scores(model, abnormal)
    assert np.median(abnormal_scores) > np.percentile(normal_scores, 90)


def test_frame_knn_leave_one_out_scores_exceed_in_sample_scores(mimii_crops):
    train, _, _ = mimii_crops["pump"]
    model = fitted("frame-knn", train)
    in_sample = scores(model, train)
    assert np.allclose(in_sample, 0.0, atol=1e-4)  # every window finds itself in the bank
    out_of_sample, _ = model.held_out_scores(train, lambda m: pool_scores(m, "topk:0.1"))
    assert out_of_sample.shape == (len(train),)
    assert (out_of_sample > in_sample + 1e-3).all()


def test_clip_stats_normal_scores_are_out_of_sample(mimii_crops):
    train, _, _ = mimii_crops["valve"]
    model = fitted("clip-stats", train)
    in_sample = scores(model, train)
    held_out, source = model.held_out_scores(train)
    assert "leave-one-clip-out" in source
    assert held_out.mean() > in_sample.mean() + 0.5
    # by construction the out-of-sample z-scores of each expert average 0
    assert abs(model._held_out.mean(axis=0)).max() < 1e-9


def test_clip_stats_scores_take_the_worst_expert_or_their_mean(mimii_crops):
    train, held_out, _ = mimii_crops["pump"]
    model = fitted("clip-stats", train)
    experts = model.expert_scores(torch.from_numpy(held_out))
    assert experts.shape == (len(held_out), 2)
    np.testing.assert_allclose(model.clip_scores(torch.from_numpy(held_out)),
                               experts.max(axis=1), rtol=1e-12)
    mean = fitted("clip-stats", train, combine="mean")
    np.testing.assert_allclose(mean.clip_scores(torch.from_numpy(held_out)),
                               experts.mean(axis=1), rtol=1e-9)


def test_frame_knn_bank_is_capped_and_its_size_comes_from_the_saved_tensor(mimii_crops):
    train, _, _ = mimii_crops["pump"]
    model = fitted("frame-knn", train, max_bank=100)
    assert model.bank.shape[0] == 100 and "bank_size" not in model.hparams
    assert set(model.bank_clip.tolist()) <= set(range(len(train)))
    rebuilt = build("frame-knn", train.shape[1:], **model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.bank, model.bank)
    too_big = build("frame-knn", train.shape[1:], max_bank=50)
    with pytest.raises(ModelFileError, match="bank"):
        too_big.load_state_dict(model.state_dict())


def test_idnn_predicts_the_centre_frame_from_its_neighbours(mimii_crops):
    train, _, _ = mimii_crops["pump"]
    model = build("idnn", train.shape[1:])
    model.before_training(train)
    inputs, targets = model.make_examples(torch.from_numpy(train[:2]))
    windows = 2 * (CROP - 4)
    assert tuple(inputs.shape) == (windows, 4 * 64) and tuple(targets.shape) == (windows, 64)
    history = fit(model, torch.from_numpy(train), config=TrainConfig(
        epochs=3, batch_size=8, patience=None, progress=False),
        batch_transform=lambda batch: model.make_examples(batch[0]))
    assert history["loss"][-1] < history["loss"][0]


def test_ledoit_wolf_matches_scikit_learn():
    rows = np.random.default_rng(0).normal(size=(30, 12)) @ np.diag(np.arange(1, 13))
    centred = rows - rows.mean(0)
    expected, _ = ledoit_wolf(rows)
    np.testing.assert_allclose(ledoit_wolf_covariance(centred), expected, rtol=1e-7)


def test_closed_form_leave_one_out_equals_refitting_without_each_row():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(25, 8)) @ rng.normal(size=(8, 8)) + 3.0
    _, shrinkage, mu = ledoit_wolf_shrinkage(rows - rows.mean(0))
    refitted = []
    for i in range(len(rows)):
        rest = np.delete(rows, i, 0)
        mean = rest.mean(0)
        cov = (rest - mean).T @ (rest - mean) / len(rest)
        precision = np.linalg.inv(shrunk(cov, 1 - shrinkage, shrinkage * mu))
        refitted.append(mahalanobis(rows[i:i + 1], mean, precision)[0])
    np.testing.assert_allclose(out_of_sample_distances(rows), refitted, rtol=1e-8)
    mean, precision = fit_gaussian(rows)
    assert out_of_sample_distances(rows).mean() > mahalanobis(rows, mean, precision).mean()


@pytest.mark.parametrize("name", QUALITY_MODELS)
def test_spectrograms_of_the_wrong_shape_are_refused(name, mimii_crops):
    train, _, _ = mimii_crops["pump"]
    with pytest.raises(DataError):
        build(name, (1, 64))
    model = fitted(name, train) if name != "idnn" else build(name, train.shape[1:])
    with pytest.raises(DataError):
        model.error_maps(torch.zeros(1, 1, 32, CROP))


def test_clip_stats_normal_scores_survive_a_rebuild_and_leave_the_model_unchanged(mimii_crops):
    train, held_out, _ = mimii_crops["pump"]
    model = fitted("clip-stats", train)
    expected, _ = model.held_out_scores(train)
    rebuilt = build("clip-stats", train.shape[1:], **model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    np.testing.assert_allclose(rebuilt.held_out_scores(train)[0], expected, rtol=1e-9)
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("name", ["clip-stats", "frame-knn"])
def test_detector_threshold_uses_out_of_sample_normal_scores(name, dcase_valve, tmp_path):
    from stethoscope.datasets import find_clips
    from stethoscope.detector import Detector

    clips = find_clips(dcase_valve / "train")
    train = clips[:12] + clips[-12:]  # both domains
    detector = Detector(name, progress=False).fit(train)
    specs = detector.features_of(train).specs
    in_sample = detector.score_features(specs)
    assert detector.train_scores_.mean() > in_sample.mean()
    detector.save(tmp_path / "model")
    loaded = Detector.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.score_features(specs), in_sample, rtol=1e-5)
    assert loaded.threshold_.value_ == pytest.approx(detector.threshold_.value_)


def test_clip_stats_takes_multichannel_spectrograms_of_any_length():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(12, 3, 16, 40)).astype(np.float32)
    model = fitted("clip-stats", train)
    shorter = rng.normal(size=(2, 3, 16, 25)).astype(np.float32)
    maps = model.expert_scores(torch.from_numpy(shorter))
    assert tuple(maps.shape) == (2, 2) and np.isfinite(maps).all()
    assert model.spectrum_mean.shape == (2 * 3 * 16,)


def test_time_quantiles_match_numpy():
    values = np.random.default_rng(2).normal(size=(3, 2, 5, 101)).astype(np.float32)
    levels = (0.5, 0.9, 0.99, 1.0)
    expected = np.quantile(values.astype(np.float64), levels, axis=-1)
    for got, want in zip(time_quantiles(values, levels), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_rhythm_statistics_see_timing_not_phase():
    import torch

    from stethoscope.errors import DataError
    from stethoscope.models import build
    from stethoscope.models.clip_stats import rhythm_stats

    def clicks(period: int, offset: int) -> torch.Tensor:
        spec = torch.full((1, 1, 8, 400), -60.0)
        spec[..., offset::period] = -10.0
        return spec

    same_period = rhythm_stats(clicks(40, 0).numpy()) - rhythm_stats(clicks(40, 17).numpy())
    other_period = rhythm_stats(clicks(40, 0).numpy()) - rhythm_stats(clicks(55, 0).numpy())
    assert np.abs(same_period).max() < 0.1 < np.abs(other_period).max()
    model = build("clip-stats-rhythm", (1, 8, 400))
    with pytest.raises(DataError, match="too short"):
        model.error_maps(torch.zeros(1, 1, 8, 100))


def test_statistics_in_chunks_equal_the_whole_batch_and_numpy(monkeypatch):
    import stethoscope.models.clip_stats as clip_stats

    specs = np.random.default_rng(4).normal(-50, 8, size=(11, 2, 6, 50)).astype(np.float32)
    model = build("clip-stats-rhythm", (2, 6, 50))
    monkeypatch.setattr(clip_stats, "CHUNK", 4)  # 11 clips: chunks of 4, 4 and 3
    chunked = model.statistics(specs)
    for name, rows in chunked.items():
        assert rows.shape == (11, clip_stats.expert_dim(name, 2, 6, 50))
        np.testing.assert_allclose(rows, clip_stats.STATS[name](specs), rtol=1e-12)
    wide = specs.astype(np.float64)
    want = np.concatenate([wide.mean(-1).reshape(11, -1), wide.std(-1).reshape(11, -1)], 1)
    np.testing.assert_allclose(chunked["spectrum"], want, rtol=1e-10)
