"""The course lab's four MNIST experiments, each writing a self-contained run folder.

* ``cnn-overfit``: the CNN trained long with RMSprop; accuracy/loss curves show it overfit.
* ``dropout``: the same CNN without dropout, with 30 % dropout on the input (1) and after
  the hidden layers (2); a 2 × 3 grid of curves and the effect on the loss gap and accuracy.
* ``dense-ae`` / ``conv-ae``: autoencoders trained with Adam and binary cross-entropy;
  loss curves and a grid of test digits, their codes and their reconstructions.

Every run uses the notebook's architecture, optimiser, loss, batch size and epoch count
unless told otherwise, and validates on the test set as the notebook did
(``validation_data=(x_test, y_test)``). Weights are those of the last epoch, as in Keras,
so the reported test accuracy is not picked on the test set. A run folder
``<out>/<experiment>/`` holds ``config.json``, ``history.json``/``history.csv``,
``model/`` (``config.json`` + ``model.safetensors``), ``results.json`` and the figures;
:func:`replot` redraws the figures from it without training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stethoscope import plots
from stethoscope.atomic import atomic_directory, atomic_write_text, claim_folder
from stethoscope.errors import DataError, ModelFileError
from stethoscope.lab.mnist_data import find_mnist, read_mnist, validate_mnist_arrays
from stethoscope.lab.overfitting import overfitting_report
from stethoscope.models import build, info
from stethoscope.models.mnist import (
    IMAGE_SHAPE,
    MnistAutoencoder,
    accuracy,
    classification_loss,
    reconstruction_loss,
)
from stethoscope.progress import progress_enabled
from stethoscope.storage import load_model, save_model
from stethoscope.training import History, TrainConfig, fit, predict, seed_everything

EXPERIMENTS = ("cnn-overfit", "dropout", "dense-ae", "conv-ae")
DROPOUT_VARIANTS = {
    "none": "no dropout",
    "input": "(1) dropout on the input",
    "hidden": "(2) dropout after hidden layers",
}
AUTOENCODERS = {"dense-ae": "mnist-dense-ae", "conv-ae": "mnist-conv-ae"}
VALIDATION = ("the test set, as the course notebook did (validation_data=(x_test, y_test)); "
              "weights are those of the last epoch (no best-epoch restore), so test "
              "accuracy is not selected on the test set")
LOSSES = {"mnist-cnn": "categorical cross-entropy (softmax in the loss)",
          "mnist-dense-ae": "binary cross-entropy per pixel",
          "mnist-conv-ae": "binary cross-entropy per pixel"}
SUBSET_TEST_FRACTION = 5  # --subset N trains on N images and validates on N // 5
IN_MEMORY = "arrays in memory"
REPORT_TITLE = "stethoscope lab: MNIST CNN, dropout and autoencoders"
LAB_KIND = "lab"  # the --out folder: experiment folders and the report
RUN_KIND = "lab-run"  # one experiment's folder


@dataclass
class LabData:
    """MNIST as tensors ``(N, 1, 28, 28)`` in [0, 1] with int64 labels, and where it came from."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    subset: int | None = None


