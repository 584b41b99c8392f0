"""Clip-statistics Gaussian ensemble: the default, sound for log-mel and for feature arrays
it knows nothing about (docs/quality.md: what was tried, and the numbers).

Fitted on normal clips only, one fixed configuration for every input:

1. **Transform, decided from the training data.** When every training value is >= 0
   (linear magnitudes or power), a Box-Cox choice between lambda = 0 (log) and lambda = 1
   (identity) is made by profile likelihood summed over the cells (Box & Cox 1964); when the
   log wins, values are floored at the smallest positive training value and logged. Inputs
   with negative values (log-mel in dB) are used as they are.
2. **Which axis is time.** The last axis is time when it has at least ``TIME_MIN_FRAMES``
   entries (0.5 s at a 16 ms hop); shorter last axes are feature positions (the 8
   modulation bands of a modulation spectrum), whose order means something.
3. **Clip vectors.** On a time axis: ``spectrum`` (per-row mean and standard deviation over
   time, the log-mel baseline) and ``peaks`` (per-row maximum over time: time-weighted rank
   pooling with r = 0, TWFR, Guan et al. ICASSP 2023), and with ``rhythm=True`` (the
   default when every training clip is a slide rail's) ``rhythm``, the pooled
   autocorrelation of the loudness envelope, for faults that change only *when* strokes
   happen. Otherwise: ``cells`` (the whole array, flattened: the log-feature baseline).
4. **Members.** A Ledoit-Wolf Gaussian per vector, scored by Mahalanobis distance. From 100
   clips on, the first vector also gets a mixture member (SECOM-style PCA + GMM): each
   dimension rank-Gaussianised (training quantiles mapped to normal quantiles, tails
   continued linearly), whitened PCA to 16 dimensions, and the average of 10 full-covariance
   Gaussian mixtures of ``min(8, N // 50)`` components fitted from different random starts.
5. **Fusion.** Each member's score is z-normalised on its own held-out normal scores
   (exact leave-one-out for the Gaussians, 5-fold for the mixture), and a clip's score is the
   largest member z-score (DCASE 2025: normalising members matters more than the members).

No trainable weights; the fitted state is arrays, saved as safetensors. Scoring is NumPy.
"""

from __future__ import annotations

import numpy as np
import torch

from stethoscope.errors import DataError, ModelFileError
from stethoscope.features import iter_chunks
from stethoscope.models.base import AnomalyModel
from stethoscope.models.clip_stats import (
    CLIP_STATS_FEATURES,
    RHYTHM_MACHINES,
    fit_gaussian,
    mahalanobis,
    out_of_sample_distances,
    rhythm_lags,
    rhythm_stats,
)
from stethoscope.models.registry import register

TIME_MIN_FRAMES = 32
PCA_DIMS = 16
MAX_COMPONENTS = 8
CLIPS_PER_COMPONENT = 50
REG_COVAR = 1e-3
MIXTURE_STARTS = 10  # mixtures from different random starts, averaged
QUANTILE_KNOTS = 100
QUANTILE_TAIL = 0.1  # share of the knots whose slope the map continues beyond the range
FOLDS = 5
MIN_CLIPS = 3
CHUNK = 64  # clips per statistics pass: flat memory for memory-mapped corpora
MAX_DIMS = 8192  # a full-covariance Gaussian beyond this many values a clip is not fitted


def chooses_log(X) -> tuple[bool, float]:
    """Box-Cox lambda 0 against 1 by profile log-likelihood over the cells of ``X``
    ``(N, C, M, F)``; returns ``(log?, floor)``, the floor being the smallest positive value.
    Only non-negative inputs can be logged. One pass over chunks."""
    lowest, floor = np.inf, np.inf
    for _, chunk in iter_chunks(X, CHUNK, dtype=np.float64):
        lowest = min(lowest, float(chunk.min()))
        if (chunk > 0).any():
            floor = min(floor, float(chunk[chunk > 0].min()))
    if lowest < 0 or not np.isfinite(floor):
        return False, 0.0
    sums = np.zeros((4, int(np.prod(X.shape[1:]))))
    for _, chunk in iter_chunks(X, CHUNK, dtype=np.float64):
        cells = np.maximum(chunk, floor).reshape(len(chunk), -1)
        logged = np.log(cells)
        sums += [cells.sum(0), (cells**2).sum(0), logged.sum(0), (logged**2).sum(0)]
    n = len(X)
    var_identity = np.maximum(sums[1] / n - (sums[0] / n) ** 2, 1e-300)
    var_log = np.maximum(sums[3] / n - (sums[2] / n) ** 2, 1e-300)
    ll_identity = -0.5 * n * np.log(var_identity).sum()
    ll_log = -0.5 * n * np.log(var_log).sum() - sums[2].sum()
    return bool(ll_log > ll_identity), floor


