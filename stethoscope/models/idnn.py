"""IDNN: predict the centre frame of a window from the frames around it (interpolation).

Suefusa et al., "Anomalous sound detection based on interpolation deep neural network",
ICASSP 2020: an autoencoder that must also reconstruct the centre of a 5-frame window
reconstructs it from its neighbours only, so a sound that starts and stops within the
window (a valve click that should not be there) cannot be copied through and gives a large
error. Inputs are standardised per mel band (statistics of the normal training frames,
saved as buffers); the error map is the squared error of the predicted centre frame.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from stethoscope.errors import DataError
from stethoscope.models.base import (
    SpectrogramModel,
    per_mel_mean_std,
    standardised_windows,
)
from stethoscope.models.registry import register


def dense_relu(in_features: int, out_features: int) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU()]


class IDNN(SpectrogramModel):
    """Dense encoder-decoder from the ``context - 1`` outer frames of a window (all channels)
    to its centre frame; error map ``(B, M, F - context + 1)``."""

    def __init__(self, input_shape: tuple[int, ...], context: int = 5,
                 widths: tuple[int, ...] | list[int] = (128, 64, 32)) -> None:
        super().__init__()
        channels, mels, frames = (int(s) for s in input_shape) if len(input_shape) == 3 else (0, 0, 0)
        widths = [int(w) for w in widths]
        if min(channels, mels) < 1 or context < 3 or context % 2 == 0 or frames < context \
                or not widths or min(widths) < 1:
            raise DataError(f"idnn needs spectrograms (channels, mels, frames) with at least an "
                            f"odd context >= 3 of frames and positive widths; got shape "
                            f"{tuple(input_shape)}, context={context}, widths={widths}")
        self.input_shape = (channels, mels, frames)
        self.context = int(context)
        self.hparams = {"context": int(context), "widths": widths}
        frame_size = channels * mels
        down = [(context - 1) * frame_size, *widths]
        up = [*widths[::-1]]
        self.encoder = nn.Sequential(*[layer for a, b in pairwise(down) for layer in dense_relu(a, b)])
        self.decoder = nn.Sequential(*[layer for a, b in pairwise(up) for layer in dense_relu(a, b)],
                                     nn.Linear(widths[0], frame_size))
        self.register_buffer("mel_mean", torch.zeros(channels, mels, 1))
        self.register_buffer("mel_std", torch.ones(channels, mels, 1))

    def before_training(self, specs) -> None:
        """Per-(channel, mel) mean and standard deviation over all normal frames."""
        mean, std = per_mel_mean_std(specs, min_std=1e-3)
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std)

    def _windows(self, spec: torch.Tensor) -> torch.Tensor:
        """Standardised windows ``(B, W, context, C*M)``."""
        w = standardised_windows(spec, self.mel_mean, self.mel_std, self.context,
                                 self.input_shape, "idnn")  # (B, C, M, W, context)
        return w.permute(0, 3, 4, 1, 2).reshape(w.shape[0], w.shape[3], self.context, -1)

    def make_examples(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outer frames ``(B*W, (context-1)*C*M)`` → centre frame ``(B*W, C*M)``."""
        w = self._windows(spec).flatten(0, 1)
        centre = self.context // 2
        outer = torch.cat([w[:, :centre], w[:, centre + 1:]], 1).flatten(1)
        return outer, w[:, centre]

    def error_maps(self, spec: torch.Tensor) -> torch.Tensor:
        """Squared error of the predicted centre frame per mel, averaged over channels."""
        batch, channels, mels, frames = spec.shape
        inputs, targets = self.make_examples(spec)
        error = (self(inputs).float() - targets.float()) ** 2
        error = error.reshape(batch, frames - self.context + 1, channels, mels)
        return error.mean(dim=2).transpose(1, 2)


@register(
    "idnn",
    description="Interpolation DNN (Suefusa et al. 2020): predicts the centre frame of a "
                "5-frame window from its 4 neighbours; mean squared error of the centre.",
    features={"n_mels": 64, "n_fft": 1024, "hop_length": 512},
    training={"epochs": 100, "batch_size": 8, "example_batch_size": 256, "lr": 1e-3,
              "patience": 10},
    scoring={"pooling": "mean"},
)
def build_idnn(input_shape: tuple[int, ...], context: int = 5,
               widths: tuple[int, ...] | list[int] = (128, 64, 32)) -> IDNN:
    return IDNN(input_shape, context=context, widths=widths)
