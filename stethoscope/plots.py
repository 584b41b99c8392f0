"""Every figure stethoscope draws: training curves, score histograms, confusion matrix, ROC,
spectrograms and "where does it sound wrong" error maps.

Matplotlib with the Agg backend (no display needed). Each ``plot_*`` function returns a
:class:`~matplotlib.figure.Figure`; :func:`save_figure` writes it as a PNG atomically and
closes it so long runs do not leak memory.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from stethoscope.atomic import atomic_write_bytes  # noqa: E402

if TYPE_CHECKING:
    from stethoscope.training import History

NORMAL_COLOR = "tab:blue"
ANOMALOUS_COLOR = "tab:red"
THRESHOLD_COLOR = "black"
PAUC_MAX_FPR = 0.1


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.0, height: float = 4.0,
               **kwargs: Any) -> tuple[Figure, Any]:
    """A figure not registered with pyplot's global state (no leaks, thread-friendly)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **kwargs)
    return fig, axes


def _figure_for(ax: Axes | None, **kwargs: Any) -> tuple[Figure, Axes]:
    """Draw into ``ax`` when given (caller composes panels), else into a new figure."""
    if ax is not None:
        return ax.figure, ax
    return new_figure(**kwargs)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Render ``fig`` to PNG, write it atomically to ``path`` and close the figure."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# ---- Training -------------------------------------------------------------------------


