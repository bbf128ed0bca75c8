"""The dashboard in a real browser: Debian's headless Chromium, driven by selenium,
against the real server (uvicorn) -- load, sign in, read, act, check, screenshot.

Chromium and chromedriver come from Debian (``make system-deps``); a machine without
them fails this test with that instruction rather than skipping it. The screenshot is
written under the test's temporary directory, and to ``bench/results/dashboard.png``
(the one the README shows) only when ``DIFFCAST_UPDATE_SCREENSHOT=1``: a test run
leaves the checkout as it found it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from server.models import ReportRow
from tests.integration.live import ADMIN_TOKEN, ENROLL_SECRET, LiveServer, live_server
from tests.lineage import Lineage, make_lineage

COMMITTED_SCREENSHOT = Path(__file__).resolve().parents[2] / "bench" / "results" / "dashboard.png"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
    "--window-size=1440,1000",
    "--lang=en-US",
)
WAIT = 20


def browser_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            "Chromium is missing (need `chromium` and `chromedriver` on PATH): run "
            "`make system-deps`, or `apt-get install -y chromium chromium-driver`",
            pytrace=False,
        )
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver_path = browser_paths()
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def seed_fleet(server: LiveServer, lineage: Lineage) -> tuple[int, int]:
    """Four versions, a completed and an active release, eight devices with reports, and a
    day of report history. Returns the active release's id and the read-only token."""
    with server.client() as api:
        assert api.post("/v1/models", json={"name": "asr"}).status_code == 201
        r = api.post("/v1/models/asr/versions", content=lineage.files[0].read_bytes())
        assert r.status_code == 201, r.text
        for number, diff in enumerate(lineage.diffs, 1):
            r = api.post("/v1/models/asr/versions", params={"parent": number - 1}, content=diff)
            assert r.status_code == 201, r.text
        old = api.post(
            "/v1/releases",
            json={"model": "asr", "version": 2, "name": "winter names", "activate": True},
        ).json()
        assert api.post(f"/v1/releases/{old['id']}/complete").status_code == 200
        release = api.post(
            "/v1/releases",
            json={
                "model": "asr",
                "version": 3,
                "name": "spring place names",
                "percent": 50,
                "selector": {"tags": {"region": ["eu", "uk"]}},
                "activate": True,
            },
        )
        assert release.status_code == 201, release.text
        devices = {
            "kitchen-eu-01": ("eu", "updated", 3, None),
            "kitchen-eu-02": ("eu", "updated", 3, None),
            "car-uk-07": ("uk", "updated", 3, None),
            "watch-eu-11": ("eu", "failed", 2, "digest_mismatch"),
            "speaker-eu-03": ("eu", "failed", 2, "download_failed"),
            "speaker-us-04": ("us", "current", 2, None),
            "car-us-09": ("us", "updated", 2, None),
            "hub-us-12": ("us", None, None, None),
        }
        for device_id, (region, outcome, version, reason) in devices.items():
            enrolled = api.post(
                "/v1/devices/enroll",
                json={
                    "enrollment_secret": ENROLL_SECRET,
                    "device_id": device_id,
                    "tags": {"region": region},
                },
            )
            assert enrolled.status_code == 201, enrolled.text
            if outcome is None or version is None:
                continue
            source = version - 1 if outcome == "updated" else version
            applied = outcome in ("updated", "current")
            body = {
                "model": "asr",
                "outcome": outcome,
                "reason": reason,
                "from_version": source,
                "from_digest": lineage.digests[source],
                "to_version": version if applied else 3,
                "to_digest": lineage.digests[version] if applied else None,
                "bytes_downloaded": len(lineage.diffs[source]) if outcome == "updated" else 0,
            }
            credential = {"Authorization": f"Bearer {enrolled.json()['credential']}"}
            r = api.post(f"/v1/devices/{device_id}/reports", json=body, headers=credential)
            assert r.status_code == 202, r.text
        reader = api.post("/v1/tokens", json={"name": "viewer", "scopes": ["read"]}).json()
    add_history(server, lineage)
    return int(release.json()["id"]), reader["token"]


