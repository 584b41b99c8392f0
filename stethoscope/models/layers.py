"""Layers that compute what a stock PyTorch layer computes, faster on CPU.

Each replaces a measured hot spot of a training step (docs/benchmarks.md) and keeps the
stock layer's parameters and state-dict keys, so models read and save as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn by ``torch.rand_like`` instead of ``bernoulli_``.

    Same distribution (keep each value with probability ``1 - p``, scale by ``1/(1-p)``),
    same generator (``torch.manual_seed`` still fixes it); torch's CPU ``bernoulli_`` draws
    one scalar at a time and was 26 % of a seed-conv-ae training step, the vectorised
    uniform draw is 4x cheaper.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        # uniform draws in x's memory layout, turned into the scaled mask in place; the
        # mask takes x's dtype so the product stays in bf16 under autocast
        mask = torch.rand_like(x, dtype=torch.float32).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * mask.to(x.dtype)


# Which of the 3 kernel rows (offsets -1, 0, +1) of a 3x3 convolution on a 2x nearest-
# upsampled image land on which input row, for output rows of even (0) and odd (1) phase.
_PHASE_TAPS = torch.tensor([
    [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]],  # even: -1 -> row i-1; 0, +1 -> row i
    [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # odd: -1, 0 -> row i; +1 -> row i+1
])


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(upsample_nearest_2x(x))`` without building the upsampled image.

    Each of the four output phases (even/odd row and column) of a 3x3 convolution on a
    nearest-upsampled image is a 3x3 convolution of the small image with summed weights;
    the four are computed as one convolution with 4x the output channels and interleaved
    by ``pixel_shuffle``. Same function and gradients; a quarter of the input traffic.
    """
    taps = _PHASE_TAPS.to(device=conv.weight.device, dtype=conv.weight.dtype)
    out_channels, in_channels = conv.weight.shape[:2]
    weight = torch.einsum("aed,oidf,bgf->oabieg", taps, conv.weight, taps)
    weight = weight.reshape(out_channels * 4, in_channels, 3, 3)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
    return F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), 2)


def fusable(upsample: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(upsample(x))`` is a 2x nearest upsampling then a plain 3x3 'same'
    convolution that shrinks the channels (where skipping the big upsampled input pays)."""
    return (isinstance(upsample, nn.Upsample) and upsample.mode == "nearest"
            and upsample.size is None and upsample.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
            and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels > conv.out_channels)


_fusion = {"enabled": True}


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Run :class:`SubpixelSequential` layer by layer inside the block (to compare with the
    fused path, or to see every layer's forward hook)."""
    previous = _fusion["enabled"]
    _fusion["enabled"] = False
    try:
        yield
    finally:
        _fusion["enabled"] = previous


class SubpixelSequential(nn.Sequential):
    """``nn.Sequential`` that runs each (2x nearest ``Upsample``, 3x3 ``Conv2d``) pair that
    shrinks the channels as :func:`upsample_conv3x3`; same modules, keys and output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        fuse = _fusion["enabled"]
        i = 0
        while i < len(modules):
            if fuse and i + 1 < len(modules) and fusable(modules[i], modules[i + 1]):
                x = upsample_conv3x3(x, modules[i + 1])
                i += 2
            else:
                x = modules[i](x)
                i += 1
        return x
