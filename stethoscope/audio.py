"""Read WAV files as float32 ``(C, n)`` arrays, with channel choice, resampling and checks.

soundfile (libsndfile) does the decoding, so 16/24/32-bit integer, float and
WAVE_FORMAT_EXTENSIBLE files all load. Every unusable file gets a one-line
:class:`~stethoscope.errors.AudioError` naming the file and the problem, rather than a
traceback or, worse, a silently wrong result (truncated or silent recordings).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from stethoscope.errors import AudioError

ChannelSpec = int | Literal["mean", "all"]

SILENCE_LEVEL = 1e-7  # below the smallest non-zero 24-bit sample (1.2e-7): digital silence
# Bounds on what a header may declare, checked before anything is allocated.
MIN_SAMPLE_RATE = 1_000  # Hz; a "1 Hz" header resampled to 16 kHz would need 16000x memory
MAX_SAMPLE_RATE = 768_000  # Hz; the highest rate of audio interfaces
MAX_CHANNELS = 256
MAX_DURATION_S = 7 * 24 * 3600.0  # a week of audio; longer headers are corrupt
MAX_DECODED_BYTES = 4 << 30  # one recording read whole (read_wav), or after resampling
MAX_FLOAT_SAMPLE = 1e6  # float samples are nominally within ±1; this is far beyond audio
_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}
# Integer samples are read as integers and scaled in numpy: libsndfile's own int→float
# conversion is ~5x slower, and reading dominates feature extraction otherwise.
_INTEGER_READS = {"PCM_16": ("int16", 2.0 ** -15), "PCM_24": ("int32", 2.0 ** -31),
                  "PCM_32": ("int32", 2.0 ** -31)}


@dataclass(frozen=True)
class AudioInfo:
    """What the header of an audio file says, without reading the samples."""

    path: Path
    sample_rate: int
    channels: int
    frames: int
    duration: float
    subtype: str
    format: str


def parse_channels(spec: ChannelSpec | str) -> ChannelSpec:
    """Normalise a channel choice: an index (``3`` or ``"3"``), ``"mean"`` or ``"all"``."""
    if isinstance(spec, bool):
        raise ValueError(f"channel choice must be an index, 'mean' or 'all', not {spec!r}")
    if isinstance(spec, int | np.integer):
        if spec < 0:
            raise ValueError(f"channel index must be 0 or more, not {spec}")
        return int(spec)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("mean", "all"):
            return text  # type: ignore[return-value]
        if text.isdigit():
            return int(text)
    raise ValueError(f"channel choice must be an index (0, 1, ...), 'mean' or 'all', "
                     f"not {spec!r}")


def audio_info(path: str | Path) -> AudioInfo:
    """Sample rate, channels, frames, duration and subtype of an audio file (header only).

    Raises AudioError for a missing, unreadable or truncated file.
    """
    path = Path(path)
    info = _soundfile_info(path)
    _check_header_bounds(path, info)
    _check_not_truncated(path, info)
    return AudioInfo(path=path, sample_rate=int(info.samplerate), channels=int(info.channels),
                     frames=int(info.frames), duration=float(info.duration),
                     subtype=str(info.subtype), format=str(info.format))


def read_wav(path: str | Path, *, channels: ChannelSpec = 0, sample_rate: int | None = None,
             resample: bool = False) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 ``(C, n)`` in [-1, 1] and its sample rate.

    Integer samples are scaled by their full range; float files are passed through as stored.

    ``channels``: an index (default 0, as the MIMII and DCASE baselines do), ``"mean"``
    (average of all channels) or ``"all"`` (keep every channel); ``C`` is 1 unless "all".
    ``sample_rate``: the rate the caller needs; a file at another rate is an error unless
    ``resample=True``, which converts it (polyphase filter, scipy.signal.resample_poly).
    """
    path = Path(path)
    channels = parse_channels(channels)
    info = audio_info(path)
    _check_channel_exists(path, info.channels, channels)
    _check_sample_rate(path, info.sample_rate, sample_rate, resample)
    data, scale = _read_samples(path, info)
    if info.subtype in _FLOAT_SUBTYPES:
        check_float_samples(data, path)
    wave = _select_channels(data, channels, scale)
    _check_not_silent(path, wave, channels, info.channels)
    rate = info.sample_rate
    if sample_rate is not None and sample_rate != rate:
        wave, rate = resample_wave(wave, rate, sample_rate, source=path), sample_rate
    return wave, rate


