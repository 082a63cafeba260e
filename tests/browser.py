"""Headless Chromium for page tests: Debian's `chromium` and `chromium-driver`, driven
with selenium (browser downloads from elsewhere are not reachable here).

`missing()` says why the browser cannot run (the tests skip with it, or fail under CI);
`chromium()` opens one browser (root needs --no-sandbox) and always quits it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator

BINARY = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


def missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra has it)"
    for path, package in ((BINARY, "chromium"), (DRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return f"Debian's {package} is not installed (.ci/run installs it)"
    return None


@contextmanager
def chromium(width: int = 412, height: int = 900) -> Iterator[object]:
    """A phone-sized window by default: the pages must be readable there."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BINARY
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_visible(driver: object, element_id: str, timeout: float = 15.0) -> object:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((By.ID, element_id)))


def wait_text(driver: object, element_id: str, text: str, timeout: float = 15.0) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(EC.text_to_be_present_in_element((By.ID, element_id), text))


def local_sign_in(driver: object, url: str, name: str, *, account_key: bool, invite: str | None = None) -> None:
    """Open a `sleap-rtc login` link, sign in as `name` with the keyboard, finish."""
    from selenium.webdriver.common.keys import Keys

    driver.get(url)  # type: ignore[attr-defined]
    field = wait_visible(driver, "name")
    field.send_keys(name)  # type: ignore[attr-defined]
    if invite is not None:
        driver.find_element("id", "invite").send_keys(invite)  # type: ignore[attr-defined]
    field.send_keys(Keys.ENTER)  # type: ignore[attr-defined]
    finish(driver, account_key=account_key)


def finish(driver: object, *, account_key: bool) -> None:
    """With the keyboard only: the page puts focus on its first control (the account-key
    box); Space ticks it, Tab moves to the button, Enter presses it."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait_visible(driver, "finish-button")
    focused = WebDriverWait(driver, 15).until(
        lambda d: d.switch_to.active_element if d.switch_to.active_element.get_attribute("id") == "want-key"
        else False)
    if account_key:
        focused.send_keys(Keys.SPACE)
    focused.send_keys(Keys.TAB)
    button = driver.switch_to.active_element  # type: ignore[attr-defined]
    assert button.get_attribute("id") == "finish-button"
    button.send_keys(Keys.ENTER)
    wait_visible(driver, "done")
