"""The web UI in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by Selenium loads
the page, uploads three photos, starts a 2-step run on the tiny pipeline and sees its loss plot and its finished
status. With UI_SCREENSHOTS=DIR it also saves a screenshot of each tab there (1000 px wide PNGs: the README's
docs/img/ui_*.png are made with UI_SCREENSHOTS=docs/img).

Without a browser the test fails under CI=true (the CI script installs one) and is skipped elsewhere."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from dreambooth_singlora.ui.testing import running_app

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TABS = ["Train", "Live run", "Runs", "Generate", "Export", "Evaluate", "Queue"]


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        message = "headless Chromium not found: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout=120, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the page is still rendering
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def field(driver, elem_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")


def type_into(driver, elem_id, text):
    from selenium.webdriver.common.keys import Keys

    el = field(driver, elem_id)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(str(text))
    el.send_keys(Keys.TAB)  # blur: the value is committed


def open_tab(driver, name):
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()
    time.sleep(0.5)


def screenshot(driver, folder: Path, name: str):
    """The page at 1000 px wide, as a small palette PNG (what the README shows)."""
    from PIL import Image

    raw = folder / f"ui_{name}.raw.png"
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(height + 120, 700), 1800))
    time.sleep(0.8)
    driver.save_screenshot(str(raw))
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im = im.resize((1000, round(im.height * 1000 / im.width)), Image.Resampling.LANCZOS)
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(folder / f"ui_{name}.png", optimize=True)
    raw.unlink()
    driver.set_window_size(1280, 1000)


def pick(driver, elem_id, text):
    """Choose `text` in a Gradio dropdown: type it into the box and press Enter."""
    from selenium.webdriver.common.keys import Keys

    from selenium.webdriver.common.by import By

    el = field(driver, elem_id)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(text)
    option = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"li[role=option][aria-label='{text}']"), 10,
                      f"option {text}")
    option[0].click()
    time.sleep(0.3)


def test_a_run_from_the_browser(browser, tmp_path, tiny_pipeline, dataset_dir, request):
    from selenium.webdriver.common.by import By

    ws = tmp_path / "ws"
    shots = os.environ.get("UI_SCREENSHOTS")
    with running_app(ws) as url:
        browser.get(url)
        start = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#train-start"), 60, "the Train tab")
        upload = browser.find_element(By.CSS_SELECTOR, "#train-photos input[type=file]")
        upload.send_keys("\n".join(str(p) for p in sorted(Path(dataset_dir, "dog").glob("*.jpg"))[:3]))
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#train-photos tr, #train-photos .file"))
                 >= 3, 60, "the three uploads listed")
        type_into(browser, "train-run", "browser-dog")
        type_into(browser, "train-base", tiny_pipeline)
        type_into(browser, "train-steps", 60 if shots else 2)  # the README's screenshots show a curve
        type_into(browser, "train-resolution", 32)
        if shots:  # the uploads as the DreamBooth subject dog, so that Evaluate can score the run
            type_into(browser, "train-validation", "a sks dog")
            pick(browser, "train-subject", "dog")
        wait_for(lambda: "sd1" in browser.find_element(By.CSS_SELECTOR, "#train-family").text, 60, "the family")
        if shots:
            screenshot(browser, Path(shots), "train")
        start.click()
        # the page moves to the Live run tab and follows the job to its end
        status = wait_for(lambda: (t := browser.find_element(By.CSS_SELECTOR, "#live-status").text)
                          and ": finished" in t and t, 180, "the finished status")
        assert status.startswith("train browser-dog [") and f"step {60 if shots else 2}/" in status, status
        # the loss curve drawn: a path in the plot's line mark (an empty plot has none)
        line = "#live-loss [aria-roledescription='line mark container'] path"
        wait_for(lambda: [p for p in browser.find_elements(By.CSS_SELECTOR, line) if p.get_attribute("d")], 30,
                 "the loss curve drawn")
        assert (ws / "runs" / "browser-dog" / "adapter" / "adapter_model.safetensors").is_file()
        if shots:
            take_screenshots(browser, ws, Path(shots), request.getfixturevalue("tiny_eval_checkpoints"))


def take_screenshots(browser, ws: Path, shots: Path, encoders: dict):
    """The other tabs with something in them: a generation of 4 images, an export."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#live-val img"), 60, "the validation images")
    screenshot(browser, shots, "live")
    open_tab(browser, "Runs")
    wait_for(lambda: "finished" in browser.find_element(By.CSS_SELECTOR, "#runs-status").text, 30, "the run")
    screenshot(browser, shots, "runs")
    open_tab(browser, "Generate")
    type_into(browser, "gen-prompts", "a sks dog on the beach")
    type_into(browser, "gen-steps", 4)
    type_into(browser, "gen-size", 64)
    browser.find_element(By.CSS_SELECTOR, "#gen-start").click()
    wait_for(lambda: ": finished" in browser.find_element(By.CSS_SELECTOR, "#gen-status").text, 120, "the images")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gen-gallery img")) >= 4, 30, "the gallery")
    screenshot(browser, shots, "generate")
    open_tab(browser, "Export")
    browser.find_element(By.CSS_SELECTOR, "#exp-start").click()
    wait_for(lambda: "Exported" in browser.find_element(By.CSS_SELECTOR, "#exp-msg").text, 120, "the export")
    screenshot(browser, shots, "export")
    open_tab(browser, "Generate")  # the 25 evaluation prompts, one image each, for Evaluate
    browser.find_element(By.CSS_SELECTOR, "#gen-eval input").click()
    type_into(browser, "gen-n", 1)
    browser.find_element(By.CSS_SELECTOR, "#gen-start").click()
    time.sleep(2)
    wait_for(lambda: ": finished" in browser.find_element(By.CSS_SELECTOR, "#gen-status").text, 180, "the 25")
    open_tab(browser, "Evaluate")
    type_into(browser, "ev-clip", encoders["clip_dir"])
    type_into(browser, "ev-dino", encoders["dino_dir"])
    newest = sorted(p.name for p in (ws / "runs" / "browser-dog" / "images").iterdir())[-1]
    time.sleep(2)  # the image set list follows the new set
    pick(browser, "ev-set", newest)
    browser.find_element(By.CSS_SELECTOR, "#ev-start").click()
    wait_for(lambda: ": finished" in browser.find_element(By.CSS_SELECTOR, "#ev-status").text, 180, "the scores")
    time.sleep(2)
    screenshot(browser, shots, "evaluate")
    open_tab(browser, "Queue")
    screenshot(browser, shots, "queue")
