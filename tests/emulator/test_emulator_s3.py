"""The emulator fetches input images from presigned S3 URLs (moto server over loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from emulator_helpers import submit, task_body, wait_done
from moto.server import ThreadedMotoServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_presigned_s3_image_is_fetched(
    make_emulator: Any, s3_endpoint: str, files_dir: Path
) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    s3.create_bucket(Bucket="inputs")
    key = "batch 1/city+dusk.jpg"
    s3.put_object(Bucket="inputs", Key=key, Body=(files_dir / "landscape.jpg").read_bytes())
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "inputs", "Key": key}, ExpiresIn=600
    )
    emu = make_emulator()
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        body = task_body(emu.base_url)
        body["input"]["image_urls"] = [url]
        data = wait_done(c, submit(c, body))
        missing = task_body(emu.base_url)
        missing["input"]["image_urls"] = [url.replace("city", "town")]
        failed = wait_done(c, submit(c, missing))
    assert data["state"] == "success", data
    assert (failed["state"], failed["failCode"]) == ("failed", "IMAGE_DOWNLOAD_FAILED")
