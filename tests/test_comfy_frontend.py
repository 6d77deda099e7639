r"""The pack inside ComfyUI's real web UI: a real ComfyUI server (subprocess) driven by headless Chromium (Selenium).

What a user does and sees, on the ComfyUI tree at ``COMFYUI_PATH`` (CI: ../shared/comfyui, 0.3.64 with frontend
1.27.10; ../shared/comfyui-0.33, frontend 1.49.6; ../shared/comfyui-0.3.48, frontend 1.23.4):

1. the template browser (the "Templates" sidebar button; 1.23: menu Workflow → Browse Templates) has a section for
   this pack (its folder name, ``comfyui-std``) with the thumbnails of ``example_workflows/``; a click on the
   ``std_image_stylize`` card loads that workflow;
2. Run (the toolbar's Run button) executes it on CPU with a tiny SD1.5 checkpoint and a tiny STD LoRA; the STD Stylize
   node then shows its plan (NFE, start timestep, timesteps) on the node, readable on screen;
3. the saved image is listed in the UI (1.23/1.27: Queue sidebar; 1.49: Assets sidebar) and is the file in output/;
4. the node's help page (``web/docs/STDStylize.md``) opens from the node library (1.23/1.27: the help button of the
   search result) or from the node's own "Node Info" button (1.49's node library has no help button);
5. the browser console has no error from this pack; the ComfyUI tree is left unchanged.

Each ComfyUI release pins its frontend (``comfyui-frontend-package==X`` in requirements.txt). A pin other than the
installed package is served from ``$STD_FRONTENDS/X/comfyui_frontend_package/static`` (``--front-end-root``;
STD_FRONTENDS defaults to /tmp/std-frontends), installed, as ``.ci/run`` does for each tree, with:

    v=$(sed -nE 's/^comfyui-frontend-package==([0-9.]+).*/\1/p' "$tree/requirements.txt")
    python -m pip install -q --no-deps --target /tmp/std-frontends/$v comfyui-frontend-package==$v

(0.33: ``pip install -q --no-deps --target /tmp/std-frontends/1.49.6 comfyui-frontend-package==1.49.6``.) The
templates/embedded-docs packages stay as installed (0.33 warns about their versions in two toasts, which the test
closes; neither package is what is tested).

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium; skips with the reason otherwise (a failure under
``STD_NO_SKIP=1``). Screenshots of every step go to the ``screenshots0`` folder under pytest's temporary folder
(``pytest --basetemp=DIR`` keeps them in a known place); a timeout saves one of the page first.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import browser
import comfy_server
from tools import comfy_host

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1600, 1100)
TEMPLATE = "std_image_stylize"
PACK_MARKERS = ("comfyui-std", "comfyui_std", "std_plan_text")
# The frontend asks for a localised help page first (docs/<Node>/<locale>.md) and falls back to docs/<Node>.md; the
# 404 of that first probe is logged by Chromium as a network error. It is not an error of the pack.
DOCS_LOCALE_PROBE = re.compile(r"/extensions/comfyui-std/docs/(\w+)/[\w-]+\.md - Failed to load resource: "
                               r"the server responded with a status of 404")
# How the page's ComfyApp is reached: window.app (1.27) / window.comfyAPI.app.app (both).
APP = "const app = window.comfyAPI?.app?.app ?? window.app;"

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not browser.available(), reason=browser.MISSING),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
from selenium.common.exceptions import (ElementClickInterceptedException,  # noqa: E402
                                        StaleElementReferenceException, TimeoutException, WebDriverException)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def tree():
    path = comfy_host.comfyui_path()
    if not path:
        pytest.skip("real-host browser test: set COMFYUI_PATH to a ComfyUI checkout (../shared/comfyui or "
                    "../shared/comfyui-0.33) to run it")
    try:
        comfy_server.frontend_root(Path(path))
    except comfy_server.FrontendMissing as err:
        pytest.skip(str(err))
    return Path(path).resolve()


@pytest.fixture(scope="module")
def server(tree, tmp_path_factory):
    """ComfyUI's main.py on a free loopback port, base folder in tmp; the tree must be unchanged afterwards."""
    before = comfy_host.tree_snapshot(str(tree))
    base = tmp_path_factory.mktemp("comfy_frontend")
    with comfy_server.comfy_server(tree, base) as srv:
        yield srv
    after = comfy_host.tree_snapshot(str(tree))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the ComfyUI server wrote into the ComfyUI tree {tree}: {changed[:10]}"


