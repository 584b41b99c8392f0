"""Log-mel features: agreement with librosa, batching, the on-disk cache and .npy arrays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stethoscope import features
from stethoscope.errors import AudioError, DataError
from stethoscope.features import (
    FeatureConfig,
    LogMel,
    check_features_match,
    clip_features,
    extract_features,
    load_feature_array,
    logmel,
    mel_filter_bank,
)

SR = 16000
NON_DEFAULT = dict(n_mels=128, fmin=50.0, fmax=7000.0, n_fft=2048, hop_length=256)


def write_noise(path: Path, seconds: float = 1.0, sr: int = SR, channels: int = 1,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, 0.1 * rng.standard_normal((int(seconds * sr), channels)), sr,
             subtype="PCM_16")
    return path


@pytest.fixture
def valve_clips(dcase_valve: Path) -> list[Path]:
    return sorted((dcase_valve / "test").glob("*.wav"))


@pytest.fixture
def short_clips(tmp_path) -> list[Path]:
    return [write_noise(tmp_path / f"clip{i}.wav", seed=i) for i in range(7)]


def librosa_logmel(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    librosa = pytest.importorskip("librosa")
    spec = librosa.feature.melspectrogram(y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                          hop_length=cfg.hop_length, n_mels=cfg.n_mels,
                                          fmin=cfg.fmin, fmax=cfg.fmax, power=cfg.power)
    return 10 * np.log10(spec + cfg.eps)


# ---------------------------------------------------------------- agreement with librosa


@pytest.mark.parametrize("settings", [{}, NON_DEFAULT, {"power": 1.0}],
                         ids=["default", "128mels-50-7000Hz-2048-256", "magnitude"])
def test_logmel_matches_librosa_on_real_clip(valve_clips, settings):
    cfg = FeatureConfig(**settings)
    y, _ = sf.read(valve_clips[0], dtype="float32")
    ours = logmel(y[None], cfg)
    reference = librosa_logmel(y, cfg)
    assert ours.shape == (1, *reference.shape)
    assert reference.std() > 1.0  # a real, varied spectrogram
    assert np.abs(ours[0] - reference).max() < 1e-3


@pytest.mark.parametrize("settings", [{}, NON_DEFAULT, {"n_mels": 40, "n_fft": 512}])
def test_mel_filter_bank_matches_librosa(settings):
    librosa = pytest.importorskip("librosa")
    cfg = FeatureConfig(**settings)
    ours = mel_filter_bank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    reference = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                    fmin=cfg.fmin, fmax=cfg.fmax)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-9)


def test_batched_equals_one_at_a_time():
    torch.manual_seed(0)
    waves = 0.1 * torch.randn(3, 4, 8000)  # 12 rows over the worker threads
    module = LogMel(FeatureConfig(n_mels=32))
    with torch.inference_mode():
        batched = module(waves)
        single = torch.stack([torch.stack([module(w) for w in clip]) for clip in waves])
    assert batched.shape == (3, 4, 32, 1 + 8000 // 512)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


def test_worker_threads_match_one_thread_and_restore_the_thread_count():
    torch.manual_seed(0)
    waves = 0.1 * torch.randn(5, 16000)
    module = LogMel(FeatureConfig(n_mels=40, power=1.0))  # the |X|^power path too
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = module(waves)  # clips spread over two worker threads
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        alone = module(waves)  # one clip after another in this thread
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(threaded, alone, rtol=0, atol=1e-5)
    assert not threaded.requires_grad and not threaded.is_inference()


def test_one_long_clip_split_over_threads_equals_one_thread():
    torch.manual_seed(1)
    wave = 0.1 * torch.randn(1, 160000)  # 626 frames at hop 256: split in two halves
    module = LogMel(FeatureConfig(hop_length=256))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = module(wave)
        torch.set_num_threads(1)
        alone = module(wave)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(split, alone, rtol=0, atol=1e-5)


def test_split_work_covers_every_clip_and_frame_once():
    assert features._split_work(5, 300, 1) == [(range(5), 0, 300)]
    assert features._split_work(5, 300, 2) == [(range(0, 5, 2), 0, 300), (range(1, 5, 2), 0, 300)]
    assert features._split_work(1, 626, 2) == [(range(1), 0, 313), (range(1), 313, 626)]
    assert features._split_work(1, 200, 2) == [(range(1), 0, 200)]  # too short to split
    parts = features._split_work(1, 1000, 3)
    assert [(a, b) for _, a, b in parts] == [(0, 333), (333, 666), (666, 1000)]


def test_concurrent_callers_get_their_own_buffers():
    from concurrent.futures import ThreadPoolExecutor

    module = LogMel(FeatureConfig(n_mels=32))
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(0.1 * rng.standard_normal((3, 8000 + 512 * k)).astype(np.float32))
             for k in range(4)]
    expected = [module(w) for w in waves]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(module, waves * 3))
    for got, want in zip(results, expected * 3, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_frame_count_and_logmel_of_1d_wave():
    spec = logmel(0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32))
    assert spec.shape == (1, 64, 1 + SR // 512) and spec.dtype == np.float32


def test_too_many_mels_warns():
    with pytest.warns(UserWarning, match="no FFT bin"):
        mel_filter_bank(SR, 256, 128)


# ---------------------------------------------------------------- FeatureConfig


def test_config_round_trips_through_json():
    cfg = FeatureConfig(n_mels=128, fmax=7000.0, channels="mean", frames=312, resample=True)
    again = FeatureConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown feature setting.*n_mel"):
        FeatureConfig.from_dict({**FeatureConfig().to_dict(), "n_mel": 64})
    with pytest.raises(ValueError, match="unknown feature setting.*hop"):
        FeatureConfig().replace(hop=256)


def test_config_replace_and_channel_text():
    cfg = FeatureConfig().replace(n_mels=128, channels="3")
    assert (cfg.n_mels, cfg.channels, cfg.n_fft) == (128, 3, 1024)


@pytest.mark.parametrize("bad", [{"n_fft": 0}, {"fmax": 9000.0}, {"fmin": 500, "fmax": 400},
                                 {"frames": -1}, {"channels": "left"}, {"hop_length": 1.5}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        FeatureConfig(**bad)


# ---------------------------------------------------------------- clips and corpora


def test_clip_features_crop_and_channels(mimii_8ch):
    path = mimii_8ch / "valve_normal.wav"
    full = clip_features(path, FeatureConfig(channels="all"))
    cropped = clip_features(path, FeatureConfig(channels=5, frames=312))
    assert full.shape == (8, 64, 313) and cropped.shape == (1, 64, 312)
    np.testing.assert_allclose(cropped[0], full[5, :, :312], atol=1e-4)


def test_clip_too_short_for_frames_names_the_file(tmp_path):
    path = write_noise(tmp_path / "short.wav", seconds=0.5)
    with pytest.raises(DataError, match="too short.*16 frames.*312") as info:
        clip_features(path, FeatureConfig(frames=312))
    assert info.value.path == path


def test_resampled_clip_gives_the_same_frames(tmp_path):
    path = write_noise(tmp_path / "cd.wav", sr=44100)
    with pytest.raises(AudioError, match="44100 Hz"):
        clip_features(path)
    assert clip_features(path, FeatureConfig(resample=True)).shape == (1, 64, 32)


def test_extract_without_cache_equals_clip_features(valve_clips):
    paths = valve_clips[:3]
    cfg = FeatureConfig(frames=312)
    specs = extract_features(paths, cfg)
    assert specs.shape == (3, 1, 64, 312) and specs.dtype == np.float32
    for spec, path in zip(specs, paths, strict=True):
        np.testing.assert_allclose(spec, clip_features(path, cfg), atol=1e-4)


def test_extract_over_many_chunks_keeps_order(short_clips, monkeypatch):
    monkeypatch.setattr(features, "CLIPS_PER_CHUNK", 3)
    specs = extract_features(short_clips, FeatureConfig())
    for spec, path in zip(specs, short_clips, strict=True):
        np.testing.assert_allclose(spec, clip_features(path), atol=1e-4)


def test_cache_second_call_reads_no_wav(short_clips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = FeatureConfig(n_mels=32)
    first = extract_features(short_clips, cfg, cache_dir=cache)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob(".*"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(features, "read_wav", no_reading)
    second = extract_features(short_clips, cfg, cache_dir=cache)
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, second)
    with pytest.raises(AssertionError, match="cache"):  # other settings: recomputed
        extract_features(short_clips, cfg.replace(n_mels=40), cache_dir=cache)


def test_cache_is_invalidated_when_a_file_changes(short_clips, tmp_path):
    cache = tmp_path / "cache"
    before = np.array(extract_features(short_clips, FeatureConfig(), cache_dir=cache))
    write_noise(short_clips[2], seed=99)
    os.utime(short_clips[2], ns=(1, 1))
    after = extract_features(short_clips, FeatureConfig(), cache_dir=cache)
    assert not np.allclose(before[2], after[2])
    np.testing.assert_array_equal(before[3], after[3])
    assert len(list(cache.glob("*.npy"))) == 2


def test_failed_extraction_leaves_no_cache_file(short_clips, tmp_path):
    bad = tmp_path / "silent.wav"
    sf.write(bad, np.zeros(SR), SR, subtype="PCM_16")
    cache = tmp_path / "cache"
    with pytest.raises(AudioError, match="silent"):
        extract_features([*short_clips, bad], FeatureConfig(), cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_clips_of_different_lengths_name_the_odd_file(tmp_path):
    good = [write_noise(tmp_path / f"{i}.wav", seconds=1.0) for i in range(2)]
    odd = write_noise(tmp_path / "odd.wav", seconds=2.0)
    with pytest.raises(DataError) as info:
        extract_features([*good, odd], FeatureConfig())
    message = str(info.value)
    assert info.value.path == odd
    assert "(1, 64, 63)" in message and "(1, 64, 32)" in message and str(good[0]) in message
    cropped = extract_features([*good, odd], FeatureConfig(frames=30))
    assert cropped.shape == (3, 1, 64, 30)


def test_real_multichannel_corpus(mimii_8ch):
    paths = sorted(mimii_8ch.glob("*.wav"))[:2]
    specs = extract_features(paths, FeatureConfig(channels="all", frames=312))
    assert specs.shape == (2, 8, 64, 312)
    assert np.isfinite(specs).all() and specs.std() > 1.0


def test_empty_path_list():
    with pytest.raises(DataError):
        extract_features([], FeatureConfig())


# ---------------------------------------------------------------- precomputed arrays


@pytest.fixture
def course_array(tmp_path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).normal(-40, 10, (5, 8, 64, 313)).astype(np.float32)
    path = tmp_path / "specs.npy"
    np.save(path, data)
    return path, data


def test_course_array_channel_and_crop(course_array):
    path, data = course_array
    loaded = load_feature_array(path, channels=3, frames=312)
    assert loaded.shape == (5, 1, 64, 312)
    assert isinstance(loaded, np.memmap)  # no copy for a plain channel pick
    np.testing.assert_array_equal(loaded, data[:, 3:4, :, :312])
    everything = load_feature_array(path, channels="all")
    np.testing.assert_array_equal(everything, data)
    mean = load_feature_array(path, channels="mean", frames=312)
    np.testing.assert_allclose(mean[:, 0], data[..., :312].mean(axis=1), atol=1e-4)


def test_three_dimensional_array_gets_a_channel_axis(tmp_path):
    data = np.ones((4, 64, 313), dtype=np.float64)
    np.save(tmp_path / "mono.npy", data)
    loaded = load_feature_array(tmp_path / "mono.npy")
    assert loaded.shape == (4, 1, 64, 313) and loaded.dtype == np.float32


def test_array_errors(tmp_path, course_array):
    path, data = course_array
    np.save(tmp_path / "flat.npy", np.zeros((10, 64), dtype=np.float32))
    nan = data.copy()
    nan[2, 1, 5, 7] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "garbage.npy").write_bytes(b"definitely not numpy")
    (tmp_path / "specs.txt").write_text("1 2 3")
    cases = [
        (tmp_path / "flat.npy", {}, r"has shape \(10, 64\); expected \(N, mels, frames\) or "
                                    r"\(N, channels, mels, frames\)"),
        (tmp_path / "nan.npy", {"channels": "all"}, "spectrogram 2 contains NaN"),
        (tmp_path / "garbage.npy", {}, "cannot be read as a .npy"),
        (tmp_path / "specs.txt", {}, "not a .npy"),
        (tmp_path / "missing.npy", {}, "no such file"),
        (path, {"channels": 8}, "has 8 channels.*channel 8 does not exist"),
        (path, {"frames": 400}, "313 frames.*400"),
    ]
    for bad_path, kwargs, pattern in cases:
        with pytest.raises(DataError, match=pattern) as info:
            load_feature_array(bad_path, **kwargs)
        assert info.value.path == bad_path and "\n" not in str(info.value)


def test_check_features_match():
    specs = np.zeros((3, 1, 128, 313), dtype=np.float32)
    check_features_match(specs, (1, 128, 313), "x.npy")
    check_features_match(specs[0], (1, 128, 313), "x.npy")
    with pytest.raises(DataError, match=r"features of shape \(1, 128, 313\) do not match the "
                                        r"model's input \(1, 64, 312\)") as info:
        check_features_match(specs, (1, 64, 312), "recordings/")
    assert "mel bands 128 vs 64" in str(info.value)
    assert str(info.value).startswith("recordings")


def _resident_kb_of(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_iter_chunks_copies_in_order_and_releases_mapped_pages(tmp_path):
    data = np.random.default_rng(0).normal(size=(40, 1, 16, 1024)).astype(np.float32)
    np.save(tmp_path / "specs.npy", data)
    mapped = np.load(tmp_path / "specs.npy", mmap_mode="r")
    seen = 0
    for start, chunk in features.iter_chunks(mapped, 7):
        assert chunk.dtype == np.float32 and not isinstance(chunk, np.memmap)
        np.testing.assert_array_equal(chunk, data[start:start + 7])
        seen += len(chunk)
    assert seen == len(data)
    assert _resident_kb_of(tmp_path / "specs.npy") < 64  # 2.5 MB were read, all let go
    touched = float(np.asarray(mapped).sum())  # reading the whole map makes it resident
    assert np.isfinite(touched) and _resident_kb_of(tmp_path / "specs.npy") > 2000
    features.release_mapped_pages(mapped)
    assert _resident_kb_of(tmp_path / "specs.npy") < 64
    np.testing.assert_array_equal(mapped[3], data[3])  # still readable afterwards


def test_release_leaves_copy_on_write_maps_alone(tmp_path):
    np.save(tmp_path / "specs.npy", np.zeros((4, 1, 2, 8), dtype=np.float32))
    private = np.load(tmp_path / "specs.npy", mmap_mode="c")
    private[1] = 5.0  # a change that exists only in this process's pages
    features.release_mapped_pages(private)
    assert float(private[1].max()) == 5.0
