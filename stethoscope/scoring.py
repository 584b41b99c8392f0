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
THRESHOLD_RULES = ("meanstd", "percentile", "gamma", "fpr", "gumbel", "fixed")
THRESHOLD_SPECS = ("gumbel:0.03", "mean+2std", "mean+3std", "p99", "gamma:0.9", "fpr:0.01",
                   "value:12.5")
DEFAULT_Q = {"percentile": 95.0, "gamma": 0.9, "fpr": 0.05, "gumbel": 0.03}
EULER_GAMMA = 0.5772156649015329


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
    ``scipy.stats.gamma.fit`` then ``gamma.ppf(q)``, q in (0, 1), default 0.9), ``"fpr"``
    (the lowest threshold that flags at most a fraction q of the normal scores, q in
    (0, 1), default 0.05: a target false-alarm rate), ``"gumbel"`` (the ``1 - q`` quantile
    of a Gumbel law fitted to the normal scores by moments, q in (0, 1), default 0.03: a
    target false-alarm rate that also holds from 10 clips, where no empirical 97 % quantile
    exists; the default rule, see :func:`gumbel_threshold`) and ``"fixed"`` (``value``).
    A clip is anomalous when its score > ``value_``.

    ``q=None`` means the rule's default (:attr:`quantile` gives the value in force); it
    is kept as None so that ``sklearn.base.clone`` sees the parameters it passed.
    ``stats_`` holds the normal scores' mean, std, n, min, max and the fraction of them
    above the fitted value (``false_alarm_rate``).
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
        if not _finite(self.k):
            raise ValueError(f"threshold k must be a finite number, not {self.k!r}")
        if self.q is not None and not _finite(self.q):
            raise ValueError(f"threshold q must be a finite number, not {self.q!r}")
        q = self.quantile
        if self.rule == "percentile" and not 0 <= q <= 100:
            raise ValueError(f"percentile q must be in [0, 100], not {q}")
        if self.rule in ("gamma", "fpr", "gumbel") and not 0 < q < 1:
            raise ValueError(f"{self.rule} q must be in (0, 1), not {q}")
        if self.rule == "fixed":
            if self.value is None or not _finite(self.value):
                raise ValueError("a fixed threshold needs a finite value")
            self.value_ = float(self.value)

    @property
    def quantile(self) -> float | None:
        """``q``, or the rule's default when ``q`` is None (None for rules without q)."""
        return self.q if self.q is not None else DEFAULT_Q.get(self.rule)

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
            value = float(np.percentile(scores, self.quantile))
        elif self.rule == "gamma":
            value = self._fit_gamma(scores, stats)
        elif self.rule == "fpr":
            value = false_alarm_threshold(scores, self.quantile)
        elif self.rule == "gumbel":
            value = gumbel_threshold(scores, self.quantile)
        else:
            value = float(self.value)
        if not math.isfinite(value):
            raise DataError(f"threshold fit on normal scores: the {self.spec()} rule gave "
                            f"{value}; choose another rule (--threshold)")
        stats["false_alarm_rate"] = float(np.mean(scores > value))
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
        return float(scipy.stats.gamma.ppf(self.quantile, shape, loc=loc, scale=scale))

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
        """The inverse of :meth:`to_dict`. Raises ValueError for a value, parameter or
        statistic that is NaN, infinite or not a number (a damaged model file)."""
        if not isinstance(data, dict):
            raise ValueError(f"a threshold must be a JSON object, not {type(data).__name__}")
        for key in ("k", "q", "value", "value_"):
            if data.get(key) is not None and not _finite(data[key]):
                raise ValueError(f"threshold {key} is {data[key]!r}; it must be a finite "
                                 "number")
        stats = data.get("stats_") or {}
        if not isinstance(stats, dict):
            raise ValueError("threshold stats_ must be a JSON object")
        for key, value in stats.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"threshold statistic {key} is {value!r}; it must be finite")
        threshold = cls(rule=data.get("rule", "meanstd"), k=float(data.get("k", 2.0)),
                        q=None if data.get("q") is None else float(data["q"]),
                        value=None if data.get("value") is None else float(data["value"]))
        if data.get("value_") is not None:
            threshold.value_ = float(data["value_"])
        threshold.stats_ = dict(stats)
        return threshold

    def spec(self) -> str:
        """The CLI string that builds this rule (inverse of :func:`parse_threshold`)."""
        if self.rule == "meanstd":
            return f"mean+{self.k:g}std"
        if self.rule == "percentile":
            return f"p{self.quantile:g}"
        if self.rule in ("gamma", "fpr", "gumbel"):
            return self.rule if self.q is None else f"{self.rule}:{self.q:g}"
        return f"value:{self.value:g}"

    def describe(self) -> str:
        """One line for reports, e.g. ``mean + 2·std of 60 normal training scores = 12.3``."""
        n = self.stats_.get("n")
        source = f"{n} normal training scores" if n is not None else "normal training scores"
        value = "(not fitted)" if self.value_ is None else f"{self.value_:.4g}"
        if self.rule == "meanstd":
            return f"mean + {self.k:g}·std of {source} = {value}"
        if self.rule == "percentile":
            return f"{self.quantile:g}th percentile of {source} = {value}"
        if self.rule == "gamma":
            return (f"{self.quantile:g} quantile of a gamma distribution fitted to {source} "
                    f"= {value}")
        if self.rule == "fpr":
            return f"{self.quantile:.3g} false-alarm rate on {source} = {value}"
        if self.rule == "gumbel":
            return (f"{self.quantile:.3g} false-alarm rate of a Gumbel law fitted to {source} "
                    f"= {value}")
        return f"fixed value = {value}"


