"""``GET /``: the page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

Skipped with the reason when no browser is installed: ``apt-get install chromium chromium-driver`` and
``pip install selenium`` provide one. ``RECURSIVEMAS_PAGE_SCREENSHOT=FILE.png`` keeps a screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip(
    "selenium", reason="no browser driver: pip install selenium (and apt-get install chromium)"
)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no headless browser: apt-get install chromium chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from recursivemas import GenerationConfig, build_preset  # noqa: E402
from tests.serve.harness import KEY, serving  # noqa: E402

QUESTION = "What is 6 times 7?"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_streams_the_answer_and_draws_the_trace(browser: webdriver.Chrome) -> None:
    system = build_preset("tiny-random")
    settings = {"rounds": 2, "latent_steps": 3}
    expected = {
        mode: system.run([QUESTION], mode=mode, generation=GenerationConfig(16), **settings)[0]
        for mode in ("latent", "text")
    }
    with serving(build_preset("tiny-random")) as server:
        browser.get(server.url + "/")
        fields = {"key": KEY, "rounds": "2", "latent_steps": "3", "max_tokens": "16"}
        for name, value in fields.items():
            browser.find_element(By.ID, name).clear()
            browser.find_element(By.ID, name).send_keys(value)
        browser.find_element(By.ID, "question").clear()
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        browser.find_element(By.ID, "compare").click()
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(
            lambda b: (
                [s.text.startswith("done") for s in b.find_elements(By.CSS_SELECTOR, ".run .status")]
                == [True, True]
            )
        )
        runs = browser.find_elements(By.CSS_SELECTOR, ".run")
        for run, mode in zip(runs, ("latent", "text"), strict=True):
            assert run.find_element(By.TAG_NAME, "h2").text == f"{mode} mode"
            assert run.find_element(By.CSS_SELECTOR, ".answer").text == expected[mode].text.strip()
            rows = run.find_elements(By.CSS_SELECTOR, "table.grid tr")
            assert len(rows) == 1 + len(system.agents)  # a header, then one row per agent
            assert len(rows[0].find_elements(By.TAG_NAME, "th")) == 1 + settings["rounds"]
            boxes = run.find_elements(By.CSS_SELECTOR, ".stage")
            assert len(boxes) == len(expected[mode].trace)
        lens = runs[0].find_elements(By.CSS_SELECTOR, ".stage.latent .lens")
        assert lens and all(box.text.startswith("lens: ") for box in lens)
        target = os.environ.get("RECURSIVEMAS_PAGE_SCREENSHOT")
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(target)