@pytest.fixture(scope="module")
def driver():
    d = browser.chrome(WINDOW, console_logs=True)
    d.set_page_load_timeout(60)
    d.set_script_timeout(30)
    yield d
    d.quit()


# --------------------------------------------------------------------------------------------------------------------
# helpers

class Page:
    """The driver plus what the test keeps: numbered screenshots and every browser console entry (get_log empties
    Chromium's buffer, so the entries are accumulated here)."""

    def __init__(self, driver, shots: Path):
        self.d = driver
        self.shots = shots
        self.n = 0
        self.console: list[dict] = []

    def js(self, script: str, *args):
        return self.d.execute_script(APP + script, *args)

    def wait(self, condition, seconds: float, message: str):
        """``condition()`` once truthy (bounded); on a timeout the page is saved as a screenshot first."""
        try:
            return WebDriverWait(self.d, seconds, poll_frequency=0.5, ignored_exceptions=(
                StaleElementReferenceException,)).until(lambda d: condition(), message)
        except TimeoutException:
            if message:
                self.shot("timeout")
            raise

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.shots / f"{self.n:02d}_{name}.png"
        assert self.d.save_screenshot(str(path)), path
        self.collect_console()
        return path

    def collect_console(self) -> list[dict]:
        self.console += self.d.get_log("browser")
        return self.console

    def visible(self, css: str) -> list:
        """The displayed elements matching ``css`` (one removed while being looked at is left out)."""
        shown = []
        for element in self.d.find_elements(By.CSS_SELECTOR, css):
            try:
                if element.is_displayed():
                    shown.append(element)
            except StaleElementReferenceException:
                pass
        return shown

    def click(self, element) -> None:
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def close_toasts(self) -> None:
        """Close notification toasts (0.33 warns, in two sticky toasts, that the installed templates/docs packages
        are older than it pins; they cover the top right corner, where cards and buttons are)."""
        def closed():
            for button in self.visible(".p-toast-close-button"):
                try:
                    button.click()
                except WebDriverException:
                    pass
            return not self.visible(".p-toast-close-button")

        try:
            WebDriverWait(self.d, 10, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: closed())
        except TimeoutException:
            pass  # a toast that will not close is not this test's subject; a click it blocks fails with its own message

    def click_through_toasts(self, element) -> None:
        """Click ``element``; a toast appearing over it is closed and the click repeated."""
        for attempt in range(3):
            try:
                element.click()
                return
            except ElementClickInterceptedException:
                if attempt == 2:
                    raise
                self.close_toasts()


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def plan_texts_on_screen(page: Page) -> list[str]:
    """Texts with 'NFE' a user can read on the page: text boxes (DOM widgets) inside the window and not covered at
    their centre, and strings the canvas draws (litegraph draws its own widgets with fillText)."""
    dom = page.d.execute_script("""
        const out = [];
        for (const el of document.querySelectorAll('textarea, input, [contenteditable], pre, div, span')) {
          const text = ('value' in el && typeof el.value === 'string') ? el.value
                       : (el.children.length ? '' : el.textContent);
          if (!text || !text.includes('NFE')) continue;
          const r = el.getBoundingClientRect(), style = getComputedStyle(el);
          if (r.width < 20 || r.height < 8 || style.visibility === 'hidden' || style.display === 'none'
              || parseFloat(style.opacity) < 0.3) continue;
          const x = r.left + Math.min(r.width / 2, 40), y = r.top + Math.min(r.height / 2, 10);
          if (x < 0 || y < 0 || x > innerWidth || y > innerHeight) continue;
          const top = document.elementFromPoint(x, y);
          if (top === el || el.contains(top)) out.push(text);
        }
        return out;""")
    drawn = page.js("""
        const texts = [], proto = CanvasRenderingContext2D.prototype, fill = proto.fillText;
        proto.fillText = function (text, ...rest) { texts.push(String(text)); return fill.call(this, text, ...rest); };
        try { app.canvas.draw(true, true); } finally { proto.fillText = fill; }
        return texts.filter(t => t.includes('NFE'));""")
    return dom + drawn