def prepare_data(data: str | Path | Sequence[np.ndarray] | LabData | None = None, *,
                 subset: int | None = None, progress: bool = True) -> LabData:
    """Load MNIST (a path, ``None`` for the caches/download, or ready arrays) and take the
    first ``subset`` training and ``subset // 5`` test images when ``subset`` is given."""
    if isinstance(data, LabData):
        arrays, source = (data.x_train, data.y_train, data.x_test, data.y_test), data.source
    elif isinstance(data, tuple | list):
        arrays, source = validate_mnist_arrays(tuple(data), IN_MEMORY), IN_MEMORY
    else:
        path = find_mnist(data, progress=progress)
        arrays, source = read_mnist(path), str(path.resolve())
    x_train, y_train, x_test, y_test = (torch.as_tensor(np.asarray(a)) for a in arrays)
    if subset is not None:
        if subset < 1:
            raise DataError(f"subset must be a positive number of images, not {subset}")
        x_train, y_train = x_train[:subset], y_train[:subset]
        n_test = max(1, subset // SUBSET_TEST_FRACTION)
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    return LabData(_as_images(x_train), y_train.long(), _as_images(x_test), y_test.long(),
                   source, subset)


def _as_images(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.reshape(x.shape[0], *IMAGE_SHAPE)


def train_config(model_name: str, *, epochs: int | None = None, batch_size: int | None = None,
                 seed: int = 0, progress: bool = True, precision: str = "fp32") -> TrainConfig:
    """The notebook's settings for ``model_name`` (from the registry), run to full length."""
    defaults = dict(info(model_name).training)
    if epochs is not None:
        defaults["epochs"] = epochs
    if batch_size is not None:
        defaults["batch_size"] = batch_size
    for key, value in (("epochs", defaults["epochs"]), ("batch_size", defaults["batch_size"])):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, not {value}")
    return TrainConfig(**defaults, patience=None, restore_best=False, seed=seed,
                       precision=precision, progress=progress_enabled(progress))


def train_network(model_name: str, data: LabData, config: TrainConfig, *,
                  description: str = "train", **hparams: Any) -> tuple[nn.Module, History]:
    """Build ``model_name`` with ``hparams`` and train it on ``data`` with the lab's loss.

    The weights are initialised right after seeding with ``config.seed``, so a run repeats.
    """
    seed_everything(config.seed)
    model = build(model_name, IMAGE_SHAPE, **hparams)
    if isinstance(model, MnistAutoencoder):
        history = fit(model, (data.x_train,), (data.x_test,), config=config,
                      loss_fn=reconstruction_loss, description=description)
    else:
        history = fit(model, (data.x_train, data.y_train), (data.x_test, data.y_test),
                      config=config, loss_fn=classification_loss,
                      metrics={"accuracy": accuracy}, description=description)
    return model.cpu().eval(), history


class _Trainer:
    """Trains networks, remembering results so an identical run is not repeated (the
    dropout study's no-dropout CNN is the cnn-overfit CNN when settings match)."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[nn.Module, History]] = {}

    def train(self, model_name: str, data: LabData, config: TrainConfig, description: str,
              **hparams: Any) -> tuple[nn.Module, History]:
        key = json.dumps([model_name, hparams, asdict(replace(config, progress=False)),
                          data.source, data.subset], sort_keys=True, default=str)
        if key not in self._done:
            self._done[key] = train_network(model_name, data, config,
                                            description=description, **hparams)
        return self._done[key]


# ---- running ---------------------------------------------------------------------------


def run_lab(experiments: Sequence[str] | str, *,
            data: str | Path | Sequence[np.ndarray] | LabData | None = None, out: str | Path,
            epochs: int | None = None, subset: int | None = None,
            batch_size: int | None = None, seed: int = 0, progress: bool = True,
            precision: str = "fp32") -> Path:
    """Run lab experiments and write the lab report; return the report's ``index.html``.

    ``experiments``: ``"all"``, one name or a list of ``cnn-overfit``, ``dropout``,
    ``dense-ae``, ``conv-ae``. ``data``: a Keras ``mnist.npz`` or an IDX folder (default:
    the caches, else a one-time download). ``epochs``/``batch_size`` override the
    notebook's (200/1000 for the CNNs, 150/250 dense AE, 200/250 conv AE); ``subset``
    trains on the first N training images and validates on the first N // 5 test images.
    ``precision`` ``"bf16"``/``"auto"`` trains under bf16 autocast (fp32 weights).
    Each experiment writes ``<out>/<experiment>/``; the report (``index.html`` and
    ``report.md``) covers every experiment folder present in ``out``.
    """
    names = expand_experiments(experiments)
    out = claim_folder(out, LAB_KIND)
    lab_data = prepare_data(data, subset=subset, progress=progress)
    trainer = _Trainer()
    for name in names:
        run_experiment(name, data=lab_data, out=out, epochs=epochs, batch_size=batch_size,
                       seed=seed, progress=progress, precision=precision, _trainer=trainer)
    return write_lab_report(out)


def expand_experiments(experiments: Sequence[str] | str) -> list[str]:
    """``"all"`` → every experiment; validates names; keeps order, drops repeats."""
    requested = [experiments] if isinstance(experiments, str) else list(experiments)
    names: list[str] = []
    for name in requested:
        if name == "all":
            names += list(EXPERIMENTS)
        elif name in EXPERIMENTS:
            names.append(name)
        else:
            raise ValueError(f"unknown lab experiment {name!r}; choose from "
                             f"{', '.join(EXPERIMENTS)} or all")
    return list(dict.fromkeys(names))


def run_experiment(name: str, *,
                   data: str | Path | Sequence[np.ndarray] | LabData | None = None,
                   out: str | Path, epochs: int | None = None, subset: int | None = None,
                   batch_size: int | None = None, seed: int = 0, progress: bool = True,
                   precision: str = "fp32", _trainer: _Trainer | None = None) -> Path:
    """Run one experiment into ``<out>/<name>/`` (replaced atomically); return that folder.

    ``out`` must be new, empty or a lab folder, and ``<out>/<name>`` new or a run of this
    lab (OutputError otherwise, before any training)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown lab experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    lab_data = data if isinstance(data, LabData) and subset is None else prepare_data(
        data, subset=subset, progress=progress)
    trainer = _trainer or _Trainer()
    settings = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "progress": progress,
                "precision": precision}
    start = time.perf_counter()
    claim_folder(out, LAB_KIND)
    with atomic_directory(Path(out) / name, kind=RUN_KIND) as run_dir:
        if name == "cnn-overfit":
            results = _run_cnn_overfit(run_dir, lab_data, trainer, settings)
        elif name == "dropout":
            results = _run_dropout(run_dir, lab_data, trainer, settings)
        else:
            results = _run_autoencoder(name, run_dir, lab_data, trainer, settings)
        results["wall_seconds"] = time.perf_counter() - start
        _write_json(run_dir / "results.json", results)
        _draw_figures(run_dir, lab_data)
    return Path(out) / name


def _run_config(name: str, data: LabData, models: dict[str, dict],
                config: TrainConfig) -> dict[str, Any]:
    from stethoscope import __version__

    return {
        "experiment": name,
        "models": models,
        "training": {k: v for k, v in asdict(config).items() if k != "progress"},
        "loss": {m["model"]: LOSSES[m["model"]] for m in models.values()},
        "validation": VALIDATION,
        "data": {"source": data.source, "subset": data.subset,
                 "train_images": len(data.x_train), "test_images": len(data.x_test)},
        "stethoscope_version": __version__,
    }


def _save_run(directory: Path, model_name: str, model: nn.Module, history: History,
              extra: dict[str, Any]) -> None:
    """``history.json``/``history.csv`` and ``model/`` (config + safetensors) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    history.save(directory)
    save_model(directory / "model", {
        "kind": "lab", "model": model_name, "input_shape": list(IMAGE_SHAPE),
        "hparams": dict(model.hparams), **extra,
    }, model.state_dict())


def _run_cnn_overfit(run_dir: Path, data: LabData, trainer: _Trainer,
                     settings: dict) -> dict[str, Any]:
    config = train_config("mnist-cnn", **settings)
    model, history = trainer.train("mnist-cnn", data, config, "cnn-overfit", dropout="none")
    _save_run(run_dir, "mnist-cnn", model, history, {"experiment": "cnn-overfit"})
    _write_json(run_dir / "config.json", _run_config(
        "cnn-overfit", data, {"cnn": {"model": "mnist-cnn", "hparams": model.hparams}}, config))
    return {"experiment": "cnn-overfit", **_classifier_results(history)}


def _classifier_results(history: History) -> dict[str, Any]:
    return {
        "epochs": history.epochs,
        "test_accuracy": history["val_accuracy"][-1],
        "test_loss": history["val_loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "train_loss": history["loss"][-1],
        "overfitting": overfitting_report(history),
    }


def _run_dropout(run_dir: Path, data: LabData, trainer: _Trainer,
                 settings: dict) -> dict[str, Any]:
    config = train_config("mnist-cnn", **settings)
    variants: dict[str, Any] = {}
    models: dict[str, dict] = {}
    for variant in DROPOUT_VARIANTS:
        model, history = trainer.train("mnist-cnn", data, config, f"dropout {variant}",
                                       dropout=variant)
        _save_run(run_dir / variant, "mnist-cnn", model, history,
                  {"experiment": "dropout", "variant": variant})
        variants[variant] = _classifier_results(history)
        models[variant] = {"model": "mnist-cnn", "hparams": model.hparams}
    _write_json(run_dir / "config.json", _run_config("dropout", data, models, config))
    return {"experiment": "dropout", "variants": variants,
            "statements": dropout_statements(variants)}


def dropout_statements(variants: dict[str, dict]) -> list[str]:
    """One computed sentence per dropout placement comparing it with no dropout."""
    base = variants["none"]
    sentences = []
    for variant in ("input", "hidden"):
        if variant not in variants:
            continue
        other = variants[variant]
        before, after = base["overfitting"]["gap_final"], other["overfitting"]["gap_final"]
        gap_verb = "reduced" if after < before else "increased"
        sentences.append(
            f"{DROPOUT_VARIANTS[variant]} {gap_verb} the final train/validation loss gap "
            f"from {before:.3g} to {after:.3g} and changed test accuracy from "
            f"{base['test_accuracy']:.4f} to {other['test_accuracy']:.4f} "
            f"({_signed_points(other['test_accuracy'] - base['test_accuracy'])}).")
    return sentences


def _signed_points(delta: float) -> str:
    return f"{100 * delta:+.2f} percentage points"


def _run_autoencoder(name: str, run_dir: Path, data: LabData, trainer: _Trainer,
                     settings: dict) -> dict[str, Any]:
    model_name = AUTOENCODERS[name]
    config = train_config(model_name, **settings)
    model, history = trainer.train(model_name, data, config, name)
    _save_run(run_dir, model_name, model, history, {"experiment": name})
    _write_json(run_dir / "config.json", _run_config(
        name, data, {"autoencoder": {"model": model_name, "hparams": model.hparams}}, config))
    return {
        "experiment": name,
        "epochs": history.epochs,
        "code_shape": list(model.code_shape),
        "train_loss": history["loss"][-1],
        "test_reconstruction": reconstruction_errors(model, data.x_test),
        "overfitting": overfitting_report(history),
    }


def reconstruction_errors(model: nn.Module, images: torch.Tensor,
                          batch_size: int = 1000) -> dict[str, float]:
    """Mean binary cross-entropy and mean squared error per pixel over ``images``."""
    bce, mse, count = 0.0, 0.0, 0
    for start, out in zip(range(0, len(images), batch_size),
                          predict(model, images, batch_size=batch_size,
                                      device=next(model.parameters()).device),
                          strict=True):
        target = images[start:start + len(out)]
        bce += float(reconstruction_loss(out, target)) * len(out)
        mse += float(((out - target) ** 2).mean()) * len(out)
        count += len(out)
    return {"binary_cross_entropy": bce / count, "mse": mse / count, "images": count}


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ---- figures ---------------------------------------------------------------------------


def replot(run_dir: str | Path, *,
           data: str | Path | Sequence[np.ndarray] | None = None) -> list[Path]:
    """Redraw a run folder's figures from its saved history and weights, without training.

    The autoencoder grids need the test digits: read from ``data`` or else from the
    source recorded in the run's ``config.json``.
    """
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    lab_data = None
    if config.get("experiment") in AUTOENCODERS:
        source = data if data is not None else config.get("data", {}).get("source")
        if source == IN_MEMORY:
            raise DataError("this run was trained on arrays in memory; pass the MNIST data "
                            "to replot (data=...) to redraw its digits", run_dir)
        lab_data = prepare_data(source, subset=config.get("data", {}).get("subset"))
    return _draw_figures(run_dir, lab_data)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("missing; not a lab run folder", path) from None
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err})", path) from None


def _draw_figures(run_dir: Path, data: LabData | None) -> list[Path]:
    experiment = _read_json(run_dir / "config.json")["experiment"]
    if experiment == "cnn-overfit":
        fig = plots.plot_accuracy_and_loss(History.load(run_dir),
                                           title="CNN trained long: train vs validation")
        return [plots.save_figure(fig, run_dir / "curves.png")]
    if experiment == "dropout":
        histories = {v: History.load(run_dir / v) for v in DROPOUT_VARIANTS}
        fig = plots.plot_dropout_grid(histories, DROPOUT_VARIANTS,
                                      suptitle="Where dropout goes: accuracy and loss")
        return [plots.save_figure(fig, run_dir / "dropout.png")]
    history = History.load(run_dir)
    fig = plots.plot_lab_loss(history, title=f"{experiment}: binary cross-entropy")
    paths = [plots.save_figure(fig, run_dir / "loss.png")]
    if data is not None:
        model = load_lab_model(run_dir / "model")
        paths.append(plots.save_figure(_autoencoder_grid(experiment, model, data),
                                       run_dir / "reconstructions.png"))
    return paths


def example_digits(labels: torch.Tensor, count: int = 10) -> list[int]:
    """Indices of the first test image of each digit 0–9, topped up with the earliest other
    images when a small subset lacks some digit."""
    labels = np.asarray(labels)
    chosen = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]
    chosen += [i for i in range(len(labels)) if i not in chosen][:count - len(chosen)]
    return chosen[:count]


def _autoencoder_grid(experiment: str, model: MnistAutoencoder, data: LabData):
    idx = example_digits(data.y_test)
    images = data.x_test[idx]
    codes = encode(model, images)
    reconstructions = decode(model, codes)
    shape = "×".join(map(str, codes.shape[1:])) + ("-unit" if codes.ndim == 2 else "")
    return plots.plot_autoencoder_grid(
        images.numpy(), codes, reconstructions, labels=data.y_test[idx].tolist(),
        title=f"{experiment}: test digits, their {shape} codes, reconstructions")


# ---- using saved autoencoders (CLI encode/decode) --------------------------------------


def load_lab_model(path: str | Path) -> nn.Module:
    """Rebuild a lab network from a model folder (or a run folder holding ``model/``)."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    config, state = load_model(path)
    if config.get("kind") != "lab":
        raise ModelFileError("not a lab model (no kind=lab in config.json)", path)
    try:
        model = build(config["model"], tuple(config["input_shape"]), **config["hparams"])
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"cannot rebuild the lab model ({str(err).splitlines()[0]})",
                             path) from None
    return model.eval()