def plot_history(history: History, metrics: Sequence[str] = ("loss",), title: str | None = None,
                 ax: Axes | None = None) -> Figure:
    """Train (solid) and validation (dashed) curves per metric, best epoch marked."""
    fig, ax = _figure_for(ax)
    for i, name in enumerate(metrics):
        color = f"C{i}"
        if name not in history.metrics:
            raise KeyError(f"history has no metric {name!r}; it has {sorted(history.metrics)}")
        train = history.metrics[name]
        ax.plot(range(1, len(train) + 1), train, color=color, label=f"train {name}")
        val = history.metrics.get(f"val_{name}")
        if val:
            ax.plot(range(1, len(val) + 1), val, color=color, linestyle="--",
                    label=f"validation {name}")
    if history.best_epoch is not None:
        ax.axvline(history.best_epoch, color="gray", linestyle=":",
                   label=f"best epoch {history.best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(", ".join(metrics))
    ax.set_title(title or "Training history")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# ---- Scores --------------------------------------------------------------------------


def plot_score_histogram(scores_normal: np.ndarray, scores_anomalous: np.ndarray | None = None,
                         threshold_stats: dict | None = None, *, bins: int = 30,
                         title: str | None = None, ax: Axes | None = None) -> Figure:
    """Histograms of normal vs anomalous scores with the normal mean, the ±k·std lines
    and the threshold, as the course notebook drew them.

    ``threshold_stats`` may hold ``mean``, ``std``, ``k`` and ``value`` (any subset).
    """
    fig, ax = _figure_for(ax)
    normal = np.asarray(scores_normal, dtype=float).ravel()
    anomalous = (np.asarray(scores_anomalous, dtype=float).ravel()
                 if scores_anomalous is not None else np.empty(0))
    both = np.concatenate([normal, anomalous])
    edges = np.histogram_bin_edges(both if both.size else [0.0, 1.0], bins=bins)
    ax.hist(normal, bins=edges, alpha=0.6, color=NORMAL_COLOR, label=f"normal (n={normal.size})")
    if anomalous.size:
        ax.hist(anomalous, bins=edges, alpha=0.6, color=ANOMALOUS_COLOR,
                label=f"anomalous (n={anomalous.size})")
    stats = threshold_stats or {}
    mean, std, k = stats.get("mean"), stats.get("std"), stats.get("k")
    if mean is not None:
        ax.axvline(mean, color="green", linestyle="-", label=f"mean = {mean:.4g}")
        if std is not None and k is not None:
            for sign in (-1, 1):
                ax.axvline(mean + sign * k * std, color="green", linestyle="--",
                           label=f"mean ± {k:g}·std" if sign > 0 else None)
    if stats.get("value") is not None:
        ax.axvline(stats["value"], color=THRESHOLD_COLOR, linewidth=2,
                   label=f"threshold = {stats['value']:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("clips")
    ax.set_title(title or "Scores of normal and anomalous clips")
    ax.legend()
    return fig


def plot_confusion_matrix(tp: int, fp: int, fn: int, tn: int, *, title: str | None = None,
                          ax: Axes | None = None) -> Figure:
    """2×2 matrix (rows: true class, columns: predicted) with counts and TP/FP/FN/TN labels."""
    fig, ax = _figure_for(ax, width=4.5, height=4.0)
    cells = np.array([[tn, fp], [fn, tp]], dtype=float)
    names = np.array([["TN", "FP"], ["FN", "TP"]])
    ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(cells.max(), 1))
    for row in range(2):
        for col in range(2):
            dark = cells[row, col] > 0.6 * max(cells.max(), 1)
            ax.text(col, row, f"{names[row, col]}\n{int(cells[row, col])}", ha="center",
                    va="center", fontsize=13, color="white" if dark else "black")
    ax.set_xticks([0, 1], ["normal", "anomalous"])
    ax.set_yticks([0, 1], ["normal", "anomalous"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix")
    return fig


def plot_roc(y_true: np.ndarray, scores: np.ndarray, *, title: str | None = None,
             ax: Axes | None = None) -> Figure:
    """ROC curve with the AUC in the legend, the chance diagonal and the pAUC region
    (FPR ≤ 0.1, DCASE's) shaded."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _figure_for(ax, width=5.0, height=4.5)
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if len(np.unique(y)) < 2:
        ax.text(0.5, 0.5, "ROC needs normal and anomalous clips", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(y, s)
        auc = roc_auc_score(y, s)
        pauc = roc_auc_score(y, s, max_fpr=PAUC_MAX_FPR)
        ax.plot(fpr, tpr, color=ANOMALOUS_COLOR, linewidth=2, label=f"ROC (AUC = {auc:.3f})")
        grid = np.linspace(0.0, PAUC_MAX_FPR, 50)
        ax.fill_between(grid, 0, np.interp(grid, fpr, tpr), color=ANOMALOUS_COLOR, alpha=0.2,
                        label=f"FPR ≤ {PAUC_MAX_FPR:g} (pAUC = {pauc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC curve")
    ax.legend(loc="lower right")
    return fig


def plot_timeline(windows: Sequence[Any], threshold: float, *, title: str | None = None,
                  ax: Axes | None = None) -> Figure:
    """Window scores of one recording over time, the threshold line, and its anomalous
    stretches shaded. ``windows``: objects with ``start_s``, ``end_s``, ``score`` and
    ``anomalous`` (:class:`stethoscope.scoring.WindowScore`)."""
    fig, ax = _figure_for(ax, width=9.0, height=2.8)
    for w in windows:
        if w.anomalous:
            ax.axvspan(w.start_s, w.end_s, color=ANOMALOUS_COLOR, alpha=0.18, linewidth=0)
    centres = [(w.start_s + w.end_s) / 2 for w in windows]
    ax.plot(centres, [w.score for w in windows], marker="o", markersize=3, color="#333333",
            linewidth=1, label="window score")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlim(min(w.start_s for w in windows), max(w.end_s for w in windows))
    ax.set_xlabel("time in the recording (s)")
    ax.set_ylabel("score")
    ax.set_title(title or "Scores along the recording", fontsize=PANEL_TITLE_SIZE)
    ax.legend(loc="upper right", fontsize=8)
    return fig


# ---- Spectrograms --------------------------------------------------------------------


def _as_2d(spec: np.ndarray) -> np.ndarray:
    """(M, F) from (M, F) or (1, M, F) (first channel of a multi-channel spectrogram)."""
    spec = np.asarray(spec, dtype=float)
    while spec.ndim > 2:
        spec = spec[0]
    if spec.ndim != 2:
        raise ValueError(f"a spectrogram must be 2-D (mels, frames), got shape {spec.shape}")
    return spec


class SpectrogramAxes(Protocol):
    """What the axes of a log-mel picture need (a :class:`~stethoscope.features.FeatureConfig`
    has it): frames are ``hop_length / sample_rate`` seconds apart, ``n_mels`` bands span
    ``fmin`` to ``fmax_hz`` on the mel scale."""

    sample_rate: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax_hz: float


FREQUENCY_TICKS_HZ = (50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000)
PANEL_TITLE_SIZE = 9
CHARS_PER_INCH = 11  # of a 9-point title; wrap titles to what their panel holds
MAX_TITLE_LINES = 3
MIN_TICK_GAP = 0.07  # frequency labels at least this share of the bands apart


def _hz_label(hz: float) -> str:
    return f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}"


def _mel_band_centres(features: SpectrogramAxes) -> np.ndarray:
    """Centre frequency (Hz) of each mel band, on the features' Slaney mel scale."""
    from stethoscope.features import hz_to_mel, mel_to_hz

    edges = np.linspace(hz_to_mel(features.fmin), hz_to_mel(features.fmax_hz),
                        features.n_mels + 2)
    return np.asarray(mel_to_hz(edges[1:-1]), dtype=float)


def _frequency_axis(ax: Axes, bands: int, features: SpectrogramAxes | None) -> None:
    """Label mel bands with their frequencies in Hz, when the map has the features' bands."""
    if features is None or bands != features.n_mels:
        ax.set_ylabel("mel band")
        return
    centres = _mel_band_centres(features)
    ticks: list[tuple[float, float]] = []  # (position, Hz), from the top down, spaced apart
    for hz in sorted(FREQUENCY_TICKS_HZ, reverse=True):
        if centres[0] <= hz <= centres[-1]:
            position = float(np.interp(hz, centres, np.arange(bands) + 0.5))
            if not ticks or ticks[-1][0] - position >= MIN_TICK_GAP * bands:
                ticks.append((position, hz))
    ax.set_yticks([t[0] for t in ticks], [_hz_label(t[1]) for t in ticks])
    ax.set_ylabel("frequency (Hz, mel scale)")


def _clip_seconds(frames: int, features: SpectrogramAxes | None) -> float | None:
    """Duration covered by ``frames`` log-mel frames, or None without feature settings."""
    if features is None:
        return None
    return frames * features.hop_length / features.sample_rate


def _show_map(fig: Figure, ax: Axes, image: np.ndarray, title: str, cmap: str,
              label: str, *, features: SpectrogramAxes | None = None,
              seconds: float | None = None) -> None:
    """One time × frequency image: time in seconds over ``seconds`` (frame indices when
    unknown), mel bands labelled in Hz when ``features`` describe them."""
    image = _as_2d(image)
    bands, frames = image.shape
    right = frames if seconds is None else seconds
    mesh = ax.imshow(image, origin="lower", aspect="auto", cmap=cmap,
                     extent=(0, right, 0, bands), interpolation="nearest")
    ax.set_title(title, fontsize=PANEL_TITLE_SIZE)
    ax.set_xlabel("frame" if seconds is None else "time (s)")
    _frequency_axis(ax, bands, features)
    fig.colorbar(mesh, ax=ax, label=label)


def _fit_title(title: str, width: int = 60, max_lines: int = MAX_TITLE_LINES) -> str:
    """Wrap a title to lines of at most ``width`` characters (long clip names break at
    any character) so that side-by-side titles never overlap; beyond ``max_lines`` the
    middle of the text is dropped."""
    lines: list[str] = []
    for part in title.split("\n"):
        lines += textwrap.wrap(part, width, break_long_words=True,
                               break_on_hyphens=False) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + ["…" + lines[-1][-(width - 1):]]
    return "\n".join(lines)


def _title_width(panel_inches: float) -> int:
    return max(12, int(panel_inches * CHARS_PER_INCH))


def plot_spectrograms(specs: Sequence[np.ndarray], titles: Sequence[str] | None = None, *,
                      ncols: int = 2, suptitle: str | None = None,
                      features: SpectrogramAxes | None = None) -> Figure:
    """Log-mel spectrograms ``(M, F)`` or ``(C, M, F)`` side by side (inferno), e.g. normal
    vs anomalous examples. With ``features`` (the model's FeatureConfig) time is in
    seconds and bands are labelled in Hz; titles wrap to their panel."""
    if not specs:
        raise ValueError("plot_spectrograms needs at least one spectrogram")
    titles = list(titles) if titles is not None else [f"clip {i}" for i in range(len(specs))]
    ncols = min(ncols, len(specs))
    nrows = -(-len(specs) // ncols)
    panel = 4.5
    fig, axes = new_figure(nrows, ncols, width=panel * ncols, height=3.4 * nrows)
    axes = np.atleast_1d(axes).ravel()
    for ax, spec, title in zip(axes, specs, titles, strict=False):
        frames = _as_2d(spec).shape[1]
        _show_map(fig, ax, spec, _fit_title(title, _title_width(panel - 1.0)), "inferno",
                  "log-mel (dB)", features=features, seconds=_clip_seconds(frames, features))
    for ax in axes[len(specs):]:
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_error_maps(specs: Sequence[np.ndarray], error_maps: Sequence[np.ndarray],
                    titles: Sequence[str] | None = None, *,
                    suptitle: str | None = None,
                    features: SpectrogramAxes | None = None) -> Figure:
    """For each clip, its log-mel (left) and its reconstruction-error map (right): where
    in time and frequency the clip sounds wrong. The two may differ in shape (frame models
    report fewer frames), so each panel gets its own extent; with ``features`` both span
    the clip's duration in seconds and bands are labelled in Hz."""
    if len(specs) != len(error_maps):
        raise ValueError(f"{len(specs)} spectrograms but {len(error_maps)} error maps")
    if not specs:
        raise ValueError("plot_error_maps needs at least one clip")
    titles = list(titles) if titles is not None else [f"clip {i}" for i in range(len(specs))]
    fig, axes = new_figure(len(specs), 2, width=12.0, height=3.5 * len(specs))
    axes = np.asarray(axes).reshape(len(specs), 2)
    width = _title_width(6.0 - 1.2)
    for (ax_spec, ax_err), spec, err, title in zip(axes, specs, error_maps, titles,
                                                   strict=True):
        seconds = _clip_seconds(_as_2d(spec).shape[1], features)
        _show_map(fig, ax_spec, spec, _fit_title(f"{title}\nlog-mel", width), "inferno",
                  "log-mel (dB)", features=features, seconds=seconds)
        _show_map(fig, ax_err, err, _fit_title(f"{title}\ndeviation from normal", width),
                  "magma", "squared deviation", features=features, seconds=seconds)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# ---- Lab figures ----


LAB_MARKER_EPOCHS = 30  # mark each epoch's point on curves this short (1 epoch: no line)


def _mark_epochs(ax: Axes, history: History) -> None:
    """Dots on each epoch of short curves, so a 1- or 2-epoch run is still visible."""
    if history.epochs > LAB_MARKER_EPOCHS:
        return
    epochs = list(range(1, history.epochs + 1))
    for line in ax.get_lines():
        if list(line.get_xdata()) == epochs:  # the curves, not the best-epoch line
            line.set_marker("o")
            line.set_markersize(3)


def plot_lab_loss(history: History, *, title: str | None = None) -> Figure:
    """Train and validation loss of a lab run (an autoencoder's binary cross-entropy)."""
    fig = plot_history(history, ("loss",), title=title)
    _mark_epochs(fig.axes[0], history)
    return fig


def plot_accuracy_and_loss(history: History, *, title: str | None = None) -> Figure:
    """The lab's classifier curves: accuracy (left) and loss (right), train vs validation."""
    fig, (ax_acc, ax_loss) = new_figure(1, 2, width=11.0, height=4.0)
    plot_history(history, ("accuracy",), title="Accuracy", ax=ax_acc)
    plot_history(history, ("loss",), title="Loss (cross-entropy)", ax=ax_loss)
    _mark_epochs(ax_acc, history)
    _mark_epochs(ax_loss, history)
    if title:
        fig.suptitle(title)
    return fig


def plot_dropout_grid(histories: dict[str, History], titles: dict[str, str] | None = None, *,
                      suptitle: str | None = None) -> Figure:
    """2 × n grid: accuracy (top row) and loss (bottom row) for each dropout variant (column),
    rows sharing their y-axis so the variants compare at a glance."""
    if not histories:
        raise ValueError("plot_dropout_grid needs at least one history")
    titles = titles or {}
    fig, axes = new_figure(2, len(histories), width=5.0 * len(histories), height=8.0,
                           sharey="row")
    axes = np.asarray(axes).reshape(2, len(histories))
    for col, (name, history) in enumerate(histories.items()):
        label = titles.get(name, name)
        plot_history(history, ("accuracy",), title=f"{label}: accuracy", ax=axes[0, col])
        plot_history(history, ("loss",), title=f"{label}: loss", ax=axes[1, col])
        _mark_epochs(axes[0, col], history)
        _mark_epochs(axes[1, col], history)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def code_as_image(code: np.ndarray) -> np.ndarray:
    """A 2-D picture of one autoencoder code: a vector of k² values as k × k; channel maps
    (C, H, W) tiled into a grid of C/cols rows × cols columns (8 × 7 × 7 → 28 × 14)."""
    code = np.asarray(code, dtype=float)
    if code.ndim == 1:
        side = int(round(np.sqrt(code.size)))
        if side * side == code.size:
            return code.reshape(side, side)
        return code.reshape(1, -1)
    if code.ndim == 3:
        channels, height, width = code.shape
        cols = max(d for d in range(1, int(np.sqrt(channels)) + 1) if channels % d == 0)
        rows = channels // cols
        return (code.reshape(rows, cols, height, width).transpose(0, 2, 1, 3)
                .reshape(rows * height, cols * width))
    if code.ndim == 2:
        return code
    raise ValueError(f"cannot draw a code of shape {code.shape}")


def plot_autoencoder_grid(images: np.ndarray, codes: np.ndarray, reconstructions: np.ndarray,
                          *, labels: Sequence[int] | None = None,
                          title: str | None = None) -> Figure:
    """3 × n grid: test digits (top), their codes as pictures (middle), reconstructions
    (bottom), as the course notebook showed them."""
    images = np.asarray(images, dtype=float).reshape(len(images), 28, 28)
    reconstructions = np.asarray(reconstructions, dtype=float).reshape(len(images), 28, 28)
    n = len(images)
    if len(codes) != n:
        raise ValueError(f"{n} images but {len(codes)} codes")
    fig, axes = new_figure(3, n, width=1.3 * n, height=4.6)
    axes = np.asarray(axes).reshape(3, n)
    code_pictures = [code_as_image(c) for c in codes]
    code_range = (min(p.min() for p in code_pictures), max(p.max() for p in code_pictures))
    rows = (("input", images, "gray", (0.0, 1.0)),
            ("code", code_pictures, "viridis", code_range),  # one scale for the whole row
            ("reconstruction", reconstructions, "gray", (0.0, 1.0)))
    for row, (name, pictures, cmap, (low, high)) in enumerate(rows):
        for col in range(n):
            ax = axes[row, col]
            ax.imshow(pictures[col], cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if row == 0 and labels is not None:
                ax.set_title(str(labels[col]))
    if title:
        fig.suptitle(title)
    return fig
