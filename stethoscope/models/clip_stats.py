"""Gaussian models of clip statistics: no training, strong on transient machines (valves).

A clip is summarised by a few per-mel statistics over time, and each summary ("expert") is
scored by its Mahalanobis distance to the normal clips (Ledoit-Wolf shrunk covariance, so
a few dozen clips suffice for a few hundred dimensions):

* ``spectrum``: per-mel mean and standard deviation of the log-mel frames — the stationary
  sound of the machine (fans, pumps);
* ``transients``: the per-mel median over time (the clip's background) and the per-mel
  upper quantiles (90 %, 99 %, max) minus that median — how loud the short events (valve
  clicks, impacts) are above the clip's own background.

A reconstruction autoencoder cannot see a click that has become weaker (the DCASE 2023 valve
anomalies): a damped click is easy to reconstruct. The transient statistics see it directly.
Each expert's distance is standardised by the spread of the leave-one-clip-out distances of
the normal clips, so the experts are comparable; a clip's score is the largest z-score
(``combine="max"``): it is flagged when any expert finds it unusual.
"""

from __future__ import annotations

import numpy as np
import torch

from stethoscope.errors import DataError
from stethoscope.features import iter_chunks
from stethoscope.models.base import AnomalyModel, check_state, per_mel_mean_std
from stethoscope.models.registry import register

EXPERTS = ("spectrum", "transients")  # the default; "rhythm" is opt-in (clip-stats-rhythm)
TRANSIENT_QUANTILES = (0.9, 0.99, 1.0)
CHUNK = 16  # clips per statistics batch: bounds memory for memory-mapped corpora


def spectrum_stats(spec: np.ndarray) -> np.ndarray:
    """Per-mel mean and standard deviation over time, ``(B, C, M, F) -> (B, 2*C*M)``."""
    values = np.asarray(spec, dtype=np.float64)
    mean = values.mean(-1)
    centred = values - mean[..., None]
    std = np.sqrt(np.einsum("...f,...f->...", centred, centred) / values.shape[-1])
    return np.concatenate([mean.reshape(len(values), -1), std.reshape(len(values), -1)], 1)


def transient_stats(spec: np.ndarray) -> np.ndarray:
    """Per-mel median over time and upper quantiles minus the median, ``(B, 4*C*M)``.

    The median (the clip's own background) is kept beside the peaks so that the Gaussian
    learns how loud events normally are *for* a given background.
    """
    median, *upper = time_quantiles(np.asarray(spec, dtype=np.float32),
                                    (0.5, *TRANSIENT_QUANTILES))
    parts = [median] + [q - median for q in upper]
    return np.concatenate([p.reshape(len(median), -1) for p in parts], 1)


def time_quantiles(values: np.ndarray, levels: tuple[float, ...]) -> list[np.ndarray]:
    """Quantiles over the last axis (float64) with NumPy's default linear interpolation,
    from one sort: several times faster than ``np.quantile``, which partitions per level,
    or ``torch.sort`` on CPU. Only the order statistics used are widened to float64."""
    ordered = np.sort(values, axis=-1)
    last = values.shape[-1] - 1
    out = []
    for level in levels:
        position = level * last
        low = int(position)
        high = min(low + 1, last)
        below = ordered[..., low].astype(np.float64)
        above = ordered[..., high].astype(np.float64)
        out.append(below + (above - below) * (position - low))
    return out


RHYTHM_MAX_LAG = 256  # frames of the envelope autocorrelation (about 4 s at hop 256)
RHYTHM_POOL = 4  # neighbouring lags averaged: timing jitter of a frame or two is normal


