"""Configuration of the local apixo emulator.

Durations that belong to the provider (queueing, generation, result URL lifetime, callback retry
delays, Retry-After hints, the callback response deadline) are multiplied by `time_scale`, so
`time_scale=0.01` turns a 120 s generation into 1.2 s. Transport-level knobs aimed at the
*client's* own timeouts (`slow_s`, `fetch_timeout_s`) are not scaled: the client's timeouts are
not scaled either.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: the most an emulated account holds: micro-dollars stay exact integers in a float's range
MAX_BALANCE_USD = 1e9


class EmulatorConfig(BaseModel):
    """Every knob of the emulator; defaults imitate the real API at real speed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535, description="0 picks a free port.")
    api_key: str | None = Field(
        default=None,
        description="Only this Bearer key is accepted; None accepts any non-empty key.",
    )
    time_scale: float = Field(
        default=1.0, gt=0, description="Multiplies every provider-side duration."
    )
    queue_s: float = Field(default=5.0, ge=0, description="Time a task stays pending.")
    processing_s: float = Field(default=120.0, ge=0, description="Nominal generation time.")
    processing_spread: float = Field(
        default=0.2, ge=0, lt=1, description="Random +- fraction of it."
    )
    processing_distribution: Literal["uniform", "lognormal"] = Field(
        default="uniform",
        description="uniform: processing_s +- processing_spread; lognormal: median processing_s, "
        "log standard deviation processing_sigma (a long right tail, like real generation times).",
    )
    processing_sigma: float = Field(
        default=0.4, ge=0, le=3, description="Log standard deviation of lognormal processing times."
    )
    concurrency: int = Field(default=20, ge=1, description="Unfinished tasks per key before 429.")
    fault_rate: float = Field(
        default=0.0, ge=0, le=1, description="Chance that a request gets a fault."
    )
    hostile_faults: bool = Field(
        default=False,
        description="Random faults include malformed status answers and non-video downloads.",
    )
    seed: int | None = Field(
        default=None, description="Seed of every random choice (faults, spread)."
    )
    balance_usd: float = Field(
        default=1000.0, ge=0, le=MAX_BALANCE_USD, description="Starting account balance."
    )
    price_standard_6s: float = Field(default=0.19, ge=0)
    price_standard_10s: float = Field(default=0.32, ge=0)
    price_pro: float = Field(default=0.33, ge=0)
    result_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="Lifetime of a result URL from the read that issued it (scaled).",
    )
    fps: int = Field(default=24, ge=1, le=60, description="Frame rate of result videos.")
    callback_retry_s: tuple[float, ...] = Field(
        default=(30.0, 120.0, 600.0), description="Delays before callback re-deliveries (scaled)."
    )
    callback_timeout_s: float = Field(
        default=30.0, gt=0, description="Receiver deadline per delivery (scaled, at least 1 s)."
    )
    callback_duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    callback_loss_rate: float = Field(default=0.0, ge=0, le=1)
    files_dir: str | None = Field(
        default=None, description="Served read-only under GET /files/{path}."
    )

    @field_validator("files_dir")
    @classmethod
    def _a_folder(cls, value: str | None) -> str | None:
        # a folder still to be filled is fine (a test writes its images after the start)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a folder")
        return value

    slow_s: float = Field(default=2.0, ge=0, description="Delay of a 'slow' fault (not scaled).")
    public_base_url: str | None = Field(
        default=None, description="Base of result URLs; default the bound address."
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Input image fetch timeout.")
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="Input image size limit."
    )
    cache_dir: str | None = Field(
        default=None, description="Encoded video cache; default <tmp>/hailuo-batch-emulator-cache."
    )
    encode_workers: int = Field(default=2, ge=1, description="Threads encoding videos.")
    access_log: bool = Field(default=False, description="uvicorn access log (URLs carry no key).")
    timings_file: str | None = Field(
        default=None,
        description="Where the record of task timings (GET /_emulator/timings) is written as JSON "
        "when the emulator stops.",
    )

    def scaled(self, seconds: float) -> float:
        """A provider-side duration on this emulator's clock."""
        return seconds * self.time_scale

    def resolved_cache_dir(self) -> Path:
        """Where encoded videos are cached (shared across runs: keys include all inputs)."""
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(tempfile.gettempdir()) / "hailuo-batch-emulator-cache"
