"""Debian's headless Chromium, driven by Selenium, for the live view's tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "artifacts"


@contextmanager
def chrome() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1500,1000",
    ):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver, so Selenium Manager never looks for one on the network.
    d = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield d
    finally:
        d.quit()