def workflow_node_types(name: str) -> list[str]:
    return sorted(n["type"] for n in json.loads((REPO / "example_workflows" / f"{name}.json").read_text())["nodes"])


def doc_first_sentence(node_id: str) -> tuple[str, list[str]]:
    """The first sentence of web/docs/<node_id>.md's first paragraph and its second-level headings."""
    lines = (REPO / "web" / "docs" / f"{node_id}.md").read_text().splitlines()
    headings = [line[3:].strip() for line in lines if line.startswith("## ")]
    paragraph = next(line for line in lines if line.strip() and not line.startswith("#"))
    sentence = re.sub(r"[*_`]", "", paragraph.split(". ")[0])
    return sentence, headings


# --------------------------------------------------------------------------------------------------------------------
# the steps

def open_app(page: Page, url: str) -> None:
    page.d.get(url)
    page.wait(lambda: page.js("return !!(app && app.graph && app.canvas)"), 90, "the ComfyUI app did not start")
    page.wait(lambda: page.js("return (app.extensions ?? []).some(e => e.name === 'comfyui_std.PlanText')"), 30,
              "the pack's web extension (web/std_plan_text.js, comfyui_std.PlanText) was not registered")
    time.sleep(2)  # the first-run dialogs and toasts settle
    page.close_toasts()
    page.shot("app_loaded")


