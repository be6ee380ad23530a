"""Helpers shared by the flow tests."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import httpx

from flows.batch import run_generate_videos
from hailuo_batch.apixo import ApixoClient
from hailuo_batch.results import ItemResult, from_jsonl

API_KEY = "sk-test-SECRET-0123456789abcdef"
COLUMNS = ["id", "image_url", "prompt", "mode", "duration"]
#: settings for flows against the emulator: loopback images allowed, fast polls and retries
FAST_FLOW_ENV = {
    "HAILUO_ALLOW_PRIVATE_NETWORKS": "1",
    "HAILUO_POLL_INITIAL_S": "0.2",
    "HAILUO_POLL_INTERVAL_S": "0.1",
    "HAILUO_POLL_MAX_INTERVAL_S": "0.3",
    "HAILUO_POLL_TIMEOUT_S": "60",
    "HAILUO_RETRY_BASE_S": "0.05",
    "HAILUO_RETRY_MAX_S": "0.2",
    "HAILUO_STORE_RETRY_DELAY_S": "0.1",
}


def generate_videos(**kw: Any) -> Any:
    """Run the async flow to its final state from a sync test."""
    kw.pop("return_state", None)
    return run_generate_videos(**kw)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    cols = sorted({k for r in rows for k in r}, key=COLUMNS.index)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def results_of(summary: dict[str, Any]) -> dict[str, ItemResult]:
    return {r.id: r for r in from_jsonl(Path(summary["results"]).read_text())}


def served_sha256(base_url: str, task_id: str) -> str:
    with ApixoClient(API_KEY, base_url) as c:
        url = c.get_status(task_id).result_urls[0]
    return hashlib.sha256(httpx.get(url, timeout=30).content).hexdigest()


def items(
    images_dir: Path, make_image: Any, emulator: Any, n: int, prefix: str = "p"
) -> list[dict[str, str]]:
    """n valid rows sharing one served image, with unique prompts."""
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    return [
        {"id": f"i{k}", "image_url": f"{emulator.base_url}/files/a.jpg", "prompt": f"{prefix}{k}"}
        for k in range(n)
    ]
