"""Request helpers shared by the emulator tests."""

from __future__ import annotations

import time
from typing import Any

import httpx

SUBMIT = "/api/v1/generateTask/hailuo-2-3-fast"
STATUS = "/api/v1/statusTask/hailuo-2-3-fast"
BALANCE = "/api/v1/apikeys/current-balance"


def task_body(
    base_url: str,
    prompt: str = "slow parallax",
    image: str = "landscape.jpg",
    mode: str = "standard-image-to-video",
    duration: Any = 6,
    **extra: Any,
) -> dict[str, Any]:
    inp: dict[str, Any] = {
        "mode": mode,
        "prompt": prompt,
        "image_urls": [f"{base_url}/files/{image}"],
        "duration": duration,
    }
    return {"request_type": "async", "provider": "auto", "input": inp, **extra}


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    resp = client.post(SUBMIT, json=body)
    assert resp.status_code == 200, resp.text
    payload = resp.json()
    assert payload["code"] == 200
    return str(payload["data"]["taskId"])


def read(client: httpx.Client, task_id: str) -> dict[str, Any]:
    resp = client.get(STATUS, params={"taskId": task_id})
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


def wait_done(client: httpx.Client, task_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = read(client, task_id)
        if data["state"] in ("success", "failed"):
            return data
        assert time.monotonic() < deadline, f"task still {data['state']}"
        time.sleep(0.02)
