"""Generic fixtures shared by the whole test suite: a real S3 (moto) server and image files."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

MakeImage = Callable[..., Path]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (ephemeral port) for the session; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Point the standard AWS variables at the moto server and create a fresh bucket (yielded)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def make_image(tmp_path: Path) -> MakeImage:
    """Factory: `make_image(width, height, fmt="JPEG", name=None, **save_kwargs) -> Path`.

    Writes a real image file with Pillow (JPEG, PNG, WEBP, GIF, ...) under tmp_path.
    """
    counter = iter(range(1_000_000))

    def _make(
        width: int, height: int, fmt: str = "JPEG", name: str | None = None, **save_kwargs: object
    ) -> Path:
        ext = {"JPEG": "jpg"}.get(fmt.upper(), fmt.lower())
        path = tmp_path / (name or f"img-{next(counter)}-{width}x{height}.{ext}")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (200, 80, 40)).save(path, fmt.upper(), **save_kwargs)
        return path

    return _make