def rhythm_lags(frames: int) -> int:
    """How many pooled autocorrelation lags a clip of ``frames`` frames gives."""
    return max(min(RHYTHM_MAX_LAG, frames - 1) // RHYTHM_POOL, 1)


def rhythm_stats(spec: np.ndarray) -> np.ndarray:
    """Autocorrelation of the clip's loudness envelope (mean log-mel per frame, median
    removed), normalised by lag 0 and pooled over ``RHYTHM_POOL`` lags, ``(B, L)``: the
    timing of strokes, clicks and cycles, which the per-mel statistics cannot see."""
    envelope = torch.from_numpy(np.asarray(spec, dtype=np.float64)).mean(dim=(1, 2))
    envelope = envelope - envelope.median(dim=1, keepdim=True).values
    frames = envelope.shape[1]
    lags = rhythm_lags(frames)
    spectrum = torch.fft.rfft(envelope, 2 * frames, dim=1)
    auto = torch.fft.irfft(spectrum * spectrum.conj(), 2 * frames, dim=1)[:, :frames]
    auto = auto / auto[:, :1].clamp_min(1e-12)
    used = auto[:, 1 : 1 + lags * RHYTHM_POOL]
    return used.reshape(len(used), lags, RHYTHM_POOL).mean(2).numpy()


STATS = {"spectrum": spectrum_stats, "transients": transient_stats, "rhythm": rhythm_stats}
STATS_PER_MEL = {"spectrum": 2, "transients": 1 + len(TRANSIENT_QUANTILES)}


def expert_dim(name: str, channels: int, mels: int, frames: int) -> int:
    """Length of expert ``name``'s statistics vector for clips of this shape."""
    if name == "rhythm":
        return rhythm_lags(frames)
    return STATS_PER_MEL[name] * channels * mels


def ledoit_wolf_shrinkage(centred: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Sample covariance ``S`` of centred rows ``(n, d)``, the Ledoit-Wolf shrinkage ``a``
    and target scale ``mu``: the shrunk covariance is ``(1 - a) S + a mu I``.

    Same estimator as ``sklearn.covariance.ledoit_wolf``; written out because the
    leave-one-out distances below need its two coefficients, which scikit-learn does not
    return together with the covariance.
    """
    n, d = centred.shape
    cov = centred.T @ centred / n
    mu = float(np.trace(cov) / d)
    squared = centred**2
    beta_sum = (squared.T @ squared).sum()
    delta_sum = (cov**2).sum()
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2 * mu * np.trace(cov) + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else float(beta / delta)
    return cov, shrinkage, mu


def ledoit_wolf_covariance(centred: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``(n, d)``."""
    cov, shrinkage, mu = ledoit_wolf_shrinkage(centred)
    return shrunk(cov, 1 - shrinkage, shrinkage * mu)


def shrunk(cov: np.ndarray, scale: float, ridge: float) -> np.ndarray:
    """``scale * cov + ridge * I``, plus a tiny ridge that keeps it invertible."""
    out = scale * cov
    out[np.diag_indices_from(out)] += ridge + 1e-9 * max(np.trace(out) / len(out), 1e-12)
    return out


def fit_gaussian(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (inverse shrunk covariance) of ``rows`` ``(n, d)``."""
    mean = rows.mean(0)
    return mean, np.linalg.inv(ledoit_wolf_covariance(rows - mean))


def quadratic_form(centred: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``u^T A u`` for each row ``u``; one matrix product (50x faster than a three-operand
    ``einsum``, which does not use BLAS)."""
    return np.einsum("ij,ij->i", centred @ matrix, centred)


def mahalanobis(rows: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance (not squared) of each row to the Gaussian."""
    return np.sqrt(np.maximum(quadratic_form(rows - mean, precision), 0.0))


def out_of_sample_distances(rows: np.ndarray) -> np.ndarray:
    """Each row's distance to the Gaussian fitted on all the *other* rows (leave-one-out).

    A Gaussian scores the rows it was fitted on too well, so a threshold on in-sample
    distances would flag far too many new normal clips. Closed form, one matrix inverse
    for all rows (the shrinkage coefficients are those of the full fit): leaving out row
    ``x`` (centred ``u``) gives mean ``m - u/(n-1)`` and shrunk covariance ``B - c u u^T``
    with ``B = (1-a) n/(n-1) S + a mu I`` and ``c = (1-a) n/(n-1)^2``; by Sherman-Morrison
    the squared distance is ``(n/(n-1))^2 q / (1 - c q)`` with ``q = u^T B^-1 u``.
    """
    n = len(rows)
    if n < 3:
        raise DataError(f"clip-stats needs at least 3 normal clips, got {n}")
    centred = rows - rows.mean(0)
    cov, shrinkage, mu = ledoit_wolf_shrinkage(centred)
    base = shrunk(cov, (1 - shrinkage) * n / (n - 1), shrinkage * mu)
    q = quadratic_form(centred, np.linalg.inv(base))
    c = (1 - shrinkage) * n / (n - 1) ** 2
    squared = (n / (n - 1)) ** 2 * q / np.maximum(1 - c * q, 1e-12)
    return np.sqrt(np.maximum(squared, 0.0))


class ClipStatsGaussian(AnomalyModel):
    """Mahalanobis distance of per-clip statistics to the normal clips, per expert.

    No training: :meth:`fit` fits each expert's Gaussian and the z-scale of its distances in
    closed form. A clip's score combines the experts' z-scores (``combine``: ``"max"``, the
    most unusual expert, or ``"mean"``); :meth:`expert_scores` gives them apart and
    :meth:`error_maps` the per-(mel, frame) squared z-score against the normal frames' level,
    the "where" of the report. Not an ``nn.Module``: its state is arrays.
    """

    frame_level = False  # scores whole clips; the detector's pooling rule does not apply

    def __init__(self, input_shape: tuple[int, ...], experts: tuple[str, ...] | list[str] = EXPERTS,
                 combine: str = "max") -> None:
        channels, mels, frames = check_input_shape(input_shape)
        experts = tuple(experts)
        unknown = sorted(set(experts) - set(STATS))
        if not experts or unknown or len(set(experts)) != len(experts):
            raise ValueError(f"clip-stats experts must be distinct names from {', '.join(STATS)}; "
                             f"got {list(experts)}")
        if combine not in ("max", "mean"):
            raise ValueError(f"clip-stats combine must be 'max' or 'mean', not {combine!r}")
        self.input_shape = (channels, mels, frames)
        self.experts = experts
        self.combine = combine
        self.hparams = {"experts": list(experts), "combine": combine}
        # what fit or load_state_dict fills (shapes only: nothing is allocated before)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in experts:
            dim = expert_dim(name, channels, mels, frames)
            self._shapes.update({f"{name}_mean": (dim,), f"{name}_precision": (dim, dim),
                                 f"{name}_scale": (2,)})
        # per-mel level of normal frames, for the report's "where does it deviate" map
        self._shapes.update(frame_mean=(channels, mels, 1), frame_std=(channels, mels, 1))
        self._state: dict[str, np.ndarray] = {}
        self._held_out: np.ndarray | None = None

    def __getattr__(self, name: str) -> np.ndarray:
        state = self.__dict__.get("_state", {})
        if name in state:
            return state[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def statistics(self, specs) -> dict[str, np.ndarray]:
        """Each expert's statistics of spectrograms ``(N, C, M, F)``, in chunks.

        The outputs are allocated before the loop: small arrays kept between the chunks'
        large temporaries fragment the heap (measured: +350 MB for 1,500 clips)."""
        shape = tuple(int(s) for s in specs.shape[1:])
        stats = {name: np.empty((len(specs), expert_dim(name, *shape))) for name in self.experts}
        for start, chunk in iter_chunks(specs, CHUNK):
            for name in self.experts:
                stats[name][start:start + len(chunk)] = STATS[name](chunk)
        return stats

    def fit(self, specs, train=None) -> ClipStatsGaussian:
        """Fit each expert's Gaussian on all normal clips ``(N, C, M, F)`` and its z-scale on
        their out-of-sample distances (kept for :meth:`held_out_scores`)."""
        if len(specs) < 3:
            raise DataError(f"clip-stats needs at least 3 normal clips, got {len(specs)}")
        stats = self.statistics(specs)
        for name in self.experts:
            mean, precision = fit_gaussian(stats[name])
            held_out = out_of_sample_distances(stats[name])
            spread = held_out.std()
            self._state[f"{name}_mean"] = mean
            self._state[f"{name}_precision"] = precision
            self._state[f"{name}_scale"] = np.array([held_out.mean(), spread if spread > 0 else 1.0])
        self._held_out = self._held_out_z(stats)
        mean, std = per_mel_mean_std(specs, CHUNK)
        self._state["frame_mean"], self._state["frame_std"] = mean.numpy(), std.numpy()
        return self

    def _held_out_z(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """Leave-one-out distances of the given clips, z-scored like :meth:`expert_scores`,
        ``(N, E)``."""
        columns = []
        for name in self.experts:
            centre, spread = self._state[f"{name}_scale"].tolist()
            columns.append((out_of_sample_distances(stats[name]) - centre) / spread)
        return np.stack(columns, 1)

    def _combined(self, z: np.ndarray) -> np.ndarray:
        return (z.max(axis=1) if self.combine == "max" else z.mean(axis=1)).astype(np.float64)

    def held_out_scores(self, specs, pool=None) -> tuple[np.ndarray, str]:
        """Out-of-sample (leave-one-clip-out) scores of the normal training clips ``specs``,
        for the threshold; the fitted model is left unchanged."""
        if self._held_out is None or len(self._held_out) != len(specs):
            if len(specs) < 3:
                raise DataError(f"clip-stats needs at least 3 normal clips, got {len(specs)}")
            self._held_out = self._held_out_z(self.statistics(specs))
        return self._combined(self._held_out), "leave-one-clip-out scores of the training clips"

    def _check_batch(self, spec) -> None:
        if spec.ndim != 4 or tuple(spec.shape[1:3]) != self.input_shape[:2] or spec.shape[3] < 2:
            raise DataError(f"spectrograms of shape {tuple(spec.shape[1:])} do not fit "
                            f"clip-stats built for {self.input_shape[:2]} (channels, mels)")
        if "rhythm" in self.experts and rhythm_lags(spec.shape[3]) != rhythm_lags(
                self.input_shape[2]):
            raise DataError(f"clips of {spec.shape[3]} frames are too short for the rhythm "
                            f"statistics of a model trained on {self.input_shape[2]} frames")
        if not self._state:
            raise RuntimeError("clip-stats is not fitted; call fit() or load_state_dict()")

    def expert_scores(self, batch) -> np.ndarray:
        """z-scored Mahalanobis distance of each clip per expert, ``(B, E)``."""
        self._check_batch(batch)
        values = _as_array(batch)
        columns = []
        for name in self.experts:  # NumPy: a third of the time of the same torch ops here
            distance = mahalanobis(STATS[name](values), self._state[f"{name}_mean"],
                                   self._state[f"{name}_precision"])
            centre, spread = self._state[f"{name}_scale"].tolist()
            columns.append((distance - centre) / spread)
        return np.stack(columns, 1)

    def clip_scores(self, batch, pool=None) -> np.ndarray:
        """The experts' z-scores combined (``combine``), one per clip ``(B,)``."""
        return self._combined(self.expert_scores(batch))

    def error_maps(self, batch) -> torch.Tensor:
        """Squared z-score of every (mel, frame) cell against the normal frames' per-mel
        level, ``(B, M, F)``: loud or quiet bands and missing or extra events stand out."""
        self._check_batch(batch)
        z = (_as_array(batch) - self._state["frame_mean"]) / self._state["frame_std"]
        return torch.from_numpy((z**2).mean(1).astype(np.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(np.ascontiguousarray(value))
                for key, value in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        check_state(state, self._shapes, "clip-stats")
        self._state = {key: state[key].numpy().astype(
            np.float32 if key.startswith("frame_") else np.float64, copy=True)
            for key in self._shapes}
        self._held_out = None


def _as_array(batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        return batch.detach().float().cpu().numpy()
    return np.asarray(batch, dtype=np.float32)


def check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, M, F)`` with at least 2 frames, or a one-line error."""
    if len(input_shape) != 3 or min(input_shape) < 1 or input_shape[2] < 2:
        raise DataError(f"clip-stats needs spectrograms (channels, mels, frames) with at least "
                        f"2 frames, got shape {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)


# hop 256 (16 ms): a click is shorter than one 32 ms hop; finer frames keep its peak
CLIP_STATS_FEATURES = {"n_mels": 64, "n_fft": 1024, "hop_length": 256}


# Slide rails are reciprocating: their faults can change only *when* strokes happen, which
# per-mel statistics cannot see (simulated slider timing faults: AUC 0.59 without the rhythm
# expert, 1.0 with it). Not for every machine: on the real DCASE valve, whose normal clips
# follow several operating patterns, the rhythm expert costs 0.05 AUC (docs/quality.md).
RHYTHM_MACHINES = ("slider",)


@register(
    "clip-stats",
    description="No training: Ledoit-Wolf Mahalanobis distance of per-clip log-mel "
                "statistics (stationary spectrum; transient peaks above the clip's own "
                "background) to the normal clips; max of the z-scores. Adds the rhythm "
                "expert when trained on slide rails.",
    features=CLIP_STATS_FEATURES,
    per_machine={m: {"experts": [*EXPERTS, "rhythm"]} for m in RHYTHM_MACHINES},
)
def build_clip_stats(input_shape: tuple[int, ...],
                     experts: tuple[str, ...] | list[str] = EXPERTS,
                     combine: str = "max") -> ClipStatsGaussian:
    return ClipStatsGaussian(input_shape, experts=experts, combine=combine)


@register(
    "clip-stats-rhythm",
    description="clip-stats plus a rhythm expert (autocorrelation of the loudness envelope) "
                "for machines whose faults change timing: slide rails, valves with late or "
                "missing strokes. Costs 0.05 AUC on the real DCASE valve (docs/quality.md).",
    features=CLIP_STATS_FEATURES,
)
def build_clip_stats_rhythm(input_shape: tuple[int, ...],
                            experts: tuple[str, ...] | list[str] = (*EXPERTS, "rhythm"),
                            combine: str = "max") -> ClipStatsGaussian:
    return ClipStatsGaussian(input_shape, experts=experts, combine=combine)
