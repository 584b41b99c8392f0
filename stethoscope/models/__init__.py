"""Model families; importing this package registers every built-in model by name."""

from stethoscope.models import (  # noqa: F401  (registers the models)
    clip_ensemble,
    clip_stats,
    dcase_ae,
    frame_knn,
    idnn,
    mnist,
    seed_conv_ae,
)
from stethoscope.models.registry import ModelInfo, build, info, names, register

__all__ = ["ModelInfo", "build", "info", "names", "register"]