def _autoencoder(model: nn.Module | str | Path) -> MnistAutoencoder:
    if not isinstance(model, nn.Module):
        model = load_lab_model(model)
    if not isinstance(model, MnistAutoencoder):
        raise ModelFileError("this lab model is not an autoencoder (no encoder/decoder)")
    return model


@torch.no_grad()
def encode(model: nn.Module | str | Path, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Codes of ``images`` ((N, 28, 28) or (N, 1, 28, 28) in [0, 1]) from the encoder alone."""
    model = _autoencoder(model).eval()
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim not in (3, 4) or tuple(x.shape[-2:]) != IMAGE_SHAPE[1:]:
        raise DataError(f"images must be (N, 28, 28) or (N, 1, 28, 28), not {tuple(x.shape)}")
    return model.encoder(x.reshape(-1, *IMAGE_SHAPE)).numpy()


@torch.no_grad()
def decode(model: nn.Module | str | Path, codes: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images ``(N, 28, 28)`` in [0, 1] from codes, with the decoder alone."""
    model = _autoencoder(model).eval()
    z = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
    expected = model.code_shape
    if tuple(z.shape[1:]) != expected:
        raise DataError(f"codes must be (N, {', '.join(map(str, expected))}), "
                        f"not {tuple(z.shape)}")
    return model.decoder(z).reshape(-1, *IMAGE_SHAPE[1:]).numpy()


# ---- report ----------------------------------------------------------------------------


def write_lab_report(out: str | Path) -> Path:
    """Write ``<out>/index.html`` and ``<out>/report.md`` from every experiment folder in
    ``out``; all statements come from the saved results. Returns the HTML path."""
    from stethoscope.report import Report

    out = Path(out)
    report = Report(REPORT_TITLE)
    found = [name for name in EXPERIMENTS if (out / name / "results.json").is_file()]
    if not found:
        raise DataError("no lab experiment folders with results.json to report on", out)
    first = _read_json(out / found[0] / "config.json")
    report.add_text(_data_sentence(first))
    for name in found:
        results = _read_json(out / name / "results.json")
        config = _read_json(out / name / "config.json")
        _REPORT_SECTIONS[name](report, out / name, results, config)
    return report.write(out)["html"]


def _data_sentence(config: dict) -> str:
    data = config["data"]
    subset = "" if data.get("subset") is None else f" (--subset {data['subset']})"
    return (f"Data: {data['train_images']} training and {data['test_images']} test images "
            f"from {data['source']}{subset}. Validation set: {config['validation']}.")


def _training_sentence(config: dict) -> str:
    t = config["training"]
    losses = "; ".join(sorted(set(config["loss"].values())))
    epochs = f"{t['epochs']} epoch" + ("" if t["epochs"] == 1 else "s")
    return (f"Trained {epochs}, batch size {t['batch_size']}, {t['optimizer']} "
            f"(learning rate {t['lr']:g}), loss: {losses}, seed {t['seed']}.")


def _report_cnn(report, run_dir: Path, results: dict, config: dict) -> None:
    fit_report = results["overfitting"]
    report.add_heading("CNN: overfitting")
    report.add_text(_training_sentence(config))
    report.add_figure(run_dir / "curves.png", "Accuracy and loss, train (solid) and "
                      "validation (dashed); dotted line: lowest validation loss")
    report.add_text(
        f"Test accuracy after {results['epochs']} epoch{'' if results['epochs'] == 1 else 's'}: "
        f"{results['test_accuracy']:.4f} "
        f"(test loss {results['test_loss']:.4g}; training accuracy "
        f"{results['train_accuracy']:.4f}). Lowest validation loss at epoch "
        f"{fit_report['best_epoch']}; train/validation loss gap {fit_report['gap_at_best']:.3g} "
        f"there and {fit_report['gap_final']:.3g} at the end. Verdict: {fit_report['verdict']}.")


def _report_dropout(report, run_dir: Path, results: dict, config: dict) -> None:
    report.add_heading("Where dropout goes")
    report.add_text(_training_sentence(config) + " 30 % dropout; (1) between the input and "
                    "the first hidden layer, (2) after every hidden layer except the last.")
    report.add_figure(run_dir / "dropout.png", "Rows: accuracy and loss; columns: no dropout, "
                      "(1) input dropout, (2) hidden-layer dropout")
    rows = []
    for variant, label in DROPOUT_VARIANTS.items():
        r = results["variants"][variant]
        rows.append({"variant": label, "test accuracy": r["test_accuracy"],
                     "final train loss": r["train_loss"], "final validation loss": r["test_loss"],
                     "final gap": r["overfitting"]["gap_final"],
                     "best epoch": r["overfitting"]["best_epoch"],
                     "verdict": r["overfitting"]["verdict"]})
    report.add_table(rows, caption="Effect of dropout placement (gap = validation − train loss)")
    for sentence in results["statements"]:
        report.add_text(sentence)


def _report_autoencoder(report, run_dir: Path, results: dict, config: dict) -> None:
    name = results["experiment"]
    title = {"dense-ae": "Dense autoencoder", "conv-ae": "Convolutional autoencoder"}[name]
    errors = results["test_reconstruction"]
    shape = "×".join(map(str, results["code_shape"]))
    unit = "-unit" if len(results["code_shape"]) == 1 else ""
    report.add_heading(f"{title} ({shape}{unit} code)")
    report.add_text(_training_sentence(config))
    report.add_figure(run_dir / "loss.png", "Binary cross-entropy, train and validation")
    if (run_dir / "reconstructions.png").is_file():
        report.add_figure(run_dir / "reconstructions.png",
                          "Top: test digits; middle: their codes; bottom: reconstructions")
    report.add_text(
        f"Reconstruction error on the {errors['images']} test images: binary cross-entropy "
        f"{errors['binary_cross_entropy']:.4g}, mean squared error {errors['mse']:.4g} per "
        f"pixel (training loss at the end {results['train_loss']:.4g}). Verdict: "
        f"{results['overfitting']['verdict']}.")


_REPORT_SECTIONS = {"cnn-overfit": _report_cnn, "dropout": _report_dropout,
                    "dense-ae": _report_autoencoder, "conv-ae": _report_autoencoder}
