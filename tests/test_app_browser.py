"""The demo page in a real browser: headless Debian Chromium driven by Selenium.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; paths overridable with ``SKINML_CHROMIUM`` / ``SKINML_CHROMEDRIVER``)
and the pip package ``selenium``. Neither downloads a browser of its own. The app runs under
uvicorn on a free loopback port with the session's tiny model; the photos are real photos of
the shared subset. ``SKINML_APP_SCREENSHOT=path.png`` saves a screenshot of the scored page.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from skinml.app.backend import LocalPredictor
from skinml.app.server import create_app
from skinml.app.thresholds import AppConfig
from skinml.data import schema
from skinml.data.source import load_metadata
from tests.test_app import registered  # noqa: F401  (module fixture: the tiny model, registered and loaded)

CHROMIUM = os.environ.get("SKINML_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SKINML_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600")
XSS = '<img src=x onerror="window.__xss=1">'
WAIT = 60  # seconds; the first explanation on a cold CPU takes a few


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_url(registered):  # noqa: F811
    import uvicorn

    config = AppConfig(referral_threshold=0.5, target_sensitivity=0.95, calibrated=True,
                       uncertainty_top_probability=0.5, uncertainty_entropy=0.8,
                       calibration={"source": "fixed test thresholds"})
    app = create_app(LocalPredictor(registered.uri, model=registered.model), config)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() or shutil.which(path)):
            raise FileNotFoundError(f"{path} not found: install the Debian package '{package}' "
                                    f"(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo_path(shared_subset) -> str:
    frame = load_metadata(shared_subset)
    return str(frame[frame[schema.TARGET] == "BCC"]["image_path"].iloc[0])


def _open(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, WAIT).until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready=true]")))
    browser.execute_script("window.__xss = undefined;")


def _fill(browser, photo: str, answers: dict[str, str]):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.find_element(By.ID, "photo-input").send_keys(photo)
    for name, value in answers.items():
        element = browser.find_element(By.ID, f"field-{name}")
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)
    browser.find_element(By.ID, "submit").click()


def test_page_scores_a_real_photo_with_heatmap_and_cited_notes(browser, live_url, photo_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, live_url)
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and "not a medical device" in notice.text
    assert "biopsed" not in browser.page_source  # never asked
    _fill(browser, photo_path, {"age": "71", "region": "NOSE", "bleed": "True"})
    WebDriverWait(browser, WAIT).until(ec.visibility_of_element_located((By.ID, "result")))

    items = browser.find_elements(By.CSS_SELECTOR, "#top-list li.diagnosis")
    assert len(items) == 3
    names = [item.find_element(By.CSS_SELECTOR, ".name").text for item in items]
    assert set(names) <= set(schema.LABEL_NAMES.values())
    widths = [browser.execute_script("return arguments[0].getBoundingClientRect().width;", bar)
              for bar in browser.find_elements(By.CSS_SELECTOR, "#top-list .bar")]
    assert widths[0] > 0 and widths == sorted(widths, reverse=True)

    heatmap = browser.find_element(By.ID, "heatmap")
    assert heatmap.is_displayed() and heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth;", heatmap) > 0  # a PNG that decoded
    slider = browser.find_element(By.ID, "heatmap-opacity")
    browser.execute_script("arguments[0].value = 20; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert float(heatmap.value_of_css_property("opacity")) == pytest.approx(0.2)
    assert browser.find_elements(By.CSS_SELECTOR, "#contributions tbody tr")

    notes = browser.find_elements(By.CSS_SELECTOR, "#notes article.note")
    assert notes
    for note in notes:
        links = note.find_elements(By.CSS_SELECTOR, "ol.citations li a")
        assert links and all(a.get_attribute("href").startswith("https://") for a in links)
    assert "No text is generated" in browser.find_element(By.ID, "no-generated-text").text
    referral = browser.find_element(By.ID, "referral").text
    assert "dermatologist" in referral or "below the referral threshold" in referral
    imputed = browser.find_element(By.ID, "imputed").text
    assert "Smokes?" in imputed and "Age" not in imputed.split("\n")

    screenshot = os.environ.get("SKINML_APP_SCREENSHOT")
    if screenshot:
        height = browser.execute_script("return document.documentElement.scrollHeight;")
        browser.set_window_size(1280, min(int(height) + 40, 6000))
        browser.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.3)
        browser.save_screenshot(screenshot)
        browser.set_window_size(1280, 1600)


def test_markup_in_a_field_is_shown_as_text_and_runs_nothing(browser, live_url, photo_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, live_url)
    # A number field: the model refuses it with a 400 naming the field, shown next to it.
    _fill(browser, photo_path, {"age": XSS, "region": "BACK", "itch": "True"})
    error = browser.find_element(By.ID, "err-age")
    WebDriverWait(browser, WAIT).until(lambda _: error.text)
    assert "must be a number" in error.text and XSS in error.text
    assert "invalid" in browser.find_element(By.ID, "field-age").get_attribute("class")

    # A category field: the model scores it as "unknown" and warns, quoting the value.
    browser.find_element(By.ID, "field-age").clear()
    browser.execute_script("document.querySelector('#field-region option[value=BACK]').value = arguments[0];", XSS)
    browser.find_element(By.ID, "submit").click()
    warnings = browser.find_element(By.ID, "warnings")
    WebDriverWait(browser, WAIT).until(lambda _: warnings.text)
    assert "<IMG SRC=X ONERROR=" in warnings.text.upper()

    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x'], img[src='X']") == []
    assert browser.execute_script("return window.__xss;") is None


def test_drag_and_drop_shows_a_preview(browser, live_url, photo_path):
    from selenium.webdriver.common.by import By

    _open(browser, live_url)
    data = base64.b64encode(Path(photo_path).read_bytes()).decode("ascii")
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const file = new File([bytes], "lesion.jpg", {type: "image/jpeg"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true});
        document.getElementById("dropzone").dispatchEvent(drop);
        """, data)
    preview = browser.find_element(By.ID, "photo-preview")
    assert preview.is_displayed() and preview.get_attribute("src").startswith("blob:")