def load_template_from_browser(page: Page) -> None:
    """The template browser → this pack's section → the std_image_stylize card (all real clicks)."""
    d = page.d
    # A new user gets the template browser on first start; close it and open it the way anyone can.
    for _ in range(3):
        if not page.visible("[role=dialog]"):
            break
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        time.sleep(0.5)
    # 1.27 and 1.49: the "Templates" sidebar button; 1.23 (ComfyUI 0.3.48): the menu Workflow → Browse Templates.
    opener = page.wait(lambda: page.visible("button[aria-label='Templates']") or page.visible(
        "li[role=menuitem][aria-label='Workflow'] > .p-menubar-item-content"), 20,
        "neither a Templates sidebar button nor a Workflow menu")[0]
    page.click(opener)
    if opener.tag_name != "button":
        page.click(page.wait(lambda: page.visible(
            "li[role=menuitem][aria-label='Browse Templates'] > .p-menubar-item-content"), 10,
            "no Browse Templates in the Workflow menu")[0])
    section = page.wait(lambda: [e for e in d.find_elements(
        By.XPATH, "//*[@role='dialog']//*[(@role='option' or @role='button') and normalize-space(.)='comfyui-std']")],
        30, "the template browser has no section for this pack (comfyui-std)")
    page.close_toasts()
    page.click(section[0])
    names = {p.stem for p in (REPO / "example_workflows").glob("*.json")}

    def cards():  # the section's cards (thumbnails with the template name as alt text); the list loads lazily
        found = {img.get_attribute("alt"): img for img in d.find_elements(By.CSS_SELECTOR, "[role=dialog] img[alt]")}
        return found if TEMPLATE in found and len(names & set(found)) >= min(8, len(names)) else None

    found = page.wait(cards, 30, f"the pack's section does not show the cards of example_workflows/ ({TEMPLATE})")
    card = found[TEMPLATE]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    # the card's thumbnail is example_workflows/std_image_stylize.jpg (the frontend shows it through a blob: URL):
    # same size, same picture (mean colours of an 8x5 grid of blocks, decoded by Chromium and by PIL)
    page.wait(lambda: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", card), 30,
              "the std_image_stylize thumbnail did not load")
    jpg = Image.open(REPO / "example_workflows" / f"{TEMPLATE}.jpg").convert("RGB")
    shown = d.execute_script("""
        const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, c.width, c.height).data, bw = c.width / 8, bh = c.height / 5, out = [];
        for (let by = 0; by < 5; by++) for (let bx = 0; bx < 8; bx++) for (let ch = 0; ch < 3; ch++) {
          let sum = 0;
          for (let y = by * bh; y < (by + 1) * bh; y++) for (let x = bx * bw; x < (bx + 1) * bw; x++)
            sum += data[(y * c.width + x) * 4 + ch];
          out.push(sum / (bw * bh));
        }
        return [c.width, c.height, out];""", card)
    assert shown[:2] == list(jpg.size), (shown[:2], jpg.size)
    blocks = np.asarray(jpg, dtype=np.float64).reshape(5, jpg.size[1] // 5, 8, jpg.size[0] // 8, 3).mean((1, 3))
    assert np.abs(np.asarray(shown[2]) - blocks.reshape(-1)).max() < 4, "the card's thumbnail is not the pack's jpg"
    page.close_toasts()
    page.shot("template_browser_pack_section")
    page.click_through_toasts(card)
    page.wait(lambda: not page.visible("[role=dialog]") and page.js(
        "return app.graph._nodes.some(n => n.type === 'STDStylize')"), 30, "the template did not load")
    types = sorted(page.js("return app.graph._nodes.map(n => n.type)"))
    assert types == workflow_node_types(TEMPLATE), types
    page.close_toasts()
    page.shot("template_loaded")


def set_widgets(page: Page, values: list[tuple[str, str, object]]) -> list:
    """Set (node type, widget name, value) through the widgets' JS API (litegraph draws combo lists and number
    fields on the canvas); the values read back."""
    return page.js("""
        const byType = t => app.graph._nodes.find(n => n.type === t);
        const out = [];
        for (const [type, name, value] of arguments[0]) {
          const node = byType(type), w = node.widgets.find(w => w.name === name), old = w.value;
          w.value = value;
          w.callback?.(value, app.canvas, node);
          node.onWidgetChanged?.(name, value, old, w);
          out.push(node.widgets.find(w => w.name === name).value);
        }
        app.graph.setDirtyCanvas(true, true);
        return out;""", [list(v) for v in values])


def use_tiny_models(page: Page) -> None:
    """The template names the real SDXL checkpoint and STD LoRA; the test has tiny ones, and runs 3 steps, not 8."""
    values = [("CheckpointLoaderSimple", "ckpt_name", comfy_server.CKPT),
              ("STDLoraLoader", "lora_name", comfy_server.LORA), ("STDStylize", "nfe", 3)]
    assert set_widgets(page, values) == [v for _, _, v in values]


def run_workflow(page: Page, server, timeout: float = 180) -> dict:
    """Click Run (1.49: data-testid=queue-button; 1.27: the split button labelled Run; a real click, no
    app.queuePrompt fallback); returns the history entry of the finished run."""
    url = server.url
    before = set(http_json(f"{url}/api/history"))
    buttons = (page.visible("[data-testid='queue-button']")
               or page.visible("button.p-splitbutton-button[aria-label='Run']")
               or [b for b in page.visible("button") if b.text.strip() == "Run"])
    assert buttons, "no Run button in the toolbar"
    page.close_toasts()
    page.click_through_toasts(buttons[0])

    def done():
        new = {k: v for k, v in http_json(f"{url}/api/history").items() if k not in before}
        entry = next(iter(new.values()), None)
        return entry if entry and entry.get("status", {}).get("completed") is not None else None

    try:
        entry = page.wait(done, timeout, "the queued workflow did not finish")
    except TimeoutException as err:
        raise AssertionError(f"{err.msg} in {timeout} s; server log:\n{comfy_server._tail(server.log)}") from None
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy_server._tail(server.log))
    return entry


