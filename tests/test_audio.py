"""Reading WAV files: channel choice, formats, resampling and one-line errors for bad input."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stethoscope.audio import audio_info, parse_channels, read_wav
from stethoscope.errors import AudioError

SR = 16000


def write_tone(path: Path, *, seconds: float = 0.5, sr: int = SR, channels: int = 1,
               subtype: str = "PCM_16", freq: float = 440.0) -> np.ndarray:
    """Write a sine (one frequency per channel) and return the (n, C) float data written."""
    t = np.arange(int(seconds * sr)) / sr
    data = np.stack([0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)],
                    axis=1)
    sf.write(path, data, sr, subtype=subtype)
    return data


def assert_audio_error(path: Path, *words: str, **kwargs) -> AudioError:
    with pytest.raises(AudioError) as info:
        read_wav(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert info.value.path == path
    for word in words:
        assert word in message, message
    return info.value


# ---------------------------------------------------------------- real multichannel data


@pytest.fixture
def mimii_fan(mimii_8ch: Path) -> Path:
    return mimii_8ch / "fan_normal.wav"


def test_all_channels_of_mimii_8ch(mimii_fan):
    wave_all, sr = read_wav(mimii_fan, channels="all")
    assert sr == SR
    assert wave_all.shape == (8, 10 * SR)
    assert wave_all.dtype == np.float32
    assert np.abs(wave_all).max() <= 1.0
    raw, _ = sf.read(mimii_fan, dtype="int16")
    np.testing.assert_array_equal(wave_all, raw.T / np.float32(32768))


@pytest.mark.parametrize("channel", [0, 3, 7])
def test_one_channel_is_that_row_of_all(mimii_fan, channel):
    one, _ = read_wav(mimii_fan, channels=channel)
    every, _ = read_wav(mimii_fan, channels="all")
    assert one.shape == (1, 10 * SR)
    np.testing.assert_array_equal(one[0], every[channel])


def test_default_channel_is_zero_and_channels_differ(mimii_fan):
    default, _ = read_wav(mimii_fan)
    zero, _ = read_wav(mimii_fan, channels=0)
    seven, _ = read_wav(mimii_fan, channels=7)
    np.testing.assert_array_equal(default, zero)
    assert not np.array_equal(zero, seven)


def test_mean_is_numpy_mean_of_all(mimii_fan):
    mean, _ = read_wav(mimii_fan, channels="mean")
    every, _ = read_wav(mimii_fan, channels="all")
    assert mean.shape == (1, 10 * SR)
    np.testing.assert_allclose(mean[0], every.mean(axis=0), atol=1e-7)


def test_channel_out_of_range_on_multichannel(mimii_fan):
    assert_audio_error(mimii_fan, "has 8 channels", "channel 8 does not exist", channels=8)


def test_channel_given_as_text_is_accepted(mimii_fan):
    as_text, _ = read_wav(mimii_fan, channels="7")
    as_int, _ = read_wav(mimii_fan, channels=7)
    np.testing.assert_array_equal(as_text, as_int)


@pytest.mark.parametrize("bad", ["left", -1, 1.5, True])
def test_invalid_channel_choice(bad):
    with pytest.raises(ValueError, match="channel"):
        parse_channels(bad)


# ---------------------------------------------------------------- formats


def test_wave_format_extensible_files_load(wav_formats: Path):
    files = sorted(wav_formats.glob("*.wav"))
    assert files
    for path in files:
        header = path.read_bytes()[:22]
        assert int.from_bytes(header[20:22], "little") == 65534  # really EXTENSIBLE
        with pytest.raises(wave.Error):  # why soundfile: the stdlib refuses these files
            wave.open(str(path)).close()
        data, sr = read_wav(path, channels="all")
        info = audio_info(path)
        assert (sr, data.shape) == (SR, (8, 10 * SR))
        assert (info.channels, info.frames, info.subtype) == (8, 10 * SR, "PCM_16")
        assert info.duration == pytest.approx(10.0)
        assert np.abs(data).max() > 0


@pytest.mark.parametrize("subtype,tolerance", [
    ("PCM_16", 2 ** -15), ("PCM_24", 2 ** -23), ("PCM_32", 2 ** -31), ("FLOAT", 1e-7),
    ("DOUBLE", 1e-7)])
def test_sample_formats_round_trip(tmp_path, subtype, tolerance):
    path = tmp_path / f"tone_{subtype}.wav"
    written = write_tone(path, subtype=subtype, channels=2)
    assert audio_info(path).subtype == subtype
    data, sr = read_wav(path, channels="all")
    assert sr == SR and data.dtype == np.float32 and data.shape == (2, len(written))
    np.testing.assert_allclose(data, written.T, atol=tolerance + 1e-7)


def test_int24_quiet_signal_is_not_called_silent(tmp_path):
    path = tmp_path / "quiet24.wav"
    sf.write(path, np.full(1000, 3 * 2 ** -23), SR, subtype="PCM_24")
    data, _ = read_wav(path)
    assert data.max() > 0


# ---------------------------------------------------------------- sample rate


def test_wrong_sample_rate_is_refused_with_advice(tmp_path):
    path = tmp_path / "cd.wav"
    write_tone(path, sr=44100)
    assert_audio_error(path, "44100 Hz", "16000 Hz", "resample=True", "--resample",
                       sample_rate=SR)


def test_matching_sample_rate_needs_no_resampling(tmp_path):
    path = tmp_path / "ok.wav"
    written = write_tone(path)
    data, sr = read_wav(path, sample_rate=SR)
    assert sr == SR and data.shape == (1, len(written))


def test_resample_gives_right_length_and_keeps_the_tone(tmp_path):
    path = tmp_path / "cd.wav"
    write_tone(path, seconds=1.0, sr=44100, freq=1000.0)
    data, sr = read_wav(path, sample_rate=SR, resample=True)
    assert sr == SR
    assert data.shape == (1, SR) and data.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(data[0]))
    peak_hz = np.argmax(spectrum) * SR / data.shape[1]
    assert peak_hz == pytest.approx(1000.0, abs=2.0)
    assert np.abs(data).max() == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert_audio_error(tmp_path / "nope.wav", "no such file")


def test_folder_is_not_a_wav(tmp_path):
    assert_audio_error(tmp_path, "folder")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_audio_error(path, "not a WAV file or is corrupt")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my notes, not a recording\n")
    assert_audio_error(path, "not a WAV file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    assert_audio_error(path, "empty")


def test_wav_with_zero_samples(tmp_path):
    path = tmp_path / "nothing.wav"
    sf.write(path, np.zeros(0), SR, subtype="PCM_16")
    assert_audio_error(path, "empty (0 samples)")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_real_wav(tmp_path, dcase_valve, keep):
    original = sorted((dcase_valve / "test").glob("*.wav"))[0]
    data = original.read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: 44 + int((len(data) - 44) * keep)])
    assert sf.info(path).frames < sf.info(original).frames  # libsndfile alone says nothing
    assert_audio_error(path, "truncated", "10.00 s")
    with pytest.raises(AudioError, match="truncated"):
        audio_info(path)


def test_header_only_wav_is_truncated(tmp_path, dcase_valve):
    original = sorted((dcase_valve / "test").glob("*.wav"))[0]
    path = tmp_path / "header.wav"
    path.write_bytes(original.read_bytes()[:44])
    assert_audio_error(path, "truncated")


def test_uncut_real_wav_is_not_truncated(dcase_valve):
    original = sorted((dcase_valve / "test").glob("*.wav"))[0]
    data, sr = read_wav(original)
    assert (sr, data.shape) == (SR, (1, 10 * SR))


def test_digital_silence(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(SR), SR, subtype="PCM_16")
    assert_audio_error(path, "is silent (all samples are zero)")


def test_one_silent_channel(tmp_path):
    path = tmp_path / "dead_mic.wav"
    data = np.zeros((SR, 2))
    data[:, 0] = 0.1
    sf.write(path, data, SR, subtype="PCM_16")
    assert read_wav(path, channels=0)[0].max() > 0
    assert read_wav(path, channels="all")[0].shape == (2, SR)
    assert_audio_error(path, "channel 1 is silent", channels=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_float_wav(tmp_path, bad):
    path = tmp_path / "broken_float.wav"
    data = np.full(SR, 0.1, dtype=np.float32)
    data[123] = bad
    sf.write(path, data, SR, subtype="FLOAT")
    assert_audio_error(path, "NaN or infinite")


def test_channel_out_of_range_on_mono(tmp_path):
    path = tmp_path / "mono.wav"
    write_tone(path)
    assert_audio_error(path, "has 1 channel;", "channel 3 does not exist", channels=3)