def false_alarm_threshold(normal_scores: Any, rate: float) -> float:
    """The lowest of the normal scores that at most ``rate`` of them lie above: flagging
    scores above it gives a false-alarm rate of at most ``rate`` on these normal clips.

    >>> false_alarm_threshold([1.0, 2.0, 3.0, 4.0], 0.25)
    3.0
    """
    scores = np.sort(_checked_scores(normal_scores, minimum=1, what="false-alarm threshold"))
    allowed = math.floor(rate * scores.size + 1e-9)  # clips that may lie above
    return float(scores[max(scores.size - 1 - allowed, 0)])


def gumbel_threshold(normal_scores: Any, rate: float) -> float:
    """The ``1 - rate`` quantile of a Gumbel (type-I extreme-value) law fitted to normal
    scores by the method of moments (scale ``b = s·√6/π``, location ``m - 0.5772·b``).

    Why Gumbel: the default model's score is a maximum of z-scores of right-skewed
    distances, the extreme-value law of such maxima; two moments are stable from 10 clips.
    Measured on the real suite sets (docs/quality.md) at ``rate = 0.03``.

    >>> round(gumbel_threshold([0.0, 1.0, 2.0, 3.0], 0.03), 3)
    4.433
    """
    scores = _checked_scores(normal_scores, minimum=2, what="Gumbel threshold")
    scale = scores.std(ddof=1) * math.sqrt(6.0) / math.pi
    location = scores.mean() - EULER_GAMMA * scale
    return float(location - scale * math.log(-math.log1p(-rate)))


def _finite(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


_MEANSTD = re.compile(r"mean\+([0-9]*\.?[0-9]+)(?:std|sigma|σ)")


def parse_threshold(spec: str) -> Threshold:
    """A :class:`Threshold` from a CLI string: ``mean+2std``, ``mean+3std``, ``p99.5``,
    ``gamma``, ``gamma:0.95``, ``fpr:0.01`` (a target false-alarm rate on the held-out
    normal scores) or ``value:12.5``."""
    text = spec.strip().lower().replace(" ", "")
    try:
        if match := _MEANSTD.fullmatch(text):
            return Threshold("meanstd", k=float(match.group(1)))
        if re.fullmatch(r"p[0-9]*\.?[0-9]+", text):
            return Threshold("percentile", q=float(text[1:]))
        if text in ("gamma", "fpr", "gumbel"):
            return Threshold(text)
        if text.startswith(("gamma:", "fpr:", "gumbel:")):
            rule, _, q = text.partition(":")
            return Threshold(rule, q=float(q))
        if text.startswith(("value:", "fixed:")):
            return Threshold("fixed", value=float(text[6:]))
    except ValueError as err:
        raise ValueError(f"bad threshold {spec!r}: {err}") from None
    raise ValueError(f"unknown threshold {spec!r}; use one of: {', '.join(THRESHOLD_SPECS)} "
                     "(mean+Kstd, pQ, gamma[:Q], fpr:RATE, gumbel:RATE, value:V)")


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
