"""Data-parallel training over processes started by ``torchrun``: one model, N ranks, each
computing its share of every optimisation step, with the result of single-process training
up to floating-point order.

    torchrun --standalone --nproc_per_node 2 -m stethoscope train DATA --model dcase-ae --out M

NCCL on GPUs (rank ``r`` on ``cuda:LOCAL_RANK``), gloo on CPUs. Outside torchrun (its
environment variables absent) everything here is a no-op and training runs as before.

Why N ranks give one process's result
-------------------------------------
* **The same global steps.** Every rank runs the single-process data pipeline with the same
  seed: the same shuffled batches of clips and the same examples in each optimisation step.
  Each rank keeps a contiguous share of every step (:func:`shard_step`). torch's
  ``DistributedSampler`` is not used: it gives each rank part of a different permutation, so
  the global batches would not be the single-process ones. The cost is that every rank
  reads every batch. For in-memory or memory-mapped spectrograms that is small next to the
  forward and backward passes.
* **The gradient of the global mean.** Each rank's loss is weighted by its share of the
  step times the world size, and DDP averages gradients over ranks. The sum is the
  single-process gradient, even when shares differ by one example.
* **Batch norm over the global step.** Batch statistics are all-reduced across ranks: torch's
  ``SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on CPU (torch's refuses CPU tensors).
  The plain batch-norm modules are put back after training (same weights, same keys).
* **The same initial weights.** Every rank builds the model from the same seed, and DDP
  also broadcasts rank 0's weights.

What differs: the order of floating-point additions (a sum over ranks, not over one batch),
so weights agree to rounding, not bit for bit. Adam divides by the root of the squared
gradients, so a weight whose true gradient is zero (a linear bias in front of batch norm)
follows rounding noise and can drift by up to ``lr`` per step. Such a weight does not change
the output. Dropout masks (``seed-conv-ae``) are drawn by each rank from its own stream
(seed + rank): statistically the same training, not the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stethoscope.errors import StethoscopeError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800  # a rank waiting longer than this for the others gives up
T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int
    device: str = "cpu"  # where this rank computes, e.g. "cuda:1"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that saves, prints and shows progress."""
        return self.rank == 0


def torchrun_rank(environ: dict[str, str] | None = None) -> Rank | None:
    """This process's rank from torchrun's environment variables, or None outside torchrun."""
    env = os.environ if environ is None else environ
    if not all(name in env for name in TORCHRUN_VARIABLES):
        return None
    try:
        rank, local_rank, world_size = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except ValueError:
        raise StethoscopeError("torchrun's RANK, LOCAL_RANK and WORLD_SIZE must be integers, "
                               f"got {env['RANK']!r}, {env['LOCAL_RANK']!r}, "
                               f"{env['WORLD_SIZE']!r}") from None
    return Rank(rank, local_rank, world_size)


def rank_device(device: str, local_rank: int) -> str:
    """The device of rank ``local_rank`` on its node: ``auto`` and ``cuda`` become
    ``cuda:LOCAL_RANK`` (``auto`` falls back to the CPU without CUDA); ``cpu`` and ``cuda:N``
    stay as given. Raises the one-line device error when CUDA is asked for but absent."""
    from stethoscope.training import resolve_device  # lazy: training imports this module

    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        text = f"cuda:{local_rank}"
    return str(resolve_device(text))


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: str = "auto", environ: dict[str, str] | None = None, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Rank | None]:
    """Join torchrun's process group for the block and leave it afterwards.

    Yields this process's :class:`Rank` (with its device), or None when the process was not
    started by torchrun: then nothing is set up and training runs in this process alone.
    A process group the caller initialised already is used as it is and left open.
    """
    found = torchrun_rank(environ)
    if found is None:
        yield None
        return
    run = replace(found, device=rank_device(device, found.local_rank))
    if dist.is_initialized():
        yield run
        return
    torch_device = torch.device(run.device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend_for(torch_device), timeout=timedelta(seconds=timeout_s))
    try:
        yield run
    finally:
        dist.destroy_process_group()


