"""One real-browser smoke test: headless Chromium loads the app, uploads an image, clicks Stylize, sees the result.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium; skips with the reason
otherwise. The screenshot goes to the test's temporary folder; with ``STD_UPDATE_SCREENSHOT=1`` it also replaces
``docs/gradio_app.png`` (the README's picture).
"""

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="headless browser test: needs /usr/bin/chromium and /usr/bin/chromedriver "
                                       "(apt-get install chromium chromium-driver; .ci/run installs them)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    import gradio_app
    from std_app.handlers import StyleApp
    from std_app.startup import load_engine, tiny_options

    app = StyleApp(load_engine(tiny_options("sd15", tmp_path / "models")), tmp_path / "outputs")
    demo = gradio_app.build_demo(app)
    port = free_port()
    gradio_app.launch(demo, app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in BROWSER_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1400, 1500)
    yield driver
    driver.quit()


def content_image(path: Path) -> Path:
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, 255 - xx - yy], -1).clip(0, 255).astype(np.uint8)
    rgb[30:66, 40:88] = (240, 200, 40)
    Image.fromarray(rgb).save(path)
    return path


def test_upload_stylize_and_see_the_result(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image-content input[type=file]"))
    upload.send_keys(str(content_image(tmp_path / "content.png")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-content img"))
    browser.find_element(By.CSS_SELECTOR, "#image-run").click()
    result = WebDriverWait(browser, 180).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-result img"))
    assert "std-image-" in result[0].get_attribute("src")
    wait.until(lambda d: "start timestep" in d.find_element(By.CSS_SELECTOR, "#image-info").text)
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "gradio_app.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("STD_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "gradio_app.png")
