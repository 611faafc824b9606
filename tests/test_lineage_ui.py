"""What a user sees: `mlflow ui` on the trained chain's sqlite store (a copy), opened in Debian's chromium through
Playwright. The runs page, in the model-training view, lists the parent run with the stage runs under it, each with its dataset (name and DVC md5) and its source commit (Version column).

Needs /usr/bin/chromium (Debian package `chromium`, installed by infra/ci/install-services.sh); Playwright drives
it as it is (no `playwright install`, no download). With EDTALK_UPDATE_SCREENSHOTS=1 the page is saved as
docs/images/mlflow-runs.png (the README's picture)."""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from services import BIN, REPO_ROOT, free_port, start, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "mlflow-runs.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium: run infra/ci/install-services.sh (apt chromium)"
    ),
]


@pytest.fixture
def mlflow_ui(trained_chain, tmp_path):
    """`mlflow ui` (one worker, 127.0.0.1, its own process group) on a copy of the chain's store."""
    store = tmp_path / "mlflow.db"
    shutil.copy(trained_chain.tracking_uri[len("sqlite:///") :], store)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{store}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = start("mlflow ui", cmd, tmp_path / "mlflow-ui.log", env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        # minutes on a loaded 2-core machine: the server imports all of MLflow before it listens
        wait_until(
            lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200, 240, proc, "/health"
        )
        yield url, f"sqlite:///{store}"
    finally:
        proc.stop()


def test_runs_page_lists_datasets_and_source_commit(mlflow_ui, trained_chain, tiny_data):
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from pipelines import lineage

    url, store = mlflow_ui
    client = MlflowClient(store)
    exp_id = client.get_run(trained_chain.parent_run_id).info.experiment_id
    commit = client.get_run(trained_chain.autoencoder["run_id"]).data.tags["mlflow.source.git.commit"]
    digest = lineage.dvc_md5(tiny_data)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 800})
            # MLflow 3.18's UI picks its view per browser (GenAI by default), not from the experiment's kind tag:
            # the link the demo prints opens the model-training view
            page.goto(f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
            page.get_by_text("trained_chain").first.wait_for(timeout=180_000)
            assert page.get_by_role("link", name="Model registry").count() == 1  # the model-training sidebar
            # the stage runs are nested under the invocation's run: expand it
            parent = page.locator('[role="gridcell"]', has=page.get_by_role("link", name="trained_chain"))
            parent.first.locator("button").first.click()
            page.get_by_text(f"processed/segments ({digest})").wait_for(timeout=60_000)
            assert page.get_by_text(f"processed/pairs ({digest})").count() == 1
            assert page.get_by_text("edtalk train autoencoder").count() == 1
            # the Version column (hidden by default) shows the source commit of every run
            page.get_by_test_id("column-selection-dropdown").first.click()
            page.get_by_text("Version", exact=True).first.click()
            page.keyboard.press("Escape")
            page.get_by_text(commit[:6], exact=True).first.wait_for(timeout=30_000)
            assert page.get_by_text(commit[:6], exact=True).count() == 3  # parent + two stage runs
            if os.environ.get("EDTALK_UPDATE_SCREENSHOTS") == "1":
                close = page.get_by_role("button", name="Close")
                if close.count():
                    close.first.click()
                page.screenshot(path=str(SCREENSHOT), clip={"x": 0, "y": 0, "width": 1800, "height": 330})
        finally:
            browser.close()