def resample_wave(wave: np.ndarray, from_rate: int, to_rate: int, *,
                  source: str | Path | None = None) -> np.ndarray:
    """Resample ``(C, n)`` along the last axis with scipy's polyphase filter (float32 out).

    Raises AudioError (naming ``source``) when a rate is outside [MIN_SAMPLE_RATE,
    MAX_SAMPLE_RATE] or the result would exceed MAX_DECODED_BYTES, before allocating it.
    """
    from scipy.signal import resample_poly

    if from_rate == to_rate:
        return wave
    for rate in (from_rate, to_rate):
        check_rate_bounds(source, rate)
    channels = int(np.prod(wave.shape[:-1]))
    out_bytes = math.ceil(wave.shape[-1] * to_rate / from_rate) * channels * 4
    if out_bytes > MAX_DECODED_BYTES:
        raise AudioError(f"resampling from {from_rate} to {to_rate} Hz would need "
                         f"{out_bytes / 2**30:.1f} GiB (the limit is "
                         f"{MAX_DECODED_BYTES / 2**30:.0f} GiB)", source)
    g = math.gcd(int(from_rate), int(to_rate))
    out = resample_poly(wave, int(to_rate) // g, int(from_rate) // g, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------- checks


def _soundfile_info(path: Path):
    if not path.exists():
        raise AudioError("no such file", path)
    if path.is_dir():
        raise AudioError("is a folder, not a WAV file", path)
    if path.stat().st_size == 0:
        raise AudioError("is empty (0 bytes); not a WAV file", path)
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        reason = _libsndfile_reason(err)
        raise AudioError(f"is not a WAV file or is corrupt ({reason})", path) from None
    except OSError as err:
        raise AudioError(f"cannot be read ({err.strerror or err})", path) from None


def _libsndfile_reason(err: Exception) -> str:
    text = str(err)
    # "Error opening '/x.wav': Format not recognised." -> "Format not recognised"
    reason = text.split("': ", 1)[-1] if "': " in text else text
    return reason.strip().rstrip(".") or "unknown error"


def check_rate_bounds(path: Path | str | None, rate: int) -> None:
    """AudioError naming ``path`` when ``rate`` is outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} "
                         "Hz; the header is corrupt or this is not a sound recording", path)


def _check_header_bounds(path: Path, info) -> None:
    """Reject headers declaring rates, channels or lengths no recording has."""
    check_rate_bounds(path, int(info.samplerate))
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError(f"header declares {info.channels} channels; at most {MAX_CHANNELS} "
                         "are supported", path)
    if info.frames < 0 or info.frames / info.samplerate > MAX_DURATION_S:
        raise AudioError(f"header declares {info.frames} frames "
                         f"({info.frames / info.samplerate / 3600:.0f} h); the header is corrupt",
                         path)


def check_float_samples(data: np.ndarray, path: str | Path) -> None:
    """Reject float samples that are NaN, infinite or beyond ±MAX_FLOAT_SAMPLE: no sound
    is stored that way, and one such sample would turn every feature of the clip to inf."""
    if not np.isfinite(data).all():
        raise AudioError("contains NaN or infinite samples; the recording is corrupt", path)
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > MAX_FLOAT_SAMPLE:
        raise AudioError(f"holds a sample of magnitude {peak:.3g}; float samples lie within "
                         f"±1 (at most ±{MAX_FLOAT_SAMPLE:g}): the recording is corrupt", path)


def _declared_data_bytes(path: Path) -> tuple[int, int] | None:
    """``(declared size, data offset)`` of a RIFF WAV's ``data`` chunk, or None if unknown.

    Written by hand because libsndfile silently clips the frame count of a truncated file
    to what is present and Python's ``wave`` rejects WAVE_FORMAT_EXTENSIBLE.
    """
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RF64, AIFF, FLAC...: libsndfile's own checks apply
        file_size = os.fstat(handle.fileno()).st_size
        offset = 12
        while offset + 8 <= file_size:
            handle.seek(offset)
            chunk_id, size = struct.unpack("<4sI", handle.read(8))
            if chunk_id == b"data":
                return size, offset + 8
            offset += 8 + size + (size & 1)
    return None


def _check_not_truncated(path: Path, info) -> None:
    declared = _declared_data_bytes(path)
    if declared is None:
        return
    size, offset = declared
    if size in (0, 0xFFFFFFFF):  # streaming writers leave the size unset: nothing to compare
        return
    present = max(path.stat().st_size - offset, 0)
    if present < size:
        rate = _bytes_per_second(info)
        raise AudioError(
            f"is truncated: the header announces {size} bytes of audio ({size / rate:.2f} s) "
            f"but only {present} are present ({present / rate:.2f} s); the copy or download "
            "was cut short", path)


def _bytes_per_second(info) -> float:
    bits = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32,
            "FLOAT": 32, "DOUBLE": 64, "ULAW": 8, "ALAW": 8}.get(str(info.subtype), 16)
    return max(info.samplerate * info.channels * bits / 8, 1.0)


def _check_channel_exists(path: Path, n_channels: int, channels: ChannelSpec) -> None:
    if isinstance(channels, int) and channels >= n_channels:
        noun = "channel" if n_channels == 1 else "channels"
        raise AudioError(f"has {n_channels} {noun}; channel {channels} does not exist "
                         f"(choose 0-{n_channels - 1}, 'mean' or 'all')", path)


def _check_sample_rate(path: Path, rate: int, wanted: int | None, resample: bool) -> None:
    if wanted is None or wanted == rate or resample:
        return
    raise AudioError(f"sample rate is {rate} Hz but the model expects {wanted} Hz; "
                     "pass resample=True (--resample) to convert", path)


def _read_samples(path: Path, info: AudioInfo) -> tuple[np.ndarray, float]:
    """Samples ``(n, C)`` as stored (int16/int32 or float32) and the factor to [-1, 1]."""
    if info.frames == 0:
        raise AudioError("is empty (0 samples)", path)
    decoded = info.frames * info.channels * 4
    if decoded > MAX_DECODED_BYTES:
        raise AudioError(f"holds {info.duration:.0f} s of {info.channels}-channel audio "
                         f"({decoded / 2**30:.1f} GiB decoded); at most "
                         f"{MAX_DECODED_BYTES / 2**30:.0f} GiB is read at once", path)
    dtype, scale = _INTEGER_READS.get(info.subtype, ("float32", 1.0))
    try:
        data, _ = sf.read(str(path), dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        reason = _libsndfile_reason(err)
        raise AudioError(f"is not a WAV file or is corrupt ({reason})", path) from None
    if data.shape[0] < info.frames:
        raise AudioError(f"is truncated: the header announces {info.frames} frames but only "
                         f"{data.shape[0]} could be read", path)
    if data.shape[0] == 0:
        raise AudioError("is empty (0 samples)", path)
    return data, scale


def _select_channels(data: np.ndarray, channels: ChannelSpec, scale: float) -> np.ndarray:
    """``(n, C)`` as read → float32 ``(C', n)`` in [-1, 1] with the chosen channel(s)."""
    factor = np.float32(scale)
    if channels == "mean":
        return (data.mean(axis=1, dtype=np.float32) * factor)[None, :]
    picked = data.T if channels == "all" else data[:, channels][None, :]
    out = np.empty(picked.shape, dtype=np.float32)
    return np.multiply(picked, factor, out=out, dtype=np.float32)


def _check_not_silent(path: Path, wave: np.ndarray, channels: ChannelSpec,
                      n_channels: int) -> None:
    if wave.size and float(max(wave.max(), -wave.min())) >= SILENCE_LEVEL:
        return
    where = f"channel {channels} " if isinstance(channels, int) and n_channels > 1 else ""
    raise AudioError(f"{where}is silent (all samples are zero); check the microphone "
                     "or the recording", path)


def select_channels(wave: np.ndarray, channels: ChannelSpec, source: str | Path = "audio"
                    ) -> np.ndarray:
    """Pick ``channels`` (index, "mean" or "all") of a float32 waveform ``(C, n)`` already
    in memory, the same choice :func:`read_wav` makes for a file.

    >>> select_channels(np.ones((2, 4), np.float32), "mean").shape
    (1, 4)
    """
    channels = parse_channels(channels)
    _check_channel_exists(Path(str(source)), wave.shape[0], channels)
    if channels == "mean":
        return wave.mean(axis=0, keepdims=True, dtype=np.float32)
    if channels == "all":
        return wave
    return wave[channels:channels + 1]


def read_wav_segment(path: str | Path, start: int, frames: int, *, channels: ChannelSpec = 0,
                     sample_rate: int | None = None, resample: bool = False,
                     info: AudioInfo | None = None) -> np.ndarray:
    """Samples ``start`` to ``start + frames`` of a WAV (in the file's own sample rate) as
    float32 ``(C, frames)``, read with one seek, so memory follows the segment, not the file.

    The same channel choice, sample-rate rule and NaN check as :func:`read_wav`; a segment of
    digital silence is returned as it is (a machine that stopped is worth scoring). With
    ``sample_rate`` and ``resample`` the segment is converted to ``sample_rate``.
    """
    path = Path(path)
    channels = parse_channels(channels)
    info = info or audio_info(path)
    _check_channel_exists(path, info.channels, channels)
    _check_sample_rate(path, info.sample_rate, sample_rate, resample)
    if start < 0 or frames < 1 or start + frames > info.frames:
        raise AudioError(f"has no samples {start}-{start + frames} (it holds {info.frames})", path)
    dtype, scale = _INTEGER_READS.get(info.subtype, ("float32", 1.0))
    try:
        with sf.SoundFile(str(path)) as handle:
            handle.seek(start)
            data = handle.read(frames, dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"is not a WAV file or is corrupt ({_libsndfile_reason(err)})",
                         path) from None
    if data.shape[0] < frames:
        raise AudioError(f"is truncated: samples {start}-{start + frames} could not be read",
                         path)
    if info.subtype in _FLOAT_SUBTYPES and not np.isfinite(data).all():
        raise AudioError("contains NaN or infinite samples; the recording is corrupt", path)
    wave = _select_channels(data, channels, scale)
    if sample_rate is not None and sample_rate != info.sample_rate:
        wave = resample_wave(wave, info.sample_rate, sample_rate)
    return wave
