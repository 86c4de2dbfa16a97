"""The human-validation form (human_eval/form.html) in a real headless Chromium: two raters rate
every cell with the keyboard, one reloads halfway and goes on where they stopped, both export,
and `06_eval.py --score-ratings` scores the exports; a screenshot check on the first cell.

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`; .ci/run
installs them) and selenium (requirements.txt); skipped, with the reason, without them.

    .venv/bin/python -m pytest -q tests/test_human_form.py
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import common
from conftest import load_stage
from test_eval import form_data_and_key, make_fixture_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no Chromium with chromedriver (Debian: apt-get install chromium chromium-driver)")
ev6 = load_stage("06_eval")


@pytest.fixture(scope="module")
def form_run(tmp_path_factory):
    """An evaluated fixture run (two datasets, human/sft/base responses), so a form.html and key.csv."""
    config, run_dir = make_fixture_run(tmp_path_factory.mktemp("form"), eval__judge__backend="none", eval__bertscore=False)
    ev6.main(["--config", str(config)])
    return config, run_dir


def browser(download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,800"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def open_as(driver, form: Path, rater: str) -> None:
    """Open the form from disk, as a rater does, and begin as `rater`."""
    from selenium.webdriver.common.by import By
    driver.get(form.resolve().as_uri())
    driver.find_element(By.ID, "rater").send_keys(rater)
    driver.find_element(By.ID, "begin").click()


def wait_for(path: Path, timeout: float = 20) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and not list(path.parent.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise TimeoutError(f"{path} was not downloaded")


def rate_everything(driver, form: Path, rater: str, attribution_key: str, ratings: str, reload_after: int | None):
    """Open the form, enter `rater`, answer every cell by keyboard (attribution key, then the three
    ratings), reloading the page once after `reload_after` cells; returns the positions seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    open_as(driver, form, rater)
    total = driver.execute_script("return state.order.length")
    for done in range(total):
        if done == reload_after:
            answered = driver.execute_script("return Object.keys(state.answers).length")
            driver.refresh()  # progress is in localStorage: the form reopens where the rater stopped
            assert driver.execute_script("return state.rater") == rater
            assert driver.execute_script("return state.position") == done
            assert driver.execute_script("return Object.keys(state.answers).length") == answered
        assert driver.execute_script("return state.position") == done
        press(driver, attribution_key, *ratings)
        if done < total - 1:
            press(driver, Keys.ARROW_RIGHT)
    assert driver.find_element(By.ID, "done").is_displayed()
    return total


def test_two_raters_rate_reload_export_and_06_scores_them(form_run, tmp_path):
    from selenium.webdriver.common.by import By
    config, run_dir = form_run
    form = run_dir / "human_eval" / "form.html"
    _, data, key = form_data_and_key(run_dir)
    exports = {}
    for rater, attribution_key, ratings, reload_after in (("ana", "1", "432", 9), ("ben", "2", "531", None)):
        downloads = tmp_path / rater
        downloads.mkdir()
        driver = browser(downloads)
        try:
            total = rate_everything(driver, form, rater, attribution_key, ratings, reload_after)
            driver.find_element(By.ID, "export-done").click()
            exports[rater] = wait_for(downloads / f"ratings-{rater}.json")
        finally:
            driver.quit()
        export = json.loads(exports[rater].read_text())
        assert export["form_version"] == data["version"] and export["rater"] == rater
        assert len(export["cells"]) == total == len(data["cells"])
        assert sorted(export["order_shown"]) == sorted(cell["id"] for cell in data["cells"])
        assert [cell["cell"] for cell in export["cells"]] == export["order_shown"]
        assert all(cell["seconds"] >= 0 for cell in export["cells"])
    orders = {rater: json.loads(path.read_text())["order_shown"] for rater, path in exports.items()}
    assert orders["ana"] != orders["ben"]  # each rater has an own seeded order ...
    assert orders["ana"] == expected_order("ana", data)  # ... from (rater ID, form seed), on any browser

    # Score both exports (put beside the key, as a study's organiser would)
    for path in exports.values():
        shutil.copy(path, run_dir / "human_eval" / path.name)
    ev6.main(["--config", str(config), "--score-ratings", *[str(run_dir / "human_eval" / p.name) for p in exports.values()]])
    scores = json.loads((run_dir / "human_eval" / "scores.json").read_text())
    # By hand: ana always names each dataset's first annotator and rates 4/3/2, ben the second and 5/3/1
    first = {name: info["annotators"][0] for name, info in data["datasets"].items()}
    second = {name: info["annotators"][1] for name, info in data["datasets"].items()}
    for row in scores["methods"]:
        cells = [k for k in key if (k["dataset"], k["model"] or None, k["method"]) ==
                 (row["dataset"], row["model"], row["method"]) and not k["attention_of"]]
        hits = sum((k["target"] == first[k["dataset"]]) + (k["target"] == second[k["dataset"]]) for k in cells)
        assert row["cells"] == len(cells)
        assert row["coherence"] == pytest.approx(4.5) and row["grounding"] == 3 and row["style"] == pytest.approx(1.5)
        assert row["human_attribution"] == pytest.approx(hits / (2 * len(cells)))
    assert scores["alpha"]["grounding"] is None  # every grounding rating is 3: alpha undefined, said so
    assert scores["attribution_kappa"][0]["kappa"] == pytest.approx(0.0)  # two constant raters that differ
    assert scores["attention"] == {"ana": {"pairs": 4, "passed": 4}, "ben": {"pairs": 4, "passed": 4}}
    report = (run_dir / "human_eval" / "scores.md").read_text()
    assert "Krippendorff" in report and "ana vs ben" in report


