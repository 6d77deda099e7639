"""The app in a real browser: headless Chromium (Selenium) on the tiny app, checked by DOM assertions and screenshots.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium; skips with the reason
otherwise (a failure under ``STD_NO_SKIP=1``). Screenshots go to the test's temporary folder; with
``STD_UPDATE_SCREENSHOT=1`` the last one also replaces ``docs/gradio_app.png`` (the README's picture).
"""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import browser
from app_server import serve

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1400, 1460)

pytestmark = pytest.mark.skipif(not browser.available(), reason=browser.MISSING)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from std_app.handlers import StyleApp
    from std_app.startup import load_engine, tiny_options

    root = tmp_path_factory.mktemp("browser")
    app = StyleApp(load_engine(tiny_options("sd15", root / "models")), root / "outputs")
    with serve(app) as (base, _):
        yield base


@pytest.fixture(scope="module")
def driver():
    d = browser.chrome(WINDOW)
    yield d
    d.quit()


@pytest.fixture
def page(server, driver):
    """A fresh load of the app (a new browser session for Gradio)."""
    driver.get(server)
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-run"))
    return driver


def wait(driver, seconds=60):
    return WebDriverWait(driver, seconds)


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def screenshot(driver, path: Path) -> Path:
    assert driver.save_screenshot(str(path))
    assert Image.open(path).size[0] > 0
    return path


def toasts(driver) -> list[str]:
    return [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']") if t.is_displayed()]


def close_toasts(driver) -> None:
    for button in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-close']"):
        if button.is_displayed():
            button.click()
    wait(driver, 20).until(lambda d: not toasts(d))


def content_image(path: Path) -> Path:
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, 255 - xx - yy], -1).clip(0, 255).astype(np.uint8)
    rgb[30:66, 40:88] = (240, 200, 40)
    Image.fromarray(rgb).save(path)
    return path


def test_first_screen_shows_the_run_button_and_what_is_loaded(page, tmp_path):
    """At 1400x1460 the Stylize button is on the first screen, and the banner names every LoRA kind properly."""
    shot = screenshot(page, tmp_path / "first_screen.png")
    assert page.execute_script("return window.scrollY") == 0
    view_height = page.execute_script("return window.innerHeight")
    button = page.find_element(By.CSS_SELECTOR, "#image-run")
    top = page.execute_script("return arguments[0].getBoundingClientRect().top", button)
    bottom = page.execute_script("return arguments[0].getBoundingClientRect().bottom", button)
    assert button.is_displayed() and 0 <= top and bottom <= view_height, (top, bottom, view_height, shot)
    banner = text_of(page, "#banner")
    assert "One-step (SiD-LSG) sid_lsg_tiny_onestep (t_init 625)" in banner
    assert "η ?" not in banner and "onestep η" not in banner


def test_a_non_image_upload_is_flagged_at_once(page, tmp_path):
    (tmp_path / "notes.png").write_text("a shopping list, not a picture")
    page.find_element(By.CSS_SELECTOR, "#image-content input[type=file]").send_keys(str(tmp_path / "notes.png"))
    message = "content image: 'notes.png' is not an image that can be read"
    wait(page, 30).until(lambda d: message in text_of(d, "#image-info"))  # no click on Stylize
    wait(page, 20).until(lambda d: any(message in t for t in toasts(d)))  # the toast too
    wait(page, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#image-content img"))  # no broken preview left
    screenshot(page, tmp_path / "flagged_upload.png")


def test_an_error_keeps_the_seed_and_stays_in_the_run_info(page, tmp_path):
    randomize = page.find_element(By.CSS_SELECTOR, "#image-randomize input[type=checkbox]")
    if randomize.is_selected():
        randomize.click()
    seed = page.find_element(By.CSS_SELECTOR, "#image-seed input")
    seed.send_keys(Keys.CONTROL, "a")
    seed.send_keys("4321", Keys.TAB)
    page.find_element(By.CSS_SELECTOR, "#image-run").click()  # nothing uploaded: the run fails
    message = "content image: nothing was uploaded"
    wait(page, 60).until(lambda d: "The last run failed" in text_of(d, "#image-info"))
    assert message in text_of(page, "#image-info")
    shot = screenshot(page, tmp_path / "after_error.png")
    seed = page.find_element(By.CSS_SELECTOR, "#image-seed input")
    assert seed.is_displayed() and seed.get_attribute("value") == "4321", shot
    assert "Error" not in text_of(page, "#image-seed")  # no red status badge over the seed box
    close_toasts(page)  # the toast goes; the message stays where the result would be
    assert message in text_of(page, "#image-info")
    screenshot(page, tmp_path / "after_error_toast_gone.png")


def test_a_corrupt_video_is_flagged_at_once(page, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 255, 5000, np.uint8).tobytes())
    page.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Video']").click()
    wait(page, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, "#video-run").is_displayed())
    page.find_element(By.CSS_SELECTOR, "#video-content input[type=file]").send_keys(str(tmp_path / "broken.mp4"))
    message = "video: could not decode 'broken.mp4'"
    wait(page, 30).until(lambda d: message in text_of(d, "#video-info"))
    wait(page, 20).until(lambda d: any(message in t for t in toasts(d)))  # the toast too
    assert "/tmp" not in text_of(page, "#video-info")  # the server's folders are not shown
    screenshot(page, tmp_path / "corrupt_video.png")


def test_upload_stylize_and_see_the_result(page, tmp_path):
    page.find_element(By.CSS_SELECTOR, "#image-content input[type=file]").send_keys(str(content_image(tmp_path / "c.png")))
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-content img"))
    wait(page).until(lambda d: "Content image: c.png, 128x96." in text_of(d, "#image-info"))
    prompt = page.find_element(By.CSS_SELECTOR, "textarea")
    prompt.send_keys("an oil painting, thick impasto brush strokes")
    page.find_element(By.CSS_SELECTOR, "#image-run").click()
    result = wait(page, 180).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-result img"))
    assert "std-image-" in result[0].get_attribute("src")
    wait(page).until(lambda d: "start timestep" in text_of(d, "#image-info"))
    assert "The last run failed" not in text_of(page, "#image-info")
    time.sleep(0.5)  # let the result image finish painting
    page.execute_script("window.scrollTo(0, 0)")
    shot = screenshot(page, tmp_path / "gradio_app.png")
    if os.environ.get("STD_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "gradio_app.png")
