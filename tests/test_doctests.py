"""The examples in the public API's docstrings run, offline (on simulated recordings)."""

from __future__ import annotations

import doctest
import importlib

import pytest

PUBLIC = ["stethoscope.detector", "stethoscope.features", "stethoscope.compute",
          "stethoscope.progress", "stethoscope.audio", "stethoscope.scoring",
          "stethoscope.models.clip_ensemble"]


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
