"""The one training loop, shared by the detector, the lab and the benchmarks.

Adam/RMSprop, a validation set, early stopping on validation loss with the best weights
restored, a history saved as JSON/CSV, a rich progress bar with loss and ETA, fixed seeds,
CUDA when present, and on CPU channels_last plus optional bf16 autocast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from stethoscope.compute import (
    autocast_context,
    place_model,
    resolve_device,
    resolve_precision,
    run_batches,
    to_device,
)
from stethoscope.features import release_mapped_pages
from stethoscope.progress import progress_bar
from stethoscope.runtime import keep_freed_memory

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
BatchTransform = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
RELEASE_PAGES_EVERY = 32  # batches between unmapping the pages read from a memory-mapped corpus


@dataclass
class TrainConfig:
    """How to train: the knobs every caller shares (hyper-parameters of the loop, not the model)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "rmsprop"
    weight_decay: float = 0.0
    patience: int | None = 10  # epochs without val-loss improvement before stopping; None: never
    restore_best: bool = True
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    precision: str = "fp32"  # "fp32", "bf16" or "auto" (bf16 where the CPU has native bf16)
    channels_last: bool = True  # NHWC memory format for 4-D inputs (faster conv on CPU)
    progress: bool = True
    example_batch_size: int | None = None  # split expanded examples (frame models) into steps
    num_workers: int = 0


@dataclass
class History:
    """Per-epoch metrics of one training run, plus where it stopped and why."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based epoch whose weights were kept
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)

    def append(self, values: dict[str, float], seconds: float) -> None:
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(float(value))
        self.epoch_seconds.append(float(seconds))

    def __getitem__(self, name: str) -> list[float]:
        return self.metrics[name]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(
            metrics={k: list(map(float, v)) for k, v in data.get("metrics", {}).items()},
            epoch_seconds=list(map(float, data.get("epoch_seconds", []))),
            best_epoch=data.get("best_epoch"),
            stopped_early=bool(data.get("stopped_early", False)),
        )

    def to_csv(self) -> str:
        names = list(self.metrics)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["epoch", *names, "seconds"])
        for i in range(self.epochs):
            row = [self.metrics[n][i] if i < len(self.metrics[n]) else "" for n in names]
            writer.writerow([i + 1, *row, self.epoch_seconds[i]])
        return out.getvalue()

    def save(self, directory: str | Path) -> None:
        """Write ``history.json`` and ``history.csv`` atomically into ``directory``."""
        from stethoscope.atomic import atomic_write_text

        directory = Path(directory)
        atomic_write_text(directory / "history.json", json.dumps(self.to_dict(), indent=2))
        atomic_write_text(directory / "history.csv", self.to_csv())

    @classmethod
    def load(cls, directory: str | Path) -> History:
        return cls.from_dict(json.loads((Path(directory) / "history.json").read_text()))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class SpectrogramDataset(Dataset):
    """Rows ``indices`` of a (possibly memory-mapped) ``(N, C, M, F)`` array as float32
    tensors, read one clip at a time, for the DataLoader of the training loop."""

    def __init__(self, specs: np.ndarray, indices: np.ndarray | None = None) -> None:
        self.specs = specs
        self.indices = np.arange(len(specs)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.specs[self.indices[item]], dtype=np.float32))

    def release_pages(self) -> None:
        """Unmap the pages read so far from a memory-mapped corpus (memory stays flat in N)."""
        release_mapped_pages(self.specs)


def _release_pages(dataset: Dataset) -> None:
    release = getattr(dataset, "release_pages", None)
    if release is not None:
        release()


def as_dataset(data: Dataset | torch.Tensor | np.ndarray | tuple) -> Dataset:
    """Accept a Dataset, a tensor/array, or a tuple of them (inputs, targets)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list):
        return TensorDataset(*[torch.as_tensor(np.asarray(d)) for d in data])
    return TensorDataset(torch.as_tensor(np.asarray(data)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        # Keras' RMSprop defaults: rho=0.9, eps=1e-7 (PyTorch's alpha is Keras' rho).
        return torch.optim.RMSprop(params, lr=config.lr, alpha=0.9, eps=1e-7,
                                   weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'rmsprop', not {config.optimizer!r}")


def _default_split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x,) trains an autoencoder to reproduce x; (x, y) trains x -> y."""
    return (batch[0], batch[0]) if len(batch) == 1 else (batch[0], batch[1])


def _steps(
    batch: Batch,
    transform: BatchTransform | None,
    example_batch_size: int | None,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Turn one loaded batch into one or more (x, y) optimisation steps."""
    x, y = (transform or _default_split)(batch)
    if example_batch_size is None or x.shape[0] <= example_batch_size:
        yield x, y
        return
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], example_batch_size):
        idx = order[start : start + example_batch_size]
        if len(idx) == 1:  # a lone trailing example breaks batch norm; the baselines skip it
            continue
        yield x[idx], y[idx]


