"""The reports in a real browser: headless Chromium (Debian's, through Selenium 4) opens the
demo, evaluate and lab reports written to relative and absolute folders, and again after
the folder was moved, and every ``<img>`` must have loaded (``naturalWidth > 0``).
Full-page screenshots are kept under ``.artifacts/reports/`` (git-ignored) to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import default_model, headless_chromium, simulated_machine

ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts" / "reports"



@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("profile"), "1100,1000")
    yield driver
    driver.quit()


def open_page(driver, page: Path, shot: str) -> list[dict]:
    """Load ``page`` from disk, keep a full-page screenshot, return its images' state."""
    driver.get(page.resolve().as_uri())
    driver.execute_script("return Promise.all(Array.from(document.images).map(i => "
                          "i.decode().catch(() => null)))")  # every image settled
    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
        "complete: i.complete, width: i.naturalWidth}))")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1100, min(max(height + 120, 600), 16000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{shot}.png"))
    driver.set_window_size(1100, 1000)
    return images


def assert_all_loaded(images: list[dict], expected: int) -> None:
    assert len(images) >= expected, images
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulated_machine(tmp_path_factory.mktemp("sim"), "fan", 14, 8, seed=5)


@pytest.fixture(scope="module")
def model(sim, tmp_path_factory) -> Path:
    return default_model(sim, tmp_path_factory.mktemp("model") / "model")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_evaluate_report_renders_every_figure(browser, tmp_path, sim, model, where,
                                              monkeypatch):
    from stethoscope.cli import main

    monkeypatch.chdir(tmp_path)
    folder = Path("report") if where == "relative" else tmp_path / "report"
    assert main(["evaluate", str(model), str(sim), "--report", str(folder)]) == 0
    assert_all_loaded(open_page(browser, tmp_path / "report" / "index.html",
                                f"evaluate-{where}"), expected=5)
    moved = Path(shutil.move(tmp_path / "report", tmp_path / "moved" / "elsewhere"))
    assert_all_loaded(open_page(browser, moved / "index.html", f"evaluate-{where}-moved"),
                      expected=5)


def test_demo_report_renders_every_figure(browser, tmp_path, monkeypatch):
    from stethoscope.demo import run_demo

    monkeypatch.chdir(tmp_path)
    page = run_demo(Path("stethoscope-demo"), machine="valve", n_train=16, n_test_normal=8,
                    n_abnormal=8)
    assert not page.is_absolute()  # the README's `stethoscope demo`: a relative folder
    assert_all_loaded(open_page(browser, tmp_path / page, "demo"), expected=5)
    title = browser.execute_script("return document.querySelector('h1').textContent")
    assert "simulated valve" in title


def test_lab_report_renders_every_figure(browser, tmp_path, monkeypatch):
    from stethoscope.lab import run_lab

    rng = np.random.default_rng(0)
    arrays = (rng.random((60, 28, 28)).astype(np.float32), rng.integers(0, 10, 60),
              rng.random((12, 28, 28)).astype(np.float32), rng.integers(0, 10, 12))
    monkeypatch.chdir(tmp_path)
    page = run_lab("dense-ae", data=arrays, out=Path("lab-runs"), epochs=2, progress=False)
    assert_all_loaded(open_page(browser, tmp_path / page, "lab"), expected=2)
