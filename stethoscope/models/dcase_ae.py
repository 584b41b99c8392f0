"""The DCASE 2020-2023 Task 2 baseline: a dense autoencoder on 5 stacked log-mel frames.

Each training example is a window of 5 consecutive 128-mel frames laid end to end (frame t's
128 bands, then frame t+1's, ...: 640 values), as in the baseline's ``file_to_vectors``.
Layers follow ``nttcslab/dcase2023_task2_baseline_ae`` ``networks/dcase2023t2_ae/network.py``:
Linear-BatchNorm-ReLU blocks 640→128→128→128→128→8 and back, then a linear 128→640 output;
BatchNorm with momentum 0.01 and eps 1e-3 (Keras' 0.99 / 1e-3). No input normalisation, as in
the baseline. A clip's score, the mean of its error map, is the baseline's mean window MSE.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from stethoscope.errors import DataError
from stethoscope.models.base import SpectrogramModel
from stethoscope.models.registry import register

HIDDEN_LAYERS = 4  # Linear-BN-ReLU blocks of width ``hidden`` on each side of the code


def dense_bn_relu(in_features: int, out_features: int) -> list[nn.Module]:
    """One baseline block: Linear, BatchNorm1d(momentum=0.01, eps=1e-3), ReLU."""
    return [nn.Linear(in_features, out_features),
            nn.BatchNorm1d(out_features, momentum=0.01, eps=1e-3), nn.ReLU()]


class DcaseAE(SpectrogramModel):
    """The DCASE baseline autoencoder over windows of ``frames`` stacked mel frames.

    Spectrograms are ``(C, M, F)``; every channel is windowed separately, so one clip gives
    ``C * (F - frames + 1)`` examples of ``frames * M`` values.
    """

    def __init__(self, input_shape: tuple[int, ...], frames: int = 5, hidden: int = 128,
                 latent: int = 8) -> None:
        super().__init__()
        channels, mels, clip_frames = (int(s) for s in check_input_shape(input_shape, frames))
        self.input_shape = (channels, mels, clip_frames)
        self.frames, self.mels = int(frames), mels
        self.hparams = {"frames": int(frames), "hidden": int(hidden), "latent": int(latent)}
        window = frames * mels
        widths = [window] + [hidden] * HIDDEN_LAYERS + [latent]
        self.encoder = nn.Sequential(
            *[layer for a, b in pairwise(widths) for layer in dense_bn_relu(a, b)])
        back = widths[::-1][:-1]  # latent, hidden × 4
        self.decoder = nn.Sequential(
            *[layer for a, b in pairwise(back) for layer in dense_bn_relu(a, b)],
            nn.Linear(hidden, window),
        )

    def make_examples(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``(B*C*(F-frames+1), frames*M)`` in clip, channel, time order; targets = inputs."""
        batch, channels, mels, clip_frames = spec.shape
        if (channels, mels) != self.input_shape[:2] or clip_frames < self.frames:
            raise DataError(f"spectrograms of shape {tuple(spec.shape[1:])} do not fit dcase-ae "
                            f"built for {self.input_shape[:2]} (channels, mels) and "
                            f"{self.frames} stacked frames")
        windows = spec.unfold(3, self.frames, 1)  # (B, C, M, F', frames)
        windows = windows.permute(0, 1, 3, 4, 2)  # (B, C, F', frames, M): frames end to end
        windows = windows.reshape(-1, self.frames * mels)
        return windows, windows

    def error_maps(self, spec: torch.Tensor) -> torch.Tensor:
        """Squared error per mel band and window ``(B, M, F-frames+1)``, averaged over the
        stacked frames and the channels; its mean is the baseline's mean window MSE."""
        batch, channels, mels, clip_frames = spec.shape
        inputs, targets = self.make_examples(spec)
        error = (self(inputs).float() - targets.float()) ** 2
        error = error.reshape(batch, channels, clip_frames - self.frames + 1, self.frames, mels)
        return error.mean(dim=(1, 3)).transpose(1, 2)


def check_input_shape(input_shape: tuple[int, ...], frames: int) -> tuple[int, int, int]:
    """``(C, M, F)``, or a one-line error when a clip is too short for one window."""
    if len(input_shape) != 3:
        raise DataError(f"dcase-ae needs spectrograms (channels, mels, frames), "
                        f"got shape {tuple(input_shape)}")
    channels, mels, clip_frames = (int(s) for s in input_shape)
    if frames < 1 or min(channels, mels) < 1 or clip_frames < frames:
        raise DataError(f"dcase-ae stacks {frames} frames but the spectrograms have shape "
                        f"{tuple(input_shape)} (channels, mels, frames)")
    return channels, mels, clip_frames


@register(
    "dcase-ae",
    description="The DCASE 2020-2023 Task 2 baseline: dense autoencoder on 5 stacked "
                "128-mel frames (640 → 8 → 640), scored by mean window MSE.",
    features={"n_mels": 128, "n_fft": 1024, "hop_length": 512, "power": 2.0},
    # Baseline YAML: 100 epochs, 256 windows a step, Adam lr 1e-3, no early stopping.
    # 64 clips per load, shuffled into steps of 256 windows: close to the baseline's global
    # frame shuffle (8 clips per load gave AUC 0.448 on the DCASE 2023 valve, 64 gave 0.543)
    training={"epochs": 100, "batch_size": 64, "example_batch_size": 256, "lr": 1e-3,
              "patience": None},
    scoring={"pooling": "mean"},
)
def build_dcase_ae(input_shape: tuple[int, ...], frames: int = 5, hidden: int = 128,
                   latent: int = 8) -> DcaseAE:
    return DcaseAE(input_shape, frames=frames, hidden=hidden, latent=latent)
