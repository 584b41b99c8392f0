"""Shared test fixtures: where the real data lives, and skips with a clear reason without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STETHOSCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test saying which folder is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture
def dcase_valve() -> Path:
    return shared_path("dcase2023_valve")


@pytest.fixture
def mimii_8ch() -> Path:
    return shared_path("mimii_8ch")


@pytest.fixture
def wav_formats() -> Path:
    return shared_path("wav_formats")


@pytest.fixture
def mnist_npz() -> Path:
    return shared_path("mnist", "mnist.npz")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    """Keep tests off each other's cores and quiet: no progress bars in test output."""
    monkeypatch.setenv("STETHOSCOPE_PROGRESS", "0")
