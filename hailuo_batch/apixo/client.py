"""Synchronous, thread-safe client of the apixo hailuo-2-3-fast API.

One `ApixoClient` may be shared by many threads (it holds two `httpx.Client`s and no other
mutable state). Errors are mapped to `hailuo_batch.apixo.errors`, both for a non-2xx HTTP status
and for an HTTP 200 whose JSON body `code` is not 200.

Retry policy (all retries run in `transport.retry_call`, bounded by `RetryPolicy`):

- Reads (`get_status`, `get_balance`, opening a `stream_download`) are idempotent: they retry
  429 (honouring Retry-After), every 5xx and every transport error. 4xx other than 429 raise at
  once (a 404 on a status read is left to the caller, who knows how long the task has existed).
- `submit` creates a paid task, so it retries ONLY failures that prove no task was created:
    * 429 (HTTP or body code), honouring Retry-After: a rate-limit refusal creates nothing;
    * 503 (HTTP or body code), "model temporarily unavailable": a documented refusal, not a crash
      mid-request, so nothing was created;
    * `httpx.ConnectError`, `ConnectTimeout`, `PoolTimeout`: the request never left this process.
  Anything after which the task may exist raises `AmbiguousSubmitError` (never retried), with the
  original error as `.cause`: 500 and other 5xx (502/504 come from proxies that may have
  forwarded the request), read/write timeouts, dropped connections (`RemoteProtocolError`,
  `ReadError`), and a 2xx answer we cannot parse or that lacks a taskId. The caller records the
  item as uncertain instead of paying twice. 400/401/402/403/404 raise their error at once; a 429
  or 503 that outlasts the retry budget raises `RateLimitedError` / `ServerError` (not created).

The API key is held as a `SecretStr`, is never part of a repr, log line or exception message,
and is only sent to URLs with the same origin as `base_url` (result URLs on another host are
fetched by a second client without credentials; httpx drops the header on cross-origin redirects).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr, ValidationError

from hailuo_batch.apixo.errors import (
    AmbiguousSubmitError,
    ApixoError,
    ApixoTransportError,
    MissingAPIKeyError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
    error_for,
)
from hailuo_batch.apixo.models import GenerateRequest, TaskStatus
from hailuo_batch.apixo.transport import (
    RetryPolicy,
    build_http_client,
    parse_retry_after,
    retry_call,
)

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

DEFAULT_BASE_URL = "https://api.apixo.ai"
MODEL = "hailuo-2-3-fast"
SUBMIT_PATH = f"/api/v1/generateTask/{MODEL}"
STATUS_PATH = f"/api/v1/statusTask/{MODEL}"
BALANCE_PATH = "/api/v1/apikeys/current-balance"

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAX_ERROR_BODY = 64 * 1024


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    u = httpx.URL(str(url))
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return (u.scheme, u.host, port)


def _retry_idempotent(exc: ApixoError) -> bool:
    return isinstance(exc, RateLimitedError | ServerError | ApixoTransportError)


def _retry_submit(exc: ApixoError) -> bool:
    if isinstance(exc, RateLimitedError):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code == 503
    if isinstance(exc, ApixoTransportError):
        return not exc.request_sent
    return False


class Download:
    """An open streamed download. Read it with `iter_bytes()`; the body is never held in memory."""

    def __init__(self, response: httpx.Response, chunk_size: int, scrub: Callable[[str], str]):
        self._response = response
        self._chunk_size = chunk_size
        self._scrub = scrub
        length = response.headers.get("content-length")
        self.content_length: int | None = int(length) if length and length.isdigit() else None
        self.content_type: str | None = response.headers.get("content-type")
        self.status_code = response.status_code

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the body in chunks; a transport failure mid-body raises ApixoTransportError."""
        try:
            yield from self._response.iter_bytes(self._chunk_size)
        except httpx.TransportError as exc:
            path = self._response.request.url.path
            raise ApixoTransportError(
                self._scrub(f"download of {path} interrupted: {type(exc).__name__}: {exc}")
            ) from exc


