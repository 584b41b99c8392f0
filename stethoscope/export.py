"""ONNX export of a saved model's whole scoring path: one window of audio in, its score out.

The exported graph holds everything from samples to verdict:

* the log-mel front end as plain ONNX ops: framing, the periodic Hann window and a real
  DFT as products with cos/sin matrices (:func:`add_power_factored`), the mel bank as
  block-sparse matrix products and ``10·log10(· + eps)``;
* the model, rebuilt from the saved folder's ``model.safetensors`` tensors and
  ``config.json`` (never from the model classes, so a refactor of their insides cannot change
  what an exported file computes without the parity test noticing);
* the pooling of the error map over frames, ending in the window's ``score`` and the
  ``anomalous`` verdict against the saved threshold.

Input ``waveform``: float32 ``(C, W)`` in [-1, 1] at the model's sample rate, ``W`` the
model's window (:func:`stethoscope.edge.model_window_samples`), ``C`` the model's channels
(the edge scorer picks them from a recording as the detector does; any number for a model
that averages the log-mels of all channels, ``channels="mean"``). Outputs ``score``
float32 ``(1,)`` and ``anomalous`` bool ``(1,)``. The file's metadata says everything the
edge scorer needs (sample rate, window, channel choice, threshold).

The DFT is factored once (Cooley-Tukey, ``n_fft = A·B``, 32·32 for 1024): framing, window,
the first stage and the twiddles are one grouped ``Conv``, the second stage one ``MatMul``;
with the real input's symmetry that is about 65 M multiply-adds per 10 s window at hop 256
instead of 658 M for one product over whole frames (measured in onnxruntime: 1.3-1.5 ms
instead of 7 ms). ONNX's own ``DFT`` and ``STFT`` operators are not used: onnxruntime's CPU
kernels for them measured 9.8 and 17 ms for the same frames.

Which models export: every registered anomaly model (see :func:`export_support`). Written
with :mod:`onnx.helper` by hand (a small builder below): the graphs are assembled from saved
tensors in loops, which onnxscript's traced functions do not make simpler.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stethoscope.edge import META_KEY, model_window_samples
from stethoscope.errors import StethoscopeError

OPSET = 18
MELS_PER_BLOCK = 8  # mel bands per product with the bins they use
SMALL_TOPK = 16  # onnxruntime's TopK is a fast heap up to about this k
NEAR_RANKS = 4  # ranks next to a large one, read from the same small sorted TopK
LOG10_FACTOR = 10.0 / math.log(10.0)

# Constants of the model families that config.json does not carry (their modules define
# them; repeated here on purpose, and guarded by the parity test).
CLIP_STATS_TRANSIENT_QUANTILES = (0.9, 0.99, 1.0)
CLIP_STATS_RHYTHM_MAX_LAG = 256
CLIP_STATS_RHYTHM_POOL = 4
BATCHNORM_EPS = {"dcase-ae": 1e-3, "idnn": 1e-5}  # dcase-ae: Keras' 1e-3; idnn: torch default


class ExportError(StethoscopeError):
    """A model cannot be exported to ONNX (unknown family, saved layout not understood)."""


# ----------------------------------------------------------------------------- builder


class GraphBuilder:
    """Collects ONNX nodes and constant tensors under unique names."""

    def __init__(self) -> None:
        import onnx  # the optional 'edge' extra; imported here so this module imports without it

        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._used: Counter = Counter()

    def name(self, hint: str) -> str:
        self._used[hint] += 1
        return f"{hint}_{self._used[hint]}"

    def const(self, value, hint: str = "const", dtype=None) -> str:
        """A constant tensor (an initializer) holding ``value``."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float64 and dtype is None:
            array = array.astype(np.float32)
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint, np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        """Add one node; returns its output name (or names when ``outputs > 1``)."""
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    # a few compound helpers, each a handful of nodes
    def matmul(self, x: str, matrix: np.ndarray, hint: str = "weights", dtype=None) -> str:
        return self.op("MatMul", x, self.const(matrix, hint, dtype))

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", x, self.ints(shape, "shape"))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", x, perm=list(perm))

    def mean(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op("ReduceMean", x, self.ints(axes, "axes"), keepdims=keepdims)

    def gather(self, x: str, indices: np.ndarray, axis: int) -> str:
        return self.op("Gather", x, self.const(np.asarray(indices, np.int64), "index", np.int64),
                       axis=axis)

    def square(self, x: str) -> str:
        return self.op("Mul", x, x)

    def model(self, inputs: list, outputs: list, metadata: dict[str, str]):
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, "stethoscope", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="stethoscope")
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.18
        helper.set_model_props(model, metadata)
        return model


# ----------------------------------------------------------------------------- front end


def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window(periodic=True)``), float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)


