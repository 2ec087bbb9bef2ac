"""The Dagster UI in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages) opens a sync's asset page served by `dagster dev` and must show
the metadata the sync recorded. The screenshot is kept under $KLAVIYO_PIPELINES_ARTIFACTS
(default `test-artifacts/`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.dagster_dev import artifacts_dir

if TYPE_CHECKING:
    from klaviyo_pipelines_tests.ui_deployment import Deployment

# The `deployment` fixture, one `dagster dev` shared with test_ui_e2e.py.
pytest_plugins = ["klaviyo_pipelines_tests.ui_deployment"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SYNC = ["klaviyo", "customers_to_klaviyo"]
PAGE_TIMEOUT = 60  # seconds for the page to load and render on a busy machine
MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
WHY = f"{', '.join(MISSING)} not installed (apt-get install chromium chromium-driver)"
if MISSING and os.environ.get("CI") != "true":  # before `dagster dev` is started for nothing
    pytest.skip(WHY, allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium, tall enough that the asset page's metadata table fits unscrolled.

    Skipped, saying why, where Debian's Chromium is not installed; in CI it must be."""
    if MISSING:
        pytest.fail(f"{WHY}; CI must run the browser test")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)  # --no-sandbox: Chromium refuses to run as root without
    options.add_argument("--window-size=1600,2600")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shown_value(page: WebDriver, label: str) -> str | None:
    """The value cell of the metadata table's row for `label`, once the page rendered it."""
    cells = page.find_elements(By.XPATH, f"//tr[td[1][normalize-space()='{label}']]/td[last()]")
    return cells[0].text.strip() if cells else None


def test_the_asset_page_shows_the_metadata_the_sync_recorded(
    browser: WebDriver, deployment: Deployment
) -> None:
    deployment.profile_sync_run()
    (latest,) = deployment.materializations(SYNC)[:1]
    recorded = latest["metadata"]
    # On a loopback address the UI first opens a "join the community" dialog over the page,
    # until the instance records it as seen.
    assert deployment.dev.graphql("mutation { setNuxSeen }")["setNuxSeen"]

    browser.get(f"{deployment.dev.url}/assets/{'/'.join(SYNC)}")
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda page: shown_value(page, "klaviyo/delivered"))
    screenshot = artifacts_dir() / "asset-page-customers_to_klaviyo.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"screenshot of the asset page: {screenshot}")

    for label in (
        "klaviyo/status",
        "klaviyo/delivered",
        "klaviyo/rejected",
        "klaviyo/planned_added",
        "klaviyo/requests",
    ):
        assert shown_value(browser, label) == str(recorded[label]), label
    assert recorded["klaviyo/delivered"] > 0 and recorded["klaviyo/rejected"] > 0
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "'not-an-email' is not a valid email address" in page  # the failures table
    assert TEST_API_KEY not in browser.page_source
