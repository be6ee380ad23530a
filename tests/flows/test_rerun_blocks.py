"""A rerun reaches its results file, output and key through the same blocks as the run."""

from __future__ import annotations

import asyncio

import s3fs

from blocks import ApixoCredentials, OutputStorage
from flows.batch import run_flow_sync
from flows.rerun import rerun_failed
from hailuo_batch.results import from_jsonl
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import API_KEY, generate_videos, write_csv


def test_rerun_uses_the_storage_and_credentials_blocks(
    flow_env, emulator, moto_server, s3_env, tmp_path, images_dir, make_image, monkeypatch
):
    # nothing in the environment: without the blocks the results file cannot even be read
    for var in ("APIXO_API_KEY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HAILUO_TRANSIENT_MAX_RESUBMITS", "0")
    get_settings.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()

    async def save() -> None:
        await ApixoCredentials(api_key=API_KEY, base_url=emulator.base_url).save(
            "rerun-apixo", overwrite=True
        )
        await OutputStorage(
            url=f"s3://{s3_env}/rerun-block",
            endpoint_url=moto_server,
            access_key_id="testing",
            secret_access_key="testing",
            region="us-east-1",
        ).save("rerun-videos", overwrite=True)

    asyncio.run(save())
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    img = f"{emulator.base_url}/files/a.jpg"
    rows = [
        {"id": "ok", "image_url": img, "prompt": "fine"},
        {"id": "flaky", "image_url": img, "prompt": "f [flaky:GENERATION_FAILED]"},
    ]
    blocks = {"credentials_block": "rerun-apixo", "storage_block": "rerun-videos"}
    first = generate_videos(manifest=str(write_csv(tmp_path / "m.csv", rows)), **blocks)
    results_url = first.result()["results"]
    assert results_url.startswith(f"s3://{s3_env}/rerun-block/runs/")

    state = run_flow_sync(rerun_failed, results=results_url, **blocks)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["results"].startswith(f"s3://{s3_env}/rerun-block/runs/")
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": moto_server}
    )
    res = {r.id: r for r in from_jsonl(fs.cat(summary["results"]).decode())}
    assert set(res) == {"flaky"} and res["flaky"].status == "succeeded"
    assert fs.exists(f"{s3_env}/rerun-block/videos/flaky.mp4")
