"""Debian's headless Chromium through Selenium, for the browser tests of the Gradio app and of ComfyUI's frontend."""

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
MISSING = ("headless browser test: needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium "
           "chromium-driver; .ci/run installs them)")


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def chrome(window: tuple[int, int], console_logs: bool = False):
    """A headless Chromium of ``window`` size (with the browser console's log when ``console_logs``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in BROWSER_ARGS:
        options.add_argument(arg)
    if console_logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(*window)
    return driver