def fit(
    model: nn.Module,
    train: Dataset | torch.Tensor | np.ndarray | tuple,
    val: Dataset | torch.Tensor | np.ndarray | tuple | None = None,
    *,
    config: TrainConfig | None = None,
    loss_fn: LossFn | None = None,
    metrics: dict[str, MetricFn] | None = None,
    batch_transform: BatchTransform | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    description: str = "train",
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    ``train``/``val`` yield batches ``(x,)`` (autoencoder: the target is x) or ``(x, y)``.
    ``batch_transform`` maps a loaded batch to ``(inputs, targets)``, e.g. spectrograms to
    stacked frames. ``metrics`` maps a name to ``fn(outputs, targets) -> float``, averaged
    over examples and reported as ``name`` and ``val_name`` beside ``loss``/``val_loss``.
    """
    keep_freed_memory()
    config = config or TrainConfig()
    loss_fn = loss_fn or nn.functional.mse_loss
    metrics = metrics or {}
    seed_everything(config.seed)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or make_optimizer(model, config)
    # Under torchrun: DDP with batch norm synced across ranks; every rank draws the same global
    # batches and trains on its share of each step, so the result is single-process training's
    # up to rounding (stethoscope.distributed). Outside torchrun `trained` is `model` itself.
    from stethoscope import distributed

    parallel = distributed.data_parallel(model, device, seed=config.seed)

    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(as_dataset(train), batch_size=config.batch_size, shuffle=True,
                              generator=generator, num_workers=config.num_workers)
    val_loader = None
    if val is not None:
        val_loader = DataLoader(as_dataset(val), batch_size=config.batch_size, shuffle=False,
                                num_workers=config.num_workers)

    history = History()
    best_loss, best_state, waited = math.inf, None, 0
    steps_per_epoch = len(train_loader) + (len(val_loader) if val_loader else 0)
    with progress_bar(config.epochs * steps_per_epoch, description,
                      enabled=config.progress) as progress, parallel as trained:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            values = _run_epoch(trained, train_loader, loss_fn, metrics, optimizer, device, dtype,
                                config, batch_transform, generator, progress, epoch)
            if val_loader is not None:
                val_values = _run_epoch(model, val_loader, loss_fn, metrics, None, device, dtype,
                                        config, batch_transform, generator, progress, epoch)
                values.update({f"val_{k}": v for k, v in val_values.items()})
            history.append(values, time.perf_counter() - start)

            monitored = values.get("val_loss", values["loss"])
            if monitored < best_loss - 1e-12:
                best_loss, waited, history.best_epoch = monitored, 0, epoch
                if config.restore_best:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if config.patience is not None and waited >= config.patience:
                    history.stopped_early = True
                    break
    if config.restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    metrics: dict[str, MetricFn],
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    dtype: torch.dtype | None,
    config: TrainConfig,
    transform: BatchTransform | None,
    generator: torch.Generator,
    progress,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``; trains when ``optimizer`` is given, else only evaluates."""
    from stethoscope import distributed

    training = optimizer is not None
    model.train(training)
    totals: dict[str, float] = {"loss": 0.0, **{name: 0.0 for name in metrics}}
    count = batches = 0
    with torch.set_grad_enabled(training):
        for batch in loader:
            batch = tuple(batch) if isinstance(batch, list | tuple) else (batch,)
            for x, y in _steps(batch, transform, config.example_batch_size, generator):
                if training:  # under DDP this rank's share of the global step, else all of it
                    x, y, weight = distributed.shard_step(x, y)
                x = to_device(x, device, config.channels_last)
                y = to_device(y, device, config.channels_last)
                with autocast_context(device, dtype):
                    out = model(x)
                loss = loss_fn(out.float(), y.float())
                if training:
                    optimizer.zero_grad(set_to_none=True)
                    (loss * weight).backward()  # weight: this share's part of the step's mean
                    optimizer.step()
                n = x.shape[0]
                count += n
                if n == 0:  # an empty DDP share: a step smaller than the world size
                    continue
                totals["loss"] += float(loss.detach()) * n
                for name, fn in metrics.items():
                    totals[name] += float(fn(out.detach().float(), y)) * n
            phase = "train" if training else "val"
            progress.advance(status=f"epoch {epoch} {phase} loss {totals['loss'] / max(count, 1):.4g}")
            batches += 1
            if batches % RELEASE_PAGES_EVERY == 0:  # memory-mapped corpus: stay flat in N
                _release_pages(loader.dataset)
    _release_pages(loader.dataset)
    if training:  # under DDP: sums over every rank's share (the single-process sums)
        totals, count = distributed.sum_over_ranks(totals, count)
    return {name: total / max(count, 1) for name, total in totals.items()}


def predict(
    model: nn.Module,
    data: Dataset | torch.Tensor | np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    channels_last: bool = True,
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> Iterable[torch.Tensor]:
    """Yield ``fn(model, x)`` (default ``model(x)``) batch by batch, on CPU, in data order,
    through the one batch loop (:func:`stethoscope.compute.run_batches`)."""
    device = resolve_device(device)
    place_model(model, device, channels_last)  # same layout as in training: same scores
    return run_batches(model, as_dataset(data), fn, batch_size=batch_size, device=device,
                       precision=precision, channels_last=channels_last, rows=_loader_rows)


def _loader_rows(dataset: Dataset, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, inputs)`` batches of a Dataset in order (its first field when it has several)."""
    start = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        yield start, x
        start += len(x)


def set_cpu_threads(n: int | None = None) -> None:
    """Use ``n`` intra-op threads (default: all cores this process may use)."""
    n = n or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
