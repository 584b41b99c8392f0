"""Detector: the scikit-learn-style front door — fit on normal sounds, score, predict, save, load.

>>> det = Detector().fit("recordings/fan/normal")          # doctest: +SKIP
>>> det.predict(["new_clip.wav"])                           # doctest: +SKIP
array([0])
>>> det.save("fan-model"); Detector.load("fan-model")       # doctest: +SKIP
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stethoscope.audio import select_channels
from stethoscope.datasets import Clip, find_clips
from stethoscope.errors import AudioError, DataError, ModelFileError, StethoscopeError
from stethoscope.features import (
    FeatureConfig,
    crop_frames,
    extract_features,
    iter_chunks,
    load_feature_array,
    logmel,
)
from stethoscope.models import registry
from stethoscope.progress import progress_enabled
from stethoscope.scoring import (
    RecordingScore,
    Threshold,
    WindowScore,
    parse_threshold,
    pool_scores,
)
from stethoscope.storage import load_model, save_model
from stethoscope.training import (
    History,
    TrainConfig,
    autocast_context,
    fit,
    resolve_device,
    resolve_precision,
    seed_everything,
    to_device,
)

DEFAULT_MODEL = "clip-stats"  # best across the data measured: docs/quality.md
LARGE_CORPUS_CLIPS = 1000  # beyond this, training features are memory-mapped from disk
MIN_VALIDATION_CLIPS = 10  # fewer held-out clips give a threshold too noisy to trust
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "patience", "seed", "device", "precision")

Inputs = str | Path | Sequence[str | Path] | Sequence[Clip] | np.ndarray


class SpectrogramDataset(Dataset):
    """Rows ``indices`` of a (possibly memory-mapped) ``(N, C, M, F)`` array, read lazily:
    an int gives one clip as a tensor (for the DataLoader in training), a slice gives a
    batch as an array (for scoring, which slices like an array)."""

    def __init__(self, specs: np.ndarray, indices: Sequence[int] | None = None) -> None:
        self.specs = specs
        self.indices = np.arange(len(specs)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | slice) -> torch.Tensor | np.ndarray:
        if isinstance(item, slice):
            return np.asarray(self.specs[self.indices[item]])
        return torch.from_numpy(np.array(self.specs[self.indices[item]], dtype=np.float32))


class Detector:
    """Unsupervised machine-sound anomaly detector trained on normal recordings only.

    Parameters
    ----------
    model : registered model name (see ``stethoscope.models.names()``).
    features : FeatureConfig or dict of overrides on the model's default log-mel settings.
    threshold : rule for the decision threshold: ``"mean+2std"`` (the course rule),
        ``"p95"``, ``"gamma:0.9"`` (DCASE 2023 baseline), ``"value:3.2"``, or a Threshold.
    pooling : how a clip's error map becomes one score (default: the model's), e.g.
        ``"mean"``, ``"max"``, ``"topk:0.1"``, ``"p95"``.
    epochs, batch_size, lr, patience, seed, device, precision : training settings; None
        keeps the model's registered defaults.
    val_fraction : share of normal clips held out for validation and early stopping.
    model_params : extra keyword arguments for the model's builder.
    cache_dir : folder for the memory-mapped feature cache (None: no cache).

    Attributes (after ``fit``): ``model_``, ``feature_config_``, ``input_shape_``,
    ``threshold_``, ``history_``, ``train_scores_``.

    ``score_samples`` returns anomaly scores: higher means more anomalous (unlike
    scikit-learn's outlier detectors, where higher means more normal).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        features: FeatureConfig | dict | None = None,
        threshold: str | Threshold = "mean+2std",
        pooling: str | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        patience: int | None = None,
        seed: int = 0,
        device: str = "auto",
        precision: str = "fp32",
        val_fraction: float = 0.1,
        model_params: dict | None = None,
        cache_dir: str | Path | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.features = features
        self.threshold = threshold
        self.pooling = pooling
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.seed = seed
        self.device = device
        self.precision = precision
        self.val_fraction = val_fraction
        self.model_params = model_params
        self.cache_dir = cache_dir
        self.progress = progress

    # ---------------------------------------------------------------- configuration
    def _info(self) -> registry.ModelInfo:
        return registry.info(self.model)

    def _feature_config(self) -> FeatureConfig:
        base = FeatureConfig().replace(**self._info().features)
        if isinstance(self.features, FeatureConfig):
            return self.features
        return base.replace(**(self.features or {}))

    def _train_config(self) -> TrainConfig:
        overrides = dict(self._info().training)
        for key in _TRAIN_KEYS:
            value = getattr(self, key)
            if value is not None and not (key == "device" and value == "auto"):
                overrides[key] = value
        overrides["progress"] = self._show_progress()
        return replace(TrainConfig(), **overrides)

    def _pooling(self) -> str:
        return self.pooling or self._info().scoring.get("pooling", "mean")

    def _threshold(self) -> Threshold:
        if isinstance(self.threshold, Threshold):
            return Threshold.from_dict(self.threshold.to_dict())
        return parse_threshold(self.threshold)

    def _show_progress(self) -> bool:
        return progress_enabled(self.progress)

    # ---------------------------------------------------------------- inputs
    def load_features(self, X: Inputs, config: FeatureConfig | None = None, *,
                      cache_dir: str | Path | None = None
                      ) -> tuple[np.ndarray, list[Clip] | None]:
        """Turn recordings (files, folders, Clips), a ``.npy`` path or an array into
        spectrograms ``(N, C, M, F)`` plus the clips they came from (None for arrays).
        ``cache_dir`` overrides the detector's feature cache for this call."""
        config = config or getattr(self, "feature_config_", None) or self._feature_config()
        if isinstance(X, np.ndarray):
            return self._array_features(X, config), None
        if isinstance(X, str | Path) and str(X).endswith(".npy"):
            specs = load_feature_array(X, channels=config.channels, frames=config.frames)
            return specs, None
        clips = self.find_recordings(X)
        specs = extract_features([c.path for c in clips], config,
                                 cache_dir=cache_dir or self.cache_dir,
                                 progress=self._show_progress())
        return specs, clips

    @staticmethod
    def find_recordings(X: Inputs) -> list[Clip]:
        """The clips that files, folders, list files or Clip objects stand for."""
        items = [X] if isinstance(X, str | Path | Clip) else list(X)
        if not items:
            raise DataError("no input recordings given")
        if all(isinstance(c, Clip) for c in items):
            return list(items)
        return find_clips([c.path if isinstance(c, Clip) else c for c in items])

    @staticmethod
    def _is_recordings(X: Inputs) -> bool:
        return not isinstance(X, np.ndarray) and not (
            isinstance(X, str | Path) and str(X).endswith(".npy"))

    def iter_features(self, X: Inputs, chunk_clips: int = 64
                      ) -> Iterator[tuple[np.ndarray, list[Clip] | None]]:
        """Spectrograms chunk by chunk, so scoring a corpus larger than memory stays flat.

        With a feature cache the whole corpus is one memory-mapped chunk."""
        if not self._is_recordings(X) or self.cache_dir is not None:
            yield self.load_features(X)
            return
        clips = self.find_recordings(X)
        for start in range(0, len(clips), chunk_clips):
            part = clips[start : start + chunk_clips]
            yield self.load_features(part)[0], part

    @staticmethod
    def _array_features(X: np.ndarray, config: FeatureConfig) -> np.ndarray:
        if X.ndim == 3:
            X = X[:, None]
        if X.ndim != 4:
            raise DataError(f"array of shape {X.shape} is not spectrograms; expected "
                            "(N, mels, frames) or (N, channels, mels, frames)")
        if not np.isfinite(X).all():
            raise DataError("array contains NaN or infinite values")
        if config.frames is not None:
            if X.shape[-1] < config.frames:
                raise DataError(f"array has {X.shape[-1]} frames; the model needs "
                                f"{config.frames}")
            X = X[..., : config.frames]
        return np.ascontiguousarray(X, dtype=np.float32)

    def _check_shape(self, specs: np.ndarray, source: str) -> None:
        expected = tuple(self.input_shape_)
        got = tuple(specs.shape[1:])
        fixed_frames = self.feature_config_.frames is not None
        if got[:2] != expected[:2] or (fixed_frames and got[2] != expected[2]):
            raise DataError(f"features of shape {got} do not match the model's input "
                            f"{expected} (channels, mels, frames)", source)

    # ---------------------------------------------------------------- training
    def fit(self, X: Inputs, y: np.ndarray | None = None) -> Detector:
        """Train on normal recordings ``X`` (labels ``y``, if given, must all be normal)."""
        self.feature_config_ = self._feature_config()
        if self._is_recordings(X):
            X = self.find_recordings(X)  # resolve folders once
        with self._scratch_cache(X) as scratch:
            specs, clips = self.load_features(X, self.feature_config_, cache_dir=scratch)
            return self._fit_features(specs, clips, y)

    def _model_params_for(self, clips: list[Clip] | None) -> dict:
        """The user's model parameters over the model's registered defaults for the machine
        type of the training clips (when they all come from one, e.g. MIMII ``slider``)."""
        machines = {clip.machine for clip in clips or []}
        defaults = {}
        if len(machines) == 1:
            defaults = self._info().per_machine.get(machines.pop(), {})
        return {**defaults, **(self.model_params or {})}

    def _scratch_cache(self, X: Inputs):
        """A temporary on-disk feature cache for large corpora when the user set none, so
        training memory stays flat in the number of clips (features are memory-mapped)."""
        large = (self.cache_dir is None and self._is_recordings(X)
                 and len(X) > LARGE_CORPUS_CLIPS)
        if large:
            return tempfile.TemporaryDirectory(prefix="stethoscope-features-")
        return nullcontext(None)

    def _fit_features(self, specs: np.ndarray, clips: list[Clip] | None,
                      y: np.ndarray | None) -> Detector:
        """Training proper, once the features are at hand (possibly memory-mapped)."""
        self._reject_anomalies(clips, y)
        if len(specs) < 2:
            raise DataError(f"need at least 2 normal clips to train, got {len(specs)}")
        self.input_shape_ = tuple(int(s) for s in specs.shape[1:])
        info = self._info()
        seed_everything(self.seed)  # initial weights depend on the seed alone
        self.model_ = registry.build(self.model, self.input_shape_,
                                     **self._model_params_for(clips))
        self.model_.before_training(specs)

        config = self._train_config()
        train_idx, val_idx = self._split(len(specs))
        if any(p.requires_grad for p in self.model_.parameters()):
            self.history_ = fit(
                self.model_, SpectrogramDataset(specs, train_idx),
                SpectrogramDataset(specs, val_idx) if len(val_idx) else None,
                config=config, batch_transform=lambda batch: self.model_.make_examples(batch[0]),
                description=f"train {info.name}")
        else:
            self.history_ = History()
        self.model_.eval()
        self.model_.after_training(specs)
        self.train_scores_ = self._normal_scores(specs, val_idx)
        self.threshold_ = self._threshold().fit(self.train_scores_)
        return self

    @staticmethod
    def _reject_anomalies(clips: list[Clip] | None, y: np.ndarray | None) -> None:
        labels = np.asarray(y) if y is not None else (
            np.array([c.label for c in clips if c.label is not None]) if clips else np.array([]))
        if labels.size and (labels == 1).any():
            raise DataError(f"training data holds {int((labels == 1).sum())} anomalous clips; "
                            "train on normal recordings only")

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng(self.seed).permutation(n)
        n_val = int(round(n * self.val_fraction)) if n >= 10 else 0
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _normal_scores(self, specs: np.ndarray, val_idx: np.ndarray) -> np.ndarray:
        """Normal scores the threshold is fitted on, out-of-sample wherever possible: a model
        scores the clips it learned too well, so a mean + 2σ rule on them flags far more
        than 2-5 % of new normal clips (measured: 12-16 %, docs/quality.md).

        Statistics/memory models give leave-one-clip-out scores; trained models use the
        held-out validation clips when there are at least ``MIN_VALIDATION_CLIPS``, else
        (small training sets) all training clips, which is optimistic."""
        if hasattr(self.model_, "normal_scores"):
            self.threshold_source_ = "leave-one-clip-out scores of the training clips"
            return np.asarray(self.model_.normal_scores(specs, pooling=self._pooling()),
                              dtype=np.float64)
        if len(val_idx) >= MIN_VALIDATION_CLIPS:
            self.threshold_source_ = f"scores of the {len(val_idx)} held-out validation clips"
            return self._scores(SpectrogramDataset(specs, val_idx))
        self.threshold_source_ = "in-sample scores of the training clips (optimistic)"
        return self._scores(specs)

    # ---------------------------------------------------------------- scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this Detector is not fitted yet; call fit() or Detector.load()")

    @torch.no_grad()
    def iter_batches(self, specs: np.ndarray, fn, batch_size: int = 32
                     ) -> Iterator[torch.Tensor]:
        """``fn(model, x)`` for batches of spectrograms, on the detector's device and
        precision, as float32 CPU tensors; memory stays flat for big corpora.

        Slices the array directly (no DataLoader): one clip scores in about a millisecond."""
        device = resolve_device(self.device)
        dtype = resolve_precision(self.precision, device)
        model = self._placed_model(device)
        for _, chunk in iter_chunks(specs, batch_size):
            x = to_device(torch.from_numpy(chunk), device, channels_last=True)
            with autocast_context(device, dtype):
                out = fn(model, x)
            yield out.float().cpu()

    def _placed_model(self, device: torch.device) -> torch.nn.Module:
        """The model in eval mode on ``device`` in channels_last; moved once, not per call
        (walking the modules took a twentieth of one clip's scoring time)."""
        placed = (self.model_, device)
        if getattr(self, "_placed", None) != placed:
            self.model_.to(device).to(memory_format=torch.channels_last)
            self._placed = placed
        if self.model_.training:  # e.g. put in train mode by the caller since
            self.model_.eval()
        return self.model_

    def iter_error_maps(self, specs: np.ndarray, batch_size: int = 32
                        ) -> Iterator[torch.Tensor]:
        """Error maps ``(B, M', F')`` batch by batch."""
        return self.iter_batches(specs, lambda model, x: model.error_map(x), batch_size)

    def _scores(self, specs: np.ndarray) -> np.ndarray:
        rule = self._pooling()
        parts = [pool_scores(maps, rule) for maps in self.iter_error_maps(specs)]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    def score_features(self, specs: np.ndarray, source: str = "input") -> np.ndarray:
        """Anomaly scores of spectrograms ``(N, C, M, F)`` already computed."""
        self._check_fitted()
        self._check_shape(specs, source)
        return self._scores(specs)

    def score_samples(self, X: Inputs) -> np.ndarray:
        """Anomaly score per clip (higher = more anomalous)."""
        self._check_fitted()
        parts = [self.score_features(specs, _source_name(X, clips))
                 for specs, clips in self.iter_features(X)]
        return np.concatenate(parts)

    def score_recordings(self, X: Inputs, *, on_error: str = "collect"
                         ) -> list[RecordingScore]:
        """Score every recording of ``X`` and say, per recording, its score, verdict and
        windows, or why it could not be scored.

        Parameters
        ----------
        X : WAV files, folders, list files or Clips.
        on_error : ``"collect"`` (default): an unreadable recording, or one whose score is
            not finite, gets a :class:`RecordingScore` with ``error`` set and the others are
            still scored; ``"raise"``: the first such problem raises its StethoscopeError.

        Returns
        -------
        list of RecordingScore, in the order of the recordings found.
        """
        if on_error not in ("collect", "raise"):
            raise ValueError(f"on_error must be 'collect' or 'raise', not {on_error!r}")
        self._check_fitted()
        clips = self.find_recordings(X)
        results: list[RecordingScore] = []
        for start in range(0, len(clips), 64):
            results += self._score_chunk(clips[start:start + 64], on_error)
        return results

    def _score_chunk(self, clips: list[Clip], on_error: str) -> list[RecordingScore]:
        try:
            specs, _ = self.load_features(clips)
        except StethoscopeError:
            if on_error == "raise" or len(clips) == 1:
                if on_error == "raise":
                    raise
                return [self._failed(clips[0], sys.exc_info()[1])]
            return [result for clip in clips for result in self._score_chunk([clip], on_error)]
        self._check_shape(specs, _source_name(clips, clips))
        scores = self._scores(specs)
        out = []
        for clip, spec, score in zip(clips, specs, scores, strict=True):
            if not np.isfinite(score):
                error = DataError("its score is not finite (NaN or infinite); the recording "
                                  "holds values the model cannot use", clip.path)
                if on_error == "raise":
                    raise error
                out.append(self._failed(clip, error))
                continue
            out.append(self._recording_score(str(clip.path), float(score), spec.shape[-1]))
        return out

    def _recording_score(self, path: str | None, score: float, frames: int) -> RecordingScore:
        cfg = self.feature_config_
        duration = max(frames - 1, 0) * cfg.hop_length / cfg.sample_rate
        anomalous = bool(score > self.threshold_.value_)
        return RecordingScore(path, score, anomalous,
                              [WindowScore(0.0, duration, score, anomalous)])

    @staticmethod
    def _failed(clip: Clip, error: BaseException) -> RecordingScore:
        return RecordingScore(str(clip.path), error=str(error))

    def score_waveform(self, wave: np.ndarray, sample_rate: int, *,
                       source: str | None = None) -> RecordingScore:
        """Score audio already in memory, ``float32 (C, n)`` or ``(n,)`` in [-1, 1] at
        ``sample_rate`` Hz (a stream's window, an upload), with the model's features.

        Raises
        ------
        AudioError
            when the sample rate differs from the model's or the audio is not finite.
        """
        self._check_fitted()
        cfg = self.feature_config_
        wave = np.asarray(wave, dtype=np.float32)
        wave = wave[None] if wave.ndim == 1 else wave
        name = source or "audio"
        if sample_rate != cfg.sample_rate:
            raise AudioError(f"sample rate {sample_rate} Hz differs from the model's "
                             f"{cfg.sample_rate} Hz", name)
        if not np.isfinite(wave).all():
            raise AudioError("audio holds NaN or infinite samples", name)
        wave = select_channels(wave, cfg.channels, name)
        spec = crop_frames(logmel(wave, cfg), cfg.frames, name)[None]
        self._check_shape(spec, name)
        return self._recording_score(source, float(self._scores(spec)[0]), spec.shape[-1])

    def refit_threshold(self, threshold: str | Threshold) -> Detector:
        """Replace the fitted decision threshold without retraining: ``threshold`` (a rule
        as in ``__init__``) is fitted on the same held-out normal scores (``train_scores_``)
        as the one chosen at training time. Returns self."""
        self._check_fitted()
        rule = (Threshold.from_dict(threshold.to_dict()) if isinstance(threshold, Threshold)
                else parse_threshold(threshold))
        self.threshold_ = rule.fit(self.train_scores_)
        return self

    def decision_function(self, X: Inputs) -> np.ndarray:
        """Score minus threshold: positive means anomalous."""
        return self.score_samples(X) - self.threshold_.value_

    def predict(self, X: Inputs) -> np.ndarray:
        """1 for anomalous clips, 0 for normal ones."""
        return self.threshold_.predict(self.score_samples(X))

    def error_maps(self, X: Inputs) -> np.ndarray:
        """Per-clip time × frequency reconstruction error, ``(N, M', F')``."""
        self._check_fitted()
        specs, clips = self.load_features(X)
        self._check_shape(specs, _source_name(X, clips))
        return torch.cat(list(self.iter_error_maps(specs))).numpy()

    # ---------------------------------------------------------------- persistence
    def get_config(self) -> dict:
        """Everything needed to rebuild this fitted detector, as JSON-ready data."""
        self._check_fitted()
        scores = self.train_scores_
        return {
            "model": self.model,
            "model_params": dict(self.model_.hparams),
            "input_shape": list(self.input_shape_),
            "features": self.feature_config_.to_dict(),
            "pooling": self._pooling(),
            "threshold": self.threshold_.to_dict(),
            "threshold_source": getattr(self, "threshold_source_", "unknown"),
            "train_scores": {"n": int(scores.size), "mean": float(scores.mean()),
                             "std": float(scores.std()), "values": scores.tolist()},
            "settings": {"seed": self.seed, "precision": self.precision,
                         "val_fraction": self.val_fraction},
            "history": self.history_.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write a model folder (``config.json`` + ``model.safetensors``) atomically."""
        return save_model(path, self.get_config(), self.model_.state_dict())

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", progress: bool | None = None
             ) -> Detector:
        """Read a model folder written by :meth:`save`; never unpickles."""
        config, state = load_model(path)
        try:
            det = cls(config["model"], features=FeatureConfig.from_dict(config["features"]),
                      pooling=config["pooling"], threshold=Threshold.from_dict(config["threshold"]),
                      seed=config["settings"]["seed"], precision=config["settings"]["precision"],
                      device=device, progress=progress)
            det.feature_config_ = det.features
            det.input_shape_ = tuple(config["input_shape"])
            det.model_ = registry.build(config["model"], det.input_shape_,
                                        **config["model_params"])
            det.model_.load_state_dict(state, strict=True)
            det.model_.eval()
            det.threshold_ = Threshold.from_dict(config["threshold"])
            det.train_scores_ = np.asarray(config["train_scores"]["values"], dtype=np.float64)
            det.history_ = History.from_dict(config.get("history", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ModelFileError(f"config.json does not describe a usable model "
                                 f"({str(err).splitlines()[0]})", path) from None
        det.model_params = dict(det.model_.hparams)
        return det

    def __repr__(self) -> str:
        fitted = "fitted" if hasattr(self, "model_") else "not fitted"
        return f"Detector(model={self.model!r}, threshold={self.threshold!r}, {fitted})"


def _source_name(X: Inputs, clips: list[Clip] | None) -> str:
    if clips:
        return str(clips[0].path.parent) if len(clips) > 1 else str(clips[0].path)
    return str(X) if isinstance(X, str | Path) else "input array"

