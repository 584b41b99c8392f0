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


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def headless_chromium(profile: Path, window: str):
    """Debian's Chromium through Selenium 4, headless, with a fresh profile and no
    background networking (the machine has none); skips clearly when it is not installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("headless Chromium is not installed (/usr/bin/chromium, "
                    "/usr/bin/chromedriver: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", f"--user-data-dir={profile}", f"--window-size={window}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(30)
    return driver


def simulated_machine(folder: Path, machine: str, normal: int, abnormal: int, seed: int) -> Path:
    """A simulated machine's clips in the MIMII layout (``normal/``, ``abnormal/``)."""
    from stethoscope.simulate import simulate_dataset

    return Path(simulate_dataset(machine, normal, abnormal, folder, seed=seed, progress=False))


def default_model(sim: Path, out: Path, clips: int = 12) -> Path:
    """The default detector trained on the first ``clips`` normal clips of ``sim``, saved
    to ``out``."""
    from stethoscope import Detector

    Detector(progress=False).fit(sorted((sim / "normal").glob("*.wav"))[:clips]).save(out)
    return out