def is_active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def on_main_process(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorate ``fn`` (saving, logging) to run on rank 0 only; other ranks get None."""

    def run(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


# ----------------------------------------------------------------------------- training


def shard_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's contiguous share of one global optimisation step, and the loss weight that
    makes the ranks' averaged gradient the gradient of the global mean.

    Parameters
    ----------
    x, y : ``(n, ...)`` inputs and targets of the whole step (the same on every rank).

    Returns
    -------
    ``(x[a:b], y[a:b], weight)`` with shares differing by at most one example and
    ``weight = (b - a) * world / n`` (zero for an empty share of a step smaller than the
    world). Outside a process group: ``(x, y, 1.0)``.
    """
    if not is_active():
        return x, y, 1.0
    world, rank, n = dist.get_world_size(), dist.get_rank(), x.shape[0]
    start, end = rank * n // world, (rank + 1) * n // world
    return x[start:end], y[start:end], (end - start) * world / max(n, 1)


def sum_over_ranks(totals: dict[str, float], count: int) -> tuple[dict[str, float], int]:
    """Per-epoch sums (loss × examples, metric × examples) and example counts added over all
    ranks, so every rank reports the global epoch mean. Unchanged outside a process group."""
    if not is_active():
        return totals, count
    where = (torch.device("cuda", torch.cuda.current_device())
             if dist.get_backend() == "nccl" else torch.device("cpu"))
    values = torch.tensor([float(count), *totals.values()], dtype=torch.float64, device=where)
    dist.all_reduce(values)
    summed = values.tolist()
    return dict(zip(totals, summed[1:], strict=True)), int(round(summed[0]))


@contextmanager
def data_parallel(model: nn.Module, device: torch.device, *, seed: int = 0
                  ) -> Iterator[nn.Module]:
    """``model`` for training under DDP for the block, or ``model`` itself outside a process
    group.

    Batch norms are synced across ranks while the block runs and put back afterwards (they
    share their weights and running statistics, so nothing is copied). The global random
    stream, which only dropout draws from during training, is reseeded to ``seed + rank``
    so that ranks do not repeat each other's masks.
    """
    if not is_active():
        yield model
        return
    swapped = _sync_batch_norms(model, device)
    try:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(seed + dist.get_rank())
        yield wrapped
    finally:
        for parent, name, original in swapped:
            setattr(parent, name, original)


def _sync_batch_norms(model: nn.Module, device: torch.device
                      ) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every batch-norm child by a synced one sharing its parameters and buffers;
    returns ``(parent, name, original)`` for putting them back."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(
                    child, nn.SyncBatchNorm | CpuSyncBatchNorm):
                synced = (nn.SyncBatchNorm.convert_sync_batchnorm(child)
                          if device.type == "cuda" else CpuSyncBatchNorm.like(child))
                setattr(parent, name, synced)
                swapped.append((parent, name, child))
    return swapped


class CpuSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank of a CPU (gloo) process group.

    Written here because ``torch.nn.SyncBatchNorm`` accepts only GPU tensors. The arithmetic
    of ``F.batch_norm`` in training: per-channel mean, then the centred sum of squares (two
    passes, as batch norm itself, no cancellation), each summed over ranks with its
    gradient (:class:`_SumOverRanks`). The biased variance
    normalises and the unbiased one updates the running variance. Statistics are computed in
    float32 whatever the input dtype. Evaluation, and training outside a process group, is
    plain batch norm.
    """

    @classmethod
    def like(cls, bn: _BatchNorm) -> CpuSyncBatchNorm:
        """A synced twin of ``bn`` sharing its parameters and buffers (updated in place)."""
        synced = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        synced.weight, synced.bias = bn.weight, bn.bias
        synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
        synced.num_batches_tracked = bn.num_batches_tracked
        synced.train(bn.training)
        return synced

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of (N, C, ...) dims, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        per_channel = xf.numel() // max(xf.shape[1], 1)
        sums = _SumOverRanks.apply(torch.cat([xf.sum(dims), xf.new_tensor([per_channel])]))
        count = sums[-1].detach()
        if count <= 1:
            raise ValueError("expected more than 1 value per channel when training, got "
                             f"{int(count)} over all ranks")
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Running statistics as ``_BatchNorm.forward`` keeps them (momentum None: the
        cumulative average), in place so the original module sees them."""
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` whose gradient is the gradient's sum over ranks. Written here
    because torch's public autograd-aware all_reduce is deprecated and its replacement is
    private."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed
