"""Names → model builders, with each model's default features and training settings.

A new model registers itself with :func:`register`; the detector, the CLI and the
benchmarks find it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name."""

    name: str
    builder: Callable[..., Any]
    description: str
    features: dict = field(default_factory=dict)  # FeatureConfig overrides
    training: dict = field(default_factory=dict)  # TrainConfig overrides
    scoring: dict = field(default_factory=dict)  # e.g. {"pooling": "mean"}
    kind: str = "anomaly"  # "anomaly" (spectrogram models) or "lab" (MNIST networks)
    per_machine: dict = field(default_factory=dict)  # machine type → hparam defaults


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, *, description: str, features: dict | None = None,
             training: dict | None = None, scoring: dict | None = None,
             kind: str = "anomaly", per_machine: dict | None = None):
    """Decorator: register ``builder(input_shape, **hparams) -> model`` under ``name``.

    ``per_machine`` maps a machine type (as the MIMII/DCASE folders name it) to hparams the
    detector uses when every training clip comes from that machine type."""

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, description, dict(features or {}),
                                    dict(training or {}), dict(scoring or {}), kind,
                                    dict(per_machine or {}))
        return builder

    return decorate


def _ensure_loaded() -> None:
    # Importing the package registers every built-in model.
    import stethoscope.models  # noqa: F401


def info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}choose one of: {', '.join(names())}")
    return _REGISTRY[name]


def names(kind: str | None = "anomaly") -> list[str]:
    """Registered names, of one kind (default the anomaly models) or all when kind is None."""
    _ensure_loaded()
    return sorted(n for n, i in _REGISTRY.items() if kind is None or i.kind == kind)


def build(name: str, input_shape: tuple[int, ...], **hparams) -> Any:
    """Build model ``name`` for inputs of ``input_shape`` (one example, no batch axis)."""
    return info(name).builder(tuple(input_shape), **hparams)
