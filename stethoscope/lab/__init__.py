"""The deep-learning course lab on MNIST, rebuilt on stethoscope's training loop, models,
plots and reports.

Main entry point::

    from stethoscope.lab import run_lab
    report = run_lab("all", out=Path("runs/lab"), epochs=10, subset=None, data=None)

``run_lab(experiments, *, data=None, out, epochs=None, subset=None, batch_size=None,
seed=0, progress=True) -> Path`` runs ``"cnn-overfit"``, ``"dropout"``, ``"dense-ae"``,
``"conv-ae"`` (or ``"all"``) with the notebook's settings unless overridden, writes one run
folder per experiment under ``out`` and returns the lab report (``out/index.html``, with
``out/report.md`` beside it). :func:`replot` redraws a run folder's figures;
:func:`encode`/:func:`decode` use a saved autoencoder's halves apart.
"""

from stethoscope.lab.experiments import (
    EXPERIMENTS,
    LabData,
    decode,
    encode,
    load_lab_model,
    prepare_data,
    replot,
    run_experiment,
    run_lab,
    write_lab_report,
)
from stethoscope.lab.mnist_data import find_mnist, load_mnist, read_idx, read_mnist
from stethoscope.lab.overfitting import overfitting_report

__all__ = [
    "EXPERIMENTS",
    "LabData",
    "decode",
    "encode",
    "find_mnist",
    "load_lab_model",
    "load_mnist",
    "overfitting_report",
    "prepare_data",
    "read_idx",
    "read_mnist",
    "replot",
    "run_experiment",
    "run_lab",
    "write_lab_report",
]
