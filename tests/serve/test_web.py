"""The web chat at / in a real headless browser (Debian's chromium + chromium-driver, driven by selenium), against
the embedded Gemma-3-270M base with the shipped ARMs: load the page, turn on the base-vs-guided comparison, send a
message and watch both replies stream in, move a slider, send another one with the new weight, and save a screenshot
(GENARM_UPDATE_DOCS=1 writes it to docs/serve.png for the README; otherwise into the test's temporary directory, so
that a test run leaves the work tree as it was).

The browser comes from apt (`apt-get install -y chromium chromium-driver`; .ci/run installs it); without it this test
fails rather than skips, so CI can never pass without having run it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the web test needs chromium and its driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_page_streams_a_guided_reply_beside_the_base(tmp_path):
    from live_server import running_server
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # the embedded base and the shipped default ARMs, as a user gets them from a bare `genarm-local serve`
    with running_server("-np", 2, "-c", 512, cwd=tmp_path) as server, browser() as page:
        wait = WebDriverWait(page, 120)
        page.get(server.url + "/")
        wait.until(lambda page: page.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        sliders = {s.get_attribute("data-arm"): s for s in page.find_elements(By.CSS_SELECTOR, "#sliders input")}
        assert set(sliders) == {"positive", "concise"}
        page.find_element(By.ID, "compare").click()
        page.find_element(By.ID, "max-tokens").clear()
        page.find_element(By.ID, "max-tokens").send_keys("40")

        def send(message: str, turn: int) -> tuple:
            page.find_element(By.ID, "message").send_keys(message)
            page.find_element(By.ID, "send").click()
            wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, ".reply .text")) == 2 * turn)
            wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, ".reply[data-done=true]")) == 2 * turn)
            assert re.fullmatch(r"\d+(\.\d)? tok/s", page.find_element(By.ID, "speed").text)
            assert not page.find_element(By.ID, "error").is_displayed()
            base, guided = page.find_elements(By.CSS_SELECTOR, ".reply")[-2:]
            # streamed: the page painted each reply's text over several network reads, not once at the end (asked
            # of the replies after they finish, so a fast machine cannot finish between two polls of the page)
            paints = [int(box.get_attribute("data-paints") or 0) for box in (base, guided)]
            assert max(paints) >= 2, paints
            assert "base" in base.get_attribute("class") and "guided" in guided.get_attribute("class")
            assert base.find_element(By.CLASS_NAME, "text").text and guided.find_element(By.CLASS_NAME, "text").text
            return base, guided

        positive = sliders["positive"]
        start = float(positive.get_attribute("value"))
        _, guided = send("What did you do at the weekend?", 1)
        # the weights the server reports having used
        assert f"positive {start:g}" in guided.find_element(By.CLASS_NAME, "label").text
        # a slider changes the next message's weights, without reloading
        positive.send_keys(*[Keys.ARROW_RIGHT] * 100)  # +1.0 in steps of 0.01
        assert float(positive.get_attribute("value")) == pytest.approx(start + 1.0)
        assert page.find_element(By.CSS_SELECTOR, "label[for=arm-positive] output").text == f"{start + 1.0:.2f}"
        _, guided = send("And what will you do next weekend?", 2)
        assert f"positive {start + 1.0:g}" in guided.find_element(By.CLASS_NAME, "label").text
        time.sleep(0.3)  # let the final tokens/s paint
        target = DOCS if os.environ.get("GENARM_UPDATE_DOCS") else tmp_path
        assert page.save_screenshot(str(target / "serve.png"))