def conv_factors(n_fft: int, hop: int) -> tuple[int, int] | None:
    """``(A, B)`` with ``A·B = n_fft``, B dividing ``hop`` and as close to sqrt(n_fft) as
    possible (both >= 4), or None (then the DFT is one product over whole frames)."""
    best = None
    for b in range(4, n_fft // 4 + 1):
        if n_fft % b == 0 and hop % b == 0:
            if best is None or abs(math.log(b / math.sqrt(n_fft))) < abs(
                    math.log(best / math.sqrt(n_fft))):
                best = b
    return None if best is None else (n_fft // best, best)


def add_power_factored(b: GraphBuilder, wave: str, samples: int, n_fft: int, hop: int,
                       factors: tuple[int, int]) -> tuple[str, int]:
    """``|DFT|²`` ``(C, n_fft // 2 + 1, F)`` of the centred Hann-windowed frames of ``wave``
    ``(C, W)``.

    Cooley-Tukey with ``n = a·B + b`` and ``k = k_a + A·k_b``: the first stage (an A-point
    DFT over a for every b, times the twiddle, with the window) is one grouped convolution
    over the signal cut into rows of B samples, stride hop / B: framing, window, first stage
    and twiddles in one op. The second stage (a B-point DFT over b, the same for every k_a)
    is one matrix product. The input is real, so ``X[N - k] = conj(X[k])``: the first stage
    computes only ``k_a <= A / 2`` (half the work) and the bins with a larger k_a are read
    at their mirror ``N - k``. No transposes; one row gather puts the bins in order."""
    big_a, big_b = factors
    frames = 1 + samples // hop
    stride = hop // big_b
    rows = -(-(samples + n_fft) // big_b)
    padded = b.op("Pad", wave, b.ints([0, n_fft // 2, 0, rows * big_b - samples - n_fft // 2],
                                      "pads"))
    signal = b.transpose(b.reshape(padded, [-1, rows, big_b]), [0, 2, 1])  # (C, B, rows)
    k_a = np.arange(big_a // 2 + 1 if big_a % 2 == 0 else big_a)
    a, col = np.arange(big_a), np.arange(big_b)
    n = a[None, :] * big_b + col[:, None]  # (b, a) -> sample index in the frame
    angle = 2.0 * np.pi * k_a[None, :, None] * n[:, None, :] / n_fft  # (b, k_a, a)
    window = hann_window(n_fft)[n][:, None, None, :]
    kernel = np.stack([np.cos(angle), -np.sin(angle)], 1) * window  # (b, re/im, k_a, a)
    first = b.op("Conv", signal,
                 b.const(kernel.reshape(big_b * 2 * len(k_a), 1, big_a), "dft1"),
                 group=big_b, kernel_shape=[big_a], strides=[stride])  # (C, B·2·|k_a|, F')
    produced = (rows - big_a) // stride + 1
    if produced != frames:
        first = b.op("Slice", first, b.ints([0], "start"), b.ints([frames], "end"),
                     b.ints([2], "axis"))
    first = b.reshape(first, [-1, 2 * big_b, len(k_a) * frames])  # rows (b, re/im)
    k_b = np.arange(big_b)
    phase = -2.0 * np.pi * np.outer(k_b, col) / big_b  # (k_b, b)
    second = np.zeros((2, big_b, big_b, 2))
    second[0, :, :, 0], second[0, :, :, 1] = np.cos(phase), -np.sin(phase)  # real part
    second[1, :, :, 0], second[1, :, :, 1] = np.sin(phase), np.cos(phase)  # imaginary part
    spectrum = b.op("MatMul", b.const(second.reshape(2 * big_b, 2 * big_b), "dft2"), first)
    re, im = b.op("Split", b.square(spectrum), axis=1, num_outputs=2, outputs=2)
    power = b.reshape(b.op("Add", re, im), [-1, big_b * len(k_a), frames])  # (k_b, k_a) rows
    bins = np.arange(n_fft // 2 + 1)
    mirrored = bins % big_a >= len(k_a)
    source = np.where(mirrored, n_fft - bins, bins)  # |X[k]|² = |X[N - k]|²
    cells = (source // big_a) * len(k_a) + source % big_a
    return b.gather(power, cells, axis=1), len(bins)


def add_power_direct(b: GraphBuilder, wave: str, samples: int, n_fft: int, hop: int
                     ) -> tuple[str, int]:
    """``|DFT|²`` ``(C, bins, F)`` as one product of the frames (cut by slicing when hop
    divides n_fft, else by a gather) with windowed cos/sin matrices (any n_fft and hop)."""
    frames = 1 + samples // hop
    if n_fft % hop == 0:  # a frame is n_fft / hop consecutive hop-sized blocks
        blocks = -(-(samples + n_fft) // hop)
        padded = b.op("Pad", wave, b.ints([0, n_fft // 2, 0, blocks * hop - samples - n_fft // 2],
                                          "pads"))
        rows = b.reshape(padded, [-1, blocks, hop])
        runs = [b.op("Slice", rows, b.ints([r], "start"), b.ints([r + frames], "end"),
                     b.ints([1], "axis")) for r in range(n_fft // hop)]
        framed = b.op("Concat", *runs, axis=2)  # (C, F, n_fft)
    else:
        padded = b.op("Pad", wave, b.ints([0, n_fft // 2, 0, n_fft // 2], "pads"))
        index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
        framed = b.gather(padded, index, axis=1)  # (C, F, n_fft)
    bins = n_fft // 2 + 1
    angle = 2.0 * np.pi * np.outer(np.arange(n_fft), np.arange(bins)) / n_fft
    window = hann_window(n_fft)[:, None]
    spectrum = b.matmul(framed, np.concatenate([np.cos(angle), -np.sin(angle)], 1) * window,
                        "dft")  # (C, F, 2·bins)
    re, im = b.op("Split", b.square(spectrum), axis=2, num_outputs=2, outputs=2)
    return b.transpose(b.op("Add", re, im), [0, 2, 1]), bins


def add_mel(b: GraphBuilder, power: str, bank: np.ndarray, width: int) -> str:
    """Mel energies ``(C, M, F)`` of a power spectrum ``(C, K, F)``: the bank's bands in
    blocks of ``MELS_PER_BLOCK``, each a product with only the bins it uses (a mel filter
    spans a few bins: 3-4x less arithmetic than the whole bank)."""
    weights = np.zeros((bank.shape[0], width))
    weights[:, : bank.shape[1]] = bank
    parts = []
    for m0 in range(0, bank.shape[0], MELS_PER_BLOCK):
        block = weights[m0:m0 + MELS_PER_BLOCK]
        used = np.flatnonzero(block.any(axis=0))
        k0, k1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        bins = b.op("Slice", power, b.ints([k0], "start"), b.ints([k1], "end"),
                    b.ints([1], "axis"))
        parts.append(b.op("MatMul", b.const(block[:, k0:k1], "mel"), bins))  # (C, 8, F)
    return parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=1)


def add_logmel(b: GraphBuilder, wave: str, samples: int, features: dict) -> tuple[str, int]:
    """Log-mel ``(C, M, F)`` of ``wave`` ``(C, W)`` with the conventions of
    :class:`stethoscope.features.LogMel` (librosa's): centred frames with zero padding,
    periodic Hann window, Slaney mel bank, ``10·log10(mel + eps)``. Returns it and F."""
    from stethoscope.features import mel_filter_bank

    n_fft, hop, n_mels = int(features["n_fft"]), int(features["hop_length"]), int(features["n_mels"])
    power, eps = float(features.get("power", 2.0)), float(features.get("eps", 1e-10))
    factors = conv_factors(n_fft, hop)
    if factors is not None:
        spectrum, width = add_power_factored(b, wave, samples, n_fft, hop, factors)
    else:
        spectrum, width = add_power_direct(b, wave, samples, n_fft, hop)
    if power != 2.0:
        spectrum = b.op("Pow", spectrum, b.const(np.float32(power / 2.0), "power"))
    bank = mel_filter_bank(int(features["sample_rate"]), n_fft, n_mels,
                           float(features.get("fmin", 0.0)), features.get("fmax"))
    mel = add_mel(b, spectrum, bank, width)
    decibels = b.op("Mul", b.op("Log", b.op("Add", mel, b.const(np.float32(eps), "eps"))),
                    b.const(np.float32(LOG10_FACTOR), "db"))
    return decibels, 1 + samples // hop


# ----------------------------------------------------------------------------- pooling


def add_frame_pooling(b: GraphBuilder, error_map: str, frames: int, rule: str) -> str:
    """One score ``(1,)`` from an error map ``(M', F')``, as
    :func:`stethoscope.scoring.pool_scores` pools it (NumPy's linear percentiles)."""
    per_frame = b.mean(b.op("Unsqueeze", error_map, b.ints([0], "axes")), [1])  # (1, F')
    if rule == "mean":
        return b.mean(per_frame, [1])
    if rule == "max":
        return b.op("ReduceMax", per_frame, b.ints([1], "axes"), keepdims=0)
    if rule.startswith("topk:"):
        count = max(1, math.ceil(float(rule[5:]) * frames))
        top, _ = b.op("TopK", per_frame, b.ints([count], "k"), axis=1, largest=1, outputs=2)
        return b.mean(top, [1])
    level = 50.0 if rule == "median" else float(rule[1:])
    (value,) = add_quantiles(b, per_frame, 1, frames, [level / 100.0])
    return b.op("Cast", b.reshape(value, [1]), to=1)


def quantile_positions(level: float, count: int) -> tuple[int, int, float]:
    """The two sorted positions and the weight NumPy's linear interpolation uses."""
    position = level * (count - 1)
    low = int(position)
    return low, min(low + 1, count - 1), position - low


def add_quantiles(b: GraphBuilder, x: str, axis: int, count: int, levels: Sequence[float]
                  ) -> list[str]:
    """The ``levels`` quantiles of ``x`` along ``axis`` (removed) with NumPy's linear
    interpolation, as float64 tensors."""
    positions = [quantile_positions(level, count) for level in levels]
    values = add_order_statistics(b, x, axis, count, {i for low, high, _ in positions
                                                      for i in (low, high)})
    out = []
    for low, high, fraction in positions:
        below = b.op("Cast", values[low], to=11)
        above = b.op("Cast", values[high], to=11)
        weight = b.const(np.float64(fraction), "fraction", np.float64)
        out.append(b.op("Add", below, b.op("Mul", b.op("Sub", above, below), weight)))
    return out


def add_order_statistics(b: GraphBuilder, x: str, axis: int, count: int,
                         positions: set[int]) -> dict[int, str]:
    """The values at ascending sorted ``positions`` along ``axis`` (removed), exactly.

    Without a full sort: onnxruntime's TopK is fast as a heap for small k but sorts slowly
    beyond (measured, 64 × 626 values: k <= 16 0.04 ms, k = 626 sorted 1.7 ms, unsorted
    0.43 ms). So the largest needed rank r takes the r + 1 largest values unsorted, whose
    few smallest (a small sorted TopK) are the ranks near r; the next ranks are taken from
    that subset in the same way, and the top ranks by one small sorted TopK (0.76 ms for the
    seven order statistics of clip-stats' quantiles)."""
    ranks = sorted({count - 1 - i for i in positions}, reverse=True)  # from the largest
    found: dict[int, str] = {}
    current, size = x, count
    while ranks:
        r = ranks[0]
        if r < SMALL_TOPK:
            top, _ = b.op("TopK", current, b.ints([r + 1], "k"), axis=axis, largest=1,
                          sorted=1, outputs=2)
            found.update({q: b.gather(top, np.array(q), axis) for q in ranks})
            break
        subset = current if r + 1 == size else b.op(
            "TopK", current, b.ints([r + 1], "k"), axis=axis, largest=1, sorted=0, outputs=2)[0]
        near = [q for q in ranks if q > r - NEAR_RANKS]
        low, _ = b.op("TopK", subset, b.ints([r - min(near) + 1], "k"), axis=axis, largest=0,
                      sorted=1, outputs=2)  # ascending: position j holds rank r - j
        found.update({q: b.gather(low, np.array(r - q), axis) for q in near})
        ranks = [q for q in ranks if q not in near]
        current, size = subset, r + 1
    return {count - 1 - q: value for q, value in found.items()}


# ----------------------------------------------------------------------------- models


@dataclass
class SavedModel:
    """What a model folder holds: its config.json and its tensors as NumPy arrays."""

    folder: Path
    config: dict
    tensors: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.config["model"]

    @property
    def params(self) -> dict:
        return dict(self.config.get("model_params") or {})

    def tensor(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise ExportError(f"model.safetensors has no tensor {key!r}; the saved "
                              f"{self.name} layout is not the one the exporter knows",
                              self.folder)
        return self.tensors[key]


def read_model_folder(folder: str | Path) -> SavedModel:
    """A model folder as written by :meth:`Detector.save`, read without building the model."""
    from stethoscope.storage import load_model

    config, state = load_model(folder)
    tensors = {key: value.detach().cpu().double().numpy() if value.is_floating_point()
               else value.cpu().numpy() for key, value in state.items()}
    return SavedModel(Path(folder), config, tensors)


Recipe = Callable[[GraphBuilder, str, SavedModel, tuple[int, int, int]], str]


def _sequential_layers(saved: SavedModel, prefix: str) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The parameterised layers of ``prefix`` (an ``nn.Sequential``), by index."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in saved.tensors.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == prefix and parts[1].isdigit():
            layers.setdefault(int(parts[1]), {})[parts[2]] = value
    return sorted(layers.items())


def add_dense_stack(b: GraphBuilder, x: str, saved: SavedModel, eps: float) -> str:
    """encoder then decoder of Linear (+ BatchNorm + ReLU) blocks; BatchNorm folded into the
    Linear before it; the last Linear of the decoder stays linear."""
    layers = _sequential_layers(saved, "encoder") + _sequential_layers(saved, "decoder")
    i = 0
    while i < len(layers):
        _, linear = layers[i]
        if linear.get("weight") is None or linear["weight"].ndim != 2:
            raise ExportError(f"unexpected layer layout in {saved.name}: expected a Linear "
                              f"layer, found tensors {sorted(linear)}", saved.folder)
        weight, bias = linear["weight"], linear.get("bias", np.zeros(linear["weight"].shape[0]))
        norm = layers[i + 1][1] if i + 1 < len(layers) else {}
        if "running_mean" in norm:
            scale = norm["weight"] / np.sqrt(norm["running_var"] + eps)
            weight = weight * scale[:, None]
            bias = (bias - norm["running_mean"]) * scale + norm["bias"]
            i += 2
        else:
            i += 1
        x = b.op("Gemm", x, b.const(weight, "dense"), b.const(bias, "bias"), transB=1)
        if "running_mean" in norm:
            x = b.op("Relu", x)
        elif i < len(layers):
            raise ExportError(f"unexpected layer layout in {saved.name}: a Linear layer "
                              "without BatchNorm before the output layer", saved.folder)
    return x


def add_windows(b: GraphBuilder, spec: str, frames: int, context: int) -> str:
    """``(C, M, F) -> (C, M, W, context)`` sliding windows, W = F - context + 1."""
    count = frames - context + 1
    return b.gather(spec, np.arange(count)[:, None] + np.arange(context)[None, :], axis=2)


def _standardised(b: GraphBuilder, spec: str, saved: SavedModel) -> str:
    mean, std = saved.tensor("mel_mean"), saved.tensor("mel_std")  # (C, M, 1)
    return b.op("Div", b.op("Sub", spec, b.const(mean, "mel_mean")), b.const(std, "mel_std"))


def recipe_dcase_ae(b: GraphBuilder, spec: str, saved: SavedModel,
                    shape: tuple[int, int, int]) -> str:
    """Error map ``(M, W)`` of the DCASE baseline autoencoder on stacked frames."""
    channels, mels, frames = shape
    context = int(saved.params.get("frames", 5))
    count = frames - context + 1
    windows = add_windows(b, spec, frames, context)  # (C, M, W, ctx)
    x = b.reshape(b.transpose(windows, [0, 2, 3, 1]), [channels * count, context * mels])
    out = add_dense_stack(b, x, saved, BATCHNORM_EPS["dcase-ae"])
    error = b.reshape(b.square(b.op("Sub", out, x)), [channels, count, context, mels])
    return b.transpose(b.mean(error, [0, 2]), [1, 0])


def recipe_idnn(b: GraphBuilder, spec: str, saved: SavedModel,
                shape: tuple[int, int, int]) -> str:
    """Error map ``(M, W)``: the centre frame predicted from its neighbours."""
    channels, mels, frames = shape
    context = int(saved.params.get("context", 5))
    count, centre = frames - context + 1, context // 2
    windows = add_windows(b, _standardised(b, spec, saved), frames, context)
    w = b.reshape(b.transpose(windows, [2, 3, 0, 1]), [count, context, channels * mels])
    outer = [i for i in range(context) if i != centre]
    inputs = b.reshape(b.gather(w, np.array(outer), axis=1),
                       [count, (context - 1) * channels * mels])
    target = b.gather(w, np.array(centre), axis=1)  # (W, C·M)
    out = add_dense_stack(b, inputs, saved, BATCHNORM_EPS["idnn"])
    error = b.reshape(b.square(b.op("Sub", out, target)), [count, channels, mels])
    return b.transpose(b.mean(error, [1]), [1, 0])


def recipe_frame_knn(b: GraphBuilder, spec: str, saved: SavedModel,
                     shape: tuple[int, int, int]) -> str:
    """Error map ``(M, W)``: squared difference of each window to its nearest bank windows."""
    channels, mels, frames = shape
    context, k = int(saved.params.get("context", 5)), int(saved.params.get("k", 1))
    count = frames - context + 1
    bank = saved.tensor("bank")
    if bank.shape[0] == 0:
        raise ExportError("frame-knn memory bank is empty; fit the model first", saved.folder)
    windows = add_windows(b, _standardised(b, spec, saved), frames, context)
    queries = b.reshape(b.transpose(windows, [2, 0, 1, 3]), [count, channels * mels * context])
    # |q|² is the same for every bank row of a query: the nearest rows need -2 q·b + |b|²
    distance = b.op("Add", b.matmul(queries, -2.0 * bank.T, "bank_t"),
                    b.const((bank * bank).sum(1), "bank_norms"))
    bank_name = b.const(bank, "bank")
    k = min(k, bank.shape[0])
    if k == 1:
        nearest = b.op("Gather", bank_name, b.op("ArgMin", distance, axis=1, keepdims=0), axis=0)
    else:
        _, index = b.op("TopK", distance, b.ints([k], "k"), axis=1, largest=0, outputs=2)
        nearest = b.mean(b.op("Gather", bank_name, index, axis=0), [1])
    error = b.reshape(b.square(b.op("Sub", queries, nearest)), [count, channels, mels, context])
    return b.transpose(b.mean(error, [1, 3]), [1, 0])


def recipe_seed_conv_ae(b: GraphBuilder, spec: str, saved: SavedModel,
                        shape: tuple[int, int, int]) -> str:
    """Error map ``(M, F)`` of the course's conv autoencoder (standardised target)."""
    mean = float(saved.tensor("encoder.0.mean").reshape(-1)[0])
    std = float(saved.tensor("encoder.0.std").reshape(-1)[0])
    x = b.op("Unsqueeze", spec, b.ints([0], "axes"))  # (1, C, M, F)
    target = b.op("Div", b.op("Sub", x, b.const(np.float32(mean), "mean")),
                  b.const(np.float32(std), "std"))
    h = target
    for _, conv in _sequential_layers(saved, "encoder"):
        if "weight" not in conv:  # the standardisation (mean, std), applied above
            continue
        h = b.op("Relu", b.op("MaxPool", _conv3x3(b, h, conv), kernel_shape=[2, 2],
                              strides=[2, 2]))
    decoder = [conv for _, conv in _sequential_layers(saved, "decoder")]
    for i, conv in enumerate(decoder):
        h = _conv3x3(b, h, conv)
        if i < len(decoder) - 1:
            h = b.op("Resize", b.op("Relu", h), "", b.const(np.array([1, 1, 2, 2], np.float32),
                                                             "scales"),
                     mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    error = b.mean(b.square(b.op("Sub", h, target)), [1])  # (1, M, F)
    return b.op("Squeeze", error, b.ints([0], "axes"))


def _conv3x3(b: GraphBuilder, x: str, conv: dict[str, np.ndarray]) -> str:
    weight = conv["weight"]
    if weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise ExportError(f"unexpected convolution weights of shape {weight.shape} in "
                          "seed-conv-ae")
    return b.op("Conv", x, b.const(weight, "conv"), b.const(conv["bias"], "bias"),
                kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def recipe_clip_stats(b: GraphBuilder, spec: str, saved: SavedModel,
                      shape: tuple[int, int, int]) -> str:
    """The clip's score ``(1,)``: z-scored Mahalanobis distances of its statistics, one per
    expert, combined by max (or mean)."""
    experts = list(saved.params.get("experts") or ["spectrum", "transients"])
    combine = saved.params.get("combine", "max")
    statistics = {"spectrum": _spectrum_stats, "transients": _transient_stats,
                  "rhythm": _rhythm_stats}
    unknown = sorted(set(experts) - set(statistics))
    if unknown or combine not in ("max", "mean"):
        raise ExportError(f"clip-stats with experts {experts} and combine {combine!r} has no "
                          "ONNX recipe", saved.folder)
    z_scores = [_gaussian_z(b, statistics[name](b, spec, shape), saved, f"{name}_mean",
                            f"{name}_precision", saved.tensor(f"{name}_scale"))
                for name in experts]
    stacked = b.op("Concat", *z_scores, axis=0)
    reduce = "ReduceMax" if combine == "max" else "ReduceMean"
    return b.op("Cast", b.op(reduce, stacked, b.ints([0], "axes"), keepdims=1), to=1)


def _gaussian_z(b: GraphBuilder, stats: str, saved: SavedModel, mean_key: str,
                precision_key: str, scale: np.ndarray) -> str:
    """``(distance - centre) / spread`` ``(1,)`` float64 of the Mahalanobis distance (not
    squared) of ``stats`` ``(1, D)`` to a saved Gaussian."""
    centred = b.op("Sub", stats, b.const(saved.tensor(mean_key)[None], "mean", np.float64))
    product = b.op("MatMul", centred, b.const(saved.tensor(precision_key), "precision",
                                              np.float64))
    squared = b.op("ReduceSum", b.op("Mul", product, centred), b.ints([1], "axes"), keepdims=0)
    distance = b.op("Sqrt", b.op("Max", squared, b.const(np.float64(0.0), "zero", np.float64)))
    return _z(b, distance, scale)


def _z(b: GraphBuilder, score: str, scale: np.ndarray) -> str:
    centre, spread = (float(v) for v in scale)
    return b.op("Div", b.op("Sub", score, b.const(np.float64(centre), "centre", np.float64)),
                b.const(np.float64(spread), "spread", np.float64))


def _mixture_z(b: GraphBuilder, rows: str, saved: SavedModel, member: str) -> str:
    """z-scored negative log-likelihood ``(1,)`` of ``rows`` ``(1, D)`` under a saved PCA +
    Gaussian mixture (:func:`stethoscope.models.clip_ensemble.mixture_nll`): every
    component's whitened residual in one product, then a log-sum-exp."""
    t = {key: saved.tensor(f"{member}.{key}") for key in
         ("pca_mean", "pca_proj", "log_weights", "means", "prec_chol", "z")}
    components, dims = t["means"].shape
    if f"{member}.qt_x" in saved.tensors:
        rows = _quantile_map(b, rows, {key: saved.tensor(f"{member}.{key}") for key in
                                       ("qt_x", "qt_z", "qt_slo", "qt_shi")})
    projected = b.op("MatMul", b.op("Sub", rows, b.const(t["pca_mean"][None], "pca_mean",
                                                         np.float64)),
                     b.const(t["pca_proj"], "pca_proj", np.float64))  # (1, d)
    chol = np.concatenate(list(t["prec_chol"]), axis=1)  # (d, K·d)
    offsets = np.concatenate([mu @ c for mu, c in zip(t["means"], t["prec_chol"], strict=True)])
    residual = b.op("Sub", b.op("MatMul", projected, b.const(chol, "prec_chol", np.float64)),
                    b.const(offsets[None], "offsets", np.float64))
    squared = b.op("ReduceSum", b.square(b.reshape(residual, [components, dims])),
                   b.ints([1], "axes"), keepdims=0)  # (K,)
    constant = (t["log_weights"] + np.log(np.stack([np.diag(c) for c in t["prec_chol"]])).sum(1)
                - 0.5 * dims * np.log(2 * np.pi))
    logs = b.op("Sub", b.const(constant, "log_norm", np.float64),
                b.op("Mul", squared, b.const(np.float64(0.5), "half", np.float64)))
    nll = b.op("Neg", b.op("ReduceLogSumExp", logs, b.ints([0], "axes"), keepdims=1))
    return _z(b, nll, t["z"])


def _quantile_map(b: GraphBuilder, rows: str, m: dict[str, np.ndarray]) -> str:
    """:func:`stethoscope.models.clip_ensemble.quantile_map` of ``rows`` ``(1, D)``: each
    value's knot interval by counting the knots at or below it, then the interpolation,
    the linear tails and 0 for dimensions constant in training."""
    x, z = m["qt_x"], m["qt_z"]
    f64 = np.float64
    knots, targets = b.const(x, "qt_x", f64), b.const(z, "qt_z", f64)
    first, last = b.const(x[0][None], "x_first", f64), b.const(x[-1][None], "x_last", f64)
    zero, one = b.const(f64(0.0), "zero", f64), b.const(f64(1.0), "one", f64)
    one_int = b.const(np.array([[1]], np.int64), "one", np.int64)
    count = b.op("ReduceSum", b.op("Cast", b.op("LessOrEqual", knots, rows), to=7),
                 b.ints([0], "axes"), keepdims=1)  # (1, D) int64
    upper = b.op("Min", b.op("Max", count, one_int),
                 b.const(np.array([[len(z) - 1]], np.int64), "last", np.int64))
    lower = b.op("Sub", upper, one_int)
    x0, x1 = (b.op("GatherElements", knots, k, axis=0) for k in (lower, upper))
    z0, z1 = (b.op("Gather", targets, k, axis=0) for k in (lower, upper))
    gap = b.op("Sub", x1, x0)
    positive = b.op("Greater", gap, zero)
    safe_gap = b.op("Where", positive, gap, one)
    t = b.op("Where", positive, b.op("Div", b.op("Sub", rows, x0), safe_gap),
             b.const(f64(0.5), "half", f64))
    mapped = b.op("Add", z0, b.op("Mul", b.op("Clip", t, zero, one), b.op("Sub", z1, z0)))
    slope_low = b.const(m["qt_slo"][None], "slope_low", f64)
    slope_high = b.const(m["qt_shi"][None], "slope_high", f64)
    below = b.op("Add", b.const(f64(z[0]), "z_first", f64),
                 b.op("Mul", b.op("Sub", rows, first), slope_low))
    above = b.op("Add", b.const(f64(z[-1]), "z_last", f64),
                 b.op("Mul", b.op("Sub", rows, last), slope_high))
    mapped = b.op("Where", b.op("Less", rows, first), below, mapped)
    mapped = b.op("Where", b.op("Greater", rows, last), above, mapped)
    constant = b.const(x[-1][None] <= x[0][None], "constant", np.bool_)
    return b.op("Where", constant, zero, mapped)


def recipe_clip_ensemble(b: GraphBuilder, spec: str, saved: SavedModel,
                         shape: tuple[int, int, int]) -> str:
    """The clip's score ``(1,)``: the transform the model chose (log or none), its clip
    vectors (per-mel mean + std, per-mel maxima, the envelope rhythm; or every cell), each
    member's z-score and their maximum (:mod:`stethoscope.models.clip_ensemble`)."""
    from stethoscope.models.clip_ensemble import TIME_MIN_FRAMES

    channels, mels, frames = shape
    values = b.op("Cast", spec, to=11)
    if saved.tensor("log")[0] > 0.5:
        values = b.op("Log", b.op("Max", values, b.const(np.float64(saved.tensor("floor")[0]),
                                                         "floor", np.float64)))
    time_axis = int(saved.config["input_shape"][2]) >= TIME_MIN_FRAMES
    if time_axis:
        vectors = {"spectrum": lambda: _spectrum_stats(b, values, shape),
                   "peaks": lambda: b.reshape(b.op("ReduceMax", values, b.ints([2], "axes"),
                                                   keepdims=0), [1, channels * mels]),
                   "rhythm": lambda: _rhythm_stats(b, values, shape)}
    else:
        vectors = {"cells": lambda: b.reshape(values, [1, channels * mels * frames])}
    members = sorted({key.split(".", 1)[0] for key in saved.tensors if "." in key},
                     key=lambda m: (m.startswith("gmm"), m))
    built: dict[str, str] = {}
    z_scores = []
    for member in members:
        kind, vector = member.split("_", 1)
        if vector not in vectors:
            raise ExportError(f"clip-ensemble member {member!r} has no ONNX recipe",
                              saved.folder)
        if vector not in built:
            built[vector] = vectors[vector]()
        rows = built[vector]
        z_scores.append(_gaussian_z(b, rows, saved, f"{member}.mean", f"{member}.precision",
                                    saved.tensor(f"{member}.z")) if kind == "gauss"
                        else _mixture_z(b, rows, saved, member))
    stacked = b.op("Concat", *z_scores, axis=0)
    return b.op("Cast", b.op("ReduceMax", stacked, b.ints([0], "axes"), keepdims=1), to=1)


def _spectrum_stats(b: GraphBuilder, spec: str, shape: tuple[int, int, int]) -> str:
    """Per-mel mean and standard deviation over time, ``(1, 2·C·M)`` float64."""
    channels, mels, _ = shape
    values = b.op("Cast", spec, to=11)
    mean = b.mean(values, [2], keepdims=1)
    std = b.op("Sqrt", b.mean(b.square(b.op("Sub", values, mean)), [2], keepdims=1))
    return b.op("Concat", b.reshape(mean, [1, channels * mels]),
                b.reshape(std, [1, channels * mels]), axis=1)


def _transient_stats(b: GraphBuilder, spec: str, shape: tuple[int, int, int]) -> str:
    """Per-mel median over time and upper quantiles minus the median, ``(1, 4·C·M)``."""
    channels, mels, frames = shape
    median, *upper = add_quantiles(b, spec, 2, frames, (0.5, *CLIP_STATS_TRANSIENT_QUANTILES))
    parts = [median] + [b.op("Sub", q, median) for q in upper]
    return b.op("Concat", *[b.reshape(p, [1, channels * mels]) for p in parts], axis=1)


def _rhythm_stats(b: GraphBuilder, spec: str, shape: tuple[int, int, int]) -> str:
    """Autocorrelation of the loudness envelope, normalised and pooled, ``(1, L)``."""
    _, _, frames = shape
    lags = max(min(CLIP_STATS_RHYTHM_MAX_LAG, frames - 1) // CLIP_STATS_RHYTHM_POOL, 1)
    used = lags * CLIP_STATS_RHYTHM_POOL
    envelope = b.mean(b.op("Cast", spec, to=11), [0, 1])  # (F,)
    lower_median = (frames - 1) // 2  # torch.median gives the lower of the middle two
    median = add_order_statistics(b, envelope, 0, frames, {lower_median})[lower_median]
    # float32 from here: onnxruntime's Conv, the cheap way to correlate, has no float64
    centred = b.reshape(b.op("Cast", b.op("Sub", envelope, median), to=1), [1, 1, frames])
    padded = b.op("Pad", centred, b.ints([0, 0, 0, 0, 0, used], "pads"))  # zeros past the end
    auto = b.op("Cast", b.reshape(b.op("Conv", padded, centred, kernel_shape=[frames]),
                                  [used + 1]), to=11)  # lags 0..used
    zero_lag = b.op("Max", b.gather(auto, np.array([0]), 0),
                    b.const(np.float64(1e-12), "floor", np.float64))
    normalised = b.op("Div", b.gather(auto, np.arange(1, used + 1), 0), zero_lag)
    pooled = b.mean(b.reshape(normalised, [lags, CLIP_STATS_RHYTHM_POOL]), [1])
    return b.reshape(pooled, [1, lags])


FRAME_RECIPES: dict[str, Recipe] = {
    "dcase-ae": recipe_dcase_ae,
    "idnn": recipe_idnn,
    "frame-knn": recipe_frame_knn,
    "seed-conv-ae": recipe_seed_conv_ae,
}
CLIP_RECIPES: dict[str, Recipe] = {
    "clip-ensemble": recipe_clip_ensemble,
    "clip-stats": recipe_clip_stats,
    "clip-stats-rhythm": recipe_clip_stats,
}


def export_support() -> dict[str, str | None]:
    """Every registered anomaly model and why it cannot be exported (None: it can)."""
    from stethoscope.models import registry

    known = FRAME_RECIPES | CLIP_RECIPES
    return {name: None if name in known else
            "no ONNX recipe yet: its scoring path is not written as ONNX ops in "
            "stethoscope.export" for name in registry.names()}


# ----------------------------------------------------------------------------- export


def build_onnx(saved: SavedModel):
    """The ONNX model of ``saved``'s scoring path (an ``onnx.ModelProto``)."""
    import onnx

    name = saved.name
    if name not in FRAME_RECIPES and name not in CLIP_RECIPES:
        reason = export_support().get(name) or "not a registered anomaly model"
        raise ExportError(f"model {name!r} cannot be exported to ONNX: {reason}", saved.folder)
    features = saved.config["features"]
    channels, mels, frames = (int(s) for s in saved.config["input_shape"])
    samples = model_window_samples(features, frames)
    b = GraphBuilder()
    averaged = features.get("channels", 0) == "mean"  # log-mels of every channel, averaged
    wave = onnx.helper.make_tensor_value_info(
        "waveform", onnx.TensorProto.FLOAT, ["channels" if averaged else channels, samples])
    spec, count = add_logmel(b, "waveform", samples, features)
    if averaged:
        spec = b.mean(spec, [0], keepdims=1)
    crop = features.get("frames")
    if crop is not None and count > crop:
        spec = b.op("Slice", spec, b.ints([0], "start"), b.ints([crop], "end"),
                    b.ints([2], "axis"))
        count = crop
    if count != frames and (crop is not None or name in FRAME_RECIPES):
        raise ExportError(f"a window of {samples} samples gives {count} frames but the model "
                          f"takes {frames}", saved.folder)
    shape = (channels, mels, count)
    if name in CLIP_RECIPES:
        score = CLIP_RECIPES[name](b, spec, saved, shape)
    else:
        error_map = FRAME_RECIPES[name](b, spec, saved, shape)
        map_frames = count - (0 if name == "seed-conv-ae" else
                              _context(saved) - 1)
        score = add_frame_pooling(b, error_map, map_frames, saved.config.get("pooling", "mean"))
    threshold = float(saved.config["threshold"]["value_"])
    b.nodes.append(onnx.helper.make_node("Identity", [score], ["score"]))
    b.nodes.append(onnx.helper.make_node(
        "Greater", ["score", b.const(np.float32(threshold), "threshold")], ["anomalous"]))
    outputs = [onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1]),
               onnx.helper.make_tensor_value_info("anomalous", onnx.TensorProto.BOOL, [1])]
    model = b.model([wave], outputs, {META_KEY: json.dumps(_metadata(saved, samples))})
    onnx.checker.check_model(model, full_check=True)
    return model


def _context(saved: SavedModel) -> int:
    params = saved.params
    return int(params.get("frames", 5) if saved.name == "dcase-ae" else params.get("context", 5))


def _metadata(saved: SavedModel, samples: int) -> dict:
    from stethoscope import __version__

    features = saved.config["features"]
    return {
        "model": saved.name,
        "stethoscope_version": __version__,
        "sample_rate": int(features["sample_rate"]),
        "window_samples": int(samples),
        "window_hop_samples": _hop_samples(features, samples),
        "channels": features.get("channels", 0),
        "input_channels": None if features.get("channels", 0) == "mean" else int(
            saved.config["input_shape"][0]),
        "threshold": float(saved.config["threshold"]["value_"]),
        "pooling": saved.config.get("pooling"),
        "window_pooling": saved.config.get("window_pooling") or "max",
        "features": features,
    }


def _hop_samples(features: dict, samples: int) -> int:
    hop_s = features.get("window_hop_s")
    return max(1, round(hop_s * int(features["sample_rate"]))) if hop_s else samples


def export_onnx(model_folder: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the ONNX file of a saved model's scoring path to ``out`` (atomically: a crash
    never leaves a half-written file). An existing ``out`` is replaced only with ``force``
    and only when it is an ONNX file this exporter wrote. Returns ``out``.

    Raises
    ------
    ExportError
        when the model cannot be exported (the message says why) or ``out`` exists.
    """
    _check_replaceable(Path(out), force)
    saved = read_model_folder(model_folder)
    try:
        model = build_onnx(saved)
    except KeyError as err:
        raise ExportError(f"config.json lacks {err} needed for the export", model_folder) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    if not os.path.lexists(out):
        return
    if out.is_dir():
        raise ExportError("is a folder; give a file name for the ONNX file", out)
    if not _written_by_us(out):
        raise ExportError("exists and is not an ONNX file written by `stethoscope export`; "
                          "refusing to replace it", out)
    if not force:
        raise ExportError("already exists; pass --force to replace this ONNX file", out)


def _written_by_us(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not protobuf, truncated, unreadable: not ours
        return False
    return any(prop.key == META_KEY for prop in model.metadata_props)


def check_export(model_folder: str | Path, onnx_file: str | Path, seed: int = 0
                 ) -> tuple[float, float]:
    """Score one seeded-noise window with the PyTorch detector and with onnxruntime;
    returns ``(pytorch score, onnxruntime score)``."""
    from stethoscope.detector import Detector
    from stethoscope.edge import EdgeScorer

    det = Detector.load(model_folder, device="cpu", progress=False)
    scorer = EdgeScorer(onnx_file)
    rng = np.random.default_rng(seed)
    wave = (0.05 * rng.standard_normal((scorer.input_channels or 2, scorer.window_samples))
            ).astype(np.float32)
    reference = det.score_waveform(wave, scorer.sample_rate).score
    return float(reference), float(scorer.score_window(wave)[0])
