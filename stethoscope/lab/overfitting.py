"""Does a training run overfit, and from which epoch? Computed from its loss curves.

Overfitting shows as validation loss rising after its minimum while training loss keeps
falling. Both trends are measured with the Theil–Sen slope (the median of pairwise slopes,
robust to single noisy epochs). The validation trend after the minimum must be positive
with 95 % confidence and rise by more than the epoch-to-epoch noise of the curve, so a
noisy but flat curve is not called overfitting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import theilslopes

from stethoscope.training import History

NO_OVERFITTING = "no overfitting detected"
MIN_EPOCHS_AFTER_BEST = 3  # epochs after the minimum needed before a rise counts
NOISE_MULTIPLE = 3.0  # the trend's rise must exceed this many noise standard deviations
RELATIVE_TOLERANCE = 0.02  # ... and this fraction of the best validation loss
CONFIDENCE = 0.95  # the validation slope's Theil–Sen confidence interval must exclude 0


def overfitting_report(history: History | Mapping[str, Any], *,
                       min_epochs_after: int = MIN_EPOCHS_AFTER_BEST,
                       noise_multiple: float = NOISE_MULTIPLE,
                       relative_tolerance: float = RELATIVE_TOLERANCE) -> dict[str, Any]:
    """Best epoch, train/validation loss gaps and an overfitting verdict for one run.

    ``history`` is a :class:`History`, its ``to_dict()``, or a mapping with ``loss`` and
    ``val_loss`` lists. Epochs are 1-based. The run overfits when, after the validation
    minimum, at least ``min_epochs_after`` epochs follow, the training-loss trend falls and
    the validation-loss trend (fitted on the epochs after the minimum, whose slope must be
    positive with 95 % confidence) rises by more than ``max(noise_multiple × noise,
    relative_tolerance × best validation loss)``.
    """
    train, val = _loss_curves(history)
    n = len(val)
    best = int(np.argmin(val))  # 0-based index of the validation minimum
    after = n - 1 - best
    report: dict[str, Any] = {
        "epochs": n,
        "best_epoch": best + 1,
        "best_val_loss": float(val[best]),
        "final_val_loss": float(val[-1]),
        "train_loss_at_best": float(train[best]),
        "final_train_loss": float(train[-1]),
        "gap_at_best": float(val[best] - train[best]),
        "gap_final": float(val[-1] - train[-1]),
        "gap_after_best_mean": float(np.mean(val[best:] - train[best:])),
        "epochs_after_best": after,
        "val_noise": _noise(val),
        "val_slope_after_best": None,
        "train_slope_after_best": None,
        "val_rise_after_best": None,
        "tolerance": None,
        "overfits": False,
        "overfit_from_epoch": None,
    }
    if after < min_epochs_after:
        report["verdict"] = (NO_OVERFITTING if n > min_epochs_after else
                             f"too few epochs ({n}) to judge overfitting")
        return report

    # The minimum itself is left out of the validation fit: every later epoch lies above it
    # by definition, which would bias a fit that includes it towards a rise.
    val_slope, _, val_slope_low, _ = theilslopes(val[best + 1:],
                                                 np.arange(best + 1, n, dtype=float),
                                                 alpha=CONFIDENCE)
    train_slope = float(theilslopes(train[best:], np.arange(best, n, dtype=float))[0])
    rise = float(val_slope) * after
    tolerance = float(max(noise_multiple * report["val_noise"],
                          relative_tolerance * abs(val[best])))
    overfits = val_slope_low > 0 and rise > tolerance and train_slope < 0
    report.update(val_slope_after_best=float(val_slope), train_slope_after_best=train_slope,
                  val_rise_after_best=rise, tolerance=tolerance, overfits=bool(overfits),
                  overfit_from_epoch=best + 1 if overfits else None)
    report["verdict"] = (
        f"overfits from epoch {best + 1}: validation loss rose {_num(val[best])} → "
        f"{_num(val[-1])} while training loss fell {_num(train[best])} → {_num(train[-1])}"
        if overfits else NO_OVERFITTING)
    return report


def _loss_curves(history: History | Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    metrics = history.metrics if isinstance(history, History) else history
    if isinstance(metrics, Mapping) and "metrics" in metrics:
        metrics = metrics["metrics"]
    if "loss" not in metrics or "val_loss" not in metrics:
        raise ValueError("overfitting needs both 'loss' and 'val_loss' curves; this history "
                         f"has {sorted(metrics)}")
    train = _curve(metrics["loss"], "loss")
    val = _curve(metrics["val_loss"], "val_loss")
    if len(train) != len(val):
        raise ValueError(f"loss has {len(train)} epochs but val_loss has {len(val)}")
    return train, val


def _curve(values: Sequence[float], name: str) -> np.ndarray:
    curve = np.asarray(values, dtype=float)
    if curve.ndim != 1 or curve.size == 0 or not np.isfinite(curve).all():
        raise ValueError(f"{name} must be a non-empty list of finite numbers")
    return curve


def _noise(curve: np.ndarray) -> float:
    """Epoch-to-epoch noise (std) of a curve, robust to its trend and to outliers.

    Uses the median absolute deviation of second differences: a smooth trend barely
    changes them, while white noise of std σ gives second differences of std σ·√6.
    """
    if curve.size < 3:
        return 0.0
    second = np.diff(curve, n=2)
    mad = np.median(np.abs(second - np.median(second)))
    return float(1.4826 * mad / np.sqrt(6.0))


def _num(value: float) -> str:
    return f"{value:.3g}"
