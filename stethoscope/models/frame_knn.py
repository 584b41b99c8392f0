"""Frame k-NN: distance of each window of frames to a memory bank of normal windows.

No training. Every window of ``context`` consecutive log-mel frames (standardised per mel
band) of the normal clips goes into a memory bank; a new window's score is its mean squared
distance to its ``k`` nearest bank windows. Pooled with ``topk:0.1`` over time, a short new
sound (a rattle, a knock) is not averaged away by the rest of the clip. A strong
non-parametric baseline for sounds that are new; it cannot see a sound that is missing.

The bank scores its own clips as perfect (distance 0), so :meth:`held_out_scores` scores each
training clip against the bank without that clip's own windows (leave-one-clip-out).
"""

from __future__ import annotations

import numpy as np
import torch

from stethoscope.errors import DataError, ModelFileError
from stethoscope.models.base import (
    AnomalyModel,
    check_state,
    per_mel_mean_std,
    standardised_windows,
)
from stethoscope.models.registry import register

DEFAULT_MAX_BANK = 16384  # windows kept; more are subsampled (distance cost grows with it)
QUERY_CHUNK = 2048  # query windows per distance matrix: bounds memory


class FrameKNN(AnomalyModel):
    """Memory bank of standardised frame windows; error map = per-mel squared difference to
    the nearest bank window, ``(B, M, F - context + 1)``. Not an ``nn.Module``: its state is
    the bank (whose size follows from the saved tensor) and the per-mel statistics."""

    def __init__(self, input_shape: tuple[int, ...], context: int = 5, k: int = 1,
                 max_bank: int = DEFAULT_MAX_BANK, seed: int = 0) -> None:
        channels, mels, frames = (int(s) for s in input_shape) if len(input_shape) == 3 else (0, 0, 0)
        if min(channels, mels) < 1 or frames < context or context < 1 or k < 1 or max_bank < 1:
            raise DataError(f"frame-knn needs spectrograms (channels, mels, frames) with at "
                            f"least context={context} frames, k >= 1 and max_bank >= 1; got "
                            f"shape {tuple(input_shape)}, k={k}, max_bank={max_bank}")
        self.input_shape = (channels, mels, frames)
        self.context, self.k = int(context), int(k)
        self.hparams = {"context": int(context), "k": int(k), "max_bank": int(max_bank),
                        "seed": int(seed)}
        self.dim = channels * mels * self.context
        self.mel_mean = torch.zeros(channels, mels, 1)
        self.mel_std = torch.ones(channels, mels, 1)
        self.bank = torch.zeros(0, self.dim)
        self.bank_clip = torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ windows
    def windows(self, spec: torch.Tensor) -> torch.Tensor:
        """Standardised windows ``(B, W, C*M*context)`` of spectrograms ``(B, C, M, F)``."""
        w = standardised_windows(spec, self.mel_mean, self.mel_std, self.context,
                                 self.input_shape, "frame-knn")  # (B, C, M, W, context)
        return w.permute(0, 3, 1, 2, 4).reshape(w.shape[0], w.shape[3], -1)

    # ------------------------------------------------------------------ fitting
    def fit(self, specs, train=None) -> FrameKNN:
        """Per-(channel, mel) statistics over all normal frames, then the memory bank of
        normal windows (a seeded random subset beyond ``max_bank``)."""
        self.mel_mean, self.mel_std = per_mel_mean_std(specs, min_std=1e-3)
        windows, owners = [], []
        for i in range(len(specs)):
            w = self.windows(torch.from_numpy(np.array(specs[i:i + 1], dtype=np.float32)))[0]
            windows.append(w)
            owners.append(torch.full((len(w),), i, dtype=torch.int64))
        bank, owner = torch.cat(windows), torch.cat(owners)
        limit = self.hparams["max_bank"]
        if len(bank) > limit:
            generator = torch.Generator().manual_seed(self.hparams["seed"])
            keep = torch.randperm(len(bank), generator=generator)[:limit].sort().values
            bank, owner = bank[keep], owner[keep]
        self.bank = bank.contiguous()
        self.bank_clip = owner
        return self

    # ------------------------------------------------------------------ scoring
    def _nearest(self, queries: torch.Tensor, exclude_clip: int | None = None) -> torch.Tensor:
        """The mean of the k nearest bank windows of each query ``(Q, D) -> (Q, D)``."""
        bank = self.bank.to(queries.device)
        if exclude_clip is not None:
            bank = bank[self.bank_clip.to(queries.device) != exclude_clip]
        if len(bank) == 0:
            raise DataError("frame-knn memory bank is empty; fit the model on normal clips first")
        k = min(self.k, len(bank))
        bank_norms = (bank * bank).sum(1)
        out = []
        for start in range(0, len(queries), QUERY_CHUNK):
            q = queries[start:start + QUERY_CHUNK]
            distance = (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + bank_norms
            index = distance.topk(k, dim=1, largest=False).indices
            out.append(bank[index].mean(1))
        return torch.cat(out)

    def _error_maps(self, spec: torch.Tensor, exclude_clip: int | None = None) -> torch.Tensor:
        batch, channels, mels, _ = spec.shape
        w = self.windows(spec.float())
        n = w.shape[1]
        nearest = self._nearest(w.flatten(0, 1), exclude_clip).reshape(w.shape)
        error = ((w - nearest) ** 2).reshape(batch, n, channels, mels, self.context)
        return error.mean(dim=(2, 4)).transpose(1, 2)

    def error_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-mel squared difference of each window to its nearest normal windows,
        averaged over channels and the window's frames: ``(B, M, F - context + 1)``."""
        return self._error_maps(torch.as_tensor(batch))

    @torch.no_grad()
    def held_out_scores(self, specs, pool) -> tuple[np.ndarray, str]:
        """Leave-one-clip-out scores of the training clips ``specs`` (in the order they were
        given to :meth:`fit`): each clip against the bank without its windows."""
        maps = [self._error_maps(torch.from_numpy(np.array(specs[i:i + 1], dtype=np.float32)),
                                 exclude_clip=i) for i in range(len(specs))]
        return pool(torch.cat(maps)), "leave-one-clip-out scores of the training clips"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mel_mean": self.mel_mean, "mel_std": self.mel_std, "bank": self.bank,
                "bank_clip": self.bank_clip}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        channels, mels, _ = self.input_shape
        check_state(state, {"mel_mean": (channels, mels, 1), "mel_std": (channels, mels, 1),
                            "bank": None, "bank_clip": None}, "frame-knn")
        bank, owner = state["bank"], state["bank_clip"]
        if bank.ndim != 2 or bank.shape[1] != self.dim or not 0 < bank.shape[0] <= \
                self.hparams["max_bank"] or tuple(owner.shape) != (bank.shape[0],):
            raise ModelFileError(f"weights do not fit frame-knn: a bank of shape "
                                 f"{tuple(bank.shape)} for windows of {self.dim} values and at "
                                 f"most {self.hparams['max_bank']} rows")
        self.mel_mean, self.mel_std = state["mel_mean"].float(), state["mel_std"].float()
        self.bank, self.bank_clip = bank.float().contiguous(), owner.long()


@register(
    "frame-knn",
    description="No training: k-NN distance of each 5-frame window to a memory bank of "
                "normal windows (per-mel standardised), mean of the top 10 % of frames.",
    features={"n_mels": 64, "n_fft": 1024, "hop_length": 512},
    scoring={"pooling": "topk:0.1"},
)
def build_frame_knn(input_shape: tuple[int, ...], context: int = 5, k: int = 1,
                    max_bank: int = DEFAULT_MAX_BANK, seed: int = 0) -> FrameKNN:
    return FrameKNN(input_shape, context=context, k=k, max_bank=max_bank, seed=seed)
