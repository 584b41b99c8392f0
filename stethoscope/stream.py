"""Score sound as it arrives: raw PCM or a WAV stream on stdin, or a sound card.

>>> scorer = load_scorer("valve-model")                             # doctest: +SKIP
>>> for line in score_stream(PcmReader(sys.stdin.buffer, PcmFormat("s16le", 16000, 1)),
...                          scorer):                               # doctest: +SKIP
...     print(line["score"])

Audio is cut into windows of the model's length (``--window``/``--hop`` in seconds change
them); each window is scored the moment its last sample has arrived, so a result is ready
one window plus the compute time (``compute_ms``, measured per window) after the window's
first sample. A tail shorter than a window at the end of the stream is not scored (said on
stderr).

Input: ``s16le``, ``s32le`` or ``f32le`` interleaved samples at ``--rate``/``--channels``
(``arecord -t raw -f S16_LE -r 16000 -c 1``), or a WAV stream (``--format wav``; a raw
format whose first bytes are a RIFF/WAVE header is read as WAV too, which is what a plain
``arecord -f S16_LE -r 16000`` writes). ``--device N`` records from a sound card through
the optional ``sounddevice`` package (``pip install 'stethoscope[microphone]'``).
"""

from __future__ import annotations

import datetime as dt
import io
import queue
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

import numpy as np

from stethoscope.errors import StethoscopeError

SOURCE_NAME = "stdin"
# encoding -> (NumPy dtype of one sample, factor to [-1, 1], soundfile subtype for posting)
ENCODINGS = {
    "s16le": ("<i2", 2.0 ** -15, "PCM_16"),
    "s32le": ("<i4", 2.0 ** -31, "PCM_32"),
    "f32le": ("<f4", 1.0, "FLOAT"),
}
STREAM_FORMATS = (*ENCODINGS, "wav")
_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers put in the data chunk's size


class StreamError(StethoscopeError):
    """The stream cannot be read or scored: bad header, wrong rate, no sound card support."""


@dataclass(frozen=True)
class PcmFormat:
    """How the samples of a stream are laid out: encoding, rate (Hz) and channels."""

    encoding: str
    rate: int
    channels: int

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise StreamError(f"unknown sample format {self.encoding!r}; use one of "
                              f"{', '.join(STREAM_FORMATS)}")
        if self.rate <= 0 or self.channels <= 0:
            raise StreamError(f"rate ({self.rate}) and channels ({self.channels}) must be "
                              "positive")

    @property
    def frame_bytes(self) -> int:
        return np.dtype(ENCODINGS[self.encoding][0]).itemsize * self.channels

    @property
    def subtype(self) -> str:
        return ENCODINGS[self.encoding][2]


# ----------------------------------------------------------------------------- readers


