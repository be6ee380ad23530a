"""A mixed batch through a started Prefect server, seen as a person sees it: the CLI names the
failures, and the UI's own API shows the state's name, the reasons in the item table and the
review page."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from deploy_helpers import API_KEY, PrefectServer, picture

from hailuo_batch.emulator import EmulatorHandle
from tests.flows.flowkit import FAST_FLOW_ENV

pytestmark = pytest.mark.slow  # a CLI process against a started server


def test_a_mixed_batch_tells_the_truth_in_the_cli_and_the_ui(
    prefect_server: PrefectServer, emulator: EmulatorHandle, images_dir: Path, tmp_path: Path
) -> None:
    picture(images_dir / "short.jpg", (451, 300), 90)  # breaks the short-side rule
    base = f"{emulator.base_url}/files"
    rows = [
        {"id": "dusk", "image_url": f"{base}/dusk.jpg", "prompt": "slow pan at dusk"},
        {"id": "garden", "image_url": f"{base}/garden.jpg", "prompt": "a dolly in the garden"},
        {"id": "crowd", "image_url": f"{base}/dusk.jpg", "prompt": "x [fail:CONTENT_VIOLATION]"},
        {"id": "too-short", "image_url": f"{base}/short.jpg", "prompt": "refused"},
    ]
    manifest = tmp_path / "person.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image_url", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    env = {
        **prefect_server.env,
        **FAST_FLOW_ENV,
        "APIXO_API_KEY": API_KEY,
        "APIXO_BASE_URL": emulator.base_url,
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hailuo_batch.cli", "run", str(manifest), "--output", str(out),
         "--quiet"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    # the CLI names every item that did not succeed, with its reason, and the run in the UI
    # with its row, what was paid for first (the skipped violation), then what cost nothing
    assert "skipped       row 3 (crowd): CONTENT_VIOLATION" in text
    assert "invalid       row 4 (too-short): field image_url:" in text and "short side" in text
    assert text.index("(crowd): CONTENT_VIOLATION") < text.index("(too-short): field")
    assert "review:" in text and "index.html" in text
    assert "Prefect:" in text and "/runs/flow-run/" in text
    run_id = text.split("/runs/flow-run/", 1)[1].split()[0]

    api = prefect_server.api
    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
    assert run["state"]["name"] == "CompletedWithFailures", run["state"]
    assert "2 of 4 items succeeded" in run["state"]["message"]
    query = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    deadline = time.monotonic() + 60  # artifacts reach the server through its event pipeline
    while True:
        arts = httpx.post(f"{api}/artifacts/filter", json=query, timeout=10).json()
        kinds = {a["type"] for a in arts}
        if {"table", "markdown"} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(1)
    table = next(a for a in arts if a["type"] == "table")
    assert table["key"] == "items-person"  # one key per manifest: the history of every night
    data = table["data"] if isinstance(table["data"], list) else json.loads(table["data"])
    reasons = {row["id"]: row["reason"] for row in data}
    assert reasons["crowd"].startswith("CONTENT_VIOLATION")
    assert "short side" in reasons["too-short"]
    assert reasons["dusk"] == "" and reasons["garden"] == ""
    summary = next(a for a in arts if a["type"] == "markdown")
    page = out / "runs"
    assert "index.html" in summary["data"] and str(page) in summary["data"]
    assert len(list(page.glob("*/index.html"))) == 1
