"""Detector: fit / score_samples / predict / save / load on real valve recordings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stethoscope import Detector
from stethoscope.datasets import find_clips
from stethoscope.errors import DataError, ModelFileError
from stethoscope.evaluation import decode, encode, evaluate_detector


@pytest.fixture(scope="module")
def valve_clips():
    from tests.conftest import shared_path

    root = shared_path("dcase2023_valve")
    train = find_clips(root / "train")[:12]
    test = find_clips(root / "test")
    # a small, labelled test set: 6 normal and 6 anomalous clips
    test = [c for c in test if c.label == 0][:6] + [c for c in test if c.label == 1][:6]
    return train, test


@pytest.fixture(scope="module")
def fitted(valve_clips):
    train, _ = valve_clips
    return Detector("seed-conv-ae", epochs=2, seed=0, progress=False).fit(train)


def test_fit_sets_learned_attributes(fitted):
    assert fitted.input_shape_ == (1, 64, 312)
    assert fitted.train_scores_.shape == (12,)
    assert fitted.threshold_.value_ == pytest.approx(
        fitted.train_scores_.mean() + 2 * fitted.train_scores_.std())
    assert fitted.history_.epochs == 2


def test_scores_and_predictions(fitted, valve_clips):
    _, test = valve_clips
    scores = fitted.score_samples(test)
    flags = fitted.predict(test)
    assert scores.shape == (12,) and np.isfinite(scores).all()
    assert np.array_equal(flags, (scores > fitted.threshold_.value_).astype(int))
    assert np.allclose(fitted.decision_function(test), scores - fitted.threshold_.value_)


def test_scoring_runs_in_eval_mode_even_after_train_mode_was_set(fitted, valve_clips):
    _, test = valve_clips
    before = fitted.score_samples(test[:3])  # places the model once
    fitted.model_.train()  # seed-conv-ae has dropout: train mode would change the scores
    try:
        assert np.array_equal(fitted.score_samples(test[:3]), before)
    finally:
        fitted.model_.eval()


def test_save_load_gives_identical_scores(fitted, valve_clips, tmp_path):
    _, test = valve_clips
    fitted.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model"] == "seed-conv-ae" and config["features"]["n_mels"] == 64
    again = Detector.load(tmp_path / "model")
    assert np.array_equal(again.score_samples(test[:3]), fitted.score_samples(test[:3]))
    assert again.threshold_.value_ == fitted.threshold_.value_


def test_same_seed_twice_gives_identical_scores(valve_clips):
    train, test = valve_clips
    a = Detector("dcase-ae", epochs=1, seed=5, progress=False).fit(train[:6])
    b = Detector("dcase-ae", epochs=1, seed=5, progress=False).fit(train[:6])
    assert np.array_equal(a.score_samples(test[:4]), b.score_samples(test[:4]))


def test_bf16_scores_stay_within_tolerance_of_fp32(fitted, valve_clips):
    """The benchmarks' fastest variant (bf16 autocast) must not change what is flagged."""
    from scipy.stats import spearmanr

    from stethoscope.compute import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    train, test = valve_clips
    clips = train + test
    fp32 = fitted.score_samples(clips)
    fitted.precision = "bf16"
    try:
        bf16 = fitted.score_samples(clips)
    finally:
        fitted.precision = "fp32"
    assert np.abs(bf16 - fp32).max() <= 0.03 * np.abs(fp32).max()
    assert spearmanr(bf16, fp32).statistic > 0.95


def test_arrays_in_and_shape_mismatch(fitted):
    rng = np.random.default_rng(0)
    specs = rng.normal(-40, 5, size=(3, 64, 313)).astype(np.float32)  # cropped to 312
    assert fitted.score_samples(specs).shape == (3,)
    with pytest.raises(DataError, match="do not match the model's input"):
        fitted.score_samples(rng.normal(size=(2, 1, 128, 312)).astype(np.float32))
    with pytest.raises(DataError, match="NaN"):
        fitted.score_samples(np.full((2, 64, 312), np.nan, dtype=np.float32))


def test_training_on_anomalies_is_refused(valve_clips):
    _, test = valve_clips
    with pytest.raises(DataError, match="anomalous clips"):
        Detector("seed-conv-ae", epochs=1, progress=False).fit(test)


def test_unfitted_detector_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        Detector().score_samples(np.zeros((1, 64, 312), np.float32))


def test_model_file_from_another_version(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "format_version": 0}))
    with pytest.raises(ModelFileError, match="format version 0"):
        Detector.load(tmp_path / "m")


