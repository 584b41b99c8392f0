"""The course lab: networks, training, overfitting indicator, figures, run folders, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stethoscope import plots
from stethoscope.errors import DataError, ModelFileError
from stethoscope.lab import (
    EXPERIMENTS,
    decode,
    encode,
    load_lab_model,
    overfitting_report,
    prepare_data,
    replot,
    run_lab,
)
from stethoscope.lab import experiments as lab
from stethoscope.models import build, names
from stethoscope.training import History

IMAGE = (1, 28, 28)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def mnist_small():
    """The first 300 training and 60 test images of the real MNIST."""
    from conftest import shared_path

    return prepare_data(shared_path("mnist", "mnist.npz"), subset=300, progress=False)


# ---- networks --------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", ["none", "input", "hidden"])
def test_cnn_has_the_notebook_parameter_count(dropout: str) -> None:
    model = build("mnist-cnn", IMAGE, dropout=dropout)
    assert n_params(model) == 628_810
    assert model(torch.rand(3, *IMAGE)).shape == (3, 10)


def test_autoencoder_parameter_counts() -> None:
    assert n_params(build("mnist-dense-ae", IMAGE)) == 829_284
    assert n_params(build("mnist-conv-ae", IMAGE)) == 3_217


def test_lab_networks_are_registered_apart_from_anomaly_models() -> None:
    lab_names = {"mnist-cnn", "mnist-dense-ae", "mnist-conv-ae"}
    assert lab_names <= set(names("lab"))
    assert not lab_names & set(names())


def test_importing_the_models_package_registers_the_lab_networks() -> None:
    # A fresh interpreter: the CLI lists models without importing stethoscope.lab.
    code = "from stethoscope.models import names; print(' '.join(names('lab')))"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed == ["mnist-cnn", "mnist-conv-ae", "mnist-dense-ae"]


def test_dropout_placements() -> None:
    def dropouts(model: nn.Sequential) -> list[int]:
        return [i for i, layer in enumerate(model) if isinstance(layer, nn.Dropout)]

    assert dropouts(build("mnist-cnn", IMAGE)) == []
    with_input = build("mnist-cnn", IMAGE, dropout="input")
    assert dropouts(with_input) == [0] and with_input[0].p == pytest.approx(0.3)
    hidden = build("mnist-cnn", IMAGE, dropout="hidden")
    layers = list(hidden)
    positions = dropouts(hidden)
    assert len(positions) == 3 and all(layers[i].p == pytest.approx(0.3) for i in positions)
    assert not isinstance(layers[0], nn.Dropout)  # the input is left alone
    last_hidden = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)
                      and layer.out_features == 100)
    assert all(i < last_hidden for i in positions)  # none between last hidden and softmax
    with pytest.raises(ValueError, match="dropout must be one of"):
        build("mnist-cnn", IMAGE, dropout="everywhere")


def test_wrong_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="MNIST images of shape"):
        build("mnist-conv-ae", (1, 64, 64))


@pytest.mark.parametrize(("name", "code_shape"), [("mnist-dense-ae", (100,)),
                                                  ("mnist-conv-ae", (8, 7, 7))])
def test_encoder_and_decoder_work_apart(name: str, code_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build(name, IMAGE).eval()
    x = torch.rand(4, *IMAGE)
    with torch.no_grad():
        code, whole = model.encoder(x), model(x)
        assert torch.allclose(model.decoder(code), whole)
    assert tuple(code.shape[1:]) == code_shape == model.code_shape
    assert tuple(whole.shape) == (4, *IMAGE)
    assert 0 <= float(whole.min()) and float(whole.max()) <= 1  # sigmoid output


# ---- training --------------------------------------------------------------------------


def _loss_on(model: nn.Module, data: lab.LabData, name: str) -> float:
    model.eval()
    with torch.no_grad():
        out = model(data.x_test)
    if name == "mnist-cnn":
        return float(lab.classification_loss(out, data.y_test))
    return float(lab.reconstruction_loss(out, data.x_test))


@pytest.mark.parametrize("name", ["mnist-cnn", "mnist-dense-ae", "mnist-conv-ae"])
def test_training_lowers_the_loss(name: str, mnist_small) -> None:
    torch.manual_seed(0)
    before = _loss_on(build(name, IMAGE), mnist_small, name)  # train_network's initial weights
    config = lab.train_config(name, epochs=2, batch_size=25, progress=False)
    model, history = lab.train_network(name, mnist_small, config)
    assert history.epochs == 2 and "val_loss" in history.metrics
    assert history["loss"][1] < history["loss"][0]
    assert history["val_loss"][-1] < before
    assert _loss_on(model, mnist_small, name) == pytest.approx(history["val_loss"][-1],
                                                              rel=1e-4)
    if name == "mnist-cnn":
        assert "val_accuracy" in history.metrics and history["val_accuracy"][-1] > 0.3


def test_notebook_settings_are_the_defaults() -> None:
    cnn = lab.train_config("mnist-cnn")
    assert (cnn.optimizer, cnn.batch_size, cnn.epochs, cnn.patience) == ("rmsprop", 1000, 200,
                                                                         None)
    dense = lab.train_config("mnist-dense-ae")
    assert (dense.optimizer, dense.batch_size, dense.epochs) == ("adam", 250, 150)
    conv = lab.train_config("mnist-conv-ae", epochs=3, batch_size=7)
    assert (conv.optimizer, conv.batch_size, conv.epochs) == ("adam", 7, 3)
    assert not conv.restore_best  # last-epoch weights, as Keras keeps them


def test_subset_takes_first_images_and_a_fifth_for_test(mnist_small) -> None:
    assert mnist_small.x_train.shape == (300, *IMAGE)
    assert mnist_small.x_test.shape == (60, *IMAGE)
    with pytest.raises(DataError, match="subset must be a positive"):
        prepare_data(mnist_small, subset=0)
    with pytest.raises(DataError, match=r"arrays in memory: x_train has shape \(2, 784\)"):
        prepare_data((np.zeros((2, 784)), np.zeros(2, int), np.zeros((1, 28, 28)),
                      np.zeros(1, int)))


# ---- overfitting indicator -------------------------------------------------------------


EPOCHS = np.arange(1, 31)
TRAIN = 0.5 * np.exp(-EPOCHS / 5) + 0.01


def test_overfitting_history_is_detected_with_its_onset() -> None:
    val = 0.3 * np.exp(-EPOCHS / 3) + 0.05 + 0.004 * np.maximum(EPOCHS - 7, 0)
    report = overfitting_report({"loss": TRAIN.tolist(), "val_loss": val.tolist()})
    best = int(np.argmin(val)) + 1
    assert report["overfits"] and report["best_epoch"] == best == report["overfit_from_epoch"]
    assert report["gap_final"] == pytest.approx(val[-1] - TRAIN[-1])
    assert report["gap_at_best"] == pytest.approx(val[best - 1] - TRAIN[best - 1])
    assert report["gap_final"] > report["gap_at_best"]
    assert report["val_slope_after_best"] > 0 > report["train_slope_after_best"]
    assert report["verdict"] == (
        f"overfits from epoch {best}: validation loss rose {val[best - 1]:.3g} → "
        f"{val[-1]:.3g} while training loss fell {TRAIN[best - 1]:.3g} → {TRAIN[-1]:.3g}")


def test_still_improving_history_does_not_overfit() -> None:
    val = 0.3 * np.exp(-EPOCHS / 8) + 0.06
    history = History(metrics={"loss": TRAIN.tolist(), "val_loss": val.tolist()},
                      epoch_seconds=[1.0] * 30)
    report = overfitting_report(history)
    assert not report["overfits"] and report["best_epoch"] == 30
    assert report["verdict"] == "no overfitting detected"


@pytest.mark.parametrize("seed", range(5))
def test_noisy_but_flat_history_does_not_overfit(seed: int) -> None:
    val = 0.1 + np.random.default_rng(seed).normal(0, 0.005, 30)
    report = overfitting_report({"loss": TRAIN.tolist(), "val_loss": val.tolist()})
    assert not report["overfits"], report
    assert report["verdict"] == "no overfitting detected"


def test_rising_validation_with_rising_training_is_not_overfitting() -> None:
    val = 0.1 + 0.01 * np.maximum(EPOCHS - 5, 0)
    train = 0.2 + 0.01 * np.maximum(EPOCHS - 5, 0)  # diverging training, not overfitting
    assert not overfitting_report({"loss": train, "val_loss": val})["overfits"]


def test_overfitting_needs_enough_epochs_and_both_curves() -> None:
    short = overfitting_report({"loss": [1.0, 0.5], "val_loss": [1.1, 0.9]})
    assert short["verdict"].startswith("too few epochs (2)") and not short["overfits"]
    with pytest.raises(ValueError, match="needs both 'loss' and 'val_loss'"):
        overfitting_report({"loss": [1.0, 0.5]})


def test_dropout_statements_are_computed_from_results() -> None:
    def variant(gap: float, acc: float) -> dict:
        return {"test_accuracy": acc, "overfitting": {"gap_final": gap}}

    sentences = lab.dropout_statements({"none": variant(0.30, 0.9812),
                                        "input": variant(0.35, 0.9790),
                                        "hidden": variant(0.05, 0.9903)})
    assert len(sentences) == 2
    assert "input" in sentences[0] and "increased" in sentences[0]
    assert sentences[1] == ("(2) dropout after hidden layers reduced the final train/validation "
                            "loss gap from 0.3 to 0.05 and changed test accuracy from 0.9812 "
                            "to 0.9903 (+0.91 percentage points).")


# ---- figures ---------------------------------------------------------------------------


def _history(epochs: int, seed: int) -> History:
    rng = np.random.default_rng(seed)
    values = {k: rng.random(epochs).tolist() for k in ("loss", "val_loss", "accuracy",
                                                       "val_accuracy")}
    return History(metrics=values, epoch_seconds=[1.0] * epochs, best_epoch=1)


def _curves(ax, epochs: int) -> int:
    return sum(1 for line in ax.get_lines() if len(line.get_xdata()) == epochs
               and list(line.get_xdata()) == list(range(1, epochs + 1)))


def test_dropout_grid_is_two_by_three_with_train_and_val_curves() -> None:
    histories = {v: _history(4, i) for i, v in enumerate(lab.DROPOUT_VARIANTS)}
    fig = plots.plot_dropout_grid(histories, lab.DROPOUT_VARIANTS)
    assert len(fig.axes) == 6
    assert fig.axes[0].get_gridspec().get_geometry() == (2, 3)
    for ax in fig.axes:
        assert _curves(ax, 4) == 2
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "no dropout: accuracy" and titles[5] == (
        "(2) dropout after hidden layers: loss")


def test_accuracy_and_loss_figure_has_two_panels() -> None:
    fig = plots.plot_accuracy_and_loss(_history(1, 0))
    assert len(fig.axes) == 2
    for ax in fig.axes:  # one epoch still shows as marked points
        assert _curves(ax, 1) == 2
        assert all(line.get_marker() == "o" for line in ax.get_lines()
                   if list(line.get_xdata()) == [1])


@pytest.mark.parametrize(("code_shape", "picture"), [((100,), (10, 10)), ((8, 7, 7), (28, 14))])
def test_autoencoder_grid_is_three_by_ten(code_shape, picture) -> None:
    rng = np.random.default_rng(0)
    images, recon = rng.random((10, 28, 28)), rng.random((10, 1, 28, 28))
    codes = rng.random((10, *code_shape))
    fig = plots.plot_autoencoder_grid(images, codes, recon, labels=list(range(10)))
    assert len(fig.axes) == 30
    assert fig.axes[0].get_gridspec().get_geometry() == (3, 10)
    shapes = [ax.get_images()[0].get_array().shape for ax in fig.axes]
    assert shapes[:10] == [(28, 28)] * 10 and shapes[20:] == [(28, 28)] * 10
    assert shapes[10:20] == [picture] * 10


def test_conv_code_picture_tiles_channels() -> None:
    code = np.arange(8 * 7 * 7, dtype=float).reshape(8, 7, 7)
    picture = plots.code_as_image(code)
    np.testing.assert_array_equal(picture[:7, :7], code[0])
    np.testing.assert_array_equal(picture[:7, 7:], code[1])
    np.testing.assert_array_equal(picture[21:, 7:], code[7])


# ---- whole lab -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory, mnist_small) -> Path:
    """``run_lab("all", epochs=1, subset=300)`` once for the tests below."""
    out = tmp_path_factory.mktemp("lab")
    report = run_lab("all", data=mnist_small, out=out, epochs=1, progress=False)
    assert report == out / "index.html"
    return out


RUN_FILES = ("config.json", "history.json", "history.csv", "model/config.json",
             "model/model.safetensors")
FIGURES = {"cnn-overfit": ["curves.png"], "dropout": ["dropout.png"],
           "dense-ae": ["loss.png", "reconstructions.png"],
           "conv-ae": ["loss.png", "reconstructions.png"]}


def test_run_lab_writes_every_run_folder(lab_run: Path) -> None:
    for name in EXPERIMENTS:
        run = lab_run / name
        assert (run / "config.json").is_file() and (run / "results.json").is_file()
        for figure in FIGURES[name]:
            assert (run / figure).stat().st_size > 1000
        folders = [run / v for v in lab.DROPOUT_VARIANTS] if name == "dropout" else [run]
        for folder in folders:
            for file in RUN_FILES[1:]:
                assert (folder / file).is_file(), folder / file
            assert History.load(folder).epochs == 1
        config = json.loads((run / "config.json").read_text())
        assert config["experiment"] == name and config["training"]["epochs"] == 1
        assert config["data"]["train_images"] == 300 and config["data"]["test_images"] == 60


def test_report_holds_figures_and_computed_statements(lab_run: Path) -> None:
    html = (lab_run / "index.html").read_text()
    markdown = (lab_run / "report.md").read_text()
    for name, figures in FIGURES.items():
        for figure in figures:
            assert f"{name}/{figure}" in html and f"{name}/{figure}" in markdown
    cnn = json.loads((lab_run / "cnn-overfit" / "results.json").read_text())
    assert f"{cnn['test_accuracy']:.4f}" in markdown
    assert cnn["overfitting"]["verdict"] in markdown
    dropout = json.loads((lab_run / "dropout" / "results.json").read_text())
    assert len(dropout["statements"]) == 2
    for sentence in dropout["statements"]:
        assert sentence in markdown
    for name in ("dense-ae", "conv-ae"):
        errors = json.loads((lab_run / name / "results.json").read_text())["test_reconstruction"]
        assert errors["images"] == 60
        assert f"binary cross-entropy {errors['binary_cross_entropy']:.4g}" in markdown


def test_dropout_none_matches_the_cnn_overfit_run(lab_run: Path) -> None:
    # Same seed and settings: run_lab trains the baseline once and reuses it.
    a = History.load(lab_run / "cnn-overfit").metrics
    b = History.load(lab_run / "dropout" / "none").metrics
    assert a == b


def test_reconstruction_error_matches_the_saved_model(lab_run: Path, mnist_small) -> None:
    for name in ("dense-ae", "conv-ae"):
        model = load_lab_model(lab_run / name)
        errors = lab.reconstruction_errors(model, mnist_small.x_test)
        saved = json.loads((lab_run / name / "results.json").read_text())
        assert errors["mse"] == pytest.approx(saved["test_reconstruction"]["mse"], rel=1e-5)


def test_saved_autoencoders_encode_and_decode_apart(lab_run: Path, mnist_small) -> None:
    for name, shape in (("dense-ae", (100,)), ("conv-ae", (8, 7, 7))):
        model = load_lab_model(lab_run / name / "model")
        images = mnist_small.x_test[:5]
        codes = encode(lab_run / name, images.numpy()[:, 0])
        assert codes.shape == (5, *shape)
        decoded = decode(model, codes)
        with torch.no_grad():
            whole = model(images).numpy()[:, 0]
        np.testing.assert_allclose(decoded, whole, atol=1e-6)
        with pytest.raises(DataError, match="codes must be"):
            decode(model, np.zeros((2, 3)))
    with pytest.raises(ModelFileError, match="not an autoencoder"):
        encode(lab_run / "cnn-overfit", np.zeros((1, 28, 28)))


def test_replot_redraws_without_training(lab_run: Path, mnist_small, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("replot must not train")

    monkeypatch.setattr(lab, "fit", no_training)
    for name, figures in FIGURES.items():
        for figure in figures:
            (lab_run / name / figure).unlink()
        drawn = replot(lab_run / name, data=(mnist_small.x_train.numpy()[:, 0],
                                             mnist_small.y_train.numpy(),
                                             mnist_small.x_test.numpy()[:, 0],
                                             mnist_small.y_test.numpy()))
        assert sorted(p.name for p in drawn) == sorted(figures)
        assert all((lab_run / name / f).is_file() for f in figures)
    assert [p.name for p in replot(lab_run / "dropout")] == ["dropout.png"]  # needs no data


def test_replot_from_the_recorded_data_source(tmp_path: Path, mnist_small) -> None:
    out = tmp_path / "lab"
    from conftest import shared_path

    lab.run_experiment("conv-ae", data=shared_path("mnist", "mnist.npz"), subset=50, out=out,
                       epochs=1, progress=False)
    (out / "conv-ae" / "reconstructions.png").unlink()
    assert [p.name for p in replot(out / "conv-ae")] == ["loss.png", "reconstructions.png"]
    config = json.loads((out / "conv-ae" / "config.json").read_text())
    assert config["data"]["test_images"] == 10 and config["data"]["source"].endswith("mnist.npz")


def test_unknown_experiment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown lab experiment 'gan'"):
        run_lab(["dense-ae", "gan"], data=(), out=tmp_path)
    assert lab.expand_experiments(["all", "dropout"]) == list(EXPERIMENTS)


def test_replot_of_an_in_memory_run_asks_for_the_data(tmp_path: Path, mnist_small) -> None:
    arrays = (mnist_small.x_train.numpy()[:40, 0], mnist_small.y_train.numpy()[:40],
              mnist_small.x_test.numpy()[:10, 0], mnist_small.y_test.numpy()[:10])
    run = lab.run_experiment("dense-ae", data=arrays, out=tmp_path, epochs=1, progress=False)
    with pytest.raises(DataError, match="trained on arrays in memory; pass the MNIST data"):
        replot(run)
    assert len(replot(run, data=arrays)) == 2


@pytest.mark.slow
def test_the_ci_lab_command(tmp_path, mnist_npz):
    """`stethoscope lab all --epochs 1 --subset 2000 --data mnist.npz` end to end."""
    from stethoscope.cli import main

    out = tmp_path / "lab"
    assert main(["lab", "all", "--epochs", "1", "--subset", "2000", "--data", str(mnist_npz),
                 "--out", str(out)]) == 0
    for experiment in ("cnn-overfit", "dropout", "dense-ae", "conv-ae"):
        assert (out / experiment / "results.json").is_file(), experiment
    assert "overfit" in (out / "report.md").read_text().lower()
