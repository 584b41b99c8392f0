"""Training and inference throughput (samples/s) of every model stethoscope ships, against
the same architecture, batch size and random data in TF-Keras.

The stethoscope side runs the package's own code: ``training.fit`` for training and
``training.predict`` for inference, in four variants (plain fp32 eager; channels_last;
channels_last + bf16 autocast; ``torch.compile`` on top of the latter). The Keras side runs
``benchmarks/_keras_side.py`` inside its own virtualenv ``benchmarks/.venv-tf`` (created on
first use with ``tensorflow-cpu``; Keras 3 is not a dependency of stethoscope); it rebuilds
each model layer for layer from the PyTorch modules, so a model added to the registry later
is benchmarked too. One round runs every side once in turn; the figure is the median round.

    python benchmarks/train_throughput.py                 # all models, all variants
    python benchmarks/train_throughput.py --quick         # a smoke run: tiny and no compile
    python benchmarks/train_throughput.py --models mnist-cnn,seed-conv-ae --repeats 7
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_arguments,
    alternate,
    ensure_repo_on_path,
    fmt_rate,
    fmt_ratio,
    logger,
    machine_line,
    markdown_table,
    median,
    publish,
    shown_command,
    usable_cores,
)

ensure_repo_on_path()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from stethoscope import training  # noqa: E402
from stethoscope.models import layers, registry  # noqa: E402

SECTION = "train_throughput"
VENV = REPO / "benchmarks" / ".venv-tf"
KERAS_SIDE = REPO / "benchmarks" / "_keras_side.py"
TF_REQUIREMENT = "tensorflow-cpu>=2.16"  # 2.16 is the first with Keras 3
CLIP_SECONDS, SAMPLE_RATE = 10.0, 16_000

# The batch sizes the issue compares at (the course notebook's and the DCASE baseline's).
BATCH_SIZES = {"seed-conv-ae": 50, "mnist-cnn": 1000, "mnist-dense-ae": 250,
               "mnist-conv-ae": 250, "dcase-ae": 256}
TARGETS = {"seed-conv-ae": 2.0, "mnist-cnn": 2.0}  # minimum best-variant ÷ Keras ratio
# minimum ÷ Keras ratio of what `stethoscope train` runs with no options (issue 16)
DEFAULT_TARGETS = {"seed-conv-ae": 2.0}


@dataclass(frozen=True)
class Variant:
    """One way of running the stethoscope side."""

    name: str
    channels_last: bool
    precision: str
    compile: bool = False


VARIANTS = {
    "eager": Variant("fp32 eager", channels_last=False, precision="fp32"),
    "cl": Variant("channels_last", channels_last=True, precision="fp32"),
    "cl-bf16": Variant("channels_last + bf16", channels_last=True, precision="bf16"),
    "compiled": Variant("compiled (cl + bf16)", channels_last=True, precision="bf16",
                        compile=True),
}


@dataclass
class Case:
    """One model prepared for both sides: shapes, loss, optimizer and random data."""

    name: str
    batch_size: int
    example_shape: tuple[int, ...]
    unit: str
    loss: str  # "mse", "bce" or "ce_logits"
    optimizer: str
    lr: float
    x: np.ndarray
    y: np.ndarray | None


# ----------------------------------------------------------------------------- Keras side


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def tf_importable(python: Path) -> bool:
    check = "import tensorflow, keras; assert int(keras.__version__.split('.')[0]) >= 3"
    return python.exists() and subprocess.run(
        [str(python), "-c", check], capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).returncode == 0


def ensure_tf_venv(log, venv: Path = VENV) -> tuple[Path | None, str]:
    """The TensorFlow virtualenv's python, creating it on first use; or None and the reason."""
    python = venv_python(venv)
    if tf_importable(python):
        return python, ""
    print(f"Creating {venv.relative_to(REPO)} with {TF_REQUIREMENT} for the Keras column "
          "(one-off; a download of several hundred MB)…", file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", TF_REQUIREMENT]]
    for step in steps:
        if step[0] == sys.executable and python.exists():
            continue
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"could not create the TensorFlow virtualenv ({' '.join(step[:4])}: " \
                         f"{tail[0]})"
    if not tf_importable(python):
        return None, "TensorFlow with Keras 3 does not import in benchmarks/.venv-tf"
    log(f"{venv} ready")
    return python, ""


class KerasWorker:
    """The Keras side as a long-lived subprocess answering one JSON line per request."""

    def __init__(self, python: Path, threads: int) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": str(threads),
               "TF_NUM_INTEROP_THREADS": "1", "KERAS_SIDE_THREADS": str(threads),
               "PYTHONPATH": ""}
        self.proc = subprocess.Popen([str(python), str(KERAS_SIDE)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)

    def ask(self, cmd: str, **payload) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Keras worker exited (code {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        try:
            self.ask("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- translation


class Untranslatable(Exception):
    """A PyTorch layer with no Keras equivalent in this benchmark."""


def leaf_calls(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, tuple, tuple]]:
    """Every leaf module the forward pass runs, in order, with its input and output shapes."""
    calls: list[tuple[nn.Module, tuple, tuple]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out: calls.append((mod, tuple(inp[0].shape), tuple(out.shape))))
        for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), layers.unfused():  # every layer's hook fires
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _two(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | float) else tuple(map(int, value))


ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ELU: "elu",
               nn.GELU: "gelu", nn.SiLU: "silu", nn.Softmax: "softmax"}


def layer_spec(module: nn.Module, in_shape: tuple, out_shape: tuple) -> dict | None:
    """The Keras-side description of one PyTorch leaf layer (None: nothing to run)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise Untranslatable(f"Conv2d padding_mode {module.padding_mode}")
        kernel, stride, dilation = (_two(v) for v in
                                    (module.kernel_size, module.stride, module.dilation))
        if isinstance(module.padding, str):
            padding = module.padding
        elif not any(module.padding):
            padding = "valid"
        elif stride == (1, 1) and all(p == d * (k - 1) // 2 and k % 2 for p, k, d in
                                       zip(module.padding, kernel, dilation, strict=True)):
            padding = "same"
        else:
            ph, pw = _two(module.padding)
            padding = [[ph, ph], [pw, pw]]
        return {"type": "conv2d", "filters": module.out_channels, "kernel": kernel,
                "strides": stride, "padding": padding, "dilation": dilation,
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.ConvTranspose2d):
        ph, pw = _two(module.padding)
        return {"type": "conv2d_transpose", "filters": module.out_channels,
                "kernel": _two(module.kernel_size), "strides": _two(module.stride),
                "padding": "valid", "output_padding": _two(module.output_padding),
                "crop": [[ph, ph], [pw, pw]], "bias": module.bias is not None}
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        kernel, stride = _two(module.kernel_size), _two(module.stride or module.kernel_size)
        pad = _two(module.padding)
        extra = [max(0, (o - 1) * s + k - (i + 2 * p)) for o, i, s, k, p in
                 zip(out_shape[2:], in_shape[2:], stride, kernel, pad, strict=True)]
        return {"type": "maxpool2d" if isinstance(module, nn.MaxPool2d) else "avgpool2d",
                "pool": kernel, "strides": stride,
                "zero_pad": [[pad[0], pad[0] + extra[0]], [pad[1], pad[1] + extra[1]]]}
    if isinstance(module, nn.Upsample):
        size = [o // i for o, i in zip(out_shape[2:], in_shape[2:], strict=True)]
        mode = {"nearest": "nearest", "bilinear": "bilinear"}.get(module.mode)
        if mode is None:
            raise Untranslatable(f"Upsample mode {module.mode}")
        return {"type": "upsample2d", "size": size, "interpolation": mode}
    for cls, name in ACTIVATIONS.items():
        if isinstance(module, cls):
            return {"type": "activation", "name": name}
    if isinstance(module, nn.LeakyReLU):
        return {"type": "activation", "name": "leaky_relu", "alpha": module.negative_slope}
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return {"type": "batchnorm", "momentum": module.momentum or 0.1, "epsilon": module.eps}
    if isinstance(module, nn.Dropout2d):
        return {"type": "spatial_dropout2d", "rate": module.p}
    if isinstance(module, nn.Dropout):
        return {"type": "dropout", "rate": module.p}
    if isinstance(module, nn.Flatten):
        return {"type": "flatten"}
    if isinstance(module, nn.Unflatten):
        return {"type": "reshape", "shape": list(out_shape[1:])}
    if isinstance(module, nn.Linear):
        return {"type": "dense", "units": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.ZeroPad2d | nn.ConstantPad2d):
        left, right, top, bottom = module.padding
        return {"type": "zero_pad2d", "padding": [[top, bottom], [left, right]]}
    if isinstance(module, nn.Identity):
        return None
    return shape_only_spec(module, in_shape, out_shape)


def shape_only_spec(module: nn.Module, in_shape: tuple, out_shape: tuple) -> dict:
    """A weightless custom layer (standardisation, crop, pad) as its cheapest Keras stand-in."""
    if any(True for _ in module.parameters()):
        raise Untranslatable(f"custom layer {type(module).__name__} has weights")
    if in_shape == out_shape:
        return {"type": "elementwise"}
    if len(in_shape) == 4 and in_shape[:2] == out_shape[:2]:
        dh, dw = out_shape[2] - in_shape[2], out_shape[3] - in_shape[3]
        if dh <= 0 and dw <= 0:
            return {"type": "crop2d", "cropping": [[0, -dh], [0, -dw]]}
        if dh >= 0 and dw >= 0:
            return {"type": "zero_pad2d", "padding": [[0, dh], [0, dw]]}
    raise Untranslatable(f"custom layer {type(module).__name__} {in_shape} → {out_shape}")


def keras_layers_for(model: nn.Module, example_shape: tuple[int, ...]) -> list[dict]:
    """The whole model as a Keras layer list, or :class:`Untranslatable`."""
    calls = leaf_calls(model, torch.zeros(2, *example_shape))
    previous = (2, *example_shape)
    specs = []
    for module, in_shape, out_shape in calls:
        if in_shape != previous:
            raise Untranslatable(f"{type(module).__name__} does not take the previous layer's "
                                 "output (not a plain chain of layers)")
        spec = layer_spec(module, in_shape, out_shape)
        if spec is not None:
            specs.append(spec)
        previous = out_shape
    return specs


# ----------------------------------------------------------------------------- cases


def input_shape_for(name: str, info: registry.ModelInfo) -> tuple[int, ...]:
    """One example's input shape: the lab builders' default, or the registry's features."""
    default = inspect.signature(info.builder).parameters.get("input_shape")
    if default is not None and default.default is not inspect.Parameter.empty:
        return tuple(default.default)
    return spectrogram_shape(info.features)


def spectrogram_shape(features: dict) -> tuple[int, int, int]:
    """(channels, mels, frames) of a 10 s 16 kHz clip under the registry's feature overrides."""
    try:
        from stethoscope.features import FeatureConfig

        config = FeatureConfig(**features)
        n_mels, hop = config.n_mels, config.hop_length
        frames = getattr(config, "frames", None)
    except ImportError:
        n_mels, hop = features.get("n_mels", 64), features.get("hop_length", 512)
        frames = features.get("frames")
    frames = frames or 1 + int(CLIP_SECONDS * SAMPLE_RATE) // hop  # torch.stft, center=True
    return (1, int(n_mels), int(frames))


def make_case(name: str, steps: int, rng: np.random.Generator) -> tuple[Case, nn.Module]:
    """Build model ``name`` and ``steps`` batches of random data shaped for it.

    Spectrogram models train on what their ``make_examples`` gives (whole spectrograms,
    stacked frames, or outer frames → centre frame) with MSE; the lab classifier on random
    labels with cross-entropy; the lab autoencoders on [0, 1) images with binary
    cross-entropy, as the notebook trained them.
    """
    info = registry.info(name)
    shape = input_shape_for(name, info)
    model = registry.build(name, shape)
    batch = BATCH_SIZES.get(name, int(info.training.get("example_batch_size")
                                      or info.training.get("batch_size", 64)))
    optimizer, lr = info.training.get("optimizer", "adam"), float(info.training.get("lr", 1e-3))
    n = steps * batch
    if hasattr(model, "make_examples"):
        with torch.no_grad():
            inputs, targets = model.make_examples(torch.zeros(1, *shape))
        unit = "spectrograms" if inputs.shape[0] == 1 else f"{inputs.shape[1]}-value windows"
        in_shape, target_shape = tuple(inputs.shape[1:]), tuple(targets.shape[1:])
        x = rng.standard_normal((n, *in_shape), dtype=np.float32)
        y = None if target_shape == in_shape else rng.standard_normal(
            (n, *target_shape), dtype=np.float32)
        return Case(name, batch, in_shape, unit, "mse", optimizer, lr, x, y), model
    with torch.no_grad():
        out_shape = tuple(model.eval()(torch.zeros(2, *shape)).shape[1:])
    x = rng.random((n, *shape), dtype=np.float32)
    if out_shape != shape:  # a classifier: logits
        y = rng.integers(0, out_shape[0], n).astype(np.int64)
        return Case(name, batch, shape, "images", "ce_logits", optimizer, lr, x, y), model
    loss = "bce" if _ends_in_sigmoid(model) else "mse"
    return Case(name, batch, shape, "images", loss, optimizer, lr, x, None), model


def _ends_in_sigmoid(model: nn.Module) -> bool:
    leaves = [m for m in model.modules() if not list(m.children())
              and not isinstance(m, nn.Unflatten | nn.Flatten | nn.Identity)]
    return bool(leaves) and isinstance(leaves[-1], nn.Sigmoid)


def torch_loss(kind: str):
    functional = nn.functional
    return {"mse": functional.mse_loss,
            "bce": lambda out, y: functional.binary_cross_entropy(out.float(), y.float()),
            "ce_logits": lambda out, y: functional.cross_entropy(out.float(), y.long())}[kind]


# ----------------------------------------------------------------------------- sides


def torch_model_for(name: str, variant: Variant, template: nn.Module) -> nn.Module:
    """A fresh copy of the model (same weights) for one variant, compiled if asked."""
    info = registry.info(name)
    model = registry.build(name, input_shape_for(name, info))
    model.load_state_dict(template.state_dict())
    return torch.compile(model) if variant.compile else model


def train_side(case: Case, model: nn.Module, variant: Variant):
    """One ``training.fit`` epoch over the case's data; returns the seconds it took."""
    data = (torch.from_numpy(case.x),) if case.y is None else (
        torch.from_numpy(case.x), torch.from_numpy(case.y))
    config = training.TrainConfig(
        epochs=1, batch_size=case.batch_size, optimizer=case.optimizer, lr=case.lr,
        patience=None, restore_best=False, progress=False, device="cpu",
        precision=variant.precision, channels_last=variant.channels_last)
    loss = torch_loss(case.loss)

    def run() -> float:
        start = time.perf_counter()
        training.fit(model, data, config=config, loss_fn=loss)
        return time.perf_counter() - start

    return run


def predict_side(case: Case, model: nn.Module, variant: Variant):
    """One ``training.predict`` pass over the case's inputs; returns the seconds it took."""
    x = torch.from_numpy(case.x)

    def run() -> float:
        start = time.perf_counter()
        for _ in training.predict(model, x, batch_size=case.batch_size, device="cpu",
                                  precision=variant.precision,
                                  channels_last=variant.channels_last):
            pass
        return time.perf_counter() - start

    return run


def keras_side(worker: KerasWorker, name: str, cmd: str):
    return lambda: float(worker.ask(cmd, name=name)["seconds"])


def calibrate_steps(name: str, seconds: float, rng: np.random.Generator, log) -> int:
    """Batches per round so that one eager fp32 round takes about ``seconds``."""
    case, model = make_case(name, 2, rng)
    run = train_side(case, model, VARIANTS["eager"])
    run()  # first call pays allocation and kernel selection
    per_step = min(run(), run()) / 2
    steps = int(min(50, max(2, round(seconds / per_step))))
    log(f"{name}: {per_step * 1000:.0f} ms per eager step of {case.batch_size} → "
        f"{steps} steps a round")
    return steps


@dataclass
class ModelResult:
    name: str
    batch_size: int
    unit: str
    train: dict[str, float]  # side → samples/s (median)
    infer: dict[str, float]
    compile_seconds: float | None = None
    notes: list[str] = field(default_factory=list)


def bench_model(name: str, variants: list[str], worker: KerasWorker | None, args,
                log) -> ModelResult:
    rng = np.random.default_rng(0)
    steps = calibrate_steps(name, args.seconds, rng, log)
    case, template = make_case(name, steps, rng)
    notes: list[str] = []
    train_sides, infer_sides = {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="stethoscope-bench-")
    try:
        if worker is not None:
            try:
                layers = keras_layers_for(template, case.example_shape)
                x_path, y_path = Path(tmp.name) / "x.npy", Path(tmp.name) / "y.npy"
                np.save(x_path, case.x)
                if case.y is not None:
                    np.save(y_path, case.y)
                built = worker.ask("build", name=name, layers=layers, loss=case.loss,
                                   optimizer=case.optimizer, lr=case.lr,
                                   batch_size=case.batch_size, x=str(x_path),
                                   y=str(y_path) if case.y is not None else None)
                torch_params = sum(p.numel() for p in template.parameters())
                log(f"{name}: Keras model built, {built['trainable_params']:,} trainable "
                    f"parameters (PyTorch {torch_params:,})")
                if built["trainable_params"] != torch_params:
                    notes.append(f"{name}: the Keras copy has {built['trainable_params']:,} "
                                 f"trainable parameters, PyTorch {torch_params:,}")
                worker.ask("train", name=name)  # compiles the Keras step; fails early if broken
                worker.ask("predict", name=name)
                train_sides["keras"] = keras_side(worker, name, "train")
                infer_sides["keras"] = keras_side(worker, name, "predict")
            except (Untranslatable, RuntimeError) as error:
                notes.append(f"{name}: no Keras column ({error})")
                log(notes[-1])
        models = {v: torch_model_for(name, VARIANTS[v], template) for v in variants}
        compile_seconds = None
        if "compiled" in models:
            start = time.perf_counter()
            train_side(case, models["compiled"], VARIANTS["compiled"])()
            compile_seconds = time.perf_counter() - start
            log(f"{name}: torch.compile warm-up (train) {compile_seconds:.1f} s")
        for v in variants:
            train_sides[v] = train_side(case, models[v], VARIANTS[v])
            infer_sides[v] = predict_side(case, models[v], VARIANTS[v])
        samples = len(case.x)
        log(f"{name}: training, {samples} samples a round")
        train = alternate(train_sides, args.repeats, args.warmup, log)
        log(f"{name}: inference")
        infer = alternate(infer_sides, args.repeats, args.warmup, log)
        if worker is not None and "keras" in train_sides:
            worker.ask("free", name=name)
    finally:
        tmp.cleanup()
    return ModelResult(
        name, case.batch_size, case.unit,
        {side: samples / median(times) for side, times in train.items()},
        {side: samples / median(times) for side, times in infer.items()},
        compile_seconds, notes)


# ----------------------------------------------------------------------------- report


def default_variant(name: str) -> str | None:
    """The uncompiled variant with the memory format and precision ``stethoscope train``
    runs model ``name`` with when given no options (the Detector's own training settings,
    its precision resolved on this CPU: ``"auto"`` is bf16 where the CPU has native bf16),
    or None when no variant matches."""
    from stethoscope.compute import resolve_precision
    from stethoscope.detector import Detector

    config = Detector(model=name)._train_config(registry.info(name))
    precision = "fp32" if resolve_precision(config.precision, torch.device("cpu")) is None \
        else "bf16"
    return next((key for key, v in VARIANTS.items() if not v.compile and
                 (v.channels_last, v.precision) == (config.channels_last, precision)), None)


def table(results: list[ModelResult], variants: list[str], phase: str) -> str:
    headers = ["model", "batch", "samples are", "TF-Keras"] + [VARIANTS[v].name
                                                                for v in variants]
    headers += ["best ÷ Keras", "by default ÷ Keras"]
    if phase == "train":
        headers += ["target (best)", "target (by default)"]
    rows = []
    for r in results:
        rates = r.train if phase == "train" else r.infer
        keras = rates.get("keras")
        row = [r.name, r.batch_size, r.unit, fmt_rate(keras)]
        for v in variants:
            ratio = f" ({fmt_ratio(rates[v] / keras)})" if keras else ""
            row.append(fmt_rate(rates[v]) + ratio)
        best = max(rates[v] for v in variants)
        default = default_variant(r.name)
        row.append(fmt_ratio(best / keras) if keras else "n/a")
        row.append(f"{fmt_ratio(rates[default] / keras)} ({VARIANTS[default].name})"
                   if keras and default in rates else "n/a")
        if phase == "train":
            row.append(verdict(TARGETS.get(r.name), best, keras))
            row.append(verdict(DEFAULT_TARGETS.get(r.name), rates.get(default), keras))
        rows.append(row)
    return markdown_table(headers, rows)


def verdict(target: float | None, rate: float | None, keras: float | None) -> str:
    """``≥ 2× ✓`` / ``≥ 2× ✗`` for a rate against Keras's, or "" with no target or no rate."""
    if target is None or not keras or rate is None:
        return ""
    return f"≥ {target:g}× {'✓' if rate / keras >= target else '✗'}"


def report(results: list[ModelResult], variants: list[str], keras_versions: dict,
           general_notes: list[str], args) -> str:
    compile_line = ""
    compiled = [r for r in results if r.compile_seconds is not None]
    if compiled:
        compile_line = ("\n`torch.compile` start-up (first training epoch, compile included): " +
                        ", ".join(f"{r.name} {r.compile_seconds:.0f} s" for r in compiled) +
                        ". It pays when a training run saves more than that.\n")
    notes = general_notes + [n for r in results for n in r.notes]
    keras_desc = (f"TF-Keras (`tensorflow-cpu` {keras_versions.get('tensorflow')}, Keras "
                  f"{keras_versions.get('keras')}, default `model.fit`/`model.predict`, "
                  "`jit_compile='auto'`)" if keras_versions else "TF-Keras (not measured)")
    lines = [
        "## Training and inference throughput",
        "",
        machine_line({"tensorflow": keras_versions.get("tensorflow"),
                      "keras": keras_versions.get("keras")}),
        "",
        f"Samples per second on random data, stethoscope (`training.fit` / `training.predict`, "
        f"{args.threads} thread{'s' if args.threads != 1 else ''}) against the same "
        f"architecture, batch size, loss and optimizer in {keras_desc} with as many threads. Each cell is the median of {args.repeats} rounds after "
        f"{args.warmup} warm-up round(s), every side run once per round in turn; the ratio in "
        "brackets is against Keras in the same run. 'By default' is the variant "
        "`stethoscope train` runs with no options (the Detector's memory format and the "
        "model's registered precision, `auto` resolving to bf16 on a CPU with native bf16), "
        "named in each cell.",
        "",
        "### Training (samples/s)",
        "",
        table(results, variants, "train"),
        "",
        "### Inference (samples/s)",
        "",
        table(results, variants, "infer"),
        compile_line,
    ]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes]
    command = shown_command("train_throughput.py", args.argv)
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines)


