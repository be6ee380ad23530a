"""HTTP plumbing: the retry policy, the single retry loop and the httpx client factory.

All retries of the apixo client go through `retry_call`; which errors are retried is decided by
the caller's `should_retry` predicate (submit is stricter than reads, see `client.py`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx
from pydantic import SecretStr

from hailuo_batch.apixo.errors import ApixoError, RateLimitedError

logger = logging.getLogger("hailuo_batch.apixo")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: `max_attempts` tries within `max_elapsed_s` seconds."""

    max_attempts: int = 6
    max_elapsed_s: float = 120.0
    base_s: float = 1.0
    max_s: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_s <= 0 or self.max_s <= 0 or self.max_elapsed_s <= 0:
            raise ValueError("base_s, max_s and max_elapsed_s must be positive")

    def backoff(self, attempt: int) -> float:
        """The un-jittered delay after failed attempt number `attempt` (1-based)."""
        exponent = max(attempt - 1, 0)
        # Cap the exponent so huge attempt numbers cannot overflow a float.
        return min(self.max_s, self.base_s * 2 ** min(exponent, 64))

    def delay(
        self, attempt: int, retry_after: float | None = None, remaining: float | None = None
    ) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based).

        Exponential (`base_s * 2**(attempt-1)`, capped at `max_s`) with equal jitter (half fixed,
        half random), never less than `retry_after`, and never more than `remaining` (the rest
        of the elapsed budget). When the result is below `retry_after`, the budget cannot honour
        the server's request and the caller should give up.
        """
        wait = self.backoff(attempt)
        if self.jitter:
            wait = wait / 2 + random.uniform(0, wait / 2)
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        if remaining is not None:
            wait = min(wait, max(remaining, 0.0))
        return wait


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP date) into seconds, None if absent/bad."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = now if now is not None else time.time()
        seconds = when.timestamp() - current
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(seconds, 0.0)


def retry_call(
    attempt_fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    should_retry: Callable[[ApixoError], bool],
    method: str,
    path: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    may_retry: Callable[[], bool] | None = None,
) -> T:
    """Call `attempt_fn` until it succeeds, raises a non-retryable error, or the budget is spent.

    `attempt_fn` must raise `ApixoError`s only. The last error is re-raised with `.attempts` set.
    Each retry is logged at WARNING (method, path without query, attempt, reason, delay).
    `may_retry`, asked before each attempt after the first (after the wait), ends the call with
    the last error when it says no: a caller's right to send may lapse while it waits.
    """
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return attempt_fn()
        except ApixoError as exc:
            exc.attempts = attempt
            if not should_retry(exc) or attempt >= policy.max_attempts:
                raise
            remaining = policy.max_elapsed_s - (clock() - start)
            retry_after = exc.retry_after if isinstance(exc, RateLimitedError) else None
            wait = policy.delay(attempt, retry_after, remaining)
            if remaining <= 0 or (retry_after is not None and wait < retry_after):
                raise
            logger.warning(
                "apixo %s %s failed (attempt %d/%d): %s; retrying in %.2fs",
                method,
                path,
                attempt,
                policy.max_attempts,
                f"{type(exc).__name__}: {exc}",
                wait,
            )
            sleep(wait)
            if may_retry is not None and not may_retry():
                raise


def decoded_url(value: str | httpx.URL) -> httpx.URL:
    """`value` as an httpx URL whose host is known to decode. httpx decodes an "xn--" (IDNA)
    host only when the host is first asked for, and a malformed one raises there (idna's
    errors, or an IndexError) instead of at parse time; here it is `httpx.InvalidURL` at once."""
    url = value if isinstance(value, httpx.URL) else httpx.URL(value)
    try:
        url.host  # noqa: B018 - read for its check
    except (ValueError, IndexError) as exc:  # (idna's errors are ValueErrors)
        raise httpx.InvalidURL(f"malformed host: {exc}") from None
    return url


def header_safe(text: str) -> bool:
    """Whether `text` can be sent as an HTTP header value as it is (an API key): printable
    ASCII without white space. Anything else fails in h11 with the value in the error."""
    return all(ch.isascii() and ch.isprintable() and not ch.isspace() for ch in text)


def build_http_client(
    base_url: str,
    api_key: str | SecretStr | None,
    *,
    timeout: httpx.Timeout,
    transport: httpx.BaseTransport | None = None,
    follow_redirects: bool = False,
) -> httpx.Client:
    """An httpx client for `base_url`, sending `Authorization: Bearer <key>` when a key is given.

    httpx masks the Authorization header in `repr(client.headers)`; our errors never include
    request headers.
    """
    headers = {"Accept": "application/json", "User-Agent": "hailuo-batch"}
    if api_key is not None:
        secret = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        headers["Authorization"] = f"Bearer {secret}"
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        timeout=timeout,
        transport=transport,
        follow_redirects=follow_redirects,
    )
