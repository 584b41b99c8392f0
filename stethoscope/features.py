"""Log-mel spectrograms: librosa's conventions, computed fast in batches with torch.

A clip becomes a float32 ``(C, M, F)`` array (channels, mel bands, frames); a corpus
``(N, C, M, F)``. :func:`extract_features` streams clips through :class:`LogMel` in small
chunks and can keep the result in an on-disk cache opened as a memory map, so corpora larger
than memory work and a second run does not touch the WAV files. Precomputed ``.npy``
arrays (as in the course notebook) load through :func:`load_feature_array`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stethoscope.audio import AudioInfo, audio_info, parse_channels, read_wav, read_wav_segment
from stethoscope.errors import AudioError, DataError, StethoscopeError
from stethoscope.progress import progress_bar, progress_enabled
from stethoscope.runtime import keep_freed_memory

CACHE_VERSION = 2  # bump when the features computed for a given config change
CLIPS_PER_CHUNK = 16  # clips read and transformed together: bounds memory, keeps BLAS busy
MELS_PER_BLOCK = 8  # mel bands per dense block of the sparse filter bank (8: fastest measured)


# What a model file or an option may ask for: generous for real use, small enough that no
# settings file can make the process allocate gigabytes (a 1e9-mel bank, a 1e9-point FFT).
LIMITS = {"sample_rate": 768_000, "n_fft": 65_536, "hop_length": 65_536, "n_mels": 1_024,
          "frames": 10_000_000}
MAX_WINDOW_S = 3_600.0


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides the features of a clip; saved with every model.

    ``channels``: index, "mean" or "all" (see :func:`stethoscope.audio.read_wav`).
    ``frames``: keep only the first ``frames`` frames (e.g. 312 of 313, as in the course).
    ``resample``: convert files at another sample rate instead of rejecting them.
    ``window_s``: recordings are cut into windows of this many seconds, each scored like a
    clip (None: a recording is one window; all must then have one length).
    ``window_hop_s``: seconds from one window's start to the next (None: ``window_s``); a
    last window is aligned to the recording's end so that every sample is scored.
    ``pad_short``: pad recordings shorter than a window with silence instead of refusing them.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    power: float = 2.0
    eps: float = 1e-10
    channels: int | str = 0
    frames: int | None = None
    resample: bool = False
    window_s: float | None = None
    window_hop_s: float | None = None
    pad_short: bool = False

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():  # bounds before anything is allocated
            if name != "frames" or self.frames is not None:
                _check_positive_int(name, getattr(self, name), limit)
        nyquist = self.sample_rate / 2
        fmax = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < fmax <= nyquist:
            raise ValueError(f"feature settings need 0 <= fmin < fmax <= sample_rate / 2 "
                             f"({nyquist:g} Hz); got fmin={self.fmin}, fmax={self.fmax}")
        if not self.power > 0 or not self.eps > 0:
            raise ValueError(f"feature settings need power > 0 and eps > 0; got "
                             f"power={self.power}, eps={self.eps}")
        for name in ("window_s", "window_hop_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and
                                          math.isfinite(value) and 0 < value <= MAX_WINDOW_S):
                raise ValueError(f"feature setting {name} must be a number of seconds in "
                                 f"(0, {MAX_WINDOW_S}], not {value!r}")
        if self.window_hop_s is not None and self.window_s is None:
            raise ValueError("feature setting window_hop_s needs window_s")
        object.__setattr__(self, "channels", parse_channels(self.channels))

    @property
    def fmax_hz(self) -> float:
        """The upper edge of the mel bank in Hz (Nyquist when ``fmax`` is None)."""
        return self.sample_rate / 2 if self.fmax is None else float(self.fmax)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, not ignored."""
        _reject_unknown_keys(data)
        return cls(**data)

    def replace(self, **changes) -> FeatureConfig:
        """A copy with some settings changed (unknown names are an error)."""
        _reject_unknown_keys(changes)
        return dataclasses.replace(self, **changes)


def _check_positive_int(name: str, value, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"feature setting {name} must be a positive integer, not {value!r}")
    if value > limit:
        raise ValueError(f"feature setting {name} = {value} is beyond the limit of {limit}")


def _reject_unknown_keys(data: dict) -> None:
    known = {f.name for f in dataclasses.fields(FeatureConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown feature setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")


# ---------------------------------------------------------------------------- mel filters


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_step = math.log(6.4) / 27.0
    with np.errstate(divide="ignore"):
        logarithmic = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step
    return np.where(hz >= 1000.0, logarithmic, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)),
                    mel * (200.0 / 3))


def mel_filter_bank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                    fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters ``(n_mels, 1 + n_fft // 2)`` with Slaney area normalisation.

    Same result as ``librosa.filters.mel(htk=False, norm="slaney")``; written here, from
    Slaney's Auditory Toolbox formulas, because torchaudio is not available and librosa is
    only a test dependency.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - fft_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per filter
    empty = np.flatnonzero(weights.max(axis=1) == 0)
    if empty.size:
        warnings.warn(f"mel bands {empty.tolist()} have no FFT bin (n_mels={n_mels} is too "
                      f"many for n_fft={n_fft}); they stay at the log floor", stacklevel=2)
    return weights.astype(np.float32)


def _band_blocks(bank: np.ndarray, size: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Split the bank into blocks of ``size`` bands and the FFT-bin range each block uses.

    A mel filter touches only a narrow range of bins, so a few small dense products
    replace one large mostly-zero one (about 4x less arithmetic for 64 bands).
    """
    blocks = []
    for m0 in range(0, bank.shape[0], size):
        m1 = min(m0 + size, bank.shape[0])
        used = np.flatnonzero(bank[m0:m1].any(axis=0))
        k0, k1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        blocks.append((m0, m1, k0, k1, np.ascontiguousarray(bank[m0:m1, k0:k1].T)))
    return blocks


# ---------------------------------------------------------------------------- log-mel


class LogMel(nn.Module):
    """Waveforms ``(..., n)`` → log-mel spectrograms ``(..., n_mels, frames)`` in dB.

    librosa's conventions: centred frames padded with zeros (librosa >= 0.10 default
    ``pad_mode="constant"``), periodic Hann window, Slaney mel bank, ``power`` spectrogram
    and ``10 * log10(mel + eps)``. ``frames = 1 + n // hop_length``. A feature extractor,
    not a layer: no gradients flow through it.

    Fast on CPU because (each measured, docs/benchmarks.md): one clip at a time goes
    through reused per-thread buffers (no large allocation per call); frames are cut with
    ``unfold`` and transformed with ``rfft`` (6x cheaper than ``torch.stft`` here); the
    squared real and imaginary parts meet an interleaved copy of the mel bank, so the
    power sum happens inside the matrix product; and several clips go to as many threads
    (or one long clip's frames, in halves), each with one torch thread, since torch's own
    threads scale poorly on one clip's small FFTs and products.
    """

    def __init__(self, config: FeatureConfig | None = None, **overrides) -> None:
        super().__init__()
        keep_freed_memory()
        self.config = (config or FeatureConfig()).replace(**overrides)
        cfg = self.config
        bank = mel_filter_bank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True),
                             persistent=False)
        interleaved = cfg.power == 2.0  # weights repeated for the real and imaginary parts
        self._blocks = []
        for i, (m0, m1, k0, k1, weights) in enumerate(_band_blocks(bank, MELS_PER_BLOCK)):
            if interleaved:
                weights, k0, k1 = np.repeat(weights, 2, axis=0), 2 * k0, 2 * k1
            self.register_buffer(f"block_{i}", torch.from_numpy(weights.T.copy()),
                                 persistent=False)
            self._blocks.append((m0, m1, k0, k1))
        self._workspaces = threading.local()

    def frames_for(self, n_samples: int) -> int:
        return 1 + n_samples // self.config.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        lead, n = wave.shape[:-1], wave.shape[-1]
        rows = wave.detach().reshape(-1, n).to(self.window.dtype)
        frames = self.frames_for(n)
        out = torch.empty(rows.shape[0], self.config.n_mels, frames, dtype=rows.dtype,
                          device=rows.device)
        on_cpu = rows.device.type == "cpu"
        *others, own = _split_work(rows.shape[0], frames, torch.get_num_threads() if on_cpu else 1)
        with _one_torch_thread() if on_cpu else contextlib.nullcontext():
            pool = _worker_pool(len(others)) if others else None
            jobs = [pool.submit(self._log_mel_rows, rows, out, part) for part in others]
            self._log_mel_rows(rows, out, own)  # the last share in this thread: one hand-off less
            for job in jobs:
                job.result()
        return out.reshape(*lead, self.config.n_mels, frames)

    def _log_mel_rows(self, rows: torch.Tensor, out: torch.Tensor,
                      part: tuple[range, int, int]) -> None:
        """Write the log-mel of ``rows[i]`` into ``out[i]`` for each index of
        ``part = (indices, first frame, end frame)``, in this thread's reused buffers."""
        cfg = self.config
        indices, start, stop = part
        n, half = rows.shape[-1], cfg.n_fft // 2
        blocks = [(m0, m1, k0, k1, getattr(self, f"block_{i}"))
                  for i, (m0, m1, k0, k1) in enumerate(self._blocks)]
        with torch.inference_mode():  # thread-local: worker threads must enter it too
            padded, frames, spectrum = self._workspace(n, stop - start, rows.device)
            framed = padded.unfold(0, cfg.n_fft, cfg.hop_length)[start:stop]  # views: no copy
            for i in indices:
                padded[half:half + n].copy_(rows[i])
                torch.mul(framed, self.window, out=frames)
                torch.fft.rfft(frames, out=spectrum)
                power = self._power(spectrum)
                target = out[i, :, start:stop]
                for m0, m1, k0, k1, weights in blocks:
                    torch.matmul(weights, power[:, k0:k1].T, out=target[m0:m1])
                _to_decibels(target, cfg.eps)

    def _workspace(self, n: int, frames: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This thread's padded-signal, frame and spectrum buffers for ``n`` samples and
        ``frames`` frames."""
        key = (n, frames, str(device))
        cached = getattr(self._workspaces, "buffers", None)
        if cached is None or cached[0] != key:
            cfg = self.config
            cached = (key, (
                torch.zeros(n + cfg.n_fft, device=device),  # zero padding stays zero
                torch.empty(frames, cfg.n_fft, device=device),
                torch.empty(frames, cfg.n_fft // 2 + 1, dtype=torch.complex64, device=device)))
            self._workspaces.buffers = cached
        return cached[1]

    def _power(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``|X|^2`` as interleaved squares ``(frames, 2*bins)`` (summed by the product),
        else ``|X|^power`` ``(frames, bins)``."""
        if self.config.power == 2.0:
            return torch.view_as_real(spectrum).square_().flatten(-2)
        return spectrum.abs().pow_(self.config.power)


def _to_decibels(power: torch.Tensor, eps: float) -> None:
    """``10 * log10(power + eps)`` in place; on CPU through NumPy, whose vectorised log is
    4x faster than torch's here (a tenth of one clip's log-mel time, 3-5 % of a batch's).
    Measured cost: the worker threads' heaps then keep about 60 MB more, a constant."""
    if power.device.type != "cpu":
        power.add_(eps).log10_().mul_(10.0)
        return
    values = power.numpy()
    np.add(values, eps, out=values)
    np.log10(values, out=values)
    np.multiply(values, 10.0, out=values)


MIN_FRAMES_PER_WORKER = 128  # below this a clip is not split: thread hand-off costs more


def _split_work(clips: int, frames: int, workers: int) -> list[tuple[range, int, int]]:
    """How ``workers`` threads share a batch: clips dealt round-robin, or, for one long
    clip, its frames in contiguous halves (measured: 15-20 % faster on 2 cores; a clip
    per thread scales better, so batches are split by clip)."""
    if workers < 2:
        return [(range(clips), 0, frames)]
    if clips >= 2:
        return [(range(k, clips, workers), 0, frames) for k in range(min(workers, clips))]
    parts = min(workers, frames // MIN_FRAMES_PER_WORKER)
    if parts < 2:
        return [(range(clips), 0, frames)]
    edges = [frames * k // parts for k in range(parts + 1)]
    return [(range(clips), edges[k], edges[k + 1]) for k in range(parts)]


_THREAD_COUNT_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous count."""
    with _THREAD_COUNT_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


@functools.lru_cache(maxsize=4)
def _worker_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="stethoscope-logmel")


@functools.lru_cache(maxsize=8)
def _logmel_module(config: FeatureConfig) -> LogMel:
    return LogMel(config)


def logmel(wave: np.ndarray, config: FeatureConfig | None = None) -> np.ndarray:
    """Log-mel of a waveform ``(C, n)`` (or ``(n,)``) → float32 ``(C, n_mels, frames)``.

    No frame crop here; :func:`clip_features` applies ``config.frames``.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        wave = wave[None]
    with torch.inference_mode():
        return _logmel_module(config or FeatureConfig())(torch.from_numpy(wave)).numpy()


def crop_frames(spec: np.ndarray, frames: int | None, source: str | Path | None) -> np.ndarray:
    """Keep the first ``frames`` frames; too short a clip is a DataError naming it."""
    if frames is None:
        return spec
    if spec.shape[-1] < frames:
        raise DataError(f"is too short: it gives {spec.shape[-1]} frames but the features "
                        f"need {frames}", source)
    return spec[..., :frames]


# ---------------------------------------------------------------------------- windows

WHOLE_READ_SAMPLES = 4_000_000  # samples × channels read at once; longer recordings by window


def window_samples(config: FeatureConfig) -> int | None:
    """Samples per window at the model's sample rate (None: the whole recording)."""
    return None if config.window_s is None else max(1, round(config.window_s * config.sample_rate))


def window_starts(n_samples: int, config: FeatureConfig, source: str | Path | None = None
                  ) -> list[int]:
    """Where the windows of a recording of ``n_samples`` (model rate) start, in samples.

    Windows of ``window_s`` every ``window_hop_s``; when the last one ends more than one STFT
    hop before the recording does, one more window is aligned to the end. A recording
    shorter than a window is a DataError naming it, unless ``pad_short``.

    >>> window_starts(192000, FeatureConfig(window_s=10.0))
    [0, 32000]
    """
    size = window_samples(config)
    if size is None:
        return [0]
    if n_samples < size:
        if config.pad_short:
            return [0]
        raise DataError(f"is {n_samples / config.sample_rate:.3g} s long, shorter than the "
                        f"model's {config.window_s:g} s window (pad_short / --pad pads it "
                        "with silence)", source)
    hop = size if config.window_hop_s is None else max(
        1, round(config.window_hop_s * config.sample_rate))
    starts = list(range(0, n_samples - size + 1, hop))
    if n_samples - (starts[-1] + size) > config.hop_length:
        starts.append(n_samples - size)
    return starts


@dataclass(frozen=True)
class RecordingPlan:
    """What the header of one recording says it will give: its windows' starts (model-rate
    samples) and its length in seconds."""

    path: Path
    starts: tuple[int, ...]
    seconds: float
    info: AudioInfo


def plan_recording(path: str | Path, config: FeatureConfig, info: AudioInfo | None = None
                   ) -> RecordingPlan:
    """Read a recording's header and lay out its windows; every header problem (missing,
    unreadable, wrong rate, no such channel, shorter than a window) is raised here, before
    any sample is read. ``info``: the header already read (an earlier plan of the same
    file), not read again."""
    path = Path(path)
    info = info or audio_info(path)
    if info.sample_rate != config.sample_rate and not config.resample:
        raise AudioError(f"sample rate is {info.sample_rate} Hz but the model expects "
                         f"{config.sample_rate} Hz; pass resample=True (--resample) to convert",
                         path)
    if isinstance(config.channels, int) and config.channels >= info.channels:
        raise AudioError(f"has {info.channels} channel(s); channel {config.channels} does not "
                         f"exist (choose 0-{info.channels - 1}, 'mean' or 'all')", path)
    n = info.frames if info.sample_rate == config.sample_rate else round(
        info.frames * config.sample_rate / info.sample_rate)
    return RecordingPlan(path, tuple(window_starts(n, config, path)), info.duration, info)


def _reading_channels(config: FeatureConfig) -> int | str:
    """"mean" averages the channels' log-mels (as for arrays), so every channel is read."""
    return "all" if config.channels == "mean" else config.channels


def read_windows(plan: RecordingPlan, config: FeatureConfig
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start sample, float32 (C, W))`` for every window of one recording. Short
    recordings are read whole (with :func:`read_wav`'s checks); long ones window by window,
    so memory follows the window, not the recording."""
    size = window_samples(config)
    channels = _reading_channels(config)
    whole = plan.info.frames * plan.info.channels <= WHOLE_READ_SAMPLES or size is None
    if whole:
        wave, _ = read_wav(plan.path, channels=channels, sample_rate=config.sample_rate,
                           resample=config.resample)
        for start in plan.starts:
            yield start, _padded(wave if size is None else wave[:, start:start + size], size)
        return
    ratio = plan.info.sample_rate / config.sample_rate
    for start in plan.starts:
        wave = read_wav_segment(plan.path, int(start * ratio), round(size * ratio),
                                channels=channels, sample_rate=config.sample_rate,
                                resample=config.resample, info=plan.info)
        yield start, _padded(wave[:, :size], size)


def _padded(wave: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or wave.shape[1] >= size:
        return wave
    return np.pad(wave, ((0, 0), (0, size - wave.shape[1])))


def window_features(spec: np.ndarray, config: FeatureConfig, source: str | Path | None
                    ) -> np.ndarray:
    """One window's log-mel ``(C, M, F)`` as a model takes it: the channels' mean when the
    channel choice is "mean", then the frame crop."""
    if config.channels == "mean" and spec.shape[0] > 1:
        spec = spec.mean(axis=0, keepdims=True)
    return crop_frames(spec, config.frames, source)


def waveform_windows(wave: np.ndarray, config: FeatureConfig, source: str | Path
                     ) -> list[tuple[int, np.ndarray]]:
    """``(start sample, (C, W))`` windows of audio already in memory, ``float32 (C, n)`` at
    the model's rate, with the channel choice a file read would make."""
    from stethoscope.audio import select_channels

    wave = select_channels(wave, _reading_channels(config), source)
    size = window_samples(config)
    return [(start, _padded(wave if size is None else wave[:, start:start + size], size))
            for start in window_starts(wave.shape[1], config, source)]


def _finish(spec: np.ndarray, config: FeatureConfig, source: Path) -> np.ndarray:
    """:func:`window_features` and a finiteness check of one window read from a file."""
    spec = window_features(spec, config, source)
    if not np.isfinite(spec).all():
        raise AudioError("gives non-finite features: its samples overflow (far outside "
                         "[-1, 1]) or are corrupt", source)
    return spec


def clip_features(path: str | Path, config: FeatureConfig | None = None) -> np.ndarray:
    """Read one WAV and return the log-mel ``(C, M, F)`` of its first window (the whole clip
    when no window is set), cropped to ``config.frames``."""
    config = config or FeatureConfig()
    plan = plan_recording(path, config)
    plan = dataclasses.replace(plan, starts=plan.starts[:1])
    return recording_features(plan, config)[0]


def recording_features(recording: str | Path | RecordingPlan, config: FeatureConfig
                       ) -> np.ndarray:
    """Log-mel of every window of one recording, ``(W, C, M, F)``."""
    plan = recording if isinstance(recording, RecordingPlan) else plan_recording(recording,
                                                                                  config)
    module = _logmel_module(config)
    waves = [wave for _, wave in read_windows(plan, config)]
    return np.stack([_finish(spec, config, plan.path) for spec in _logmel_batch(waves, module)])


# ---------------------------------------------------------------------------- corpora


@dataclass
class WindowChunk:
    """Features of consecutive windows of a list of recordings.

    ``specs``: float32 ``(n, C, M, F)``; ``owner``: ``(n,)`` index of each window's recording
    in the list; ``start``: ``(n,)`` each window's start in model-rate samples."""

    specs: np.ndarray
    owner: np.ndarray
    start: np.ndarray


def extract_features(paths: Sequence[str | Path], config: FeatureConfig | None = None, *,
                     cache_dir: str | Path | None = None, progress: bool = False
                     ) -> np.ndarray:
    """Log-mel of every window of every file → float32 ``(N, C, M, F)``, streamed in chunks
    (one window per file unless ``config.window_s`` is set).

    With ``cache_dir`` the array is written there (named by a hash of the settings and each
    file's path, size and modification time) and returned as a read-only memory map; the
    next call with the same inputs opens it without reading any WAV.
    """
    config = config or FeatureConfig()
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no recordings to compute features from")
    plans = [plan_recording(path, config) for path in paths]  # header errors before work
    return features_of_plans(plans, config, cache_dir=cache_dir, progress=progress)


def features_of_plans(plans: list[RecordingPlan], config: FeatureConfig, *,
                      cache_dir: str | Path | None = None, progress: bool = False
                      ) -> np.ndarray:
    """The features of every window of planned recordings, ``(N, C, M, F)``, in memory or
    through the on-disk cache (see :func:`extract_features`)."""
    paths = [plan.path for plan in plans]
    n_windows = sum(len(plan.starts) for plan in plans)
    if cache_dir is None:
        sink = _MemorySink(n_windows)
        _extract(plans, config, progress, sink)
        return sink.array
    cache_file = cache_path(paths, config, cache_dir)
    cached = _open_cache(cache_file, n_windows)
    if cached is not None:
        return cached
    return _extract_to_cache(plans, config, progress, cache_file, n_windows)


def cache_path(paths: Sequence[Path], config: FeatureConfig, cache_dir: str | Path) -> Path:
    """Where the cached features of these files under these settings live."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "config": config.to_dict()},
                             sort_keys=True).encode())
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise AudioError("no such file", path) from None
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return Path(cache_dir) / f"logmel-{digest.hexdigest()[:24]}.npy"


def _open_cache(cache_file: Path, n_windows: int) -> np.ndarray | None:
    """The cached array, or None when absent or unusable (then it is rebuilt)."""
    if not cache_file.is_file():
        return None
    try:
        array = np.load(cache_file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.ndim != 4 or array.shape[0] != n_windows or array.dtype != np.float32:
        return None
    return array


def _extract_to_cache(plans: list[RecordingPlan], config: FeatureConfig, progress: bool,
                      cache_file: Path, n_windows: int) -> np.ndarray:
    """Stream the features into a temporary .npy beside ``cache_file``, then rename it."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{cache_file.stem}.", suffix=".npy.tmp",
                                    dir=cache_file.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            _extract(plans, config, progress, _NpyFileSink(n_windows, handle))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, cache_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(cache_file, mmap_mode="r", allow_pickle=False)


class _MemorySink:
    """Collects the spectrograms of a corpus in one in-memory array."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.array: np.ndarray | None = None

    def add(self, index: int, spec: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.n_rows, *spec.shape), dtype=np.float32)
        self.array[index] = spec


class _NpyFileSink:
    """Appends spectrograms, in order, to an open ``.npy`` file: memory stays flat whatever
    the corpus size (a writable memory map would keep every written page resident)."""

    def __init__(self, n_rows: int, handle) -> None:
        self.n_rows = n_rows
        self.handle = handle

    def add(self, index: int, spec: np.ndarray) -> None:
        if index == 0:
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.n_rows, *spec.shape)}
            np.lib.format.write_array_header_1_0(self.handle, header)
        self.handle.write(np.ascontiguousarray(spec, dtype="<f4").tobytes())


def _extract(plans: list[RecordingPlan], config: FeatureConfig, progress: bool, sink) -> None:
    """Pass every window's ``(C, M, F)`` to ``sink.add`` in order; all must share one shape."""
    first: tuple[tuple[int, ...], Path] | None = None
    row = 0
    with progress_bar(len(plans), "log-mel features", enabled=progress) as bar:
        for chunk in iter_window_chunks(plans, config, on_error="raise"):
            first = first or (chunk.specs.shape[1:], plans[chunk.owner[0]].path)
            _check_same_shape(first, chunk.specs.shape[1:], plans[chunk.owner[0]].path)
            for spec in chunk.specs:
                sink.add(row, spec)
                row += 1
            bar.advance(len(set(chunk.owner.tolist())))


def _check_same_shape(first: tuple[tuple[int, ...], Path], shape: tuple[int, ...],
                      path: Path) -> None:
    if shape != first[0]:
        raise DataError(
            f"features of shape {tuple(shape)} differ from {tuple(first[0])} of the first "
            f"clip {first[1]}; all clips need the same length, sample rate and channels "
            "(set a window length to cut them into equal windows)", path)


def iter_window_chunks(plans: Sequence[RecordingPlan], config: FeatureConfig, *,
                       chunk_windows: int = CLIPS_PER_CHUNK, on_error: str = "raise",
                       errors: dict[int, Exception] | None = None) -> Iterator[WindowChunk]:
    """Features of every window of ``plans`` in order, ``chunk_windows`` at a time (a long
    recording spans several chunks), reading the next chunk while this one computes.

    ``on_error="collect"``: a recording that fails to read is left out (all its windows) and
    its error stored in ``errors[index]``; ``"raise"``: the error propagates."""
    errors = {} if errors is None else errors
    jobs = [(i, start) for i, plan in enumerate(plans) for start in plan.starts]
    chunks = [jobs[k:k + chunk_windows] for k in range(0, len(jobs), chunk_windows)]
    if not chunks:
        return
    module = _logmel_module(config)
    if len(chunks) == 1:  # nothing to read ahead: a reader thread would cost 2 ms per call
        waves = _read_job_chunk(plans, chunks[0], config, on_error, errors)
        kept = [(job, wave) for job, wave in zip(chunks[0], waves, strict=True)
                if wave is not None and job[0] not in errors]
        chunk = _transform_jobs(plans, kept, config, module, on_error, errors)
        if chunk is not None:
            yield chunk
        return
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_job_chunk, plans, chunks[0], config, on_error, errors)
        for index in range(len(chunks)):
            waves = pending.result()
            if index + 1 < len(chunks):
                pending = reader.submit(_read_job_chunk, plans, chunks[index + 1], config,
                                        on_error, errors)
            kept = [(job, wave) for job, wave in zip(chunks[index], waves, strict=True)
                    if wave is not None and job[0] not in errors]
            chunk = _transform_jobs(plans, kept, config, module, on_error, errors)
            if chunk is not None:
                yield chunk


def _read_job_chunk(plans: Sequence[RecordingPlan], jobs: list[tuple[int, int]],
                    config: FeatureConfig, on_error: str, errors: dict[int, Exception]
                    ) -> list[np.ndarray | None]:
    """The waveforms of ``jobs`` (recording index, window start); a recording read whole is
    read once for all its windows in the chunk."""
    out: list[np.ndarray | None] = []
    cache: dict[int, dict[int, np.ndarray]] = {}
    for owner, start in jobs:
        if owner in errors:
            out.append(None)
            continue
        try:
            if owner not in cache:
                wanted = [s for o, s in jobs if o == owner]
                plan = dataclasses.replace(plans[owner], starts=tuple(wanted))
                cache = {owner: dict(read_windows(plan, config))}
            out.append(cache[owner][start])
        except StethoscopeError as err:
            if on_error == "raise":
                raise
            errors[owner] = err
            out.append(None)
    return out


def _transform_jobs(plans, kept, config, module, on_error, errors) -> WindowChunk | None:
    specs, owners, starts = [], [], []
    for (owner, start), spec in zip([job for job, _ in kept],
                                    _logmel_batch([wave for _, wave in kept], module),
                                    strict=True):
        try:
            spec = _finish(spec, config, plans[owner].path)
        except StethoscopeError as err:
            if on_error == "raise":
                raise
            errors[owner] = err
            continue
        specs.append(spec)
        owners.append(owner)
        starts.append(start)
    keep = [i for i, owner in enumerate(owners) if owner not in errors]
    if not keep:
        return None
    first = (specs[keep[0]].shape, plans[owners[keep[0]]].path)
    for i in keep:
        _check_same_shape(first, specs[i].shape, plans[owners[i]].path)
    return WindowChunk(np.stack([specs[i] for i in keep]).astype(np.float32, copy=False),
                       np.array([owners[i] for i in keep]), np.array([starts[i] for i in keep]))


def _logmel_batch(waves: list[np.ndarray], module: LogMel) -> list[np.ndarray]:
    """Log-mel of waveforms of possibly different shapes, batching those of equal shape."""
    specs: list[np.ndarray | None] = [None] * len(waves)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, wave in enumerate(waves):
        by_shape.setdefault(wave.shape, []).append(i)
    with torch.inference_mode():
        for indices in by_shape.values():
            batch = torch.from_numpy(np.stack([waves[i] for i in indices]))
            result = module(batch).numpy()
            for j, i in enumerate(indices):
                specs[i] = result[j]
    return specs  # type: ignore[return-value]


# ---------------------------------------------------------------------------- arrays


def load_feature_array(path: str | Path, *, channels: int | str = 0,
                       frames: int | None = None) -> np.ndarray:
    """Precomputed spectrograms from a ``.npy`` file → float32 ``(N, C, M, F)``.

    Accepts ``(N, M, F)`` or ``(N, channels, M, F)`` (the course's ``(N, 8, 64, 313)``),
    picks ``channels`` (index, "mean" or "all") and keeps the first ``frames`` frames. The
    file is memory-mapped; only "mean" or a non-float32 file makes an in-memory copy.
    """
    path = Path(path)
    array = _open_npy(path)
    select_feature_channels(array[:1], channels, path)  # a bad channel choice before any reading
    if frames is not None and array.shape[-1] < frames:
        raise DataError(f"has {array.shape[-1]} frames per clip (shape {array.shape}); the "
                        f"features need {frames}", path)
    array = array[..., :frames] if frames is not None else array
    _check_finite(array, path)
    array = select_feature_channels(array, channels, path)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "is not a file", path)
    if path.suffix.lower() != ".npy":
        raise DataError("is not a .npy array (expected spectrograms saved with numpy.save)",
                        path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot be read as a .npy array ({reason})", path) from None
    if array.dtype.kind not in "fiu":
        raise DataError(f"holds {array.dtype} values; expected numbers", path)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise DataError(f"has shape {array.shape}; expected (N, mels, frames) or "
                        "(N, channels, mels, frames)", path)
    if array.shape[0] == 0:
        raise DataError(f"holds no spectrograms (shape {array.shape})", path)
    return array


def iter_chunks(specs, rows: int, dtype: type = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, copy of specs[start:start + rows] as dtype)`` over an array-like of clips.

    For a memory-mapped corpus the pages just copied are dropped from this process (they
    stay in the kernel's page cache), so resident memory does not grow with the corpus."""
    for start in range(0, len(specs), rows):
        chunk = np.array(specs[start:start + rows], dtype=dtype)
        release_mapped_pages(specs)
        yield start, chunk


def release_mapped_pages(array) -> None:
    """Unmap the resident pages of a read-only ``np.memmap``; the data stays on disk and in
    the page cache and is read back on the next access. Writable or copy-on-write maps, and
    anything that is not a memmap, are left alone: their changes could be lost.

    NumPy exposes the mapping only as ``memmap._mmap``; nothing happens without one."""
    mapping = getattr(array, "_mmap", None) if isinstance(array, np.memmap) else None
    if mapping is not None and array.mode == "r" and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # closed or unsupported: keep the pages
            mapping.madvise(mmap.MADV_DONTNEED)


def _rows_per_pass(array: np.ndarray, budget_bytes: int = 64 << 20) -> int:
    row_bytes = max(int(np.prod(array.shape[1:])) * 4, 1)
    return max(1, budget_bytes // row_bytes)


def _check_finite(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind != "f":
        return
    step = _rows_per_pass(array)
    for start in range(0, array.shape[0], step):
        block = np.asarray(array[start:start + step])
        finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not finite.all():
            raise DataError(f"spectrogram {start + int(np.argmin(finite))} contains NaN or "
                            "infinite values", path)


def _channel_mean(array: np.ndarray) -> np.ndarray:
    out = np.empty((array.shape[0], 1, *array.shape[2:]), dtype=np.float32)
    step = _rows_per_pass(array)
    for start in range(0, array.shape[0], step):
        out[start:start + step] = array[start:start + step].mean(axis=1, keepdims=True,
                                                                 dtype=np.float32)
    return out


def check_features_match(array: np.ndarray, expected_shape: Sequence[int],
                         source: str | Path | None = None) -> None:
    """Raise DataError when spectrograms do not have the shape a model was trained on.

    ``array`` is one clip ``(C, M, F)`` or a corpus ``(N, C, M, F)``; ``expected_shape`` is
    the model's per-clip input shape.
    """
    expected = tuple(int(s) for s in expected_shape)
    shape = tuple(int(s) for s in np.shape(array))
    got = shape[-len(expected):] if len(shape) >= len(expected) else shape
    if got == expected:
        return
    names = ("channels", "mel bands", "frames")[-len(expected):] if len(expected) <= 3 else ()
    differ = [f"{name} {g} vs {e}" for name, g, e in zip(names, got, expected, strict=False)
              if g != e]
    hint = f" ({', '.join(differ)}); use the feature settings the model was trained with" \
        if differ and len(got) == len(expected) else ""
    raise DataError(f"features of shape {got} do not match the model's input {expected}{hint}",
                    source)


def check_features_finite(array: np.ndarray, source: str | Path | None) -> None:
    """Raise DataError naming the first spectrogram with NaN or infinite values."""
    _check_finite(array, Path(str(source)) if source is not None else Path("input array"))


def select_feature_channels(array: np.ndarray, channels: int | str, source: str | Path
                            ) -> np.ndarray:
    """Channels of spectrograms ``(N, C, M, F)`` chosen as for recordings: an index, "mean"
    (of the channels' log-mels) or "all"."""
    try:
        channels = parse_channels(channels)
    except ValueError as err:
        raise DataError(str(err), source) from None
    n_channels = array.shape[1]
    if isinstance(channels, int) and channels >= n_channels:
        noun = "channel" if n_channels == 1 else "channels"
        raise DataError(f"has {n_channels} {noun} (shape {array.shape}); channel {channels} "
                        f"does not exist", source)
    if channels == "mean":
        return _channel_mean(array) if n_channels > 1 else array
    if isinstance(channels, int):
        return array[:, channels:channels + 1]
    return array


# ---------------------------------------------------------------------------- featurizer


@dataclass
class Corpus:
    """Features of some inputs, ready for a model: one row per window.

    ``specs``: float32 ``(N, C, M, F)`` (possibly a read-only memmap); ``owner``: ``(N,)``
    index of each row's input (recording, or row of an array); ``start``: ``(N,)`` each
    window's start in model-rate samples; ``recordings``: the clips the rows came from (None
    for arrays); ``errors``: input index → the error that kept it out; ``source``: a name
    for messages; ``n_inputs``: how many inputs (recordings or array rows) were given;
    ``plans``: the window plans (headers) of the recordings this piece read, if any.
    """

    specs: np.ndarray
    owner: np.ndarray
    start: np.ndarray
    recordings: list | None
    errors: dict[int, Exception]
    source: str
    n_inputs: int
    plans: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.specs)


ARRAY_KINDS = ("array", "npy")


def input_kind(X) -> str:
    """``"array"`` (an ndarray of features), ``"npy"`` (a ``.npy`` file of features, alone
    or as the one item of a list) or ``"recordings"`` (WAV files, folders, lists, Clips)."""
    if isinstance(X, np.ndarray):
        return "array"
    if _npy_path(X) is not None:
        return "npy"
    return "recordings"


def _npy_path(X) -> Path | None:
    if isinstance(X, str | Path):
        return Path(X) if str(X).lower().endswith(".npy") else None
    if isinstance(X, list | tuple) and len(X) == 1 and isinstance(X[0], str | Path):
        return _npy_path(X[0])
    return None


class Featurizer:
    """Turns recordings, ``.npy`` files or arrays into a :class:`Corpus` the same way for
    every input kind: the same channel choice, frame crop, windows and checks.

    Parameters
    ----------
    config : the feature settings (a model's ``feature_config_``).
    cache_dir : on-disk feature cache for recordings (None: none).
    progress : show a progress bar (None: the process-wide switch, :mod:`stethoscope.progress`).

    >>> corpus = Featurizer(FeatureConfig(channels="mean")).transform(np.zeros((4, 2, 8, 10)))
    >>> corpus.specs.shape
    (4, 1, 8, 10)
    """

    def __init__(self, config: FeatureConfig, *, cache_dir: str | Path | None = None,
                 progress: bool | None = None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.progress = progress

    # ---- arrays
    def array_corpus(self, X, source: str | None = None) -> Corpus:
        """Spectrograms ``(N, M, F)`` or ``(N, C, M, F)`` from an ndarray or a ``.npy`` file."""
        path = _npy_path(X)
        if path is not None:
            specs = load_feature_array(path, channels=self.config.channels,
                                       frames=self.config.frames)
            name = str(path)
        else:
            name = source or "input array"
            specs = self._array(np.asarray(X), name)
        n = len(specs)
        return Corpus(specs, np.arange(n), np.zeros(n, dtype=np.int64), None, {}, name, n)

    def _array(self, X: np.ndarray, source: str) -> np.ndarray:
        if X.ndim == 3:
            X = X[:, None]
        if X.ndim != 4 or X.shape[0] == 0:
            raise DataError(f"array of shape {X.shape} is not spectrograms; expected "
                            "(N, mels, frames) or (N, channels, mels, frames)", source)
        if X.dtype.kind not in "fiu":
            raise DataError(f"array holds {X.dtype} values; expected numbers", source)
        check_features_finite(X, source)
        X = select_feature_channels(X, self.config.channels, source)
        X = crop_frames(X, self.config.frames, source)
        return np.ascontiguousarray(X, dtype=np.float32)

    # ---- recordings
    def clips(self, X) -> list:
        """The clips that files, folders, list files or Clip objects stand for."""
        from stethoscope.datasets import Clip, find_clips

        items = [X] if isinstance(X, str | Path | Clip) else list(X)
        if not items:
            raise DataError("no input recordings given")
        if all(isinstance(c, Clip) for c in items):
            return list(items)
        return find_clips([c.path if isinstance(c, Clip) else c for c in items])

    def plans(self, clips: Sequence, headers: Sequence[AudioInfo] | None = None
              ) -> list[RecordingPlan]:
        """Every clip's window plan (header errors raised before any sample is read);
        ``headers``: the clips' headers when already read, in the same order."""
        headers = headers or [None] * len(clips)
        return [plan_recording(clip.path, self.config, info)
                for clip, info in zip(clips, headers, strict=True)]

    def transform(self, X, headers: Sequence[AudioInfo] | None = None) -> Corpus:
        """The whole corpus at once (training). Any unusable input raises its error.
        ``headers``: the recordings' headers when already read (see :meth:`plans`)."""
        if input_kind(X) in ARRAY_KINDS:
            return self.array_corpus(X)
        clips = self.clips(X)
        plans = self.plans(clips, headers)
        specs = features_of_plans(plans, self.config, cache_dir=self.cache_dir,
                                  progress=progress_enabled(self.progress))
        owner = np.concatenate([np.full(len(p.starts), i) for i, p in enumerate(plans)])
        start = np.concatenate([np.asarray(p.starts, dtype=np.int64) for p in plans])
        return Corpus(specs, owner, start, clips, {}, _source_of(clips), len(clips), plans)

    def iter_transform(self, X, *, chunk_recordings: int = 64, chunk_windows: int = 64,
                       on_error: str = "raise") -> Iterator[Corpus]:
        """The corpus in pieces of at most ``chunk_windows`` rows, so memory stays flat
        whatever the number and length of the recordings (scoring).

        ``owner`` indexes all the inputs of ``X``; a long recording spans several pieces.
        ``on_error="collect"``: inputs that cannot be read are left out and their errors put
        in the piece's ``errors``; ``"raise"``: the first error propagates."""
        if input_kind(X) in ARRAY_KINDS:
            yield self.array_corpus(X)
            return
        clips = self.clips(X)
        for first in range(0, len(clips), chunk_recordings):
            part = clips[first:first + chunk_recordings]
            errors: dict[int, Exception] = {}
            plans, index = [], []
            for i, clip in enumerate(part):
                try:
                    plans.append(plan_recording(clip.path, self.config))
                    index.append(first + i)
                except StethoscopeError as err:
                    if on_error == "raise":
                        raise
                    errors[first + i] = err
            local: dict[int, Exception] = {}
            pieces = iter_window_chunks(plans, self.config, chunk_windows=chunk_windows,
                                        on_error=on_error, errors=local)
            for k, piece in enumerate(pieces):
                owner = np.asarray(index)[piece.owner]
                yield Corpus(piece.specs, owner, piece.start, clips, {}, _source_of(part),
                             len(clips), plans if k == 0 else [])
            errors.update({index[i]: err for i, err in local.items()})
            if errors:
                empty = np.zeros((0, *self._row_shape()), dtype=np.float32)
                yield Corpus(empty, np.zeros(0, dtype=int), np.zeros(0, dtype=np.int64), clips,
                             errors, _source_of(part), len(clips))

    def _row_shape(self) -> tuple[int, ...]:
        return (0, 0, 0)


def _source_of(clips: Sequence) -> str:
    if not clips:
        return "input"
    return str(clips[0].path.parent) if len(clips) > 1 else str(clips[0].path)
