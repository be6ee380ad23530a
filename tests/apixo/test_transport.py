"""RetryPolicy arithmetic and the retry loop, without HTTP."""

from __future__ import annotations

import logging

import httpx
import pytest

from hailuo_batch.apixo import (
    ApixoError,
    InvalidRequestError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    retry_call,
)
from hailuo_batch.apixo.transport import decoded_url, header_safe, parse_retry_after
from hailuo_batch.settings import Settings


def test_backoff_doubles_and_is_capped() -> None:
    p = RetryPolicy(max_attempts=10, base_s=1.0, max_s=30.0, jitter=False)
    assert [p.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert p.delay(10_000) == 30


def test_equal_jitter_stays_within_half_and_full_backoff() -> None:
    p = RetryPolicy(base_s=2.0, max_s=30.0, jitter=True)
    for attempt in range(1, 8):
        full = min(30.0, 2.0 * 2 ** (attempt - 1))
        samples = [p.delay(attempt) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples)
        assert len(set(samples)) > 1  # actually jittered


def test_retry_after_is_a_floor() -> None:
    p = RetryPolicy(base_s=1.0, max_s=30.0, jitter=True)
    assert all(p.delay(1, retry_after=12.5) >= 12.5 for _ in range(50))
    # a Retry-After below the backoff does not shorten it
    assert RetryPolicy(base_s=8, jitter=False).delay(1, retry_after=1.0) == 8


def test_delay_bounded_by_remaining_budget() -> None:
    p = RetryPolicy(base_s=10.0, max_s=30.0, jitter=False)
    assert p.delay(3, remaining=5.0) == 5.0
    assert p.delay(3, retry_after=20.0, remaining=5.0) == 5.0
    assert p.delay(3, remaining=-1.0) == 0.0


def test_from_settings() -> None:
    s = Settings(retry_max_attempts=3, retry_max_elapsed_s=9.0, retry_base_s=0.5, retry_max_s=4.0)
    assert s.retry_policy() == RetryPolicy(3, 9.0, 0.5, 4.0, True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("", None), (None, None), ("soon", None)],
)
def test_parse_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    # Thu, 01 Jan 2026 00:00:30 GMT is 30 s after "now"
    now = 1767225600.0  # 2026-01-01T00:00:00Z
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == pytest.approx(30.0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def failing(errors: list[ApixoError], result: str = "ok"):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


def always_retry(exc: ApixoError) -> bool:
    return isinstance(exc, RateLimitedError | ServerError)


def test_retry_call_retries_then_succeeds_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    fn, calls = failing([ServerError("boom", 503), RateLimitedError("slow", retry_after=4.0)])
    policy = RetryPolicy(max_attempts=5, base_s=1.0, max_s=30.0, jitter=False)
    with caplog.at_level(logging.WARNING, logger="hailuo_batch.apixo"):
        out = retry_call(
            fn,
            policy=policy,
            should_retry=always_retry,
            method="GET",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
        )
    assert out == "ok"
    assert calls["n"] == 3
    assert clock.sleeps == [1.0, 4.0]  # backoff, then Retry-After (above the 2 s backoff)
    msgs = [r.getMessage() for r in caplog.records if r.name == "hailuo_batch.apixo"]
    assert len(msgs) == 2
    assert "GET /x" in msgs[0] and "attempt 1/5" in msgs[0] and "ServerError" in msgs[0]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_retry_call_stops_at_max_attempts() -> None:
    clock = FakeClock()
    fn, calls = failing([ServerError("boom", 500) for _ in range(10)])
    with pytest.raises(ServerError) as ei:
        retry_call(
            fn,
            policy=RetryPolicy(max_attempts=3, jitter=False),
            should_retry=always_retry,
            method="GET",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
        )
    assert calls["n"] == 3
    assert ei.value.attempts == 3
    assert len(clock.sleeps) == 2


def test_retry_call_does_not_retry_non_retryable() -> None:
    clock = FakeClock()
    fn, calls = failing([InvalidRequestError("bad")])
    with pytest.raises(InvalidRequestError):
        retry_call(
            fn,
            policy=RetryPolicy(),
            should_retry=always_retry,
            method="GET",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
        )
    assert calls["n"] == 1
    assert clock.sleeps == []


def test_retry_call_asks_may_retry_after_each_wait() -> None:
    """A caller whose right to send lapses while it waits (a run's lease) gets the last error
    back instead of another attempt; `may_retry` is never asked before the first."""
    clock = FakeClock()
    fn, calls = failing([ServerError("boom", 503) for _ in range(10)])
    answers = iter([True, False])
    asked: list[float] = []

    def may_retry() -> bool:
        asked.append(clock())
        return next(answers)

    with pytest.raises(ServerError) as ei:
        retry_call(
            fn,
            policy=RetryPolicy(max_attempts=10, jitter=False),
            should_retry=always_retry,
            method="POST",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
            may_retry=may_retry,
        )
    assert calls["n"] == 2 and ei.value.attempts == 2
    assert asked == [1.0, 3.0]  # asked after each wait, at the moment it would send


def test_retry_call_respects_elapsed_budget() -> None:
    clock = FakeClock()
    fn, calls = failing([ServerError("boom", 500) for _ in range(50)])
    policy = RetryPolicy(max_attempts=50, max_elapsed_s=10.0, base_s=3.0, jitter=False)
    with pytest.raises(ServerError):
        retry_call(
            fn,
            policy=policy,
            should_retry=always_retry,
            method="GET",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
        )
    assert sum(clock.sleeps) <= 10.0
    assert clock.sleeps == [3.0, 6.0, 1.0]  # last delay trimmed to the remaining budget
    assert calls["n"] == 4


def test_retry_call_gives_up_when_retry_after_exceeds_budget() -> None:
    clock = FakeClock()
    fn, calls = failing([RateLimitedError("slow", retry_after=600.0)])
    with pytest.raises(RateLimitedError):
        retry_call(
            fn,
            policy=RetryPolicy(max_elapsed_s=60.0),
            should_retry=always_retry,
            method="GET",
            path="/x",
            sleep=clock.sleep,
            clock=clock,
        )
    assert calls["n"] == 1
    assert clock.sleeps == []  # never sleeps less than the server asked


@pytest.mark.parametrize(
    "url", ["http://xn--/a", "http://XN--/a", "https://xn--zz/a", "http://xn--ls8h.la/"]
)
def test_a_host_that_does_not_decode_is_an_invalid_url_at_once(url: str) -> None:
    with pytest.raises(httpx.InvalidURL, match="malformed host"):
        decoded_url(url)


def test_a_host_that_decodes_is_kept() -> None:
    assert decoded_url("https://xn--80ak6aa92e.com/v").host == b"xn--80ak6aa92e.com".decode("idna")
    assert decoded_url(httpx.URL("http://127.0.0.1:8/x")).port == 8


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("sk-abc_123.XYZ", True),
        ("sk-é", False),
        ("sk a", False),
        ("sk\tb", False),
        ("a\x00", False),
    ],
)
def test_only_printable_ascii_without_spaces_is_header_safe(text: str, safe: bool) -> None:
    assert header_safe(text) is safe
