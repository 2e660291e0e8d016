"""The MLflow UI as a user sees it: `mlflow ui` on the SQLite store of the session's tiny runs
(conftest.py: a 2-epoch training, its evaluation and quantization, tracked as the README's main job
tracks them), driven by a headless Chromium through Selenium. The experiment page segcore links to
opens on its runs with the Dataset column filled; a run shows its dataset, its per-epoch Dice
charts, its system metrics and its plots.

Skips where Chromium, its driver or Selenium is missing (CI installs them: `apt-get install
chromium chromium-driver`). With SEGCORE_UI_SCREENSHOTS=DIR the screenshots are also copied to DIR
(docs/images holds the ones the docs show)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from servers import MlflowUi

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver")
selenium = pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")

WAIT_S = 60


@pytest.fixture(scope="module")
def logged(tiny, tmp_path_factory):
    """`mlflow ui` on the session's store, and where its training run is."""
    from mlflow import MlflowClient

    from segcore.tracking import read_run_file

    ui = MlflowUi(tiny.uri, tmp_path_factory.mktemp("mlflow-ui")).start()
    run_id = read_run_file(tiny.cli.run)["run_id"]
    run = MlflowClient(tracking_uri=tiny.uri).get_run(run_id)
    yield {"url": ui.url, "experiment_id": run.info.experiment_id, "run_id": run_id, "run_name": run.info.run_name,
           "dataset": Path(tiny.raw).name}  # fmt: skip
    ui.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _wait_for_text(driver, *texts: str) -> str:
    """The page's visible text once it holds every one of ``texts`` (fails after WAIT_S)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + WAIT_S
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    pytest.fail(f"{driver.current_url}: {[t for t in texts if t not in body]} not on the page:\n{body[:2000]}")


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel on the first visit; a user closes it."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        if button.is_displayed():
            button.click()


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if target := os.environ.get("SEGCORE_UI_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def test_the_experiment_opens_on_its_runs_with_their_dataset(logged, browser, tmp_path):
    from segcore.tracking import ui_url

    browser.get(ui_url(logged["url"], logged["experiment_id"]))  # the link segcore prints
    body = _wait_for_text(browser, logged["run_name"], "Dataset", logged["dataset"])
    _close_assistant(browser)
    assert "/runs" in browser.current_url and "Token Usage" not in body  # the runs table, not GenAI's overview
    assert _screenshot(browser, tmp_path, "mlflow-runs.png").stat().st_size > 10_000


def test_a_run_shows_its_dataset_dice_per_epoch_system_metrics_and_plots(logged, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from segcore.tracking import ui_url

    run_page = ui_url(logged["url"], logged["experiment_id"], logged["run_id"])
    browser.get(run_page)
    _wait_for_text(browser, logged["run_name"], logged["dataset"], "val_dice")  # overview: datasets, metrics

    browser.get(run_page.replace("?", "/model-metrics?"))
    _wait_for_text(browser, "Model metrics")
    _close_assistant(browser)
    browser.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric']").send_keys("val_dice")
    _wait_for_text(browser, "val_dice", "Step")  # charts over epochs (steps 1, 2)
    section = browser.find_elements(By.XPATH, "//*[normalize-space(text())='val_dice']")
    assert section, "no val_dice chart section"
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", section[-1])
    time.sleep(1)
    _screenshot(browser, tmp_path, "mlflow-dice-chart.png")

    browser.get(run_page.replace("?", "/system-metrics?"))
    _wait_for_text(browser, "cpu_utilization_percentage")

    browser.get(run_page.replace("?", "/artifacts?"))
    _wait_for_text(browser, "plots", "bundle", "model")