def chosen_models(selected: str | None) -> list[str]:
    """The models to benchmark: the ones asked for, else every registered model."""
    available = registry.names(kind=None)
    if not selected:
        return available
    wanted = [n.strip() for n in selected.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(available)}")
    return wanted


def untrainable_reason(name: str) -> str | None:
    """Why model ``name`` has no training throughput (no weights to train), or None."""
    info = registry.info(name)
    model = registry.build(name, input_shape_for(name, info))
    if not isinstance(model, nn.Module) or not any(p.requires_grad
                                                   for p in model.parameters()):
        return f"{name}: not benchmarked (no trainable weights)"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated registry names (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"stethoscope variants to run, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="aim for rounds of about this many seconds (default 2)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="intra-op threads for both sides (default: all usable cores)")
    parser.add_argument("--no-keras", action="store_true", help="skip the TF-Keras column")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds of ~0.3 s, no torch.compile")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.repeats, args.seconds = min(args.repeats, 2), min(args.seconds, 0.3)
        if args.variants == ",".join(VARIANTS):
            args.variants = "eager,cl,cl-bf16"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = logger(args.quiet)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    names = chosen_models(args.models)

    worker, keras_versions, keras_note = None, {}, ""
    if args.no_keras:
        keras_note = "TF-Keras column skipped (--no-keras)."
    else:
        python, reason = ensure_tf_venv(log)
        if python is None:
            keras_note = f"TF-Keras column skipped: {reason}."
            print(keras_note, file=sys.stderr)
        else:
            worker = KerasWorker(python, args.threads)
            keras_versions = worker.ask("hello")
            log(f"Keras side: TensorFlow {keras_versions['tensorflow']}, "
                f"Keras {keras_versions['keras']}")
    results, skipped = [], []
    try:
        for name in names:
            reason = untrainable_reason(name)
            if reason is None:
                try:
                    results.append(bench_model(name, variants, worker, args, log))
                    continue
                except Exception as error:  # one broken model must not lose the others' rows
                    reason = f"{name}: failed ({type(error).__name__}: {error})".splitlines()[0]
            skipped.append(reason)
            log(reason)
    finally:
        if worker is not None:
            worker.close()
    notes = [keras_note, *skipped] if keras_note else skipped
    text = report(results, variants, keras_versions, notes, args)
    publish(SECTION, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
