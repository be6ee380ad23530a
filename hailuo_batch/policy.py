"""Policy as plain functions: failure classification, poll schedule, cost. No Prefect, no I/O.

The flow calls these; tests exercise them directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from hailuo_batch.settings import FailClass, Settings

#: The contract's failCode table. Users move a code with `HAILUO_FAILCODE_POLICY`.
FAILCODE_TABLE: dict[str, FailClass] = {
    **dict.fromkeys(
        (
            "CONTENT_VIOLATION",
            "NSFW_DETECTED",
            "SensitiveContent",
            "SensitiveContentDetected",
            "InputImageSensitiveContentDetected",
            "InputOutputSensitiveContentDetected",
            "NSFW",
            "ProhibitedContentDetected",
        ),
        "content",
    ),
    **dict.fromkeys(
        (
            "INVALID_IMAGE_URL",
            "IMAGE_TOO_LARGE",
            "UNSUPPORTED_FORMAT",
            "PROMPT_TOO_LONG",
            "PromptLengthExceeded",
            "INVALID_PROMPT",
        ),
        "bad_input",
    ),
    **dict.fromkeys(
        ("IMAGE_DOWNLOAD_FAILED", "PROCESSING_TIMEOUT", "MODEL_UNAVAILABLE", "GENERATION_FAILED"),
        "transient",
    ),
    "INSUFFICIENT_CREDITS": "balance",
}


def classify_fail_code(
    code: str | None, overrides: Mapping[str, FailClass] | None = None
) -> FailClass:
    """Class of a task's `failCode`: content, bad_input, transient, balance or unknown."""
    if not code:
        return "unknown"
    if overrides and code in overrides:
        return overrides[code]
    return FAILCODE_TABLE.get(code, "unknown")


@dataclass(frozen=True)
class PollSchedule:
    """When to read a task's status: an initial wait, then a growing interval, under a deadline."""

    initial_s: float = 60.0
    interval_s: float = 15.0
    backoff: float = 1.5
    max_interval_s: float = 30.0
    timeout_s: float = 600.0

    @classmethod
    def from_settings(cls, s: Settings) -> PollSchedule:
        return cls(
            initial_s=s.poll_initial_s,
            interval_s=s.poll_interval_s,
            backoff=s.poll_backoff,
            max_interval_s=s.poll_max_interval_s,
            timeout_s=s.poll_timeout_s,
        )

    def delays(self) -> Iterator[float]:
        """Delays before each status read; their sum never passes `timeout_s`.

        The first read comes after `initial_s`; later reads follow `interval_s` multiplied by
        `backoff` each time and capped at `max_interval_s`. A last read is placed exactly at the
        deadline so a task that finishes just before it is not given up on.
        """
        elapsed = 0.0
        delay = min(self.initial_s, self.timeout_s)
        interval = self.interval_s
        while True:
            yield delay
            elapsed += delay
            if elapsed >= self.timeout_s:
                return
            delay = min(interval, self.timeout_s - elapsed)
            interval = min(interval * self.backoff, max(self.max_interval_s, self.interval_s))


@dataclass(frozen=True)
class Prices:
    """USD prices: standard mode billed by clip length, pro per task."""

    standard_6s: float = 0.19
    standard_10s: float = 0.32
    pro: float = 0.33

    @classmethod
    def from_settings(cls, s: Settings) -> Prices:
        return cls(s.price_standard_6s_usd, s.price_standard_10s_usd, s.price_pro_usd)


def estimate_cost(mode: str, duration: int | None, prices: Prices) -> float:
    """Estimated price of one clip. `mode` is the contract's mode string."""
    if mode == "pro-image-to-video":
        return prices.pro
    if duration == 10:
        return prices.standard_10s
    return prices.standard_6s


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5 - 1e-9)))
    return ordered[rank - 1]


def not_forced_again(
    fail_code: str | None, overrides: Mapping[str, FailClass] | None = None
) -> str | None:
    """Why `force` alone must not pay again for an item whose task ended with `fail_code`:
    the contract never resubmits a content violation automatically, nor bad input unchanged
    (the same inputs fail again, and are paid for again). None: force may resubmit it. A rerun
    that names the failCode (`rerun-failed --fail-code`) says the user changed what the row
    points at, and resubmits it."""
    cls = classify_fail_code(fail_code, overrides)
    if cls == "content":
        return f"{fail_code} is a content violation: never resubmitted automatically"
    if cls == "bad_input":
        return f"{fail_code} is bad input: not resubmitted unchanged"
    return None


def after_failure(fail_class: FailClass, resubmits: int, max_resubmits: int) -> str:
    """What to do with an item whose task ended `failed`.

    `resubmits`: the resubmissions after a transient failure the item has already used (since its
    last forced run, see `ledger.Plan`). Only those count against `max_resubmits`: a POST whose
    outcome was unknown is reported uncertain by its run and paid for under that report, so it
    never uses up the resubmission the first task that really ran and failed is owed.

    Returns "skip" (content policy: record, never resubmit), "resubmit" (transient, resubmissions
    left), "stop_submitting" (the provider says the balance is gone) or "fail".
    """
    if fail_class == "content":
        return "skip"
    if fail_class == "transient" and resubmits < max_resubmits:
        return "resubmit"
    if fail_class == "balance":
        return "stop_submitting"
    return "fail"
