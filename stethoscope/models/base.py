"""The interface every anomaly model shares, so the detector treats them all alike."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stethoscope.errors import DataError
from stethoscope.features import iter_chunks


def per_mel_mean_std(specs, chunk_clips: int = 64, min_std: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every (channel, mel) band over all frames of all
    clips ``(N, C, M, F)``, as ``(C, M, 1)`` float32 tensors; reads ``chunk_clips`` clips at a
    time so a memory-mapped corpus is never loaded whole."""
    total = squares = None
    count = 0
    for _, chunk in iter_chunks(specs, chunk_clips, dtype=np.float64):
        part, part_sq = chunk.sum(axis=(0, 3)), (chunk**2).sum(axis=(0, 3))
        total = part if total is None else total + part
        squares = part_sq if squares is None else squares + part_sq
        count += chunk.shape[0] * chunk.shape[3]
    if count == 0:
        raise ValueError("no spectrograms to compute per-mel statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return (torch.from_numpy(mean[..., None]).float(),
            torch.from_numpy(np.maximum(std, min_std)[..., None]).float())


def standardised_windows(spec: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         context: int, input_shape: tuple[int, ...], model: str
                         ) -> torch.Tensor:
    """Sliding windows of ``context`` frames of per-mel standardised spectrograms
    ``(B, C, M, F) -> (B, C, M, W, context)``, ``W = F - context + 1``; a one-line error
    naming ``model`` when the clips do not fit it (the frame models' shared first step)."""
    _, channels, mels, frames = spec.shape
    if (channels, mels) != tuple(input_shape[:2]) or frames < context:
        raise DataError(f"spectrograms of shape {tuple(spec.shape[1:])} do not fit {model} "
                        f"built for {tuple(input_shape[:2])} (channels, mels) and {context} "
                        "frames a window")
    z = (spec.float() - mean.to(spec.device)) / std.to(spec.device)
    return z.unfold(3, context, 1)


class SpectrogramModel(nn.Module):
    """A model that learns normal spectrograms and reports where a new one deviates.

    Subclasses set ``encoder`` and ``decoder`` (usable apart) and ``hparams`` (constructor
    arguments, saved so the model can be rebuilt), and override :meth:`make_examples` when
    they do not reconstruct the whole spectrogram.
    """

    encoder: nn.Module
    decoder: nn.Module
    hparams: dict
    is_autoencoder: bool = True  # False: encoder/decoder are identities (memory/statistics models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def before_training(self, specs) -> None:
        """Fit input statistics (e.g. per-mel mean/std) on the normal training spectrograms.

        ``specs`` is an array-like ``(N, C, M, F)`` (possibly a memmap). Store results as
        buffers so they are saved with the weights. Default: nothing.
        """

    def after_training(self, specs) -> None:
        """Fit scoring statistics (error standardisation, Mahalanobis, k-NN bank) on the
        normal training spectrograms once the weights are trained. Default: nothing."""

    def make_examples(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets for a batch of spectrograms ``(B, C, M, F)``."""
        return spec, spec

    def explain(self, spec: torch.Tensor) -> torch.Tensor:
        """A time × frequency map ``(B, M', F')`` of where each clip deviates from normal,
        for the report. Default: the error map itself."""
        return self.error_map(spec)

    def error_map(self, spec: torch.Tensor) -> torch.Tensor:
        """Squared error per (mel, frame) cell, ``(B, M', F')``, averaged over channels."""
        inputs, targets = self.make_examples(spec)
        return ((self(inputs).float() - targets.float()) ** 2).mean(dim=1)
