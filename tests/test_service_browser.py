"""The dashboard in headless Chromium (Debian's, through Selenium 4): log in, see the fleet,
post a recording through the API and watch it appear on the machine page without a
reload, see the alert, acknowledge it. Screenshots are kept under .artifacts/service/."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import (  # noqa: F401 - fixtures
    MACHINES,
    LiveServer,
    fleet,
    make_tokens,
    service_clips,
    service_models,
    settings_for,
)

from stethoscope.service import create_app
from tests.conftest import headless_chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts" / "service"
V1, V2 = MACHINES
LIVE_WITHIN_S = 2.0


By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By


@pytest.fixture
def browser(tmp_path):
    driver = headless_chromium(tmp_path / "profile", "1280,1500")
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 10.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s: {predicate.__doc__ or predicate}")


def shoot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


def text_of(driver, css: str) -> str | None:
    """Text of the first element matching ``css``, read in one step in the page (the panel
    may be swapped between a find and a read)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() "
        ": null;", css)


def images_loaded(driver) -> bool:
    return driver.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0);")


def test_dashboard_live_in_chromium(browser, tmp_path, service_models, fleet, service_clips):
    app = create_app(settings_for(tmp_path, service_models, keep_audio_days=1), fleet=fleet)
    tokens = make_tokens(app)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=20) as api:
        def post(machine: str, body: bytes, source: str) -> dict:
            reply = api.post(f"/v1/machines/{machine}/recordings", content=body,
                             params={"source": source},
                             headers={"Authorization": f"Bearer {tokens['score']}",
                                      "Content-Type": "audio/wav"})
            assert reply.status_code == 201, reply.text
            return reply.json()

        for i in range(4):
            post(V1, service_clips.normal_bytes(i), f"mic-{i}.wav")
        post(V2, service_clips.normal_bytes(5), "mic-5.wav")

        # log in: the fleet page sends us to the login form first
        browser.get(server.url + "/")
        assert "/login" in browser.current_url
        browser.find_element(By.ID, "token").send_keys(tokens["admin"])
        browser.find_element(By.ID, "login").click()
        rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.machine"))
        assert [r.get_attribute("data-machine") for r in rows] == [V1, V2]
        assert {r.find_element(By.CSS_SELECTOR, ".status").text for r in rows} == {"normal"}
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.spark polyline")) == 2
        shoot(browser, tmp_path, "01-fleet")

        # the machine page, live: a posted recording appears without a reload
        browser.find_element(By.LINK_TEXT, V1).click()
        wait_for(lambda: "on" in browser.find_element(By.ID, "live").get_attribute("class"))
        browser.execute_script("window.__sameDocument = 42;")
        before = len(browser.find_elements(By.CSS_SELECTOR, "tr.recording"))
        posted = post(V1, service_clips.normal_bytes(6), "live-normal.wav")
        start = time.monotonic()
        wait_for(lambda: browser.find_elements(
            By.CSS_SELECTOR, f'tr.recording[data-recording="{posted["recording_id"]}"]'),
            timeout=LIVE_WITHIN_S)
        assert time.monotonic() - start <= LIVE_WITHIN_S
        assert browser.execute_script("return window.__sameDocument;") == 42  # no reload
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr.recording")) == before + 1
        wait_for(lambda: images_loaded(browser), timeout=20)
        shoot(browser, tmp_path, "02-machine-live")

        # an anomalous recording: the alert and the status appear live
        bad = post(V1, service_clips.anomalous_bytes(0), "live-whistle.wav")
        assert bad["anomalous"] and bad["alert_id"]
        row = f'tr.alert.open[data-alert="{bad["alert_id"]}"]'
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, row), timeout=LIVE_WITHIN_S)
        assert text_of(browser, "#status") == "anomalous"
        assert browser.find_elements(By.CSS_SELECTOR, "circle.point.bad")
        assert browser.find_elements(By.CSS_SELECTOR, "g.alert-marker")
        assert browser.execute_script("return window.__sameDocument;") == 42
        wait_for(lambda: images_loaded(browser), timeout=20)
        shoot(browser, tmp_path, "03-alert")

        # acknowledge it from the page
        browser.find_element(By.CSS_SELECTOR, f'button[data-ack="{bad["alert_id"]}"]').click()
        acked = f'tr.alert.acked[data-alert="{bad["alert_id"]}"]'
        wait_for(lambda: text_of(browser, f"{acked} td.state") == "acknowledged by test admin")
        stored = api.get("/v1/alerts?state=acked", headers={
            "Authorization": f"Bearer {tokens['read']}"}).json()["items"]
        assert [a["alert_id"] for a in stored] == [bad["alert_id"]]
        post(V1, service_clips.normal_bytes(7), "live-normal-2.wav")
        wait_for(lambda: text_of(browser, "#status") == "normal", timeout=LIVE_WITHIN_S)
        wait_for(lambda: images_loaded(browser), timeout=20)
        shoot(browser, tmp_path, "04-acknowledged")

        # back on the fleet page, which also follows live
        browser.find_element(By.LINK_TEXT, "fleet").click()
        wait_for(lambda: "on" in browser.find_element(By.ID, "live").get_attribute("class"))
        post(V2, service_clips.anomalous_bytes(1), "fleet-whistle.wav")
        wait_for(lambda: text_of(browser, f'tr.machine[data-machine="{V2}"] .status')
                 == "anomalous", timeout=LIVE_WITHIN_S)
        shoot(browser, tmp_path, "05-fleet-live")
