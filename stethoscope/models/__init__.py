"""Model families; importing this package registers every built-in model by name."""

from stethoscope.models import dcase_ae, mnist, seed_conv_ae  # noqa: F401  (registers the models)
from stethoscope.models.registry import ModelInfo, build, info, names, register

__all__ = ["ModelInfo", "build", "info", "names", "register"]
