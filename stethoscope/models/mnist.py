"""The course lab's MNIST networks: a CNN (with the two dropout placements studied in the
lab), a dense autoencoder and a convolutional autoencoder.

Each is an ``nn.Sequential`` so printing it reads as the Keras ``Sequential`` it mirrors.
Inputs are images ``(B, 1, 28, 28)`` in [0, 1]. The CNN outputs logits (softmax lives in
the cross-entropy loss, which is what Keras' softmax + categorical cross-entropy computes);
the autoencoders end in a sigmoid and are trained with binary cross-entropy and Adam, as
the course notebook did. Registered with ``kind="lab"`` so the anomaly tools ignore them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from stethoscope.models.layers import Dropout
from stethoscope.models.registry import register

IMAGE_SHAPE = (1, 28, 28)
DROPOUT_RATE = 0.3
DROPOUT_PLACEMENTS = ("none", "input", "hidden")

# The notebook's training settings (Keras defaults: RMSprop/Adam with lr 0.001).
CNN_TRAINING = {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 1000, "epochs": 200}
DENSE_AE_TRAINING = {"optimizer": "adam", "lr": 1e-3, "batch_size": 250, "epochs": 150}
CONV_AE_TRAINING = {"optimizer": "adam", "lr": 1e-3, "batch_size": 250, "epochs": 200}


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> None:
    if tuple(input_shape) != IMAGE_SHAPE:
        raise ValueError(f"{name} takes MNIST images of shape {IMAGE_SHAPE}, "
                         f"not {tuple(input_shape)}")


class MnistCNN(nn.Sequential):
    """Conv 256 → pool → Conv 128 → pool → Dense 100 → Dense 100 → Dense 10 (logits).

    ``dropout``: ``"none"``; ``"input"``: 30 % dropout between the input and the first
    hidden layer; ``"hidden"``: 30 % dropout after every hidden layer except the last one
    before the softmax.
    """

    def __init__(self, dropout: str = "none", rate: float = DROPOUT_RATE) -> None:
        if dropout not in DROPOUT_PLACEMENTS:
            raise ValueError(f"dropout must be one of {DROPOUT_PLACEMENTS}, not {dropout!r}")
        hidden = dropout == "hidden"
        # In-place ReLUs: batches of 1000 make 256-channel activations ~0.7 GB a copy.
        layers: list[tuple[str, nn.Module]] = []
        if dropout == "input":
            layers.append(("input_dropout", Dropout(rate)))
        layers += [
            ("conv1", nn.Conv2d(1, 256, 3)),  # 'valid': 28 → 26
            ("relu1", nn.ReLU(inplace=True)),
            ("pool1", nn.MaxPool2d(2)),  # 26 → 13
            *([("dropout1", Dropout(rate))] if hidden else []),
            ("conv2", nn.Conv2d(256, 128, 3)),  # 13 → 11
            ("relu2", nn.ReLU(inplace=True)),
            ("pool2", nn.MaxPool2d(2)),  # 11 → 5
            *([("dropout2", Dropout(rate))] if hidden else []),
            ("flatten", nn.Flatten()),
            ("dense1", nn.Linear(5 * 5 * 128, 100)),
            ("relu3", nn.ReLU(inplace=True)),
            *([("dropout3", Dropout(rate))] if hidden else []),
            ("dense2", nn.Linear(100, 100)),
            ("relu4", nn.ReLU(inplace=True)),
            ("logits", nn.Linear(100, 10)),  # softmax is inside the cross-entropy loss
        ]
        super().__init__(OrderedDict(layers))
        self.hparams = {"dropout": dropout, "rate": rate}


class MnistAutoencoder(nn.Sequential):
    """``encoder`` then ``decoder``: both usable apart, ``forward = decoder(encoder(x))``."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential, hparams: dict) -> None:
        super().__init__(OrderedDict([("encoder", encoder), ("decoder", decoder)]))
        self.hparams = dict(hparams)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one image's code (no batch axis)."""
        with torch.no_grad():
            return tuple(self.encoder(torch.zeros(1, *IMAGE_SHAPE)).shape[1:])