class ApixoClient:
    """Client of the apixo hailuo-2-3-fast endpoints. Use as a context manager or call close()."""

    def __init__(
        self,
        api_key: str | SecretStr,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        secret = key.get_secret_value()
        if not secret or any(c.isspace() or not c.isprintable() for c in secret):
            # Never echo the key: a bad value would otherwise surface in an h11 header error.
            raise ValueError("the apixo API key is empty or contains whitespace/control characters")
        self._api_key = key
        self.base_url = base_url.strip().rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        self.timeout = timeout or httpx.Timeout(30.0, connect=10.0)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = build_http_client(
            self.base_url, key, timeout=self.timeout, transport=transport, follow_redirects=False
        )
        self._http_downloads = build_http_client(
            self.base_url, key, timeout=self.timeout, transport=transport, follow_redirects=True
        )
        self._http_anonymous = build_http_client(
            "", None, timeout=self.timeout, transport=transport, follow_redirects=True
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ApixoClient:
        """Build a client from `Settings` (key, base URL, timeouts, retry policy)."""
        if settings.apixo_api_key is None:
            raise MissingAPIKeyError(
                "no apixo API key: set APIXO_API_KEY or an ApixoCredentials block"
            )
        timeout = httpx.Timeout(
            settings.read_timeout_s,
            connect=settings.connect_timeout_s,
            pool=settings.connect_timeout_s,
        )
        return cls(
            settings.apixo_api_key,
            settings.apixo_base_url,
            timeout=timeout,
            retry=RetryPolicy.from_settings(settings),
            transport=transport,
            sleep=sleep,
        )

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()
        self._http_downloads.close()
        self._http_anonymous.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ApixoClient(base_url={self.base_url!r})"

    # --- public calls ---------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> str:
        """Create a task; return its taskId. See the module docstring for the retry policy."""
        payload = request.to_payload()

        def attempt() -> str:
            data = self._call("POST", SUBMIT_PATH, json=payload)
            task_id = data.get("taskId") if isinstance(data, dict) else None
            if not isinstance(task_id, str) or not task_id:
                raise UnexpectedResponseError("submit answer has no data.taskId", 200)
            return task_id

        try:
            return retry_call(
                attempt,
                policy=self.retry,
                should_retry=_retry_submit,
                method="POST",
                path=SUBMIT_PATH,
                sleep=self._sleep,
            )
        except ApixoError as exc:
            if _retry_submit(exc) or not self._maybe_created(exc):
                raise
            ambiguous = AmbiguousSubmitError(
                f"submit outcome unknown, the task may have been created: {exc}", cause=exc
            )
            ambiguous.attempts = exc.attempts
            raise ambiguous from exc

    def get_status(self, task_id: str) -> TaskStatus:
        """Read a task's status (retries 429, 5xx and transport errors)."""
        if not task_id:
            raise ValueError("task_id must not be empty")

        def attempt() -> TaskStatus:
            data = self._call("GET", STATUS_PATH, params={"taskId": task_id})
            try:
                return TaskStatus.from_data(data)
            except (ValueError, ValidationError) as exc:
                raise UnexpectedResponseError(
                    self._scrub(f"cannot parse status of task {task_id}: {exc}"), 200
                ) from exc

        return retry_call(
            attempt,
            policy=self.retry,
            should_retry=_retry_idempotent,
            method="GET",
            path=STATUS_PATH,
            sleep=self._sleep,
        )

    def get_balance(self) -> float:
        """The remaining account balance in USD."""

        def attempt() -> float:
            data = self._call("GET", BALANCE_PATH)
            if isinstance(data, bool) or not isinstance(data, int | float | str):
                raise UnexpectedResponseError("balance answer's data is not a number", 200)
            try:
                return float(data)
            except ValueError as exc:
                raise UnexpectedResponseError("balance answer's data is not a number", 200) from exc

        return retry_call(
            attempt,
            policy=self.retry,
            should_retry=_retry_idempotent,
            method="GET",
            path=BALANCE_PATH,
            sleep=self._sleep,
        )

    @contextmanager
    def stream_download(self, url: str, *, chunk_size: int = 1 << 20) -> Iterator[Download]:
        """Open `url` for a streamed download (retrying 429/5xx/transport errors on open).

        403/404/410 raise ForbiddenError/NotFoundError at once (expired result URL). The API key
        is only sent when `url` has the same origin as `base_url`.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("download URL must be an http:// or https:// URL")
        same_origin = _origin(url) == _origin(self.base_url)
        http = self._http_downloads if same_origin else self._http_anonymous
        path = parts.path or "/"

        def attempt() -> httpx.Response:
            response = self._send(http, "GET", url, path, stream=True)
            if response.is_success:
                return response
            try:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                code = response.status_code
            finally:
                response.close()
            raise error_for(code, f"download of {path} failed: HTTP {code}", retry_after)

        response = retry_call(
            attempt,
            policy=self.retry,
            should_retry=_retry_idempotent,
            method="GET",
            path=path,
            sleep=self._sleep,
        )
        try:
            yield Download(response, chunk_size, self._scrub)
        finally:
            response.close()

    # --- internals ------------------------------------------------------------------------------

    @staticmethod
    def _maybe_created(exc: ApixoError) -> bool:
        """True when a failed submit may still have created the task."""
        if isinstance(exc, ApixoTransportError):
            return exc.request_sent
        if isinstance(exc, ServerError):
            return True
        return isinstance(exc, UnexpectedResponseError) and (
            exc.status_code is None or exc.status_code < 400 or exc.status_code >= 500
        )

    def _scrub(self, text: str) -> str:
        secret = self._api_key.get_secret_value()
        return text.replace(secret, "**********") if secret else text

    def _send(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        path: str,
        *,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One HTTP exchange; httpx failures become ApixoTransportError (no headers, no key)."""
        try:
            request = http.build_request(method, url, **kwargs)
            return http.send(request, stream=stream)
        except _NOT_SENT as exc:
            raise ApixoTransportError(
                self._scrub(f"{method} {path}: {type(exc).__name__}: {exc}"), request_sent=False
            ) from exc
        except httpx.TooManyRedirects as exc:
            raise UnexpectedResponseError(f"{method} {path}: too many redirects") from exc
        except httpx.TransportError as exc:
            raise ApixoTransportError(
                self._scrub(f"{method} {path}: {type(exc).__name__}: {exc}"), request_sent=True
            ) from exc

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call: send, check HTTP status and body code, return the envelope's `data`."""
        response = self._send(self._http, method, path, path, **kwargs)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        content = response.content if response.is_success else response.content[:_MAX_ERROR_BODY]
        try:
            body: Any = json.loads(content)
        except ValueError:
            body = None
        if not response.is_success:
            message = _envelope_message(body) or response.reason_phrase or "error"
            raise error_for(response.status_code, self._scrub(message), retry_after)
        if not isinstance(body, dict) or "code" not in body:
            raise UnexpectedResponseError(
                f"{method} {path}: answer is not a JSON envelope (HTTP {response.status_code})",
                response.status_code,
            )
        code_int = _as_code(body.get("code"))
        if code_int is None:
            raise UnexpectedResponseError(
                self._scrub(f"{method} {path}: envelope code {body.get('code')!r} is not a number")
            )
        if code_int != 200:
            message = _envelope_message(body) or f"error code {code_int}"
            raise error_for(code_int, self._scrub(message), retry_after)
        return body.get("data")


def _as_code(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _envelope_message(body: Any) -> str | None:
    """The error text of an envelope: `message`, plus `data.error` when it says more."""
    if not isinstance(body, dict):
        return None
    message = body.get("message")
    data = body.get("data")
    detail = data.get("error") if isinstance(data, dict) else None
    parts = [str(p) for p in (message, detail) if p not in (None, "")]
    if len(parts) == 2 and parts[0] == parts[1]:
        parts = parts[:1]
    return ": ".join(parts) or None
