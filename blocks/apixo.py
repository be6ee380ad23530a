"""Prefect blocks: typed, documented configuration loaded inside flows (never at import time)."""

from __future__ import annotations

from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from hailuo_batch.apixo import DEFAULT_BASE_URL, ApixoClient
from hailuo_batch.netguard import GuardedTransport
from hailuo_batch.settings import (
    BadSettingError,
    Settings,
    check_block_name,
    check_output_url,
    get_settings,
)
from hailuo_batch.storage import OutputStore


class ApixoCredentials(CredentialsBlock):
    """apixo API credentials. The key is stored encrypted by Prefect and never shown."""

    _block_type_name = "apixo Credentials"
    _block_type_slug = "apixo-credentials"
    _description = "API key and base URL for the apixo hailuo-2-3-fast image-to-video API."

    api_key: SecretStr = Field(description="apixo API key (sent as a Bearer token).")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="API base URL. Point it at `hailuo-batch emulator` for local runs.",
    )

    def get_client(self, settings: Settings | None = None, **kwargs: Any) -> ApixoClient:
        """An apixo client with this key and base URL, and the timeouts and retry bounds of
        `settings` (default: the environment's). `kwargs` go to `ApixoClient`."""
        settings = settings or get_settings()
        return settings.apixo_client(api_key=self.api_key, base_url=self.base_url, **kwargs)


class OutputStorage(Block):
    """Where videos and results go: an fsspec URL plus its storage options."""

    _block_type_name = "hailuo-batch Output Storage"
    _block_type_slug = "hailuo-batch-output-storage"
    _description = "Output location for hailuo-batch: local folder or s3://bucket/prefix."

    url: str = Field(description="Local path, file:// or s3://bucket/prefix URL for the output.")
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, R2, ...). Empty: AWS or AWS_ENDPOINT_URL.",
    )
    access_key_id: str | None = Field(
        default=None, description="S3 access key id. Empty: the standard AWS credential chain."
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key. Empty: the standard AWS credential chain."
    )
    region: str | None = Field(default=None, description="S3 region, when the store needs one.")

    def get_store(self, url: str | None = None) -> OutputStore:
        """The output store at `url` (default: this block's URL) with this block's S3 options.
        A URL that is not a usable output raises `BadSettingError`."""
        url = self.url if url is None else url
        return OutputStore(check_output_url(url), self.storage_options() or None)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this location (empty for local paths)."""
        if not self.url.startswith("s3://"):
            return {}
        opts: dict[str, Any] = {}
        if self.access_key_id:
            opts["key"] = self.access_key_id
        if self.secret_access_key:
            opts["secret"] = self.secret_access_key.get_secret_value()
        client_kwargs: dict[str, str] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


async def _load(kind: type[Block], name: str, setting: str) -> Block:
    """The block `name` of `kind`; one that does not exist is a bad setting that says how to
    find or make one."""
    try:
        return await kind.aload(name)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        slug = kind.get_block_type_slug()
        raise BadSettingError(
            f"{setting}: no {slug} block named {name!r} on this Prefect server: "
            f"`prefect block ls` lists them; create it as the README's Blocks section shows"
        ) from None


async def open_store(output: str | None, block: str | None, settings: Settings) -> OutputStore:
    """`output`, else the OutputStorage block `block`'s URL, else HAILUO_OUTPUT (with the block's
    S3 options whenever a block is named)."""
    name = check_block_name(block, name="storage_block")
    if name is None:
        return OutputStore(check_output_url(settings.output if output is None else output))
    storage: OutputStorage = await _load(OutputStorage, name, "storage_block")  # type: ignore[assignment]
    return storage.get_store(output)


async def open_client(block: str | None, settings: Settings) -> ApixoClient:
    """The ApixoCredentials block `block`'s client, else the environment's; downloads guarded
    like image checks, a submit's 429 handed to the run's limiter at once."""
    kwargs: dict[str, Any] = {
        "download_transport": GuardedTransport(allow_private=settings.allow_private_networks),
        "retry_rate_limited_submits": False,
    }
    name = check_block_name(block, name="credentials_block")
    if name is None:
        return settings.apixo_client(**kwargs)
    creds: ApixoCredentials = await _load(ApixoCredentials, name, "credentials_block")  # type: ignore[assignment]
    return creds.get_client(settings, **kwargs)
