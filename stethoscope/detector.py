"""Detector: the scikit-learn estimator front door — fit on normal sounds, score, predict, save.

>>> import tempfile
>>> from stethoscope.simulate import simulate_dataset
>>> root = simulate_dataset("valve", 8, 2, tempfile.mkdtemp(), seed=0, progress=False)
>>> det = Detector(progress=False).fit(f"{root}/normal")
>>> det.score_samples(f"{root}/abnormal").shape
(2,)
>>> from sklearn.base import clone
>>> clone(det).get_params() == det.get_params()
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn

from stethoscope.atomic import scratch_directory
from stethoscope.compute import (
    PRECISIONS,
    place_model,
    resolve_device,
    run_batches,
)
from stethoscope.datasets import Clip
from stethoscope.errors import (
    AudioError,
    ConfigError,
    DataError,
    ModelFileError,
    StethoscopeError,
)
from stethoscope.features import (
    Corpus,
    FeatureConfig,
    Featurizer,
    input_kind,
    iter_chunks,
    logmel,
    waveform_windows,
    window_features,
)
from stethoscope.models import registry
from stethoscope.models.base import TrainPlan
from stethoscope.scoring import (
    RecordingScore,
    Threshold,
    WindowScore,
    check_pooling_rule,
    parse_threshold,
    pool_scores,
)
from stethoscope.storage import load_model, save_model
from stethoscope.training import History, TrainConfig, seed_everything

DEFAULT_MODEL = "clip-ensemble"  # chosen on every labelled real set: docs/quality.md
DEFAULT_THRESHOLD = "mean+2std"  # the course rule, for models that register no rule of their own
LARGE_CORPUS_CLIPS = 1000  # beyond this, training features are memory-mapped from disk
SCORE_BATCH = 32  # windows per model call when scoring
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "patience")
_NESTED = ("model_params", "features")  # dict-valued parameters set_params reaches into

Inputs = str | Path | Sequence[str | Path] | Sequence[Clip] | np.ndarray
log = logging.getLogger("stethoscope")


class Detector(BaseEstimator):
    """Unsupervised machine-sound anomaly detector trained on normal recordings only.

    A scikit-learn estimator: ``__init__`` only stores its parameters, ``fit`` returns self,
    ``get_params`` / ``set_params`` / ``sklearn.base.clone`` work (``set_params`` also
    reaches into the dict parameters: ``model_params__experts``, ``features__n_mels``), and
    every fitted attribute ends in ``_``. Not an ``OutlierMixin``: scikit-learn's outlier
    detectors predict -1 for outliers and score normal samples higher, the opposite of the
    anomaly-detection convention followed here (1 = anomalous, higher score = more anomalous).

    Parameters
    ----------
    model : str, default "clip-ensemble"
        Registered model name (``stethoscope.models.names()``).
    features : FeatureConfig or dict, optional
        Log-mel settings, or overrides of the model's registered defaults; ``window_s`` /
        ``window_hop_s`` cut recordings into windows (default: the training clips' length).
    threshold : str or Threshold, optional
        Decision rule fitted on held-out normal scores: ``"mean+2std"`` (the course rule),
        ``"gumbel:0.03"`` (a 3 % false-alarm rate from a Gumbel law fitted to them; measured
        in docs/quality.md), ``"fpr:0.05"``, ``"p95"``,
        ``"gamma:0.9"``, ``"value:3.2"`` ... (:func:`stethoscope.scoring.parse_threshold`).
        None: the model's registered rule (``"gumbel:0.03"`` for clip-ensemble), else
        ``"mean+2std"``.
    pooling : str, optional
        How a window's error map becomes one score for frame-level models (``"mean"``,
        ``"max"``, ``"topk:0.1"``, ``"p95"``); default the model's. Models that score whole
        clips (clip-stats) take none.
    window_pooling : str, default "max"
        How a recording's window scores become its score (same rules).
    epochs, batch_size, lr, patience : int or float, optional
        Training settings of trained models; None keeps the model's registered defaults.
    seed : int, default 0
    device : str, default "auto"
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : str, optional
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the hardware has it natively);
        None: the model's registered default (``"auto"`` for seed-conv-ae, whose scores and
        verdicts it leaves unchanged on the real valve data; ``"fp32"`` for the others).
    val_fraction : float, default 0.1
        Share of normal clips held out by trained models for early stopping and the threshold.
    model_params : dict, optional
        Keyword arguments of the model's builder (over its per-machine defaults).
    cache_dir : path, optional
        On-disk, memory-mapped feature cache.
    progress : bool, optional
        Progress bars on stderr (None: on unless ``STETHOSCOPE_PROGRESS=0``).
    channels : int or str, optional
        Channel choice when reading inputs, over the feature settings' (e.g. score channel 3
        of 8-channel files with a mono model).
    resample : bool, optional
        Convert recordings at another sample rate, over the feature settings'.

    Attributes
    ----------
    model_ : AnomalyModel
        The fitted model (:mod:`stethoscope.models.base`).
    feature_config_ : FeatureConfig
        The feature settings used, after the model's defaults and the window are resolved.
    model_params_ : dict
        The builder arguments used, after per-machine defaults are resolved.
    pooling_ : str or None
        The pooling rule used (None for clip-level models).
    precision_ : str
        The precision trained and scored with, after the model's default is resolved.
    train_config_ : TrainConfig or None
        The training loop's settings (None for models that are not trained).
    input_shape_ : tuple of int
        One window's features ``(C, M, F)``.
    train_scores_ : ndarray of shape (n_windows,)
        Held-out normal scores the threshold was fitted on.
    threshold_ : Threshold
        The fitted decision threshold.
    threshold_source_ : str
        Where ``train_scores_`` came from (leave-one-out, validation split, in-sample).
    history_ : History
        Training history (empty for models that are not trained).
    train_input_ : dict
        What the training inputs were: ``kind``, ``recordings``, ``windows``, ``channels``,
        ``sample_rate``, ``seconds`` (min, max); used to warn about different inputs.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        features: FeatureConfig | dict | None = None,
        threshold: str | Threshold | None = None,
        pooling: str | None = None,
        window_pooling: str = "max",
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        patience: int | None = None,
        seed: int = 0,
        device: str = "auto",
        precision: str | None = None,
        val_fraction: float = 0.1,
        model_params: dict | None = None,
        cache_dir: str | Path | None = None,
        progress: bool | None = None,
        channels: int | str | None = None,
        resample: bool | None = None,
    ) -> None:
        self.model = model
        self.features = features
        self.threshold = threshold
        self.pooling = pooling
        self.window_pooling = window_pooling
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
        self.channels = channels
        self.resample = resample

    # ---------------------------------------------------------------- parameters
    def get_params(self, deep: bool = True) -> dict:
        """Parameters of this detector; with ``deep``, also ``model_params__key`` and
        ``features__key`` for the entries of those dicts."""
        params = super().get_params(deep=False)
        if deep:
            for name in _NESTED:
                value = params[name]
                if isinstance(value, dict):
                    params.update({f"{name}__{k}": v for k, v in value.items()})
        return params

    def set_params(self, **params) -> Detector:
        """Set parameters; ``model_params__key=value`` and ``features__key=value`` update
        one entry of those dicts (a new dict: the old one is not changed)."""
        nested: dict[str, dict] = {}
        for key in [k for k in params if "__" in k]:
            name, _, entry = key.partition("__")
            if name not in _NESTED:
                raise ValueError(f"invalid parameter {key!r} for Detector")
            nested.setdefault(name, {})[entry] = params.pop(key)
        for name, entries in nested.items():
            current = params.get(name, getattr(self, name))
            if isinstance(current, FeatureConfig):
                params[name] = current.replace(**entries)
            else:
                params[name] = {**(current or {}), **entries}
        return super().set_params(**params) if params else self

    # ---------------------------------------------------------------- configuration
    def _info(self) -> registry.ModelInfo:
        try:
            info = registry.info(self.model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if info.kind != "anomaly":
            raise ConfigError(f"model {self.model!r} is a course-lab network, not an anomaly "
                              f"model; choose one of: {', '.join(registry.names())}")
        return info

    def _feature_config(self) -> FeatureConfig:
        if isinstance(self.features, FeatureConfig):
            return self.features
        try:
            return FeatureConfig().replace(**self._info().features).replace(
                **(self.features or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def _reading_config(self, config: FeatureConfig) -> FeatureConfig:
        """``config`` with this detector's reading overrides (channels, resample)."""
        changes = {k: v for k, v in (("channels", self.channels), ("resample", self.resample))
                   if v is not None}
        try:
            return config.replace(**changes) if changes else config
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _pooling(self, info: registry.ModelInfo, model) -> str | None:
        if not model.frame_level:
            if self.pooling is not None:
                raise ConfigError(f"model {self.model} scores whole clips; pooling "
                                  f"{self.pooling!r} (over frames) does not apply to it")
            return None
        return _checked_rule(self.pooling or info.scoring.get("pooling", "mean"), "pooling")

    def _precision(self, info: registry.ModelInfo) -> str:
        return self.precision or info.training.get("precision", "fp32")

    def _train_config(self, info: registry.ModelInfo) -> TrainConfig:
        overrides = dict(info.training)
        overrides.update({k: getattr(self, k) for k in _TRAIN_KEYS if getattr(self, k) is not None})
        overrides.update(seed=self.seed, device=self.device, precision=self._precision(info),
                         progress=self.progress is not False)
        try:
            return TrainConfig(**overrides)
        except TypeError as err:
            raise ConfigError(str(err)) from None

    def _threshold_rule(self) -> Threshold:
        if isinstance(self.threshold, Threshold):
            return Threshold.from_dict(self.threshold.to_dict())
        rule = self.threshold or self._info().scoring.get("threshold", DEFAULT_THRESHOLD)
        try:
            return parse_threshold(rule)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_settings(self) -> None:
        """Every setting that can be checked before reading any data."""
        self._info()
        resolve_device(self.device)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {self.precision!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        _checked_rule(self.window_pooling, "window pooling")
        if self.pooling is not None:
            _checked_rule(self.pooling, "pooling")
        self._threshold_rule()

    def featurizer(self, *, cache_dir: str | Path | None = None) -> Featurizer:
        """The :class:`~stethoscope.features.Featurizer` this detector reads inputs with."""
        config = getattr(self, "feature_config_", None) or self._feature_config()
        return Featurizer(self._reading_config(config), cache_dir=cache_dir or self.cache_dir,
                          progress=self.progress)

    # ---------------------------------------------------------------- training
    def fit(self, X: Inputs, y: np.ndarray | None = None) -> Detector:
        """Train on normal recordings or spectrograms ``X``.

        Parameters
        ----------
        X : WAV files, folders, list files or Clips; a ``.npy`` file; or an array
            ``(N, M, F)`` / ``(N, C, M, F)`` of spectrograms (or any per-clip features).
        y : array of shape (N,), optional
            0 for normal, 1 for anomalous inputs; anomalous ones are left out of training
            (so cross-validation over labelled data works). Without ``y``, recordings whose
            file names say they are anomalous are refused.

        Returns
        -------
        self
        """
        self._check_settings()
        info = self._info()
        X = self._normal_inputs(X, y)
        kind = input_kind(X)
        config = self._reading_config(self._feature_config())
        featurizer = Featurizer(config, cache_dir=self.cache_dir, progress=self.progress)
        headers = None
        if kind == "recordings":
            X = featurizer.clips(X)
            self._reject_anomalies(X)
            plans = featurizer.plans(X)
            config = self._with_window(config, plans)
            featurizer = Featurizer(config, cache_dir=self.cache_dir, progress=self.progress)
            headers = [plan.info for plan in plans]  # each header read once, not twice
        with self._scratch_cache(X, kind) as scratch:
            if scratch is not None:
                featurizer.cache_dir = scratch
            corpus = featurizer.transform(X, headers)
            self._fit_corpus(corpus, config, info)
        return self

    def _normal_inputs(self, X: Inputs, y: np.ndarray | None) -> Inputs:
        if y is None:
            return X
        y = np.asarray(y).ravel()
        if input_kind(X) == "npy":
            raise DataError("labels y cannot select rows of a .npy file; load it as an array")
        rows = X if isinstance(X, np.ndarray) else list(X)
        if len(rows) != len(y):
            raise DataError(f"{len(y)} labels for {len(rows)} inputs")
        keep = np.flatnonzero(y == 0)
        return rows[keep] if isinstance(rows, np.ndarray) else [rows[i] for i in keep]

    @staticmethod
    def _reject_anomalies(clips: list[Clip]) -> None:
        anomalous = [c for c in clips if c.label == 1]
        if anomalous:
            raise DataError(f"training data holds {len(anomalous)} anomalous clips (e.g. "
                            f"{anomalous[0].path}); train on normal recordings only")

    def _with_window(self, config: FeatureConfig, plans) -> FeatureConfig:
        """The window defaults to the shortest training recording, so recordings of mixed
        lengths train together; an explicit ``window_s`` is kept."""
        seconds = [p.seconds for p in plans]
        self.train_input_ = {"kind": "recordings", "recordings": len(plans),
                             "channels": sorted({p.info.channels for p in plans}),
                             "sample_rate": sorted({p.info.sample_rate for p in plans}),
                             "seconds": [min(seconds), max(seconds)]}
        if config.window_s is not None:
            return config
        shortest = min(round(p.info.frames * config.sample_rate / p.info.sample_rate)
                       for p in plans)
        return config.replace(window_s=shortest / config.sample_rate)

    def _scratch_cache(self, X, kind: str):
        """A temporary on-disk feature cache for large corpora when the user set none, so
        training memory stays flat in the number of clips (features are memory-mapped)."""
        if self.cache_dir is None and kind == "recordings" and len(X) > LARGE_CORPUS_CLIPS:
            return scratch_directory("stethoscope-features-")  # named after this process
        return nullcontext(None)

    def _fit_corpus(self, corpus: Corpus, config: FeatureConfig,
                    info: registry.ModelInfo) -> None:
        """Training proper, once the features are at hand (possibly memory-mapped)."""
        specs = corpus.specs
        if len(specs) < 2:
            raise DataError(f"need at least 2 normal clips to train, got {len(specs)}",
                            corpus.source)
        if corpus.recordings is None:
            self.train_input_ = {"kind": "array", "recordings": len(specs),
                                 "channels": [int(specs.shape[1])]}
        self.train_input_["windows"] = len(specs)
        self.feature_config_ = config
        self.input_shape_ = tuple(int(s) for s in specs.shape[1:])
        self.model_params_ = self._model_params_for(info, corpus.recordings)
        seed_everything(self.seed)  # initial weights depend on the seed alone
        try:
            self.model_ = registry.build(self.model, self.input_shape_, **self.model_params_)
        except TypeError as err:
            raise ConfigError(f"model_params do not fit {self.model}: {err}") from None
        self.pooling_ = self._pooling(info, self.model_)
        self.precision_ = self._precision(info)
        self.train_config_ = self._train_config(info) if self.model_.trainable else None
        plan = TrainPlan(self.train_config_, self.val_fraction, f"train {info.name}") \
            if self.model_.trainable else None
        self.model_.fit(specs, plan)
        self.history_ = getattr(self.model_, "history_", None) or History()
        scores, self.threshold_source_ = self.model_.held_out_scores(specs, self._pool)
        self.train_scores_ = np.asarray(scores, dtype=np.float64)
        self._check_finite_scores(self.train_scores_, corpus)
        self.threshold_ = self._threshold_rule().fit(self.train_scores_)

    def _model_params_for(self, info: registry.ModelInfo, clips: list[Clip] | None) -> dict:
        """The user's model parameters over the model's registered defaults for the machine
        type of the training clips (when they all come from one, e.g. MIMII ``slider``)."""
        machines = {clip.machine for clip in clips or []}
        defaults = info.per_machine.get(machines.pop(), {}) if len(machines) == 1 else {}
        return {**defaults, **(self.model_params or {})}

    @staticmethod
    def _check_finite_scores(scores: np.ndarray, corpus: Corpus) -> None:
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            row = int(bad[0])
            where = (corpus.recordings[int(corpus.owner[row])].path
                     if corpus.recordings is not None else f"{corpus.source} row {row}")
            raise DataError(f"gives a non-finite score (NaN or infinite) for {bad.size} "
                            "training window(s); the recording holds values the model cannot "
                            "use", where)

    # ---------------------------------------------------------------- scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("this Detector is not fitted yet; call fit() or Detector.load()")

    def _pool(self, maps) -> np.ndarray:
        return pool_scores(maps, self.pooling_ or "mean")

    def _placed(self) -> tuple[object, torch.device]:
        """The model on the detector's device (moved once, not per call: walking the
        modules took a twentieth of one clip's scoring time), in eval mode."""
        device = resolve_device(self.device)
        if isinstance(self.model_, nn.Module):
            if getattr(self, "_placed_on", None) != (id(self.model_), device):
                place_model(self.model_, device)
                self._placed_on = (id(self.model_), device)
            elif self.model_.training:  # e.g. put in train mode by the caller since
                self.model_.eval()
        return self.model_, device

    def iter_model(self, specs: np.ndarray, fn, batch_size: int = SCORE_BATCH
                   ) -> Iterator[torch.Tensor]:
        """``fn(model, x)`` for batches of spectrograms ``(N, C, M, F)`` on the detector's
        device and precision, as float32 CPU tensors; memory stays flat for big corpora."""
        model, device = self._placed()
        return run_batches(model, specs, fn, batch_size=batch_size, device=device,
                           precision=self.precision_, rows=iter_chunks)

    def _check_shape(self, specs: np.ndarray, source: str) -> None:
        expected = tuple(self.input_shape_)
        got = tuple(specs.shape[1:])
        cfg = self.feature_config_
        fixed_frames = cfg.frames is not None or cfg.window_s is not None
        if len(got) != 3 or got[:2] != expected[:2] or (fixed_frames and got[2] != expected[2]):
            raise DataError(f"features of shape {got} do not match the model's input "
                            f"{expected} (channels, mels, frames)", source)

    def score_features(self, specs: np.ndarray, source: str = "input") -> np.ndarray:
        """Anomaly score of every row of spectrograms ``(N, C, M, F)`` already computed
        (windows or clips), ``(N,)`` float64."""
        self._check_fitted()
        self._check_shape(specs, source)
        if len(specs) == 0:
            return np.zeros(0)
        parts = [torch.as_tensor(np.asarray(p, dtype=np.float64)) for p in self.iter_model(
            specs, lambda model, x: torch.as_tensor(model.clip_scores(x, self._pool)))]
        return torch.cat(parts).numpy().astype(np.float64)

    def score_samples(self, X: Inputs) -> np.ndarray:
        """Anomaly score per input, higher = more anomalous: per recording (its windows'
        scores pooled by ``window_pooling``) or per array row. Raises on the first input
        that cannot be scored; :meth:`score_recordings` says per recording instead."""
        self._check_fitted()
        if input_kind(X) != "recordings":
            corpus = self.featurizer().array_corpus(X)
            return self.score_features(corpus.specs, corpus.source)
        return np.array([r.score for r in self.score_recordings(X, on_error="raise")])

    def score_recordings(self, X: Inputs, *, on_error: str = "collect"
                         ) -> list[RecordingScore]:
        """Score every recording of ``X``: its windows (start, end, score, verdict), its
        score and verdict, or why it could not be scored.

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
        featurizer = self.featurizer()
        windows: dict[int, list[tuple[int, float]]] = {}
        errors: dict[int, Exception] = {}
        clips: list[Clip] = []
        headers = []
        for piece in featurizer.iter_transform(X, on_error=on_error):
            clips = piece.recordings
            errors.update(piece.errors)
            headers += [plan.info for plan in piece.plans]
            if len(piece):
                self._check_shape(piece.specs, piece.source)
                for owner, start, score in zip(piece.owner, piece.start,
                                               self.score_features(piece.specs), strict=True):
                    windows.setdefault(int(owner), []).append((int(start), float(score)))
        self._warn_about_inputs(featurizer, headers)
        return [self._result(clips[i], windows.get(i), errors.get(i), on_error)
                for i in range(len(clips))]

    def _result(self, clip: Clip, windows: list[tuple[int, float]] | None,
                error: Exception | None, on_error: str) -> RecordingScore:
        if error is None and windows and not all(math.isfinite(s) for _, s in windows):
            error = DataError("its score is not finite (NaN or infinite); the recording "
                              "holds values the model cannot use", clip.path)
        if error is None and not windows:
            error = DataError("gave no window to score", clip.path)
        if error is not None:
            if on_error == "raise":
                raise error
            return RecordingScore(str(clip.path), error=str(error))
        return self._recording_score(str(clip.path), windows)

    def _recording_score(self, path: str | None, windows: list[tuple[int, float]]
                         ) -> RecordingScore:
        cfg = self.feature_config_
        rate, threshold = cfg.sample_rate, self.threshold_.value_
        length = self._window_seconds()
        scored = [WindowScore(start / rate, start / rate + length, score, score > threshold)
                  for start, score in sorted(windows)]
        values = np.array([w.score for w in scored])[None, None, :]
        score = float(pool_scores(values, self.window_pooling)[0])
        return RecordingScore(path, score, bool(score > threshold), scored)

    def _window_seconds(self) -> float:
        cfg = self.feature_config_
        if cfg.window_s is not None:
            return float(cfg.window_s)
        return max(self.input_shape_[2] - 1, 0) * cfg.hop_length / cfg.sample_rate

    def _warn_about_inputs(self, featurizer: Featurizer, headers: list) -> None:
        """One warning (stderr, via logging) when inputs differ from the training ones in
        channels or sample rate; scores of such inputs may not mean what they should."""
        trained = getattr(self, "train_input_", {})
        if trained.get("kind") != "recordings" or not headers:
            return
        seen_channels = {h.channels for h in headers}
        seen_rates = {h.sample_rate for h in headers}
        if seen_channels - set(trained.get("channels", [])):
            log.warning("recordings with %s channel(s) scored by a model trained on "
                        "recordings with %s (using channel choice %r)",
                        sorted(seen_channels), trained.get("channels"),
                        featurizer.config.channels)
        if seen_rates - set(trained.get("sample_rate", [])):
            log.warning("recordings at %s Hz scored by a model trained at %s Hz",
                        sorted(seen_rates), trained.get("sample_rate"))

    def score_waveform(self, wave: np.ndarray, sample_rate: int, *,
                       source: str | None = None) -> RecordingScore:
        """Score audio already in memory, ``float32 (C, n)`` or ``(n,)`` in [-1, 1] at
        ``sample_rate`` Hz (a stream's window, an upload), window by window as a recording.

        Raises
        ------
        AudioError
            when the sample rate differs from the model's or the audio is not finite.
        """
        self._check_fitted()
        cfg = self._reading_config(self.feature_config_)
        wave = np.asarray(wave, dtype=np.float32)
        wave = wave[None] if wave.ndim == 1 else wave
        name = source or "audio"
        if sample_rate != cfg.sample_rate:
            raise AudioError(f"sample rate {sample_rate} Hz differs from the model's "
                             f"{cfg.sample_rate} Hz", name)
        if not np.isfinite(wave).all():
            raise AudioError("audio holds NaN or infinite samples", name)
        windows = waveform_windows(wave, cfg, name)
        specs = np.stack([window_features(logmel(piece, cfg), cfg, name) for _, piece in windows])
        scores = self.score_features(specs, name)
        starts = [start for start, _ in windows]
        return self._recording_score(source, list(zip(starts, scores.tolist(), strict=True)))

    def decision_function(self, X: Inputs) -> np.ndarray:
        """Score minus threshold: positive means anomalous."""
        return self.score_samples(X) - self.threshold_.value_

    def predict(self, X: Inputs) -> np.ndarray:
        """1 for anomalous inputs, 0 for normal ones."""
        return self.threshold_.predict(self.score_samples(X))

    def refit_threshold(self, threshold: str | Threshold) -> Detector:
        """Replace the fitted decision threshold without retraining: ``threshold`` (a rule
        as in ``__init__``) is fitted on the same held-out normal scores (``train_scores_``)
        as the one chosen at training time. Returns self."""
        self._check_fitted()
        rule = (Threshold.from_dict(threshold.to_dict()) if isinstance(threshold, Threshold)
                else parse_threshold(threshold))
        self.threshold_ = rule.fit(self.train_scores_)
        return self

    # ---------------------------------------------------------------- explaining
    def features_of(self, X: Inputs) -> Corpus:
        """The features of ``X`` as this fitted detector reads them, checked against the
        model's input (one row per window)."""
        self._check_fitted()
        corpus = self.featurizer().transform(X)
        self._check_shape(corpus.specs, corpus.source)
        return corpus

    def error_maps(self, X: Inputs) -> np.ndarray:
        """Per-window deviation maps ``(N, M', F')`` the scores are made of."""
        specs = self.features_of(X).specs
        return torch.cat(list(self.iter_model(specs, lambda m, x: m.error_maps(x)))).numpy()

    def explain_features(self, specs: np.ndarray) -> np.ndarray:
        """Where each spectrogram ``(N, C, M, F)`` deviates from normal, ``(N, M, F)``, the
        map the report draws."""
        self._check_fitted()
        self._check_shape(specs, "input")
        return torch.cat(list(self.iter_model(specs, lambda m, x: m.explain(x)))).numpy()

    def encode(self, X: Inputs) -> np.ndarray:
        """Codes of the autoencoder's encoder half for every window (frame models: every
        stacked frame window)."""
        self._require_autoencoder()
        specs = self.features_of(X).specs
        return torch.cat(list(self.iter_model(specs, lambda m, x: m.encode(x)))).numpy()

    def decode(self, codes: np.ndarray, source: str = "codes array") -> np.ndarray:
        """Outputs of the decoder half for codes from :meth:`encode`."""
        self._require_autoencoder()
        try:
            parts = self.iter_model(np.asarray(codes, np.float32), lambda m, x: m.decode(x))
            return torch.cat(list(parts)).numpy()
        except RuntimeError as err:
            raise DataError(f"codes of shape {np.shape(codes)} do not fit the decoder of "
                            f"{self.model} ({str(err).splitlines()[0]})", source) from None

    def _require_autoencoder(self) -> None:
        self._check_fitted()
        if not self.model_.is_autoencoder:
            raise DataError(f"model {self.model} is not an autoencoder: it has no "
                            "encoder/decoder halves to run apart")

    def describe(self) -> str:
        """One paragraph for reports: the model, its features and how a clip is scored."""
        self._check_fitted()
        cfg = self.feature_config_
        weights = sum(p.numel() for p in self.model_.parameters()) \
            if isinstance(self.model_, nn.Module) else 0
        size = f"{weights:,} trained weights" if weights else "no trained weights"
        window = f"{cfg.window_s:g} s windows" if cfg.window_s else "whole clips"
        members = ", ".join(getattr(self.model_, "members", None) or
                            getattr(self.model_, "experts", None) or ())
        score = (f"a window's score is the {self.pooling_} of its reconstruction error map"
                 if self.pooling_ else "a window's score is the largest z-score of its "
                 "clip statistics' distances to the normal clips" +
                 (f" ({members})" if members else ""))
        return (f"Model {self.model} ({size}) on {cfg.n_mels}-mel log spectrograms (n_fft "
                f"{cfg.n_fft}, hop {cfg.hop_length}, {cfg.sample_rate} Hz) of {window}; "
                f"{score}; a recording's score is the {self.window_pooling} over its windows.")

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
            "pooling": self.pooling_,
            "window_pooling": self.window_pooling,
            "threshold": self.threshold_.to_dict(),
            "threshold_source": self.threshold_source_,
            "train_scores": {"n": int(scores.size), "mean": float(scores.mean()),
                             "std": float(scores.std()), "values": scores.tolist()},
            "train_input": getattr(self, "train_input_", {}),
            "settings": {"seed": self.seed, "precision": self.precision_,
                         "val_fraction": self.val_fraction},
            "history": self.history_.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write a model folder (``config.json`` + ``model.safetensors``) atomically."""
        return save_model(path, self.get_config(), self.model_.state_dict())

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", progress: bool | None = None,
             channels: int | str | None = None, resample: bool | None = None) -> Detector:
        """Read a model folder written by :meth:`save`; never unpickles.

        ``channels`` and ``resample`` override how inputs are read (not the model)."""
        config, state = load_model(path)
        try:
            det = _from_config(cls, config, state, device=device, progress=progress,
                               channels=channels, resample=resample)
        except (KeyError, TypeError, ValueError, RuntimeError, StethoscopeError) as err:
            raise ModelFileError(f"config.json does not describe a usable model "
                                 f"({str(err).splitlines()[0]})", path) from None
        resolve_device(device)
        return det


def _from_config(cls, config: dict, state: dict, **reading) -> Detector:
    """A fitted Detector from ``config.json`` data and its weights (checked, never trusted)."""
    features = FeatureConfig.from_dict(config["features"])
    threshold = Threshold.from_dict(config["threshold"])
    if threshold.value_ is None or not math.isfinite(threshold.value_):
        raise ValueError(f"the threshold value {threshold.value_!r} is not a finite number")
    scores = np.asarray(config["train_scores"]["values"], dtype=np.float64)
    if scores.size < 1 or not np.isfinite(scores).all():
        raise ValueError("the held-out normal scores are missing or not finite")
    info = registry.info(config["model"])
    pooling = config.get("pooling")
    det = cls(config["model"], features=features, threshold=threshold,
              pooling=pooling if pooling is not None else None,
              window_pooling=config.get("window_pooling", "max"),
              seed=config["settings"]["seed"], precision=config["settings"]["precision"],
              val_fraction=config["settings"].get("val_fraction", 0.1),
              model_params=dict(config["model_params"]), **reading)
    det.feature_config_ = features
    det.input_shape_ = _bounded_shape(config["input_shape"])
    det.model_params_ = dict(config["model_params"])
    det.model_ = registry.build(config["model"], det.input_shape_, **det.model_params_)
    det.model_.load_state_dict(state, strict=True)
    if isinstance(det.model_, nn.Module):
        det.model_.eval()
    if not det.model_.frame_level:  # files from before clip-level models took no pooling
        det.pooling = None
    det.pooling_ = det._pooling(info, det.model_)
    det.train_config_ = None
    det.precision_ = det.precision or "fp32"
    det.threshold_ = threshold
    det.threshold_source_ = config.get("threshold_source", "unknown")
    det.train_scores_ = scores
    det.train_input_ = dict(config.get("train_input") or {})
    det.history_ = History.from_dict(config.get("history", {}))
    return det


MAX_INPUT_SHAPE = (256, 1_024, 10_000_000)  # channels, mels, frames a model file may declare


def _bounded_shape(shape) -> tuple[int, int, int]:
    """A model file's input shape, refused beyond :data:`MAX_INPUT_SHAPE` before any model
    is built from it (a model allocates its statistics from the shape)."""
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or any(not 0 < v <= limit for v, limit in zip(values, MAX_INPUT_SHAPE,
                                                                       strict=True)):
        raise ValueError(f"input shape {list(shape)} is not (channels, mels, frames) within "
                         f"{list(MAX_INPUT_SHAPE)}")
    return values


def _checked_rule(rule: str, what: str) -> str:
    try:
        return check_pooling_rule(rule)
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from None