def dense_autoencoder(code_size: int = 100) -> MnistAutoencoder:
    """784-400-200-100-200-400-784, ReLU inside, sigmoid output."""
    encoder = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("dense1", nn.Linear(784, 400)), ("relu1", nn.ReLU()),
        ("dense2", nn.Linear(400, 200)), ("relu2", nn.ReLU()),
        ("code", nn.Linear(200, code_size)), ("relu3", nn.ReLU()),
    ]))
    decoder = nn.Sequential(OrderedDict([
        ("dense4", nn.Linear(code_size, 200)), ("relu4", nn.ReLU()),
        ("dense5", nn.Linear(200, 400)), ("relu5", nn.ReLU()),
        ("dense6", nn.Linear(400, 784)), ("sigmoid", nn.Sigmoid()),
        ("unflatten", nn.Unflatten(1, IMAGE_SHAPE)),
    ]))
    return MnistAutoencoder(encoder, decoder, {"code_size": code_size})


def conv_autoencoder() -> MnistAutoencoder:
    """Conv 16, pool, Conv 8, pool (7×7×8 code), Conv 8, up, Conv 16, up, Conv 1 (sigmoid)."""
    encoder = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding="same")), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),  # 28 → 14
        ("conv2", nn.Conv2d(16, 8, 3, padding="same")), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),  # 14 → 7: code (8, 7, 7)
    ]))
    decoder = nn.Sequential(OrderedDict([
        ("conv3", nn.Conv2d(8, 8, 3, padding="same")), ("relu3", nn.ReLU()),
        ("up1", nn.Upsample(scale_factor=2, mode="nearest")),  # Keras UpSampling2D
        ("conv4", nn.Conv2d(8, 16, 3, padding="same")), ("relu4", nn.ReLU()),
        ("up2", nn.Upsample(scale_factor=2, mode="nearest")),
        ("conv5", nn.Conv2d(16, 1, 3, padding="same")), ("sigmoid", nn.Sigmoid()),
    ]))
    return MnistAutoencoder(encoder, decoder, {})


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits = Keras' softmax + categorical cross-entropy."""
    return F.cross_entropy(logits, labels.long())


def reconstruction_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per pixel, averaged (Keras' ``binary_crossentropy``)."""
    return F.binary_cross_entropy(images.float(), targets.float())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose largest logit is the true digit."""
    return float((logits.argmax(dim=1) == labels.to(logits.device).long()).float().mean())


@register("mnist-cnn", kind="lab", training=CNN_TRAINING,
          description="Course lab CNN on MNIST (628,810 parameters); dropout none/input/hidden")
def build_mnist_cnn(input_shape: tuple[int, ...] = IMAGE_SHAPE, dropout: str = "none",
                    rate: float = DROPOUT_RATE) -> MnistCNN:
    _check_image_shape("mnist-cnn", input_shape)
    return MnistCNN(dropout=dropout, rate=rate)


@register("mnist-dense-ae", kind="lab", training=DENSE_AE_TRAINING,
          description="Course lab dense autoencoder 784-400-200-100-200-400-784 (829,284 "
                      "parameters)")
def build_mnist_dense_ae(input_shape: tuple[int, ...] = IMAGE_SHAPE,
                         code_size: int = 100) -> MnistAutoencoder:
    _check_image_shape("mnist-dense-ae", input_shape)
    return dense_autoencoder(code_size)


@register("mnist-conv-ae", kind="lab", training=CONV_AE_TRAINING,
          description="Course lab convolutional autoencoder, 7×7×8 code (3,217 parameters)")
def build_mnist_conv_ae(input_shape: tuple[int, ...] = IMAGE_SHAPE) -> MnistAutoencoder:
    _check_image_shape("mnist-conv-ae", input_shape)
    return conv_autoencoder()
