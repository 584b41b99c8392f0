"""From error maps to clip scores (pooling), and from normal scores to a decision threshold.

A model's error map is the squared reconstruction error per (mel band, frame) cell. A clip
score pools it to one number (higher = more anomalous). A :class:`Threshold` is fitted on
the scores of normal training clips and turns scores into 0/1 verdicts.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats

from stethoscope.errors import DataError

POOLING_RULES = ("mean", "max", "topk:R", "pNN", "median")
THRESHOLD_RULES = ("meanstd", "percentile", "gamma", "fixed")
THRESHOLD_SPECS = ("mean+2std", "mean+3std", "p95", "p99.5", "gamma", "gamma:0.95", "value:12.5")
DEFAULT_Q = {"percentile": 95.0, "gamma": 0.9}


# ---- pooling --------------------------------------------------------------------------


def _as_numpy(array: Any) -> np.ndarray:
    """A float64 NumPy view of a NumPy array or a (possibly GPU, grad-tracking) tensor."""
    if hasattr(array, "detach"):
        array = array.detach().to("cpu").float().numpy()
    return np.asarray(array, dtype=np.float64)


def frame_errors(error_maps: Any) -> np.ndarray:
    """Per-frame error ``(N, F)``: the mean over the mel axis of an ``(N, M, F)`` error map."""
    maps = _as_numpy(error_maps)
    if maps.ndim != 3:
        raise DataError(f"error maps must have shape (clips, mels, frames), got {maps.shape}")
    if maps.shape[1] == 0 or maps.shape[2] == 0:
        raise DataError(f"error maps have an empty axis: shape {maps.shape}")
    return maps.mean(axis=1)


def _invalid_rule(rule: str) -> ValueError:
    return ValueError(f"unknown pooling rule {rule!r}; valid rules: "
                      "'mean', 'max', 'median', 'topk:R' with 0 < R <= 1 (e.g. 'topk:0.1'), "
                      "'pNN' with 0 <= NN <= 100 (e.g. 'p95')")


def _parse_fraction(text: str, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _invalid_rule(rule) from None
    if not 0 < value <= 1:
        raise _invalid_rule(rule)
    return value


def _parse_percent(text: str, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _invalid_rule(rule) from None
    if not 0 <= value <= 100:
        raise _invalid_rule(rule)
    return value


def check_pooling_rule(rule: str) -> str:
    """Return ``rule`` if valid, else raise the ValueError that lists the valid rules."""
    if rule in ("mean", "max", "median"):
        return rule
    if rule.startswith("topk:"):
        _parse_fraction(rule[5:], rule)
        return rule
    if re.fullmatch(r"p[0-9.]+", rule):
        _parse_percent(rule[1:], rule)
        return rule
    raise _invalid_rule(rule)


def pool_scores(error_maps: Any, rule: str = "mean") -> np.ndarray:
    """One score per clip from ``(N, M, F)`` error maps.

    ``"mean"`` is the course/DCASE score (mean of all cells); the others pool the per-frame
    error (mean over mels) so that a short fault in a long clip is not averaged away:
    ``"max"``, ``"median"``, ``"topk:R"`` (mean of the top R fraction of frames) and
    ``"pNN"`` (the NN-th percentile of frame errors).
    """
    check_pooling_rule(rule)
    frames = frame_errors(error_maps)
    if rule == "mean":
        scores = frames.mean(axis=1)  # equal to the mean of all cells: every frame has M cells
    elif rule == "max":
        scores = frames.max(axis=1)
    elif rule == "median":
        scores = np.median(frames, axis=1)
    elif rule.startswith("topk:"):
        count = max(1, math.ceil(_parse_fraction(rule[5:], rule) * frames.shape[1]))
        top = np.partition(frames, frames.shape[1] - count, axis=1)[:, -count:]
        scores = top.mean(axis=1)
    else:
        scores = np.percentile(frames, _parse_percent(rule[1:], rule), axis=1)
    return scores.astype(np.float64)


# ---- thresholds -----------------------------------------------------------------------


def _checked_scores(scores: Any, *, minimum: int, what: str) -> np.ndarray:
    values = _as_numpy(scores).ravel()
    if values.size < minimum:
        raise DataError(f"{what}: need at least {minimum} scores, got {values.size}")
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DataError(f"{what}: {bad} of {values.size} scores are NaN or infinite")
    return values


@dataclass
class Threshold:
    """A decision threshold fitted on the scores of normal clips.

    Rules: ``"meanstd"`` (course rule: mean + k·std, population std), ``"percentile"``
    (the q-th percentile, q in [0, 100], default 95), ``"gamma"`` (DCASE 2023 baseline:
    ``scipy.stats.gamma.fit`` then ``gamma.ppf(q)``, q in (0, 1), default 0.9) and
    ``"fixed"`` (``value`` as given). A clip is anomalous when its score > ``value_``.
    """

    rule: str = "meanstd"
    k: float = 2.0
    q: float | None = None
    value: float | None = None
    value_: float | None = field(default=None, repr=False)
    stats_: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {self.rule!r}; valid rules: "
                             f"{', '.join(THRESHOLD_RULES)}")
        if self.q is None and self.rule in DEFAULT_Q:
            self.q = DEFAULT_Q[self.rule]
        if self.rule == "percentile" and not 0 <= self.q <= 100:
            raise ValueError(f"percentile q must be in [0, 100], not {self.q}")
        if self.rule == "gamma" and not 0 < self.q < 1:
            raise ValueError(f"gamma q must be in (0, 1), not {self.q}")
        if self.rule == "fixed":
            if self.value is None or not math.isfinite(self.value):
                raise ValueError("a fixed threshold needs a finite value")
            self.value_ = float(self.value)

    @property
    def fitted(self) -> bool:
        return self.value_ is not None

    def fit(self, normal_scores: Any) -> Threshold:
        """Set ``value_`` and ``stats_`` from the scores of normal (training) clips."""
        scores = _checked_scores(normal_scores, minimum=2, what="threshold fit on normal scores")
        stats: dict[str, Any] = {
            "mean": float(scores.mean()), "std": float(scores.std()), "n": int(scores.size),
            "min": float(scores.min()), "max": float(scores.max()),
        }
        if self.rule == "meanstd":
            value = stats["mean"] + self.k * stats["std"]
        elif self.rule == "percentile":
            value = float(np.percentile(scores, self.q))
        elif self.rule == "gamma":
            value = self._fit_gamma(scores, stats)
        else:
            value = float(self.value)
        self.value_, self.stats_ = float(value), stats
        return self

    def _fit_gamma(self, scores: np.ndarray, stats: dict[str, Any]) -> float:
        if np.ptp(scores) == 0:
            raise DataError("threshold fit on normal scores: all scores are equal; "
                            "a gamma distribution cannot be fitted")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # optimiser noise on small samples
            shape, loc, scale = scipy.stats.gamma.fit(scores)
        stats.update(gamma_shape=float(shape), gamma_loc=float(loc), gamma_scale=float(scale))
        return float(scipy.stats.gamma.ppf(self.q, shape, loc=loc, scale=scale))

    def predict(self, scores: Any) -> np.ndarray:
        """1 for scores above the threshold (anomalous), 0 otherwise."""
        if not self.fitted:
            raise RuntimeError("threshold is not fitted; call fit(normal_scores) first")
        values = _checked_scores(scores, minimum=0, what="scores to classify")
        return (values > self.value_).astype(int)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings and fitted state, for ``config.json``."""
        return {"rule": self.rule, "k": self.k, "q": self.q, "value": self.value,
                "value_": self.value_, "stats_": dict(self.stats_)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        threshold = cls(rule=data.get("rule", "meanstd"), k=float(data.get("k", 2.0)),
                        q=data.get("q"), value=data.get("value"))
        if data.get("value_") is not None:
            threshold.value_ = float(data["value_"])
        threshold.stats_ = dict(data.get("stats_") or {})
        return threshold

    def spec(self) -> str:
        """The CLI string that builds this rule (inverse of :func:`parse_threshold`)."""
        if self.rule == "meanstd":
            return f"mean+{self.k:g}std"
        if self.rule == "percentile":
            return f"p{self.q:g}"
        if self.rule == "gamma":
            return f"gamma:{self.q:g}"
        return f"value:{self.value:g}"

    def describe(self) -> str:
        """One line for reports, e.g. ``mean + 2·std of 60 normal training scores = 12.3``."""
        n = self.stats_.get("n")
        source = f"{n} normal training scores" if n is not None else "normal training scores"
        value = "(not fitted)" if self.value_ is None else f"{self.value_:.4g}"
        if self.rule == "meanstd":
            return f"mean + {self.k:g}·std of {source} = {value}"
        if self.rule == "percentile":
            return f"{self.q:g}th percentile of {source} = {value}"
        if self.rule == "gamma":
            return f"{self.q:g} quantile of a gamma distribution fitted to {source} = {value}"
        return f"fixed value = {value}"


_MEANSTD = re.compile(r"mean\+([0-9]*\.?[0-9]+)(?:std|sigma|σ)")


def parse_threshold(spec: str) -> Threshold:
    """A :class:`Threshold` from a CLI string: ``mean+2std``, ``p99.5``, ``gamma``,
    ``gamma:0.95`` or ``value:12.5``."""
    text = spec.strip().lower().replace(" ", "")
    try:
        if match := _MEANSTD.fullmatch(text):
            return Threshold("meanstd", k=float(match.group(1)))
        if re.fullmatch(r"p[0-9]*\.?[0-9]+", text):
            return Threshold("percentile", q=float(text[1:]))
        if text == "gamma":
            return Threshold("gamma")
        if text.startswith("gamma:"):
            return Threshold("gamma", q=float(text[6:]))
        if text.startswith(("value:", "fixed:")):
            return Threshold("fixed", value=float(text[6:]))
    except ValueError as err:
        raise ValueError(f"bad threshold {spec!r}: {err}") from None
    raise ValueError(f"unknown threshold {spec!r}; use one of: {', '.join(THRESHOLD_SPECS)} "
                     "(mean+Kstd, pQ, gamma[:Q], value:V)")


# ---- results of scoring recordings -----------------------------------------------------


@dataclass
class WindowScore:
    """One window of a recording: where it starts and ends (seconds), its score and verdict."""

    start_s: float
    end_s: float
    score: float
    anomalous: bool

    def to_dict(self) -> dict[str, Any]:
        return {"start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6),
                "score": _json_float(self.score), "anomalous": bool(self.anomalous)}


@dataclass
class RecordingScore:
    """What scoring one recording gave: its score and verdict over its windows, or the
    one-line error that kept it from being scored (then ``score`` and ``anomalous`` are
    None and ``windows`` is empty)."""

    path: str | None
    score: float | None = None
    anomalous: bool | None = None
    windows: list[WindowScore] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON data (NaN and infinities become null)."""
        return {"path": self.path, "score": _json_float(self.score),
                "anomalous": self.anomalous, "error": self.error,
                "windows": [w.to_dict() for w in self.windows]}


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)
