"""All configuration in one place: one pydantic-settings class read from the environment.

Every knob has an environment variable. The API key is `APIXO_API_KEY` and the base URL
`APIXO_BASE_URL` (the provider's own names); everything else is `HAILUO_*`. S3 endpoints and
credentials are *not* settings here: s3fs/botocore read the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), so any
S3-compatible store works unchanged.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_URL = "https://api.apixo.ai"

FailClass = Literal["content", "bad_input", "transient", "balance", "unknown"]


class Settings(BaseSettings):
    """Settings for the client, the flow, the CLI and the receiver."""

    model_config = SettingsConfigDict(env_prefix="HAILUO_", extra="ignore", populate_by_name=True)

    # --- provider -----------------------------------------------------------------------------
    apixo_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("APIXO_API_KEY", "apixo_api_key"),
        description="apixo API key (Bearer token). Never logged.",
    )
    apixo_base_url: str = Field(
        default=DEFAULT_BASE_URL,
        validation_alias=AliasChoices("APIXO_BASE_URL", "apixo_base_url"),
        description="apixo API base URL; point it at `hailuo-batch emulator` for local runs.",
    )

    # --- HTTP transport -----------------------------------------------------------------------
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Read timeout per response chunk.")
    retry_max_attempts: int = Field(
        6, ge=1, le=50, description="Attempts per idempotent call (status, balance, download)."
    )
    retry_max_elapsed_s: float = Field(
        120.0, gt=0, description="Give up retrying one call after this many seconds in total."
    )
    retry_base_s: float = Field(1.0, gt=0, description="First backoff delay; doubles each retry.")
    retry_max_s: float = Field(30.0, gt=0, description="Cap on one backoff delay.")

    store_retry_delay_s: float = Field(
        2.0,
        ge=0,
        description="A broken video download is retried twice, after this and 5x this delay.",
    )

    # --- polling (provider guidance: 60 s first read, every 15 s x1.5 capped 30 s, 10 min) ------
    poll_initial_s: float = Field(60.0, ge=0, description="Wait before the first status read.")
    poll_interval_s: float = Field(15.0, gt=0, description="Interval between status reads.")
    poll_backoff: float = Field(1.5, ge=1.0, description="Interval multiplier after each read.")
    poll_max_interval_s: float = Field(30.0, gt=0, description="Cap on the poll interval.")
    poll_timeout_s: float = Field(600.0, gt=0, description="Give up on a task after this long.")
    not_found_grace_s: float = Field(
        60.0, ge=0, description="A 404 on a task we created is transient for this long."
    )

    # --- failure policy -----------------------------------------------------------------------
    transient_max_resubmits: int = Field(
        2, ge=0, le=10, description="Resubmissions of an item after a transient failCode."
    )
    failcode_policy: dict[str, FailClass] = Field(
        default_factory=dict,
        description='Overrides of the failCode table, JSON: {"GENERATION_FAILED": "bad_input"}.',
    )

    # --- resume and claims --------------------------------------------------------------------
    uncertain_policy: Literal["resubmit", "hold"] = Field(
        "resubmit",
        description="Items whose earlier POST has an unknown outcome: resubmit them, or hold them "
        "for a person (status `uncertain`).",
    )
    lease_ttl_s: float = Field(
        120.0,
        gt=0,
        description="A run that has not renewed its lease for this long is dead; its claims on "
        "items may be taken over by another run.",
    )

    # --- input images -------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Input image size limit.")
    fetch_timeout_s: float = Field(20.0, gt=0, description="Time limit on one image fetch.")
    allow_private_networks: bool = Field(
        False,
        description="Allow http(s) image URLs on private, loopback and link-local addresses.",
    )

    # --- money --------------------------------------------------------------------------------
    price_standard_6s_usd: float = Field(0.19, ge=0, description="Price of a 6 s 768p clip.")
    price_standard_10s_usd: float = Field(0.32, ge=0, description="Price of a 10 s 768p clip.")
    price_pro_usd: float = Field(0.33, ge=0, description="Price of a 1080p pro clip (per task).")

    # --- output -------------------------------------------------------------------------------
    output: str = Field("./output", description="Default output location (path or fsspec URL).")
    presign_expiry_s: int = Field(
        3600, gt=0, description="Lifetime of presigned URLs for staged s3/local images."
    )

    # --- callbacks ----------------------------------------------------------------------------
    callback_url: str | None = Field(None, description="Public base URL of the receiver.")
    callback_token: SecretStr | None = Field(None, description="Secret path token of the receiver.")
    callback_store: str = Field(
        "./callbacks", description="fsspec URL where the receiver records deliveries."
    )
    callback_check_s: float = Field(
        2.0, gt=0, description="How often a callback-mode run looks for new deliveries."
    )
    callback_backstop_s: float = Field(
        120.0,
        gt=0,
        description="Callback mode: interval of the slow status poll that recovers lost callbacks.",
    )

    @field_validator("apixo_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("APIXO_BASE_URL must start with http:// or https://")
        return v


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests call `get_settings.cache_clear()`."""
    return Settings()