def test_progress_survives_a_reload_that_loses_either_store(form_run, tmp_path):
    """Chromium now and then reloads a page opened from disk with an empty localStorage; the tab's
    sessionStorage still holds the progress. A new tab has no sessionStorage; localStorage does."""
    _, run_dir = form_run
    progress = "return [state.rater, JSON.stringify(state.answers)]"
    driver = browser(tmp_path)
    try:
        open_as(driver, run_dir / "human_eval" / "form.html", "cleo")
        press(driver, "1", "4", "3", "2")
        before = driver.execute_script(progress)
        assert before[0] == "cleo" and len(json.loads(before[1])) == 1
        driver.execute_script("state = null; localStorage.clear()")  # as that reload sees it, and no save on unload
        driver.refresh()
        assert driver.execute_script(progress) == before
        driver.execute_script("state = null; sessionStorage.clear()")  # as a new tab or a restarted browser
        driver.refresh()
        assert driver.execute_script(progress) == before
    finally:
        driver.quit()


def test_the_first_cell_renders_with_every_part_visible(form_run, tmp_path):
    from selenium.webdriver.common.by import By
    import matplotlib.image
    config, run_dir = form_run
    driver = browser(tmp_path)
    try:
        open_as(driver, run_dir / "human_eval" / "form.html", "screenshot")
        height = driver.execute_script("return window.innerHeight")
        for part in ("text-a", "text-b", "response", "examples", "questions", "progress"):
            element = driver.find_element(By.ID, part)
            assert element.is_displayed() and element.text.strip(), part
        # the item, the response and the question fit on a laptop screen without scrolling
        for part in ("text-a", "response", "questions"):
            top = driver.execute_script(f"return document.getElementById('{part}').getBoundingClientRect().top")
            assert 0 <= top < height, part
        assert len(driver.find_elements(By.CSS_SELECTOR, "#examples ol")) >= 2  # every annotator's examples
        assert driver.find_elements(By.CSS_SELECTOR, "#questions button")  # the attribution choices
        shot = tmp_path / "first_cell.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05  # a rendered page, not a blank one


def expected_order(rater: str, data: dict) -> list[str]:
    """The form's shuffle, recomputed here: FNV-1a of "rater/seed", mulberry32, Fisher-Yates."""
    h = 0x811C9DC5
    for byte in f"{rater}/{data['seed']}".encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    state = h

    def random() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & 0xFFFFFFFF
        t = state
        t = ((t ^ (t >> 15)) * (t | 1)) & 0xFFFFFFFF
        t ^= (t + (((t ^ (t >> 7)) * (t | 61)) & 0xFFFFFFFF)) & 0xFFFFFFFF
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    order = [cell["id"] for cell in data["cells"]]
    for i in range(len(order) - 1, 0, -1):
        j = int(random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order
