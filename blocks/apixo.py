"""Prefect blocks: typed, documented configuration loaded inside flows (never at import time)."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from hailuo_batch.settings import DEFAULT_BASE_URL


class ApixoCredentials(Block):
    """apixo API credentials. The key is stored encrypted by Prefect and never shown."""

    _block_type_name = "apixo Credentials"
    _block_type_slug = "apixo-credentials"
    _description = "API key and base URL for the apixo hailuo-2-3-fast image-to-video API."

    api_key: SecretStr = Field(description="apixo API key (sent as a Bearer token).")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="API base URL. Point it at `hailuo-batch emulator` for local runs.",
    )


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

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options for this location (empty for local paths)."""
        if not self.url.startswith("s3://"):
            return {}
        opts: dict[str, object] = {}
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
