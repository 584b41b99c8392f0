"""The protocol every anomaly model implements, so the detector treats them all alike.

Two families implement it:

* statistics and memory models (``clip-stats``, ``frame-knn``): plain Python objects holding
  NumPy/torch arrays, fitted in closed form; not ``nn.Module``s;
* trained networks (``dcase-ae``, ``idnn``, ``seed-conv-ae``): ``nn.Module``s subclassing
  :class:`SpectrogramModel`, fitted by :func:`stethoscope.training.fit`.

The protocol (:class:`AnomalyModel`):

``fit(specs, train=None) -> self``
    learn normal spectrograms ``(N, C, M, F)`` (an array or read-only memmap);
    ``train`` carries the training loop's settings for trained models.
``error_maps(batch) -> (B, M', F')``
    where each clip of a batch ``(B, C, M, F)`` deviates, per (band, frame) cell.
``clip_scores(batch, pool) -> (B,)``
    one score per clip; ``pool`` (the detector's pooling rule, a callable on error maps)
    reduces the frame axis. Models that score whole clips (``frame_level = False``) ignore it.
``held_out_scores(specs, pool) -> (scores, description)``
    out-of-sample scores of the normal training clips for the threshold: leave-one-clip-out
    for statistics models, the validation split for trained ones.
``explain(batch) -> (B, M, F)``
    the deviation map the report draws (default: the error maps).
``state_dict()`` / ``load_state_dict(state)``
    fitted arrays as tensors, saved in ``model.safetensors``; ``hparams`` holds only
    constructor arguments (never fitted sizes: those follow from the saved tensors).
``encode(batch)`` / ``decode(codes)``
    autoencoders only (``is_autoencoder = True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stethoscope.errors import DataError, ModelFileError
from stethoscope.features import iter_chunks

Pool = Callable[[torch.Tensor | np.ndarray], np.ndarray]
MIN_VALIDATION_CLIPS = 10  # fewer held-out clips give a threshold too noisy to trust


@dataclass
class TrainPlan:
    """How a trained model is fitted: the loop's settings and the validation split."""

    config: object  # stethoscope.training.TrainConfig
    val_fraction: float = 0.1
    description: str = "train"


class AnomalyModel:
    """Base of every anomaly model; see the module docstring for the protocol."""

    hparams: dict
    input_shape: tuple[int, int, int]
    trainable: bool = False
    is_autoencoder: bool = False
    frame_level: bool = True  # error maps have a frame axis that the pooling rule reduces

    def fit(self, specs, train: TrainPlan | None = None) -> AnomalyModel:
        raise NotImplementedError

    def error_maps(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def clip_scores(self, batch: torch.Tensor, pool: Pool) -> np.ndarray:
        """One score per clip of ``batch`` ``(B, C, M, F)``: the pooled error maps."""
        return pool(self.error_maps(batch))

    def explain(self, batch: torch.Tensor) -> torch.Tensor:
        """A time × frequency map ``(B, M', F')`` of where each clip deviates, for the report."""
        return self.error_maps(batch)

    def held_out_scores(self, specs, pool: Pool) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.error_maps(batch)


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...] | None],
                model: str) -> None:
    """Raise ModelFileError unless ``state`` has exactly the ``expected`` keys, each of the
    expected shape (None: any shape, checked by the caller)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFileError(f"weights do not fit {model}: missing {missing}, unexpected {extra}")
    for key, shape in expected.items():
        if shape is not None and tuple(state[key].shape) != tuple(shape):
            raise ModelFileError(f"weights do not fit {model}: {key} has shape "
                                 f"{tuple(state[key].shape)}, expected {tuple(shape)}")


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


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and validation indices of ``n`` clips (no validation below 10 clips)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction)) if n >= 10 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class SpectrogramModel(nn.Module, AnomalyModel):
    """A trained network that learns normal spectrograms and reports where a new one deviates.

    Subclasses set ``encoder`` and ``decoder`` (usable apart) and ``hparams`` (constructor
    arguments, saved so the model can be rebuilt), and override :meth:`make_examples` when
    they do not reconstruct the whole spectrogram.
    """

    encoder: nn.Module
    decoder: nn.Module
    trainable = True
    is_autoencoder = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    __call__ = nn.Module.__call__

    def before_training(self, specs) -> None:
        """Fit input statistics (e.g. per-mel mean/std) on the normal training spectrograms.

        ``specs`` is an array-like ``(N, C, M, F)`` (possibly a memmap). Store results as
        buffers so they are saved with the weights. Default: nothing.
        """

    def make_examples(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets for a batch of spectrograms ``(B, C, M, F)``."""
        return spec, spec

    def error_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """Squared error per (mel, frame) cell, ``(B, M', F')``, averaged over channels."""
        inputs, targets = self.make_examples(batch)
        return ((self(inputs).float() - targets.float()) ** 2).mean(dim=1)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Codes of the encoder half for a batch of spectrograms (frame models: per window)."""
        return self.encoder(self.make_examples(batch)[0])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Outputs of the decoder half for codes from :meth:`encode`."""
        return self.decoder(codes)

    def fit(self, specs, train: TrainPlan | None = None) -> SpectrogramModel:
        """Fit the input statistics, then train on a split of ``specs`` with early stopping
        on the rest (``train.val_fraction``); the split is kept for :meth:`held_out_scores`."""
        from stethoscope.training import SpectrogramDataset, TrainConfig
        from stethoscope.training import fit as train_loop

        plan = train or TrainPlan(TrainConfig())
        self.before_training(specs)
        train_idx, val_idx = validation_split(len(specs), plan.val_fraction, plan.config.seed)
        self.history_ = train_loop(
            self, SpectrogramDataset(specs, train_idx),
            SpectrogramDataset(specs, val_idx) if len(val_idx) else None,
            config=plan.config, batch_transform=lambda batch: self.make_examples(batch[0]),
            description=plan.description)
        self.eval()
        self.validation_indices_ = val_idx
        self._scoring = (plan.config.device, plan.config.precision)
        return self

    def held_out_scores(self, specs, pool: Pool) -> tuple[np.ndarray, str]:
        """Scores of the validation clips when there are at least ``MIN_VALIDATION_CLIPS``,
        else of all training clips (optimistic: the network has seen them)."""
        from stethoscope.compute import place_model, resolve_device, run_batches

        val_idx = getattr(self, "validation_indices_", np.zeros(0, dtype=int))
        if len(val_idx) >= MIN_VALIDATION_CLIPS:
            rows, source = val_idx, f"scores of the {len(val_idx)} held-out validation clips"
        else:
            rows, source = np.arange(len(specs)), \
                "in-sample scores of the training clips (optimistic)"
        device, precision = getattr(self, "_scoring", ("auto", "fp32"))
        device = resolve_device(device)
        place_model(self, device)
        parts = [pool(maps) for maps in run_batches(
            self, np.asarray(specs[rows]), lambda m, x: m.error_maps(x), device=device,
            precision=precision)]
        return np.concatenate(parts).astype(np.float64), source
