"""Scoring at the edge: an exported ONNX model run by onnxruntime, with NumPy and soundfile
only (this module never imports torch), and the same interface over the PyTorch detector.

>>> scorer = EdgeScorer("valve.onnx")                          # doctest: +SKIP
>>> scorer.score_file("clip.wav")["score"]                      # doctest: +SKIP
3.71

A recording is cut into windows of the model's length (``window_samples``, every
``hop_samples``; a last window is aligned to the recording's end when the windows would
leave more than one STFT hop unscored); each window goes through the ONNX graph and the
recording's score is the largest window score. Results have the fields of
:meth:`stethoscope.scoring.RecordingScore.to_dict`: ``path``, ``score``, ``anomalous``,
``error`` and ``windows`` (``start_s``, ``end_s``, ``score``, ``anomalous``).

Command line (what ``stethoscope`` itself is not needed for)::

    python -m stethoscope.edge model.onnx recording.wav [more.wav ...]   # one JSON line each
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from stethoscope.errors import AudioError, ModelFileError, StethoscopeError

META_KEY = "stethoscope"  # the ONNX metadata entry holding the JSON below


def model_window_samples(features: dict, input_frames: int) -> int:
    """Samples of one scoring window of a model: its configured window (``window_s``) or,
    without one, the samples whose centred frames are exactly the model's ``input_frames``
    (``(F - 1) · hop``: F frames at hop h span about that many samples)."""
    window_s = features.get("window_s")
    if window_s:
        return max(1, round(float(window_s) * int(features["sample_rate"])))
    return max(1, (int(input_frames) - 1) * int(features["hop_length"]))


def window_starts(n_samples: int, window: int, hop: int, tail: int) -> list[int]:
    """Starts of the windows of a recording of ``n_samples``: every ``hop`` while a whole
    window fits, plus one aligned to the end when more than ``tail`` samples would be left
    unscored. Empty when the recording is shorter than one window."""
    if n_samples < window:
        return []
    starts = list(range(0, n_samples - window + 1, hop))
    if n_samples - (starts[-1] + window) > tail:
        starts.append(n_samples - window)
    return starts


def pool_window_scores(scores: list[float], rule: str) -> float:
    """A recording's score from its window scores, by the rules of
    :func:`stethoscope.scoring.pool_scores` (``mean``, ``max``, ``median``, ``topk:R``,
    ``pNN``); repeated here in NumPy so that this module needs no more than NumPy."""
    values = np.asarray(scores, dtype=np.float64)
    if rule == "mean":
        return float(values.mean())
    if rule == "max":
        return float(values.max())
    if rule == "median":
        return float(np.median(values))
    if rule.startswith("topk:"):
        count = max(1, math.ceil(float(rule[5:]) * values.size))
        return float(np.sort(values)[-count:].mean())
    if rule.startswith("p"):
        return float(np.percentile(values, float(rule[1:])))
    raise ModelFileError(f"unknown window pooling rule {rule!r} in the ONNX metadata")


class Scorer(Protocol):
    """What ``watch`` and ``stream`` need from a model, whichever runtime scores it."""

    sample_rate: int
    window_samples: int
    input_channels: int | None
    threshold: float

    def score_waveform(self, wave: np.ndarray, sample_rate: int, source: str | None = None
                       ) -> dict: ...

    def score_file(self, path: str | Path) -> dict: ...


def _failed(path: str | Path | None, error: BaseException | str) -> dict:
    return {"path": None if path is None else str(path), "score": None, "anomalous": None,
            "error": str(error), "windows": []}


class EdgeScorer:
    """Score audio with an ONNX file written by ``stethoscope export`` (onnxruntime only).

    Parameters
    ----------
    path : the ``.onnx`` file.
    threads : onnxruntime intra-op threads (None: onnxruntime's default, all cores).

    Attributes: ``sample_rate``, ``window_samples``, ``hop_samples``, ``input_channels``
    (None: any number, averaged), ``channels`` (which channels of a recording the model
    uses: an index, ``"mean"`` or ``"all"``), ``window_pooling`` (how window scores become a
    recording's), ``threshold``, ``model`` (the exported model's name), ``metadata``.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError("no such ONNX file", self.path)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelFileError(f"onnxruntime cannot load it ({str(err).splitlines()[0]})",
                                 self.path) from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if meta is None:
            raise ModelFileError("is not an ONNX file written by `stethoscope export` (no "
                                 f"'{META_KEY}' metadata)", self.path)
        self.metadata = json.loads(meta)
        self.model = self.metadata["model"]
        self.sample_rate = int(self.metadata["sample_rate"])
        self.window_samples = int(self.metadata["window_samples"])
        self.hop_samples = int(self.metadata.get("window_hop_samples") or self.window_samples)
        self.channels = self.metadata.get("channels", 0)
        given = self.metadata.get("input_channels")
        self.input_channels = None if given is None else int(given)  # None: any ("mean")
        self.window_pooling = self.metadata.get("window_pooling") or "max"
        self.threshold = float(self.metadata["threshold"])
        self.stft_hop = int(self.metadata["features"]["hop_length"])

    def score_window(self, wave: np.ndarray) -> tuple[float, bool]:
        """Score and verdict of exactly one window, float32 ``(C, window_samples)`` with the
        model's channels (``input_channels``; any number when the model averages them)."""
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        score, anomalous = self.session.run(None, {"waveform": wave})
        return float(score[0]), bool(anomalous[0])

    def _model_channels(self, wave: np.ndarray, source: str) -> np.ndarray:
        from stethoscope.audio import select_channels

        if self.channels == "mean":  # the graph averages the channels' log-mels itself
            return wave
        wave = select_channels(wave, self.channels, source)
        if wave.shape[0] != self.input_channels:
            raise AudioError(f"has {wave.shape[0]} channel(s) after choosing "
                             f"{self.channels!r}; the model takes {self.input_channels}", source)
        return wave

    def score_waveform(self, wave: np.ndarray, sample_rate: int, source: str | None = None
                       ) -> dict:
        """Score audio in memory, float32 ``(C, n)`` or ``(n,)`` at ``sample_rate`` Hz.

        Raises
        ------
        AudioError
            when the rate differs from the model's, the audio is not finite or shorter than
            one window.
        """
        name = source or "audio"
        wave = np.asarray(wave, dtype=np.float32)
        wave = wave[None] if wave.ndim == 1 else wave
        if sample_rate != self.sample_rate:
            raise AudioError(f"sample rate {sample_rate} Hz differs from the model's "
                             f"{self.sample_rate} Hz", name)
        if not np.isfinite(wave).all():
            raise AudioError("audio holds NaN or infinite samples", name)
        wave = self._model_channels(wave, name)
        starts = window_starts(wave.shape[1], self.window_samples, self.hop_samples,
                               self.stft_hop)
        if not starts:
            raise AudioError(f"is {wave.shape[1] / self.sample_rate:.3g} s long, shorter than "
                             f"the model's {self.window_samples / self.sample_rate:.4g} s "
                             "window", name)
        windows = []
        for start in starts:
            score, anomalous = self.score_window(wave[:, start:start + self.window_samples])
            if not math.isfinite(score):
                raise AudioError("its score is not finite (NaN or infinite)", name)
            windows.append({"start_s": round(start / self.sample_rate, 6),
                            "end_s": round((start + self.window_samples) / self.sample_rate, 6),
                            "score": score, "anomalous": anomalous})
        score = pool_window_scores([w["score"] for w in windows], self.window_pooling)
        return {"path": source, "score": score, "anomalous": score > self.threshold,
                "error": None, "windows": windows}

    def score_file(self, path: str | Path) -> dict:
        """Read a WAV file (as :func:`stethoscope.audio.read_wav` does) and score it; an
        unusable file gives a result whose ``error`` says why."""
        from stethoscope.audio import read_wav

        try:
            wave, rate = read_wav(path, channels="all")
            return self.score_waveform(wave, rate, source=str(path))
        except StethoscopeError as err:
            return _failed(path, err)


class DetectorScorer:
    """The :class:`Scorer` interface over a PyTorch :class:`~stethoscope.Detector` (imports
    torch: for machines that have it)."""

    def __init__(self, folder: str | Path, *, device: str = "auto") -> None:
        from stethoscope.detector import Detector

        self.detector = Detector.load(folder, device=device, progress=False)
        features = self.detector.feature_config_.to_dict()
        self.model = self.detector.model
        self.sample_rate = int(features["sample_rate"])
        self.window_samples = model_window_samples(features, self.detector.input_shape_[2])
        self.input_channels = None if features["channels"] == "mean" else int(
            self.detector.input_shape_[0])
        self.threshold = float(self.detector.threshold_.value_)

    def score_waveform(self, wave: np.ndarray, sample_rate: int, source: str | None = None
                       ) -> dict:
        return self.detector.score_waveform(wave, sample_rate, source=source).to_dict()

    def score_file(self, path: str | Path) -> dict:
        try:
            return self.detector.score_recordings([path], on_error="collect")[0].to_dict()
        except StethoscopeError as err:  # e.g. the file went away before it was read
            return _failed(path, err)


def load_scorer(model: str | Path, *, device: str = "auto", threads: int | None = None
                ) -> EdgeScorer | DetectorScorer:
    """An :class:`EdgeScorer` for a ``.onnx`` file, a :class:`DetectorScorer` for a model
    folder. ``threads``: compute threads (onnxruntime's intra-op threads, or torch's for this
    process); None keeps the library's default (all cores)."""
    model = Path(model)
    if model.suffix.lower() == ".onnx":
        return EdgeScorer(model, threads=threads)
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    return DetectorScorer(model, device=device)


def main(argv: list[str] | None = None) -> int:
    """``python -m stethoscope.edge MODEL.onnx WAV...``: one JSON line per recording on
    stdout; exit 0, 1 when any is anomalous, 2 on an error (one line on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print("usage: python -m stethoscope.edge MODEL.onnx WAV [WAV ...]", file=sys.stderr)
        return 2
    try:
        scorer = EdgeScorer(args[0])
    except StethoscopeError as err:
        print(f"stethoscope.edge: error: {err}", file=sys.stderr)
        return 2
    anomalous = failed = False
    for path in args[1:]:
        start = time.perf_counter()
        result = scorer.score_file(path)
        result["compute_ms"] = round((time.perf_counter() - start) * 1e3, 3)
        print(json.dumps(result), flush=True)
        anomalous |= bool(result["anomalous"])
        failed |= result["error"] is not None
    return 2 if failed else 1 if anomalous else 0


if __name__ == "__main__":
    sys.exit(main())
