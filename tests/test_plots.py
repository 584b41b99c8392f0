"""Each figure carries the panels and lines it promises, and PNGs are written."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from stethoscope import plots
from stethoscope.training import History


def _vertical_lines(ax) -> dict[str, float]:
    """Label → x of every axvline-style line (two equal x values)."""
    found = {}
    for line in ax.get_lines():
        x = np.asarray(line.get_xdata(), dtype=float)
        if x.size == 2 and x[0] == x[1]:
            found[f"{line.get_label()}@{x[0]:.6g}"] = float(x[0])
    return found


@pytest.fixture
def history() -> History:
    h = History()
    for epoch in range(8):
        h.append({"loss": 1.0 / (epoch + 1), "val_loss": 1.3 / (epoch + 1) + 0.01 * epoch}, 0.1)
    h.best_epoch = 5
    return h


def test_plot_history_draws_train_val_and_best_epoch(history) -> None:
    fig = plots.plot_history(history)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "train loss" in labels and "validation loss" in labels
    train = next(line for line in ax.get_lines() if line.get_label() == "train loss")
    np.testing.assert_allclose(train.get_ydata(), history["loss"])
    assert 5.0 in _vertical_lines(ax).values()


def test_plot_history_without_validation_and_into_given_axes() -> None:
    h = History()
    h.append({"loss": 1.0, "accuracy": 0.5}, 0.1)
    h.append({"loss": 0.5, "accuracy": 0.7}, 0.1)
    fig, axes = plots.new_figure(1, 2)
    assert plots.plot_history(h, metrics=("accuracy",), ax=axes[1]) is fig
    assert [line.get_label() for line in axes[1].get_lines()] == ["train accuracy"]
    assert not axes[0].get_lines()
    with pytest.raises(KeyError, match="no metric"):
        plots.plot_history(h, metrics=("f1",))


def test_score_histogram_has_mean_and_k_std_lines() -> None:
    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(10, 1, 60), rng.normal(14, 1, 40)
    mean, std, k = float(normal.mean()), float(normal.std()), 2.0
    fig = plots.plot_score_histogram(normal, anomalous,
                                     {"mean": mean, "std": std, "k": k, "value": mean + k * std})
    ax = fig.axes[0]
    xs = sorted(_vertical_lines(ax).values())
    for expected in (mean - k * std, mean, mean + k * std):
        assert any(x == pytest.approx(expected) for x in xs)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("threshold =") for t in legend)
    assert any("normal (n=60)" in t for t in legend) and any("anomalous (n=40)" in t
                                                              for t in legend)
    assert len(ax.patches) > 0  # the histogram bars


def test_score_histogram_without_stats_has_no_lines() -> None:
    fig = plots.plot_score_histogram([1.0, 2.0, 3.0])
    assert _vertical_lines(fig.axes[0]) == {}


def test_confusion_matrix_labels_counts() -> None:
    fig = plots.plot_confusion_matrix(tp=7, fp=2, fn=3, tn=11)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"TP\n7", "FP\n2", "FN\n3", "TN\n11"}


def test_roc_has_curve_diagonal_and_shaded_pauc_region() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(50), np.ones(50)]
    s = rng.normal(size=100) + y
    ax = plots.plot_roc(y, s).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("ROC (AUC = ") for label in labels)
    diagonal = next(line for line in ax.get_lines() if line.get_label() == "chance")
    np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())
    shaded = ax.collections[0].get_paths()[0].vertices
    assert shaded[:, 0].max() == pytest.approx(0.1)


def test_roc_with_one_class_draws_no_curve() -> None:
    ax = plots.plot_roc([0, 0, 0], [0.1, 0.2, 0.3]).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["chance"]


def test_spectrograms_panels_use_inferno() -> None:
    specs = [np.random.rand(64, 100), np.random.rand(1, 64, 80), np.random.rand(64, 90)]
    fig = plots.plot_spectrograms(specs, ["a", "b", "c"])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert all(im.get_cmap().name == "inferno" for im in images)
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["a", "b", "c"]


def test_error_maps_pair_spectrogram_and_error_with_own_extents() -> None:
    specs = [np.random.rand(64, 313), np.random.rand(64, 313)]
    errors = [np.random.rand(64, 309), np.random.rand(64, 309)]
    fig = plots.plot_error_maps(specs, errors, ["x", "y"])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    extents = [tuple(ax.images[0].get_extent()) for ax in panels]
    assert extents[0] == (0, 313, 0, 64) and extents[1] == (0, 309, 0, 64)
    with pytest.raises(ValueError, match="error maps"):
        plots.plot_error_maps(specs, errors[:1])


def test_save_figure_writes_png_and_closes(tmp_path, history) -> None:
    import matplotlib.pyplot as plt

    fig = plots.plot_history(history)
    out = plots.save_figure(fig, tmp_path / "sub" / "loss.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert list(out.parent.iterdir()) == [out]  # no temporary file left
    pyplot_fig = plt.figure()
    plots.save_figure(pyplot_fig, tmp_path / "p.png")
    assert not plt.fignum_exists(pyplot_fig.number)
    assert isinstance(fig, Figure)


def test_error_maps_span_the_clip_in_seconds_with_features() -> None:
    from stethoscope.features import FeatureConfig

    cfg = FeatureConfig()
    seconds = 313 * cfg.hop_length / cfg.sample_rate
    fig = plots.plot_error_maps([np.random.rand(64, 313)], [np.random.rand(64, 309)], ["x"],
                                features=cfg)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.images[0].get_extent()[1] for ax in panels] == [pytest.approx(seconds)] * 2
    assert all(ax.get_xlabel() == "time (s)" for ax in panels)


def test_frequency_labels_are_spaced_apart() -> None:
    from stethoscope.features import FeatureConfig

    ax = plots.plot_spectrograms([np.random.rand(64, 100)], features=FeatureConfig()).axes[0]
    ticks = sorted(ax.get_yticks())
    assert len(ticks) >= 4 and min(np.diff(ticks)) >= plots.MIN_TICK_GAP * 64
    assert ax.get_yticklabels()[0].get_text() in {"1k", "2k", "4k"}  # from the top down


def test_maps_of_other_band_counts_keep_band_indices() -> None:
    from stethoscope.features import FeatureConfig

    ax = plots.plot_spectrograms([np.random.rand(32, 100)], features=FeatureConfig()).axes[0]
    assert ax.get_ylabel() == "mel band"


def test_long_titles_wrap_to_at_most_three_lines() -> None:
    title = plots._fit_title("x" * 500, 40)
    assert len(title.splitlines()) == 3 and all(len(line) <= 40 for line in title.splitlines())
