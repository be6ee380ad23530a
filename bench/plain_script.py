"""The plain script a user would write instead of the pipeline (the benchmark's baseline).

    APIXO_API_KEY=... python bench/plain_script.py manifest.csv out/ [--concurrency 100]

One asyncio task per manifest row (`id,image_url,prompt`), at most `--concurrency` at once
(a semaphore): submit (a 429 is retried after its Retry-After, else 10 s), wait the provider's
60 s, read the status every 15 s until it ends, download the video to out/<id>.mp4. No ledger,
no resume, no image checks, no money guards: what a careful afternoon produces.

`TIME_SCALE` (environment, default 1) multiplies the provider's schedule (60 s, 15 s, 10 s), for
the benchmark, whose emulator runs the provider's clock at the same scale.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from pathlib import Path

import httpx

BASE_URL = os.environ.get("APIXO_BASE_URL", "https://api.apixo.ai")
MODEL = "hailuo-2-3-fast"
SCALE = float(os.environ.get("TIME_SCALE", "1"))
FIRST_POLL_S = 60 * SCALE  # the provider's guidance: first read after about 60 s
POLL_S = 15 * SCALE  # then every 15 s
RETRY_429_S = 10 * SCALE  # when a 429 has no Retry-After
GIVE_UP_S = 600 * SCALE  # about 10 minutes


async def generate(
    client: httpx.AsyncClient, slots: asyncio.Semaphore, row: dict[str, str], out: Path
) -> str:
    async with slots:
        body = {
            "request_type": "async",
            "provider": "auto",
            "input": {
                "mode": "standard-image-to-video",
                "prompt": row["prompt"],
                "image_urls": [row["image_url"]],
                "duration": 6,
            },
        }
        while True:
            r = await client.post(f"/api/v1/generateTask/{MODEL}", json=body)
            if r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("Retry-After", RETRY_429_S)))
                continue
            r.raise_for_status()
            task_id = r.json()["data"]["taskId"]
            break

        await asyncio.sleep(FIRST_POLL_S)
        waited = FIRST_POLL_S
        while True:
            r = await client.get(f"/api/v1/statusTask/{MODEL}", params={"taskId": task_id})
            r.raise_for_status()
            data = r.json()["data"]
            if data["state"] == "success":
                url = json.loads(data["resultJson"])["resultUrls"][0]
                break
            if data["state"] == "failed":
                return f"failed {data.get('failCode')}"
            if waited > GIVE_UP_S:
                return "timed out"
            await asyncio.sleep(POLL_S)
            waited += POLL_S

        async with client.stream("GET", url) as video:
            video.raise_for_status()
            with (out / f"{row['id']}.mp4").open("wb") as fh:
                async for chunk in video.aiter_bytes():
                    fh.write(chunk)
        return "succeeded"


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--concurrency", type=int, default=10)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(args.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))

    headers = {"Authorization": f"Bearer {os.environ['APIXO_API_KEY']}"}
    async with httpx.AsyncClient(base_url=BASE_URL, headers=headers, timeout=60) as client:
        slots = asyncio.Semaphore(args.concurrency)
        results = await asyncio.gather(
            *(generate(client, slots, row, out) for row in rows), return_exceptions=True
        )
    counts: dict[str, int] = {}
    for row, result in zip(rows, results, strict=True):
        outcome = result if isinstance(result, str) else f"error {type(result).__name__}"
        if outcome != "succeeded":
            print(f"{row['id']}: {outcome}", file=sys.stderr)
        counts[outcome] = counts.get(outcome, 0) + 1
    print(json.dumps(counts))
    return 0 if counts.get("succeeded") == len(rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