def clip_vectors(T: np.ndarray, time_axis: bool, rhythm: bool = False
                 ) -> dict[str, np.ndarray]:
    """Clip vectors of transformed clips ``(N, C, M, F)`` (see the module docstring)."""
    n = len(T)
    if not time_axis:
        return {"cells": T.reshape(n, -1)}
    vectors = {"spectrum": np.concatenate([T.mean(-1).reshape(n, -1),
                                           T.std(-1).reshape(n, -1)], 1),
               "peaks": T.max(-1).reshape(n, -1)}
    if rhythm:
        vectors["rhythm"] = rhythm_stats(T)
    return vectors


def fit_quantile_map(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension map of ``rows`` ``(N, D)`` to standard-normal quantiles (rank
    Gaussianisation): ``min(QUANTILE_KNOTS, N)`` training quantiles at p = (i + 0.5) / q
    mapped to the normal quantiles of p, linear between knots, and beyond the training
    range a straight line continuing the slope over the outer ``QUANTILE_TAIL`` of the
    knots (so a value far outside stays far out, unlike scikit-learn's
    ``QuantileTransformer``, which clips it to the range: written here for that reason)."""
    from scipy.special import ndtri

    q = min(QUANTILE_KNOTS, len(rows))
    p = (np.arange(q) + 0.5) / q
    x = np.quantile(rows, p, axis=0)  # (q, D), non-decreasing per column
    z = ndtri(p)
    j = max(1, int(round(QUANTILE_TAIL * q)))
    low, high = x[j] - x[0], x[-1] - x[-1 - j]
    slope_low = np.where(low > 0, (z[j] - z[0]) / np.where(low > 0, low, 1), 0.0)
    slope_high = np.where(high > 0, (z[-1] - z[-1 - j]) / np.where(high > 0, high, 1), 0.0)
    return {"qt_x": x, "qt_z": z, "qt_slo": slope_low, "qt_shi": slope_high}


def quantile_map(rows: np.ndarray, m: dict[str, np.ndarray], chunk: int = 256) -> np.ndarray:
    """Apply :func:`fit_quantile_map`'s map to ``rows`` ``(N, D)`` → float64 ``(N, D)``; a
    dimension that was constant in training maps to 0.

    >>> rows = np.random.default_rng(0).lognormal(size=(1000, 2))
    >>> m = fit_quantile_map(rows)
    >>> bool(abs(quantile_map(rows, m).mean()) < 0.05)  # about standard normal now
    True
    >>> float(quantile_map(np.array([[1e3, 1e3]]), m)[0, 0]) > 10  # far out stays far out
    True
    """
    x, z, slope_low, slope_high = m["qt_x"], m["qt_z"], m["qt_slo"], m["qt_shi"]
    q, d = x.shape
    columns = np.arange(d)
    constant = x[-1] <= x[0]
    out = np.empty_like(rows, dtype=np.float64)
    for start in range(0, len(rows), chunk):
        v = rows[start:start + chunk]
        k = np.clip((x[None] <= v[:, None]).sum(1), 1, q - 1)  # searchsorted, side="right"
        x0, x1 = x[k - 1, columns], x[k, columns]
        gap = x1 - x0
        t = np.clip(np.where(gap > 0, (v - x0) / np.where(gap > 0, gap, 1), 0.5), 0, 1)
        mapped = z[k - 1] + t * (z[k] - z[k - 1])
        mapped = np.where(v < x[0], z[0] + (v - x[0]) * slope_low, mapped)
        mapped = np.where(v > x[-1], z[-1] + (v - x[-1]) * slope_high, mapped)
        out[start:start + chunk] = np.where(constant, 0.0, mapped)
    return out


def fit_mixture(rows: np.ndarray, components: int, seed: int) -> dict[str, np.ndarray]:
    """The mixture member as arrays: the quantile map, whitened PCA (``PCA_DIMS``) and the
    equal-weight average of ``MIXTURE_STARTS`` full-covariance Gaussian mixtures fitted
    from different random starts (one mixture of all their components, weights divided by
    the number of starts): one fit's result depends on its start, the average much less."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    m = fit_quantile_map(rows)
    mapped = quantile_map(rows, m)
    dims = max(1, min(PCA_DIMS, len(rows) - 2, rows.shape[1]))
    pca = PCA(n_components=dims, whiten=True, svd_solver="covariance_eigh").fit(mapped)
    projected = pca.transform(mapped)
    fits = [GaussianMixture(components, covariance_type="full", reg_covar=REG_COVAR,
                            random_state=seed * MIXTURE_STARTS + start).fit(projected)
            for start in range(MIXTURE_STARTS)]
    return {**m, "pca_mean": pca.mean_,
            "pca_proj": pca.components_.T / np.sqrt(np.maximum(pca.explained_variance_, 1e-12)),
            "log_weights": np.concatenate([np.log(g.weights_) - np.log(len(fits))
                                           for g in fits]),
            "means": np.concatenate([g.means_ for g in fits]),
            "prec_chol": np.concatenate([g.precisions_cholesky_ for g in fits])}


def mixture_nll(rows: np.ndarray, m: dict[str, np.ndarray]) -> np.ndarray:
    """Negative log-likelihood under the mixture member: the quantile map (when the member
    has one), the whitened PCA and the mixture's log-sum-exp, in NumPy (scikit-learn's input
    checks cost more than the arithmetic per clip)."""
    mapped = quantile_map(rows, m) if "qt_x" in m else rows
    z = (mapped - m["pca_mean"]) @ m["pca_proj"]
    d = z.shape[1]
    chol = m["prec_chol"]  # (K, d, d)
    residual = np.einsum("nd,kde->nke", z, chol) - np.einsum("kd,kde->ke", m["means"], chol)[None]
    logs = (m["log_weights"] + np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
            - 0.5 * d * np.log(2 * np.pi))[None] - 0.5 * (residual ** 2).sum(2)  # (N, K)
    top = logs.max(1)
    return -(top + np.log(np.exp(logs - top[:, None]).sum(1)))


def mixture_held_out(rows: np.ndarray, components: int, seed: int) -> np.ndarray:
    """Out-of-sample (5-fold) mixture scores of the training rows: the whole member (map,
    PCA, mixtures) refitted without each fold."""
    order = np.random.default_rng(seed).permutation(len(rows))
    out = np.empty(len(rows))
    for fold in range(FOLDS):
        test = order[fold::FOLDS]
        out[test] = mixture_nll(rows[test], fit_mixture(rows[np.setdiff1d(order, test)],
                                                        components, seed))
    return out


def _spread(values: np.ndarray) -> float:
    spread = float(values.std())
    return spread if spread > 0 else 1.0


MEMBER_FIELDS = {"gauss": ("mean", "precision", "z"),
                 "gmm": ("qt_x", "qt_z", "qt_slo", "qt_shi", "pca_mean", "pca_proj",
                         "log_weights", "means", "prec_chol", "z")}
OPTIONAL_FIELDS = {"gauss": (), "gmm": ("qt_x", "qt_z", "qt_slo", "qt_shi")}  # older files


class ClipGaussianEnsemble(AnomalyModel):
    """Held-out-normalised Gaussians (and a mixture) on clip vectors; see the module docstring.

    ``error_maps`` is the squared z-score of every cell against the normal clips (per row over
    all frames on a time axis, per cell otherwise), the report's "where"."""

    frame_level = False  # scores whole clips; the detector's pooling rule does not apply

    def __init__(self, input_shape: tuple[int, ...], seed: int = 0, rhythm: bool = False
                 ) -> None:
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise DataError(f"clip-ensemble needs spectrograms or feature arrays (channels, "
                            f"rows, columns), got shape {tuple(input_shape)}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.seed = int(seed)
        self.time_axis = self.input_shape[2] >= TIME_MIN_FRAMES
        self.rhythm = bool(rhythm) and self.time_axis  # no envelope without a time axis
        self.hparams = {"seed": self.seed, "rhythm": self.rhythm}
        self.members: dict[str, dict[str, np.ndarray]] = {}
        self._held_out: np.ndarray | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, specs, train=None) -> ClipGaussianEnsemble:
        """Fit the transform, the members and their z-scales on normal clips ``(N, C, M, F)``."""
        if len(specs) < MIN_CLIPS:
            raise DataError(f"clip-ensemble needs at least {MIN_CLIPS} normal clips, got "
                            f"{len(specs)}")
        self.log, self.floor = chooses_log(specs)
        vectors, self.cell_mean, self.cell_std = self._statistics(specs)
        self.members, held = {}, []
        for name, rows in vectors.items():
            if rows.shape[1] > MAX_DIMS:
                raise DataError(f"clip-ensemble: {rows.shape[1]} values a clip ({name}) are "
                                f"too many for a full-covariance Gaussian (at most {MAX_DIMS})")
            mean, precision = fit_gaussian(rows)
            loo = out_of_sample_distances(rows)
            self.members[f"gauss_{name}"] = {"mean": mean, "precision": precision,
                                             "z": np.array([loo.mean(), _spread(loo)])}
            held.append(self._z(f"gauss_{name}", loo))
        primary = next(iter(vectors))
        components = min(MAX_COMPONENTS, len(specs) // CLIPS_PER_COMPONENT)
        if components >= 2:
            rows = vectors[primary]
            scores = mixture_held_out(rows, components, self.seed)
            self.members[f"gmm_{primary}"] = {**fit_mixture(rows, components, self.seed),
                                              "z": np.array([scores.mean(), _spread(scores)])}
            held.append(self._z(f"gmm_{primary}", scores))
        self._held_out = np.max(held, 0)
        return self

    def _transform(self, X: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(X, self.floor)) if self.log else X

    def _statistics(self, specs):
        """Clip vectors and the per-row (time axis) or per-cell mean and std of the
        transformed clips, chunk by chunk."""
        parts: dict[str, list[np.ndarray]] = {}
        total = squares = 0.0
        count = 0
        axes = (0, 3) if self.time_axis else (0,)
        for _, chunk in iter_chunks(specs, CHUNK, dtype=np.float64):
            T = self._transform(chunk)
            if not np.isfinite(T).all():
                raise DataError("training clips hold NaN or infinite values")
            for name, rows in clip_vectors(T, self.time_axis, self.rhythm).items():
                parts.setdefault(name, []).append(rows)
            total = total + T.sum(axes, keepdims=True)[0]
            squares = squares + (T**2).sum(axes, keepdims=True)[0]
            count += len(T) * (T.shape[-1] if self.time_axis else 1)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return ({k: np.concatenate(v) for k, v in parts.items()}, mean, np.maximum(std, 1e-12))

    def _z(self, member: str, scores: np.ndarray) -> np.ndarray:
        centre, spread = self.members[member]["z"]
        return (scores - centre) / spread

    def held_out_scores(self, specs, pool=None) -> tuple[np.ndarray, str]:
        """Out-of-sample fused scores of the training clips (kept from :meth:`fit`; a loaded
        model refits on ``specs`` to get them)."""
        if self._held_out is None or len(self._held_out) != len(specs):
            self._held_out = type(self)(self.input_shape, self.seed, self.rhythm).fit(
                specs)._held_out
        return self._held_out.copy(), ("held-out scores of the training clips (leave-one-out "
                                       "Gaussians, 5-fold mixture)")

    # ------------------------------------------------------------------ scoring
    def _check_batch(self, batch) -> np.ndarray:
        X = batch.detach().double().cpu().numpy() if isinstance(batch, torch.Tensor) else \
            np.asarray(batch, dtype=np.float64)
        fixed = self.input_shape[:2] if self.time_axis else self.input_shape
        if X.ndim != 4 or tuple(X.shape[1:1 + len(fixed)]) != tuple(fixed) or X.shape[3] < 2:
            raise DataError(f"spectrograms of shape {tuple(X.shape[1:])} do not fit "
                            f"clip-ensemble built for {self.input_shape}")
        if self.rhythm and rhythm_lags(X.shape[3]) != rhythm_lags(self.input_shape[2]):
            raise DataError(f"clips of {X.shape[3]} frames are too short for the rhythm "
                            f"member fitted on {self.input_shape[2]} frames")
        if not self.members:
            raise RuntimeError("clip-ensemble is not fitted; call fit() or load_state_dict()")
        return X

    def member_scores(self, batch) -> dict[str, np.ndarray]:
        """Each member's z-score, ``{member: (B,)}``."""
        vectors = clip_vectors(self._transform(self._check_batch(batch)), self.time_axis,
                               self.rhythm)
        out = {}
        for member, p in self.members.items():
            kind, vector = member.split("_", 1)
            raw = (mahalanobis(vectors[vector], p["mean"], p["precision"]) if kind == "gauss"
                   else mixture_nll(vectors[vector], p))
            out[member] = self._z(member, raw)
        return out

    def clip_scores(self, batch, pool=None) -> np.ndarray:
        """The largest member z-score of each clip, ``(B,)``."""
        return np.max(list(self.member_scores(batch).values()), 0)

    def error_maps(self, batch) -> torch.Tensor:
        """Squared z-score of every cell against the normal clips, mean over channels,
        ``(B, M, F)``."""
        T = self._transform(self._check_batch(batch))
        return torch.from_numpy((((T - self.cell_mean) / self.cell_std) ** 2).mean(1)
                                .astype(np.float32))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        arrays = {"log": np.array([float(self.log)]), "floor": np.array([self.floor]),
                  "cell_mean": self.cell_mean, "cell_std": self.cell_std}
        for member, params in self.members.items():
            arrays.update({f"{member}.{key}": value for key, value in params.items()})
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                for k, v in arrays.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        channels, rows, columns = self.input_shape
        cells = (channels, rows, 1) if self.time_axis else (channels, rows, columns)
        vectors = (("spectrum", "peaks", *(("rhythm",) if self.rhythm else ()))
                   if self.time_axis else ("cells",))
        allowed = {f"gauss_{v}" for v in vectors} | {f"gmm_{vectors[0]}"}
        members: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if "." in key:
                member, field = key.split(".", 1)
                if member not in allowed or field not in MEMBER_FIELDS[member.split("_")[0]]:
                    raise ModelFileError(f"weights do not fit clip-ensemble: unexpected {key}")
                members.setdefault(member, {})[field] = value.numpy().astype(np.float64)
            elif key not in ("log", "floor", "cell_mean", "cell_std"):
                raise ModelFileError(f"weights do not fit clip-ensemble: unexpected {key}")
        required = {f"gauss_{v}" for v in vectors}
        def complete(member: str, fields: set[str]) -> bool:
            kind = member.split("_")[0]
            full = set(MEMBER_FIELDS[kind])
            return fields in (full, full - set(OPTIONAL_FIELDS[kind]))

        if not required <= set(members) or not all(complete(m, set(p))
                                                   for m, p in members.items()):
            raise ModelFileError("weights do not fit clip-ensemble: members are incomplete")
        for key in ("cell_mean", "cell_std"):
            if tuple(state[key].shape) != cells:
                raise ModelFileError(f"weights do not fit clip-ensemble: {key} has shape "
                                     f"{tuple(state[key].shape)}, expected {cells}")
        self.log, self.floor = bool(state["log"][0]), float(state["floor"][0])
        self.cell_mean = state["cell_mean"].numpy().astype(np.float64)
        self.cell_std = state["cell_std"].numpy().astype(np.float64)
        order = {"gauss_spectrum": 0, "gauss_cells": 0, "gauss_peaks": 1, "gauss_rhythm": 2}
        self.members = dict(sorted(members.items(), key=lambda kv: order.get(kv[0], 9)))
        self._held_out = None


@register(
    "clip-ensemble",
    description="No training: held-out-normalised Gaussians (Ledoit-Wolf) on clip vectors "
                "(log-mel mean+std and per-band peaks, plus the loudness rhythm on slide "
                "rails; or any feature array, flattened, logged when the data say so), and "
                "from 100 clips a rank-Gaussianised PCA + averaged-GMM member; a clip's "
                "score is the largest member z-score; threshold gumbel:0.03.",
    features=CLIP_STATS_FEATURES,
    scoring={"threshold": "gumbel:0.03"},
    per_machine={m: {"rhythm": True} for m in RHYTHM_MACHINES},
)
def build_clip_ensemble(input_shape: tuple[int, ...], seed: int = 0, rhythm: bool = False
                        ) -> ClipGaussianEnsemble:
    return ClipGaussianEnsemble(input_shape, seed=seed, rhythm=rhythm)