def add_history(server: LiveServer, lineage: Lineage) -> None:
    """Reports from the past day, written straight to the server's database (the API
    stamps reports with the time they arrive)."""
    engine = create_engine(f"sqlite:///{server.data_dir / 'diffcast.db'}")
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for hour in range(1, 20):
            for n in range((hour * 7) % 5 + 1):
                failed = (hour + n) % 6 == 0
                session.add(
                    ReportRow(
                        device_id="kitchen-eu-01",
                        outcome="failed" if failed else "updated",
                        reason=("download_failed", "digest_mismatch")[hour % 2] if failed else None,
                        model_name="asr",
                        from_version=2,
                        to_version=3,
                        bytes_downloaded=0 if failed else len(lineage.diffs[2]),
                        detail={},
                        created_at=now - timedelta(hours=hour, minutes=7 * n),
                    )
                )
    engine.dispose()


def wait_for_state(driver: WebDriver, release_id: int, state: str) -> None:
    row = f'tr[data-release-id="{release_id}"]'

    def reached(d: WebDriver) -> bool:
        return d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == state

    WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(reached)


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page, not just the window: the viewport is made as tall as the page."""
    driver.execute_script("document.documentElement.style.overflow = 'hidden'")
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": 1440, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    if os.environ.get("DIFFCAST_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, COMMITTED_SCREENSHOT)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})  # type: ignore[attr-defined]
    driver.execute_script("document.documentElement.style.overflow = ''")


def sign_in(driver: WebDriver, token: str) -> None:
    field = WebDriverWait(driver, WAIT).until(
        ec.visibility_of_element_located((By.ID, "token-input"))
    )
    field.send_keys(token)
    driver.find_element(By.ID, "token-submit").click()
    WebDriverWait(driver, WAIT).until(ec.visibility_of_element_located((By.ID, "board")))


def test_dashboard_in_chromium(tmp_path: Path, browser: WebDriver) -> None:
    (tmp_path / "lineage").mkdir()
    lineage = make_lineage(tmp_path / "lineage", 4, rows=256)
    with live_server(tmp_path / "server") as server:
        release_id, read_token = seed_fleet(server, lineage)
        browser.get(f"{server.url}/dashboard")
        assert browser.title == "Diffcast · Fleet dashboard"
        sign_in(browser, ADMIN_TOKEN)
        wait = WebDriverWait(browser, WAIT)
        wait.until(ec.text_to_be_present_in_element((By.ID, "whoami"), "bootstrap"))

        # the fleet's version distribution and the release with its buttons
        wait.until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, '[data-model="asr"] [data-version="v3"]')
            )
        )
        versions = browser.find_element(By.ID, "versions").text
        assert "v3" in versions and "3 devices" in versions and "v2" in versions
        wait_for_state(browser, release_id, "active")
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-release-id="{release_id}"]')
        assert "spring place names" in row.text and "region=eu|uk" in row.text
        assert browser.find_element(By.ID, "stat-devices").text == "8"
        assert "digest_mismatch" in browser.find_element(By.ID, "chart-reasons").text

        # act: pause from the page, then check through the API
        browser.find_element(
            By.CSS_SELECTOR, f'button[data-action="pause"][data-release="{release_id}"]'
        ).click()
        wait_for_state(browser, release_id, "paused")
        with server.client() as api:
            assert api.get(f"/v1/releases/{release_id}").json()["state"] == "paused"
            audit = api.get("/v1/audit", params={"limit": 1}).json()[0]
            assert (audit["action"], audit["actor"].split("#")[0]) == ("release.pause", "bootstrap")
        assert "now paused" in browser.find_element(By.ID, "notice").text
        assert browser.find_elements(
            By.CSS_SELECTOR, f'button[data-action="resume"][data-release="{release_id}"]'
        )

        screenshot(browser, tmp_path / "dashboard.png")

        # device search narrows the table
        browser.find_element(By.ID, "device-search").send_keys("region=us")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == 3)

        # a read-only token sees the same page without the buttons
        browser.find_element(By.ID, "sign-out").click()
        sign_in(browser, read_token)
        wait_for_state(browser, release_id, "paused")
        assert not browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
        assert "actions hidden" in browser.find_element(By.ID, "releases-note").text

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # the page's own requests were all answered
        assert httpx.get(f"{server.url}/readyz").status_code == 200
