"""The TF-Keras side of ``train_throughput.py``: a worker run by the TensorFlow virtualenv.

It reads one JSON request per line on stdin and answers one JSON line on stdout, so the
benchmark can alternate PyTorch and Keras rounds without paying TensorFlow's start-up each
time. Requests: ``hello``; ``build`` (a layer list translated from the PyTorch model, the
loss, optimizer, batch size and ``.npy`` data paths); ``train`` / ``predict`` (one timed
pass over the data, answers ``{"seconds": …}``); ``free``; ``quit``. Errors answer
``{"error": "…"}``. Runs only in ``benchmarks/.venv-tf`` (TensorFlow + Keras 3, no torch).

Usage by hand: ``echo '{"cmd": "hello"}' | benchmarks/.venv-tf/bin/python benchmarks/_keras_side.py``
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

_STDOUT = sys.stdout
sys.stdout = sys.stderr  # TensorFlow's chatter must not mix with the JSON answers

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

MODELS: dict[str, dict] = {}


def set_threads() -> None:
    """Use the thread count the benchmark asks for (``KERAS_SIDE_THREADS``), as torch does."""
    threads = int(os.environ.get("KERAS_SIDE_THREADS", "0"))
    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | float) else tuple(map(int, value))


def keras_layers(spec: dict) -> list:
    """The Keras layers for one translated PyTorch layer (NCHW shapes become NHWC)."""
    kind = spec["type"]
    L = keras.layers
    if kind in ("conv2d", "conv2d_transpose"):
        layers = []
        padding = spec["padding"]
        if kind == "conv2d" and isinstance(padding, list):
            layers.append(L.ZeroPadding2D(padding=tuple(map(tuple, padding))))
            padding = "valid"
        common = dict(filters=spec["filters"], kernel_size=pair(spec["kernel"]),
                      strides=pair(spec["strides"]), padding=padding,
                      use_bias=spec.get("bias", True))
        if kind == "conv2d":
            layers.append(L.Conv2D(dilation_rate=pair(spec.get("dilation", 1)),
                                   groups=spec.get("groups", 1), **common))
        else:
            out_pad = spec.get("output_padding")
            layers.append(L.Conv2DTranspose(output_padding=None if not any(out_pad or [0])
                                            else pair(out_pad), **common))
            if spec.get("crop") and any(sum(spec["crop"], [])):
                layers.append(L.Cropping2D(cropping=tuple(map(tuple, spec["crop"]))))
        return layers
    if kind in ("maxpool2d", "avgpool2d"):
        cls = L.MaxPooling2D if kind == "maxpool2d" else L.AveragePooling2D
        layers = []
        if spec.get("zero_pad") and any(sum(spec["zero_pad"], [])):
            layers.append(L.ZeroPadding2D(padding=tuple(map(tuple, spec["zero_pad"]))))
        layers.append(cls(pool_size=pair(spec["pool"]), strides=pair(spec["strides"]),
                          padding="valid"))
        return layers
    if kind == "upsample2d":
        return [L.UpSampling2D(size=pair(spec["size"]), interpolation=spec["interpolation"])]
    if kind == "activation":
        if spec["name"] == "leaky_relu":
            return [L.LeakyReLU(negative_slope=spec.get("alpha", 0.01))]
        return [L.Activation(spec["name"])]
    if kind == "batchnorm":
        return [L.BatchNormalization(momentum=1 - spec.get("momentum", 0.1),
                                     epsilon=spec.get("epsilon", 1e-5))]
    if kind == "dropout":
        return [L.Dropout(spec["rate"])]
    if kind == "spatial_dropout2d":
        return [L.SpatialDropout2D(spec["rate"])]
    if kind == "flatten":
        return [L.Flatten()]
    if kind == "reshape":
        shape = spec["shape"]
        return [L.Reshape((*shape[1:], shape[0]) if len(shape) == 3 else tuple(shape))]
    if kind == "dense":
        return [L.Dense(spec["units"], use_bias=spec.get("bias", True))]
    if kind == "zero_pad2d":
        return [L.ZeroPadding2D(padding=tuple(map(tuple, spec["padding"])))]
    if kind == "crop2d":
        return [L.Cropping2D(cropping=tuple(map(tuple, spec["cropping"])))]
    if kind == "elementwise":  # a parameter-free, shape-keeping step such as standardisation
        return [L.Rescaling(1.0)]
    raise ValueError(f"no Keras layer for {kind!r}")


def to_keras_layout(array: np.ndarray) -> np.ndarray:
    """(N, C, H, W) → (N, H, W, C); other ranks unchanged."""
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if array.ndim == 4 else array


def build(request: dict) -> dict:
    x = to_keras_layout(np.load(request["x"]).astype(np.float32))
    y = to_keras_layout(np.load(request["y"])) if request.get("y") else x
    model = keras.Sequential([keras.Input(shape=x.shape[1:])])
    for spec in request["layers"]:
        for layer in keras_layers(spec):
            model.add(layer)
    loss = {"mse": "mse", "bce": "binary_crossentropy",
            "ce_logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}[
        request["loss"]]
    optimizer = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[
        request["optimizer"]](learning_rate=request["lr"])
    model.compile(optimizer=optimizer, loss=loss)
    MODELS[request["name"]] = {"model": model, "x": x, "y": y,
                               "batch_size": int(request["batch_size"])}
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {"params": int(model.count_params()), "trainable_params": trainable,
            "output_shape": list(model.output_shape[1:])}


def train(request: dict) -> dict:
    entry = MODELS[request["name"]]
    start, cpu = time.perf_counter(), time.process_time()
    entry["model"].fit(entry["x"], entry["y"], batch_size=entry["batch_size"], epochs=1,
                       shuffle=True, verbose=0)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "samples": int(len(entry["x"]))}


def predict(request: dict) -> dict:
    entry = MODELS[request["name"]]
    batch_size = int(request.get("batch_size") or entry["batch_size"])
    start = time.perf_counter()
    entry["model"].predict(entry["x"], batch_size=batch_size, verbose=0)
    return {"seconds": time.perf_counter() - start, "samples": int(len(entry["x"]))}


def hello(_: dict) -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": sys.version.split()[0],
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


def free(request: dict) -> dict:
    MODELS.pop(request["name"], None)
    keras.backend.clear_session()
    return {"ok": True}


HANDLERS = {"hello": hello, "build": build, "train": train, "predict": predict, "free": free}


def answer(payload: dict) -> None:
    _STDOUT.write(json.dumps(payload) + "\n")
    _STDOUT.flush()


def main() -> None:
    set_threads()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            answer({"ok": True})
            return
        try:
            answer(HANDLERS[request["cmd"]](request))
        except Exception as error:  # report, keep serving: one bad model must not end the run
            traceback.print_exc(file=sys.stderr)
            answer({"error": f"{type(error).__name__}: {error}".splitlines()[0]})


if __name__ == "__main__":
    main()
