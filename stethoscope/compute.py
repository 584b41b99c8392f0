"""Where and how tensors are computed: device, precision, memory format, and the one batch loop.

Training (:mod:`stethoscope.training`) and scoring (:class:`stethoscope.Detector`) both run
models through :func:`run_batches`, so a model sees the same device, autocast dtype and
channels_last layout in both, and its scores match to the last bit.

>>> import torch
>>> parts = run_batches(torch.nn.Identity(), torch.ones(5, 1, 2, 3), batch_size=2)
>>> [tuple(p.shape) for p in parts]
[(2, 1, 2, 3), (2, 1, 2, 3), (1, 1, 2, 3)]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stethoscope.errors import ConfigError
from stethoscope.runtime import keep_freed_memory

PRECISIONS = ("fp32", "bf16", "auto")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        for any other name, or for CUDA where this PyTorch build or machine has none, as one
        line the CLI prints (never a traceback).
    """
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if not _DEVICE.match(text):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA" if torch.version.cuda is None else \
                "no CUDA GPU is visible"
            raise ConfigError(f"device {device!r} is not available: {build}; use --device cpu "
                              "or auto")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} is not available: "
                              f"{torch.cuda.device_count()} CUDA GPU(s) visible")
    return torch.device(text)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX, where bf16 matmuls are fast rather than emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``"auto"`` is bf16 on GPUs that support it and on CPUs with native bf16, else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if cpu_has_native_bf16() else None
    raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op context when dtype is None."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``x`` on ``device``; 4-D inputs in channels_last layout when asked (faster conv on CPU)."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def place_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """``model`` on ``device`` (channels_last when asked) in eval mode."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval() if model.training else model


def run_batches(model, data: np.ndarray | torch.Tensor, fn: Callable | None = None, *,
                batch_size: int = 32, device: str | torch.device = "cpu",
                precision: str = "fp32", channels_last: bool = True,
                rows: Callable[[object, int], Iterator[tuple[int, np.ndarray]]] | None = None
                ) -> Iterator[torch.Tensor]:
    """``fn(model, x)`` (default ``model(x)``) for consecutive batches of ``data``, as
    float32 CPU tensors, under no_grad, on ``device`` with ``precision`` autocast.

    Parameters
    ----------
    model : anything ``fn`` can call; an ``nn.Module`` should already be placed with
        :func:`place_model` (moving it every call costs a twentieth of one clip's time).
    data : ``(N, ...)`` array, memmap or tensor; sliced, never copied whole.
    rows : how to cut ``data`` into ``(start, array)`` chunks (default: plain slices);
        e.g. :func:`stethoscope.features.iter_chunks`, which releases memory-mapped pages.
    """
    keep_freed_memory()
    device = resolve_device(device)
    dtype = resolve_precision(precision, device)
    chunks = rows(data, batch_size) if rows is not None else _slices(data, batch_size)
    with torch.no_grad():
        for _, chunk in chunks:
            x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(chunk, dtype=np.float32))
            x = to_device(x, device, channels_last)
            with autocast_context(device, dtype):
                out = fn(model, x) if fn is not None else model(x)
            yield out.float().cpu()


def _slices(data, batch_size: int) -> Iterator[tuple[int, object]]:
    for start in range(0, len(data), batch_size):
        yield start, data[start:start + batch_size]