class PcmReader:
    """Interleaved PCM samples from a binary stream as float32 ``(C, n)`` blocks.

    ``limit`` caps the bytes read (a WAV data chunk of known size)."""

    def __init__(self, stream: BinaryIO, fmt: PcmFormat, *, limit: int | None = None,
                 source: str = SOURCE_NAME) -> None:
        self.stream, self.format, self.limit, self.source = stream, fmt, limit, source
        self._carry = b""  # a partial sample frame left by the last read
        self.tail = 0  # samples at the end too few for a window (set by iter_windows)

    def read(self, samples: int) -> np.ndarray:
        """Up to ``samples`` sample frames; fewer only at the end of the stream."""
        want = samples * self.format.frame_bytes - len(self._carry)
        data = self._carry + _read_exactly(self.stream, self._take(want))
        whole = len(data) - len(data) % self.format.frame_bytes
        self._carry = data[whole:]
        dtype, scale, _ = ENCODINGS[self.format.encoding]
        values = np.frombuffer(data[:whole], dtype=dtype).reshape(-1, self.format.channels)
        out = values.T.astype(np.float32)
        if scale != 1.0:
            out *= np.float32(scale)
        return out

    def _take(self, want: int) -> int:
        if self.limit is None:
            return max(want, 0)
        want = max(min(want, self.limit), 0)
        self.limit -= want
        return want

    @property
    def leftover_bytes(self) -> int:
        return len(self._carry)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, or fewer at the end of the stream (pipes return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_wav_header(stream: BinaryIO, head: bytes = b"", source: str = SOURCE_NAME
                    ) -> tuple[PcmFormat, int | None]:
    """Parse a WAV header from a stream (``head``: bytes already read from it) up to the
    start of the samples; returns the format and the data size (None: until the end).

    Parsed by hand because soundfile (libsndfile) needs a seekable file and a pipe is not.
    """
    head = head + _read_exactly(stream, 12 - len(head))
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise StreamError("is not a WAV stream (no RIFF/WAVE header)", source)
    fmt = None
    while True:
        chunk = _read_exactly(stream, 8)
        if len(chunk) < 8:
            raise StreamError("WAV stream ends before its data chunk", source)
        chunk_id, size = struct.unpack("<4sI", chunk)
        if chunk_id == b"data":
            if fmt is None:
                raise StreamError("WAV stream has no fmt chunk before its data", source)
            return fmt, None if size in _UNKNOWN_SIZES else size
        body = _read_exactly(stream, size + (size & 1))
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(body[:size], source)


def _parse_fmt(body: bytes, source: str) -> PcmFormat:
    if len(body) < 16:
        raise StreamError("WAV stream has a short fmt chunk", source)
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the tag
    encodings = {(_WAVE_FORMAT_PCM, 16): "s16le", (_WAVE_FORMAT_PCM, 32): "s32le",
                 (_WAVE_FORMAT_FLOAT, 32): "f32le"}
    if (tag, bits) not in encodings:
        raise StreamError(f"WAV stream holds {bits}-bit samples of format {tag}; streams of "
                          "16/32-bit integer or 32-bit float PCM are supported", source)
    return PcmFormat(encodings[(tag, bits)], int(rate), int(channels))


def open_stdin_stream(stream: BinaryIO, encoding: str, rate: int, channels: int,
                      log: TextIO | None = None) -> PcmReader:
    """A reader for stdin: a WAV stream (``encoding="wav"`` or a RIFF header seen at the
    start of a raw stream) or raw PCM as given."""
    if encoding not in STREAM_FORMATS:
        raise StreamError(f"unknown stream format {encoding!r}; use one of "
                          f"{', '.join(STREAM_FORMATS)}")
    head = _read_exactly(stream, 4)
    if encoding == "wav" or head == b"RIFF":
        if encoding != "wav":
            _note("stdin starts with a WAV header; reading it as WAV (its own rate and "
                  f"channels, not --format {encoding})", log)
        fmt, size = read_wav_header(stream, head)
        return PcmReader(stream, fmt, limit=size)
    reader = PcmReader(stream, PcmFormat(encoding, rate, channels))
    reader._carry = head
    return reader


class DeviceReader:
    """Float32 blocks ``(C, n)`` recorded from a sound card through ``sounddevice``."""

    def __init__(self, device: int | str, rate: int, channels: int, block: int) -> None:
        try:
            import sounddevice
        except ImportError:
            raise StreamError("--device needs the optional sounddevice package: pip install "
                              "'stethoscope[microphone]'") from None
        except OSError as err:  # the package is there but PortAudio is not
            raise StreamError(f"sounddevice cannot load PortAudio ({err})") from None
        self.format = PcmFormat("f32le", rate, channels)
        self.source = f"device {device}"
        self._blocks: queue.Queue = queue.Queue()
        self._pending = np.zeros((channels, 0), dtype=np.float32)
        self.tail = 0
        try:
            self._stream = sounddevice.InputStream(
                device=device, channels=channels, samplerate=rate, dtype="float32",
                blocksize=block, callback=self._on_block)
            self._stream.start()
        except Exception as err:  # PortAudio errors come in several types
            raise StreamError(f"cannot record from sound card {device!r} "
                              f"({str(err).splitlines()[0]})") from None

    def _on_block(self, data, frames, time_info, status) -> None:
        self._blocks.put(np.array(data, dtype=np.float32).T)

    def read(self, samples: int) -> np.ndarray:
        parts, have = [self._pending], self._pending.shape[1]
        while have < samples:
            block = self._blocks.get()
            parts.append(block)
            have += block.shape[1]
        joined = np.concatenate(parts, axis=1)
        self._pending = joined[:, samples:]
        return joined[:, :samples]

    leftover_bytes = 0

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


# ----------------------------------------------------------------------------- windows


def iter_windows(reader, window: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start sample, float32 (C, window))`` for each window of the stream, yielded as
    soon as its last sample is read; afterwards ``reader.tail`` holds how many samples at
    the end were too few for a window."""
    if window <= 0 or hop <= 0:
        raise StreamError(f"window ({window}) and hop ({hop}) must be positive samples")
    buffer = reader.read(window)
    start, scored_until = 0, 0
    while buffer.shape[1] == window:
        yield start, buffer
        scored_until = start + window
        start += hop
        if hop >= window:
            _skip(reader, hop - window)
            buffer = reader.read(window)
        else:
            buffer = np.concatenate([buffer[:, hop:], reader.read(hop)], axis=1)
    reader.tail = max(start + buffer.shape[1] - scored_until, 0)


def _skip(reader, samples: int) -> None:
    block = 1 << 16
    while samples > 0:
        got = reader.read(min(samples, block)).shape[1]
        if got == 0:
            return
        samples -= got


# ----------------------------------------------------------------------------- scoring


def wav_bytes(wave: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """A float32 ``(C, n)`` window as the bytes of a WAV file."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave.T, rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


def _shifted(windows: list[dict], offset_s: float) -> list[dict]:
    return [{**w, "start_s": round(w["start_s"] + offset_s, 6),
             "end_s": round(w["end_s"] + offset_s, 6)} for w in windows]


def score_stream(reader, scorer, *, window: int | None = None, hop: int | None = None,
                 poster=None, log: TextIO | None = None, resample: bool = False
                 ) -> Iterator[dict]:
    """Score a stream window by window; yields one result per window as it completes.

    Parameters
    ----------
    reader : :class:`PcmReader` or :class:`DeviceReader` (anything with ``read(n)`` and
        ``format``), at the model's sample rate unless ``resample``.
    scorer : a :class:`stethoscope.edge.Scorer` (``load_scorer(model)``), or None to only
        post (then ``window`` is needed).
    window, hop : samples of the stream per window and between window starts (default: the
        model's window, back to back).
    poster : a :class:`stethoscope.watch.RecordingPoster`; each window is posted as a WAV.
    resample : convert each window from the stream's rate to the model's (scipy's
        polyphase filter, as ``score --resample`` converts a file); else a stream at another
        rate is an error.

    Yields
    ------
    dict with ``window`` (index), ``start_s``, ``end_s`` (seconds from the stream's start),
    ``score``, ``anomalous``, ``error``, ``windows``, ``compute_ms`` (decoding excluded:
    features, model, pooling) and ``completed_at`` (UTC, ISO 8601); ``server`` (the
    service's answer) or ``server_error`` when posting.
    """
    log = log or sys.stderr
    rate = reader.format.rate
    model_rate = rate if scorer is None else scorer.sample_rate
    if scorer is not None:
        if rate != model_rate and not resample:
            raise StreamError(f"the stream is at {rate} Hz but the model needs "
                              f"{model_rate} Hz (pass --resample, or resample before, e.g. "
                              f"arecord -r {model_rate})", getattr(reader, "source", None))
        if rate != model_rate:
            from stethoscope.audio import check_rate_bounds

            check_rate_bounds(getattr(reader, "source", None), rate)  # before any window
        window = window or round(scorer.window_samples * rate / model_rate)
        model_window = round(window * model_rate / rate)  # a window's samples at the model's rate
        if model_window < scorer.window_samples:
            raise StreamError(f"a window of {window / rate:.4g} s is shorter than the model's "
                              f"{scorer.window_samples / model_rate:.4g} s")
    if window is None:
        raise StreamError("without a model, give the window length (--window SECONDS)")
    hop = hop or window
    source = getattr(reader, "source", SOURCE_NAME)
    if scorer is not None:
        warm_up(scorer, model_window, reader.format.channels)
    for index, (start, wave) in enumerate(iter_windows(reader, window, hop)):
        offset = start / rate
        line: dict = {"window": index, "start_s": round(offset, 6),
                      "end_s": round((start + window) / rate, 6)}
        if scorer is not None:
            began = time.perf_counter()
            try:
                result = scorer.score_waveform(_at_model_rate(wave, rate, model_rate,
                                                              model_window),
                                               model_rate, source=source)
            except StethoscopeError as err:
                result = {"score": None, "anomalous": None, "error": str(err), "windows": []}
            line["compute_ms"] = round((time.perf_counter() - began) * 1e3, 3)
            line.update(score=result["score"], anomalous=result["anomalous"],
                        error=result["error"], windows=_shifted(result["windows"], offset))
        completed = dt.datetime.now(dt.timezone.utc)
        line["completed_at"] = completed.isoformat()
        if poster is not None:
            line.update(_post_window(poster, wave, rate, reader.format.subtype,
                                     completed - dt.timedelta(seconds=window / rate),
                                     f"{source} window {index}", scorer is None))
        yield line
    tail = getattr(reader, "tail", 0)
    if tail:
        _note(f"the last {tail / rate:.3g} s were shorter than a window and not scored", log)
    if getattr(reader, "leftover_bytes", 0):
        _note(f"the stream ended inside a sample frame ({reader.leftover_bytes} bytes "
              "ignored)", log)


def _at_model_rate(wave: np.ndarray, rate: int, model_rate: int, length: int) -> np.ndarray:
    """A window ``(C, window)`` of the stream at the model's rate: resampled, then cut or
    zero-padded to ``length``, the samples its duration has there."""
    if rate == model_rate:
        return wave
    from stethoscope.audio import resample_wave

    converted = resample_wave(wave, rate, model_rate)
    if converted.shape[1] < length:
        converted = np.pad(converted, ((0, 0), (0, length - converted.shape[1])))
    return np.ascontiguousarray(converted[:, :length])


def _note(text: str, log: TextIO | None = None) -> None:
    """A status line on stderr (none under --quiet)."""
    from stethoscope.progress import progress_enabled

    if progress_enabled():
        print(f"stethoscope stream: {text}", file=log or sys.stderr, flush=True)


def warm_up(scorer, window: int, channels: int) -> None:
    """Score one window (``window`` samples at the model's rate) of faint seeded noise, so
    that the first real window does not pay for one-time set-up (thread pools, buffers,
    onnxruntime's first run: 25-150 ms)."""
    noise = np.random.default_rng(0).standard_normal((channels, window)).astype(np.float32)
    try:
        scorer.score_waveform(noise * np.float32(1e-3), scorer.sample_rate, source="warm-up")
    except StethoscopeError:
        pass


def _post_window(poster, wave: np.ndarray, rate: int, subtype: str, recorded_at: dt.datetime,
                 source: str, remote_only: bool) -> dict:
    from stethoscope.watch import PostRejected, WatchError

    try:
        answer = poster.post(wav_bytes(wave, rate, subtype), recorded_at=recorded_at,
                             source=source)
    except (PostRejected, WatchError) as err:
        if remote_only:
            return {"score": None, "anomalous": None, "error": str(err), "windows": []}
        return {"server_error": str(err)}
    if remote_only:
        return {"score": answer.get("score"), "anomalous": answer.get("anomalous"),
                "error": answer.get("error"), "windows": answer.get("windows", []),
                "server": answer}
    return {"server": answer}


def run_stream(*, model: str | None, encoding: str = "s16le", rate: int | None = None,
               channels: int = 1, window_s: float | None = None, hop_s: float | None = None,
               device: int | str | None = None, server: str | None = None,
               token: str | None = None, machine: str | None = None,
               stdin: BinaryIO | None = None, stdout: TextIO | None = None,
               threads: int | None = None, resample: bool = False) -> int:
    """What ``stethoscope stream`` does: read stdin (or a sound card), print one JSON line
    per window, flushed. Returns the number of windows. ``threads``: compute threads for
    the model (None: the library's default)."""
    import json

    from stethoscope.edge import load_scorer
    from stethoscope.watch import RecordingPoster

    if model is None and server is None:
        raise StreamError("give a model (--model) or a service to post windows to (--server)")
    scorer = load_scorer(model, threads=threads) if model is not None else None
    poster = RecordingPoster(server, token, machine or "", max_attempts=4,
                             max_backoff_s=5.0) if server else None
    rate = rate or (scorer.sample_rate if scorer is not None else 16000)
    window = _samples(window_s, rate, "--window")
    hop = _samples(hop_s, rate, "--hop")
    stdout = stdout or sys.stdout
    if device is not None:
        reader = DeviceReader(device, rate, channels, block=min(hop or window or rate, rate))
    else:
        reader = open_stdin_stream(stdin or sys.stdin.buffer, encoding, rate, channels)
    count = 0
    try:
        for line in score_stream(reader, scorer, window=window, hop=hop, poster=poster,
                                 resample=resample):
            stdout.write(json.dumps(line) + "\n")
            stdout.flush()
            count += 1
    finally:
        if isinstance(reader, DeviceReader):
            reader.close()
    return count


def _samples(seconds: float | None, rate: int, option: str) -> int | None:
    if seconds is None:
        return None
    if not seconds > 0:
        raise StreamError(f"{option} must be a positive number of seconds, not {seconds}")
    return max(1, round(seconds * rate))