def test_evaluate_writes_report(fitted, valve_clips, tmp_path):
    _, test = valve_clips
    result = evaluate_detector(fitted, test, report_dir=tmp_path / "report")
    overall = result["metrics"]["overall"]
    assert overall["tp"] + overall["fn"] == 6 and overall["fp"] + overall["tn"] == 6
    assert 0.0 <= overall["auc"] <= 1.0
    for name in ("index.html", "metrics.json", "scores.csv", "figures/roc.png",
                 "figures/error_maps.png", "figures/score_histogram.png"):
        assert (tmp_path / "report" / name).is_file(), name


def test_encoder_and_decoder_apart(fitted, valve_clips, tmp_path):
    _, test = valve_clips
    codes = encode(fitted, test[:2], tmp_path / "codes.npy")
    assert codes.shape == (2, 4, 8, 39)
    outputs = decode(fitted, tmp_path / "codes.npy", tmp_path / "out.npy")
    assert outputs.shape[-2:] == (64, 312)
    with pytest.raises(DataError, match="do not fit the decoder"):
        decode(fitted, np.zeros((1, 3, 3), np.float32))


def test_default_model_and_out_of_sample_threshold(valve_clips, tmp_path):
    train, test = valve_clips
    det = Detector(progress=False).fit(train)
    assert det.model == "clip-ensemble" and "leave-one-out" in det.threshold_source_
    assert det.threshold_.rule == "gumbel" and det.threshold_.q == 0.03  # the model's own rule
    assert Detector(threshold="mean+2std", progress=False).fit(train).threshold_.rule == "meanstd"
    assert Detector("clip-stats", progress=False).fit(train).threshold_.rule == "meanstd"
    in_sample = det.score_samples(train)
    # leave-one-out scores of the training clips are higher than their in-sample scores
    assert det.train_scores_.mean() > in_sample.mean()
    with pytest.raises(DataError, match="not an autoencoder"):
        encode(det, test[:1])
    report = evaluate_detector(det, test, report_dir=tmp_path / "r")
    assert report["metrics"]["overall"]["auc"] is not None
    assert (tmp_path / "r" / "figures" / "error_maps.png").stat().st_size > 10_000


def test_trained_model_threshold_uses_validation_clips(dcase_valve):
    clips = find_clips(dcase_valve / "train")[:20]
    det = Detector("dcase-ae", epochs=1, val_fraction=0.5, progress=False).fit(clips)
    assert det.threshold_source_ == "scores of the 10 held-out validation clips"
    assert det.train_scores_.shape == (10,)
    small = Detector("dcase-ae", epochs=1, progress=False).fit(clips[:8])
    assert "in-sample" in small.threshold_source_ and small.train_scores_.shape == (8,)


def test_large_corpora_train_from_a_memory_mapped_scratch_cache(valve_clips, monkeypatch):
    import stethoscope.detector as detector_module

    train, _ = valve_clips
    monkeypatch.setattr(detector_module, "LARGE_CORPUS_CLIPS", 5)
    seen = {}
    original = Detector._fit_corpus

    def spy(self, corpus, config, info):
        seen["memmap"] = isinstance(corpus.specs, np.memmap)
        return original(self, corpus, config, info)

    monkeypatch.setattr(Detector, "_fit_corpus", spy)
    big = Detector(progress=False).fit(train)
    assert seen["memmap"]
    small = Detector(progress=False, cache_dir=None)
    monkeypatch.setattr(detector_module, "LARGE_CORPUS_CLIPS", 1000)
    small.fit(train)
    assert not seen["memmap"]
    assert np.allclose(big.score_samples(train[:3]), small.score_samples(train[:3]))


def test_machine_type_defaults_apply_only_to_one_machine_type_and_yield_to_the_user(tmp_path):
    from stethoscope.simulate import simulate_dataset

    slider = [c for c in find_clips(simulate_dataset("slider", 6, 0, tmp_path / "s", seed=0,
                                                     progress=False)) if c.label == 0]
    fan = [c for c in find_clips(simulate_dataset("fan", 6, 0, tmp_path / "f", seed=0,
                                                  progress=False)) if c.label == 0]
    assert "gauss_rhythm" in Detector(progress=False).fit(slider).model_.members
    assert "gauss_rhythm" not in Detector(progress=False).fit(fan).model_.members
    assert "gauss_rhythm" not in Detector(progress=False).fit(slider[:3] + fan[:3]).model_.members
    chosen = Detector(model_params={"rhythm": False}, progress=False).fit(slider)
    assert "gauss_rhythm" not in chosen.model_.members
    chosen.save(tmp_path / "model")
    assert "gauss_rhythm" not in Detector.load(tmp_path / "model").model_.members
    assert Detector("clip-stats", progress=False).fit(slider).model_.experts[-1] == "rhythm"
    rhythm = Detector(progress=False).fit(slider)
    rhythm.save(tmp_path / "rhythm")
    assert "gauss_rhythm" in Detector.load(tmp_path / "rhythm").model_.members