def plan_is_shown(page: Page, nfe: int) -> str:
    """The STD Stylize node's plan (of a run with ``nfe`` steps) is in its std_plan widget and readable on screen."""
    plan = page.wait(lambda: page.js("""
        const n = app.graph._nodes.find(n => n.type === 'STDStylize');
        return n.widgets?.find(w => w.name === 'std_plan')?.value || null;"""), 30,
        "the STD Stylize node got no std_plan widget after the run")
    for word in (f"NFE {nfe}", "start timestep", "timesteps"):
        assert word in plan, plan
    # Bring the node into view the way a user would look at it (centred, 100 % zoom) and read the screen.
    page.js("""
        const n = app.graph._nodes.find(n => n.type === 'STDStylize');
        app.canvas.ds.scale = 1;
        app.canvas.centerOnNode ? app.canvas.centerOnNode(n) : null;
        app.graph.setDirtyCanvas(true, true);""")
    time.sleep(1.5)
    shot = page.shot(f"plan_on_node_nfe{nfe}")
    shown = plan_texts_on_screen(page)
    assert any(f"NFE {nfe}" in t and "timesteps" in t for t in shown), (
        f"the std_plan widget holds the plan ({plan!r}) but the screen does not show it (visible texts with NFE: "
        f"{shown}; see {shot})")
    return plan


def output_is_shown(page: Page, server, entry: dict) -> None:
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert images, entry["outputs"]
    image = images[0]
    path = server.base / "output" / image["subfolder"] / image["filename"]
    assert path.is_file() and image["subfolder"] == "STD" and image["filename"].startswith("stylized"), image

    def shown():
        for img in page.d.find_elements(By.CSS_SELECTOR, "img[src*='/view?']"):
            src = img.get_attribute("src") or ""
            if f"filename={image['filename']}" in src and img.is_displayed() and page.d.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth", img):
                return img
        return None

    # The results list: 1.27's Queue sidebar, 1.49's Assets sidebar ("Generated").
    tab = page.visible("button[aria-label^='Queue']") or page.visible("button[aria-label^='Assets']")
    assert tab, "no Queue or Assets sidebar button"
    page.click(tab[0])
    img = page.wait(shown, 30, f"the results sidebar shows no <img> of /api/view?filename={image['filename']}")
    assert page.d.execute_script("return arguments[0].naturalWidth", img) == 64
    with urllib.request.urlopen(img.get_attribute("src"), timeout=10) as r:
        assert r.read() == path.read_bytes(), "the image shown is not the file saved in output/"
    page.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    page.shot("saved_image_shown")


def node_title_point(page: Page, node_type: str) -> tuple[float, float]:
    return tuple(page.js("""
        const n = app.graph._nodes.find(n => n.type === arguments[0]);
        const p = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + 30, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + p[0], r.top + p[1]];""", node_type))


