"""The course notebook's convolutional autoencoder on whole log-mel spectrograms.

Three conv + max-pool stages squeeze a (C, 64, 312) spectrogram into a 4 × 8 × 39 code and
three conv + upsample stages rebuild it; 11,193 weights for one channel. The notebook fed raw
dB values; here a fixed standardisation fitted on the training clips is the model's first
layer, so the reconstruction error is measured in standard deviations, not dB².
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stethoscope.errors import DataError
from stethoscope.models.base import SpectrogramModel
from stethoscope.models.layers import Dropout, SubpixelSequential
from stethoscope.models.registry import register

POOLING_ROUNDS = 3  # each round halves mels and frames, so both must divide by 2**3


class Standardize(nn.Module):
    """``(x - mean) / std`` with one mean and std fitted on the normal training spectrograms.

    Hand-written: torch has no layer holding fixed, data-fitted statistics as buffers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def fit(self, specs, chunk_clips: int = 16) -> None:
        """Set mean and std from ``specs`` ``(N, ...)``, reading ``chunk_clips`` clips at a time."""
        mean, std = streaming_mean_std(specs, chunk_clips)
        self.mean.fill_(mean)
        self.std.fill_(std)


def streaming_mean_std(specs, chunk_clips: int = 16) -> tuple[float, float]:
    """Global mean and standard deviation of an ``(N, ...)`` array (a memmap is never loaded whole)."""
    if len(specs) == 0:
        raise DataError("no training spectrograms to fit the input standardisation on")
    count, total, total_sq = 0, 0.0, 0.0
    for start in range(0, len(specs), chunk_clips):
        chunk = np.asarray(specs[start : start + chunk_clips], dtype=np.float64)
        count += chunk.size
        total += float(chunk.sum())
        total_sq += float(np.square(chunk).sum())
    if not np.isfinite(total_sq):
        raise DataError("training spectrograms hold NaN or infinite values")
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    return mean, max(float(np.sqrt(variance)), 1e-6)  # a constant input must not divide by 0


def conv_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3×3 'same' convolution followed by ReLU (Keras ``Conv2D(..., activation='relu')``)."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]


def conv_pool_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3×3 'same' convolution, 2×2 max-pooling, then ReLU."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.MaxPool2d(2),
            nn.ReLU(inplace=True)]


class SeedConvAE(SpectrogramModel):
    """The seed notebook's conv autoencoder for spectrograms ``(C, M, F)``, M and F divisible by 8."""

    def __init__(self, input_shape: tuple[int, ...], dropout: float = 0.3) -> None:
        super().__init__()
        channels, mels, frames = check_input_shape(input_shape)
        self.input_shape = (channels, mels, frames)
        self.hparams = {"dropout": float(dropout)}
        # ReLU after each pooling: the same function as Keras' conv(relu) → pool (max and
        # ReLU commute, gradients included) on a quarter of the values.
        self.encoder = nn.Sequential(
            Standardize(),
            *conv_pool_relu(channels, 32), Dropout(dropout),
            *conv_pool_relu(32, 16),
            *conv_pool_relu(16, 4),
        )
        # The last upsample + conv runs as one sub-pixel convolution (layers.py).
        self.decoder = SubpixelSequential(
            *conv_relu(4, 4), nn.Upsample(scale_factor=2),
            *conv_relu(4, 16), nn.Upsample(scale_factor=2),
            *conv_relu(16, 32), nn.Upsample(scale_factor=2),
            nn.Conv2d(32, channels, 3, padding=1),  # linear: standardised dB are not in [0, 1]
        )

    @property
    def standardize(self) -> Standardize:
        return self.encoder[0]

    def before_training(self, specs) -> None:
        """Fit the input standardisation on the normal training spectrograms ``(N, C, M, F)``."""
        self.standardize.fit(specs)

    def make_examples(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input: the raw spectrogram; target: the same spectrogram standardised (the output's units)."""
        factor = 2**POOLING_ROUNDS
        if tuple(spec.shape[1:3]) != self.input_shape[:2] or spec.shape[3] % factor:
            raise DataError(f"spectrograms of shape {tuple(spec.shape[1:])} do not fit "
                            f"seed-conv-ae built for {self.input_shape} (channels, mels, frames)")
        return spec, self.standardize(spec)


def check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, M, F)`` as ints, or a one-line error when the pooling rounds cannot undo exactly."""
    if len(input_shape) != 3:
        raise DataError(f"seed-conv-ae needs spectrograms (channels, mels, frames), "
                        f"got shape {tuple(input_shape)}")
    channels, mels, frames = (int(s) for s in input_shape)
    factor = 2**POOLING_ROUNDS
    if mels % factor or frames % factor or min(channels, mels, frames) < 1:
        raise DataError(f"seed-conv-ae needs mel bands and frames divisible by {factor} "
                        f"(e.g. 64 × 312), got {mels} × {frames}; set the feature frames")
    return channels, mels, frames


@register(
    "seed-conv-ae",
    description="The course notebook's conv autoencoder on 64-mel × 312-frame log-mel "
                "spectrograms (11k weights), with input standardisation.",
    features={"n_mels": 64, "n_fft": 1024, "hop_length": 512, "frames": 312},
    # bf16 autocast where the CPU or GPU has it natively: on the real valve clips its scores
    # rank like fp32's (Spearman >= 0.998) and at most 3 of 140 verdicts move, as much as
    # a change of seed moves them; training runs 2.98x TF-Keras instead of 1.81x (docs/benchmarks.md)
    training={"epochs": 100, "batch_size": 32, "lr": 1e-3, "patience": 10, "precision": "auto"},
    scoring={"pooling": "mean"},
)
def build_seed_conv_ae(input_shape: tuple[int, ...], dropout: float = 0.3) -> SeedConvAE:
    return SeedConvAE(input_shape, dropout=dropout)
