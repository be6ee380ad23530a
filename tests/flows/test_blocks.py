"""The flow reads its key and output location from Prefect blocks, loaded at run time."""

from __future__ import annotations

import asyncio

import s3fs

from blocks import ApixoCredentials, OutputStorage
from hailuo_batch.results import from_jsonl
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import API_KEY, generate_videos, items, write_csv


def test_blocks_supply_key_and_s3_output(
    flow_env, emulator, moto_server, s3_env, tmp_path, images_dir, make_image, monkeypatch
):
    # nothing in the environment: the key, the API URL and the S3 endpoint come from the blocks
    for var in ("APIXO_API_KEY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("APIXO_BASE_URL", "https://api.apixo.ai")  # overridden by the block
    get_settings.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()

    async def save() -> None:
        await ApixoCredentials(api_key=API_KEY, base_url=emulator.base_url).save(
            "test-apixo", overwrite=True
        )
        await OutputStorage(
            url=f"s3://{s3_env}/from-block",
            endpoint_url=moto_server,
            access_key_id="testing",
            secret_access_key="testing",
            region="us-east-1",
        ).save("test-videos", overwrite=True)

    asyncio.run(save())
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 2))
    state = generate_videos(
        manifest=str(m), credentials_block="test-apixo", storage_block="test-videos"
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["results"].startswith(f"s3://{s3_env}/from-block/runs/")
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": moto_server}
    )
    res = from_jsonl(fs.cat(summary["results"]).decode())
    assert [r.status for r in res] == ["succeeded", "succeeded"]
    assert fs.exists(f"{s3_env}/from-block/videos/i0.mp4")
    assert API_KEY not in fs.cat(summary["results"]).decode()


def test_a_block_that_does_not_exist_says_how_to_find_one(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    for option, slug in (
        ("credentials_block", "apixo-credentials"),
        ("storage_block", "hailuo-batch-output-storage"),
    ):
        state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), **{option: "nope"})
        assert state.name == "NotStarted", state.message
        assert (
            f"no {slug} block named 'nope'" in state.message and "prefect block ls" in state.message
        )
    assert emulator.stats()["submissions"] == 0