def help_page_opens(page: Page) -> None:
    """Node library → search "STD Stylize" → the result's help button (1.27). 1.49's node library has only a preview
    (the node's Python description) on hover, so there the help opens from the node: click its title on the canvas,
    then the selection toolbox's "Node Info" button."""
    d = page.d
    sentence, headings = doc_first_sentence("STDStylize")
    page.click(page.wait(lambda: page.visible("button[aria-label^='Node Library']"), 20, "no Node Library button")[0])
    box = page.wait(lambda: [e for e in page.visible("input")
                             if "search" in (e.get_attribute("placeholder") or "").lower()], 20,
                    "no search box in the node library")[0]
    box.clear()
    box.send_keys("STD Stylize")

    def result():  # the row of the search result (1.27: a .tree-leaf; 1.49: a flat role=treeitem row)
        found = [e for e in d.find_elements(By.XPATH, "//*[contains(@class, 'tree-leaf') or @role='treeitem']"
                                            "[.//span[normalize-space(.)='STD Stylize']]") if e.is_displayed()]
        # 1.27's folders are treeitems too and contain the row: take the innermost (smallest) element
        return min(found, key=lambda e: e.size["height"] * e.size["width"]) if found else None

    page.wait(result, 30, "the node library search shows no STD Stylize")
    time.sleep(1)  # the result tree unfolds (animated); hover once it stands still
    help_buttons = []
    for _ in range(3):
        try:
            item = result()
            ActionChains(d).move_to_element(item).perform()
            time.sleep(0.5)
            help_buttons = [b for b in item.find_elements(By.CSS_SELECTOR, ".help-button") if b.is_displayed()]
            if help_buttons or not item.find_elements(By.CSS_SELECTOR, ".help-button"):
                break
        except StaleElementReferenceException:  # the tree re-rendered under the pointer: look again
            help_buttons = []
            time.sleep(0.5)
    page.shot("node_library_search")
    if help_buttons:
        help_buttons[0].click()
    else:
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        page.click(page.visible("button[aria-label^='Node Library']")[0])  # close the library again
        x, y = node_title_point(page, "STDStylize")
        builder = ActionBuilder(d)
        builder.pointer_action.move_to_location(int(x), int(y))
        builder.pointer_action.click()
        builder.perform()
        selected = page.js("return Object.values(app.canvas.selected_nodes ?? {}).map(n => n.type)")
        assert selected == ["STDStylize"], selected
        info = page.wait(lambda: page.visible("[data-testid='info-button'], button[aria-label='Node Info']"), 20,
                         "no Node Info button for the selected STD Stylize node")
        info[0].click()

    def doc_shown():
        text = d.find_element(By.TAG_NAME, "body").text
        return sentence in text and all(d.find_elements(By.XPATH, f"//h2[normalize-space(.)='{h}']")
                                        for h in headings[:2])

    page.wait(doc_shown, 30, f"the help page (web/docs/STDStylize.md: {sentence!r}, {headings[:2]}) did not open")
    page.shot("help_page")


def console_errors_of_the_pack(page: Page) -> list[str]:
    errors = []
    for entry in page.collect_console():
        message = entry.get("message", "")
        if entry.get("level") != "SEVERE" or not any(m in message for m in PACK_MARKERS):
            continue
        probe = DOCS_LOCALE_PROBE.search(message)
        if probe and (REPO / "web" / "docs" / f"{probe.group(1)}.md").is_file():
            continue
        errors.append(message)
    return errors


# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(driver, tmp_path_factory):
    """The browser page; screenshots of every step in one folder (printed on failure)."""
    return Page(driver, tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def ran(server, page):
    """Open ComfyUI, load std_image_stylize from the template browser, switch to the tiny models, click Run; the
    history entry of the finished run."""
    open_app(page, server.url)
    load_template_from_browser(page)
    use_tiny_models(page)
    page.shot("tiny_models_set")
    return run_workflow(page, server)


def test_the_plan_is_shown_on_the_std_stylize_node(page, server, ran):
    plan_is_shown(page, 3)
    # Run again with another NFE: the same widget shows the new plan (one std_plan widget, not a second one).
    assert set_widgets(page, [("STDStylize", "nfe", 4)]) == [4]
    run_workflow(page, server)
    plan_is_shown(page, 4)
    assert page.js("return app.graph._nodes.find(n => n.type === 'STDStylize').widgets"
                   ".filter(w => w.name === 'std_plan').length") == 1


def test_the_saved_image_is_listed(page, server, ran):
    output_is_shown(page, server, ran)


def test_the_help_page_opens(page, ran):
    help_page_opens(page)


def test_no_console_error_from_the_pack(page, ran):
    errors = console_errors_of_the_pack(page)
    assert not errors, errors
