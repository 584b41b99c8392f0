"""Model families; importing this package registers every built-in model by name."""

from stethoscope.models.registry import ModelInfo, build, info, names, register

__all__ = ["ModelInfo", "build", "info", "names", "register"]
