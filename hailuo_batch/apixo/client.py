"""Synchronous, thread-safe client of the apixo hailuo-2-3-fast API.

One `ApixoClient` may be shared by many threads (it holds three `httpx.Client`s, a `Scrubber` and
no other mutable state). Every call goes through one request path, `_request`: send, parse,
retry per the call's predicate, scrub. Errors are mapped to `hailuo_batch.apixo.errors`, both
for a non-2xx HTTP status and for an HTTP 200 whose JSON body `code` is not 200.

Nothing is trusted until it parses. An API answer is read up to `MAX_ANSWER_BYTES`; a 2xx body
that is not a JSON envelope (proxy HTML, empty, cut) is a `NotAnEnvelopeError`; a status whose
data breaks the contract (a wrong-typed field, another task's id, an unknown state, a success
without a usable result URL) is a `MalformedAnswerError` with a `.fail_code`, raised at once.

Retry policy (all retries run in `transport.retry_call`, bounded by `RetryPolicy`):

- Reads (`get_status`, `get_balance`, opening a `stream_download`) are idempotent: they retry
  429 (honouring Retry-After), every 5xx, every transport error and a 2xx that is not an
  envelope. 4xx other than 429 raise at once (a 404 on a status read is left to the caller, who
  knows how long the task has existed), and so does a `MalformedAnswerError`.
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
  A `RateLimitedError` that ends a call carries the last Retry-After the server sent during it
  (`.retry_after`) and the number of attempts (`.attempts`), so a caller can requeue the item.

Secrets: the API key is held as a `SecretStr` and is only sent to URLs with the same origin as
`base_url`. Result URLs on another host are fetched by a client without credentials, through
`download_transport` when one is given; a redirect from the API origin to another host is
followed by that client too. Every `ApixoError` the client raises, its arguments and its whole
`__cause__`/`__context__` chain pass through the client's `Scrubber` (`hailuo_batch.secrets`):
the API key, the secrets given to `secrets=`/`add_secret` (the callback token), every callback
URL submitted and every signed URL's query are removed, in any encoding an echo may use.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from hailuo_batch.apixo.errors import (
    FOREIGN_TASK,
    MALFORMED_BALANCE,
    MALFORMED_STATUS,
    MALFORMED_SUBMIT,
    AmbiguousSubmitError,
    ApixoError,
    ApixoTransportError,
    ClientClosedError,
    DownloadTooLargeError,
    MalformedAnswerError,
    NotAnEnvelopeError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
    error_for,
)
from hailuo_batch.apixo.models import (
    MAX_PROVIDER_MESSAGE,
    GenerateRequest,
    MalformedStatus,
    TaskStatus,
    provider_text,
)
from hailuo_batch.apixo.transport import (
    RetryPolicy,
    build_http_client,
    decoded_url,
    header_safe,
    parse_retry_after,
    retry_call,
)
from hailuo_batch.secrets import Scrubber, ScrubbingFilter

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.apixo.ai"
MODEL = "hailuo-2-3-fast"
SUBMIT_PATH = f"/api/v1/generateTask/{MODEL}"
STATUS_PATH = f"/api/v1/statusTask/{MODEL}"
BALANCE_PATH = "/api/v1/apikeys/current-balance"

MAX_ANSWER_BYTES = 1 << 20  # an API answer is a small JSON envelope; more is not one
MAX_REDIRECTS = 20
MAX_TASK_ID = 256
_MAX_ERROR_BODY = 64 * 1024  # of a non-2xx answer, only this much is read for its message
_CAPABILITY_SEGMENT = 16  # a callback URL's last path segment this long is its secret token

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

Retry = Callable[[ApixoError], bool]


def _closed(method: str, path: str) -> ClientClosedError:
    return ClientClosedError(
        f"{method} {path}: not sent: the client is closed (the run is stopping)"
    )


# httpx logs every request line with its full URL (a signed result URL's query included),
# httpcore logs response headers at DEBUG, and fsspec logs the URLs it reads (a presigned
# manifest link's, with any password in it) at DEBUG: their records go through every live
# client's scrubber
HTTP_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
    "fsspec",
    "fsspec.http",
)
_LIVE_SCRUBBERS: weakref.WeakSet[Scrubber] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_ANONYMOUS_SCRUBBER = Scrubber()  # signed URL queries and bearer tokens, whoever logs them


def _scrub_http_log(text: str) -> str:
    with _LIVE_LOCK:
        live = list(_LIVE_SCRUBBERS)
    for scrubber in [_ANONYMOUS_SCRUBBER, *live]:
        text = scrubber.scrub(text)
    return text


_HTTP_LOG_FILTER = ScrubbingFilter(_scrub_http_log)
for _name in HTTP_LOGGERS:
    logging.getLogger(_name).addFilter(_HTTP_LOG_FILTER)


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    u = decoded_url(str(url))
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return (u.scheme, u.host, port)


def _retry_read(exc: ApixoError) -> bool:
    """Reads retry rate limits, server errors, transport errors and answers that are not an
    envelope (a proxy's page); never a malformed envelope or another 4xx."""
    return isinstance(
        exc, RateLimitedError | ServerError | ApixoTransportError | NotAnEnvelopeError
    )


def retried_refusal(exc: ApixoError) -> bool:
    """Whether a submit's error is a refusal the client retries (it proves nothing was
    created): a 429, a 503, a connection never made."""
    return _retry_submit(exc)


def _retry_submit(exc: ApixoError) -> bool:
    """A submit retries only what proves no task was created (see the module doc)."""
    if isinstance(exc, RateLimitedError):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code == 503
    if isinstance(exc, ApixoTransportError):
        return not exc.request_sent
    return False


def _maybe_created(exc: ApixoError) -> bool:
    """True when a failed submit may still have created the task."""
    if isinstance(exc, ApixoTransportError):
        return exc.request_sent
    if isinstance(exc, ServerError):
        return True
    return isinstance(exc, UnexpectedResponseError) and (
        exc.status_code is None or exc.status_code < 400 or exc.status_code >= 500
    )


def _content_length(headers: httpx.Headers) -> int | None:
    length = headers.get("content-length", "").strip()
    return int(length) if length.isascii() and length.isdigit() else None


def _content_encoding(headers: httpx.Headers) -> str | None:
    value = headers.get("content-encoding")
    if value is None:
        return None
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    return ", ".join(codings) or None


class CutBodyError(ValueError):
    """A gzip stream that ends before its last member is complete."""


def _gunzip(raw: Iterator[bytes], chunk_size: int) -> Iterator[bytes]:
    """Decode a gzip body chunk by chunk, never more than `chunk_size` bytes at a time (a small
    body that inflates enormously is still read in bounded pieces). Concatenated members are
    decoded in turn; a stream that stops mid-member raises CutBodyError, one that is not gzip
    zlib.error."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    for data in raw:
        while data:
            if inflater.eof:  # another member follows
                inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out = inflater.decompress(data, chunk_size)
            if out:
                yield out
            data = inflater.unconsumed_tail or (inflater.unused_data if inflater.eof else b"")
    while not inflater.eof and (out := inflater.decompress(b"", chunk_size)):
        yield out
    if not inflater.eof:
        raise CutBodyError("the gzip stream ends before its end marker")


class Download:
    """An open streamed download. Read it with `iter_bytes()`; the body is never held in memory.

    `content_length` is the length of the bytes `iter_bytes()` yields when the server said so:
    None when the header is absent, or when a `content_encoding` other than identity applies
    (the body is decoded, and the header then counts the encoded bytes). A gzip body is decoded
    here, in bounded pieces, and one cut before its end marker is an error, not a short video.
    """

    def __init__(
        self,
        response: httpx.Response,
        chunk_size: int,
        scrubber: Scrubber,
        max_bytes: int | None = None,
    ) -> None:
        self._response = response
        self._chunk_size = chunk_size
        self._scrubber = scrubber
        self.max_bytes = max_bytes
        self.content_encoding: str | None = _content_encoding(response.headers)
        identity = self.content_encoding is None or all(
            c == "identity" for c in self.content_encoding.split(", ")
        )
        self.content_length: int | None = _content_length(response.headers) if identity else None
        self.content_type: str | None = response.headers.get("content-type")
        self.status_code = response.status_code
        if max_bytes is not None and self.content_length is not None:
            self._check_size(self.content_length, "its Content-Length says")

    def _check_size(self, size: int, said: str) -> None:
        assert self.max_bytes is not None
        if size > self.max_bytes:
            error = DownloadTooLargeError(
                f"download of {self._response.url.path} is larger than the limit of "
                f"{self.max_bytes:,} bytes ({said} {size:,}; HAILUO_MAX_VIDEO_BYTES): "
                "not stored"
            )
            self._scrubber.scrub_exception(error)
            raise error

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """`chunks`, stopped with `DownloadTooLargeError` once they pass `max_bytes`."""
        if self.max_bytes is None:
            yield from chunks
            return
        size = 0
        for chunk in chunks:
            size += len(chunk)
            self._check_size(size, "at least")
            yield chunk

    def _chunks(self) -> Iterator[bytes]:
        if self.content_encoding in ("gzip", "x-gzip"):
            return _gunzip(self._response.iter_raw(self._chunk_size), self._chunk_size)
        return self._response.iter_bytes(self._chunk_size)  # httpx decodes other codings

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the body in chunks. A transport failure mid-body raises ApixoTransportError; a
        body that cannot be decoded, or a gzip body cut short, UnexpectedResponseError."""
        path = self._response.url.path
        failure: ApixoError
        try:
            yield from self._counted(self._chunks())
            return
        except httpx.TransportError as exc:
            failure = ApixoTransportError(
                f"download of {path} interrupted: {type(exc).__name__}: {exc}"
            )
            failure.__cause__ = exc
        except (httpx.DecodingError, zlib.error, CutBodyError) as exc:
            failure = UnexpectedResponseError(
                f"download of {path} cannot be decoded ({self.content_encoding}): {exc}"
            )
            failure.__cause__ = exc
        except DownloadTooLargeError as exc:
            failure = exc
        self._scrubber.scrub_exception(failure)
        raise failure


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
        download_transport: httpx.BaseTransport | None = None,
        secrets: Iterable[str | SecretStr] = (),
        sleep: Callable[[float], None] = time.sleep,
        retry_rate_limited_submits: bool = True,
        max_download_bytes: int | None = None,
    ) -> None:
        """`retry_rate_limited_submits=False` raises a submit's first 429 at once (nothing was
        created), for a caller whose own limiter must see every refusal. `transport` carries API
        calls (and downloads from the API's own origin);
        `download_transport` carries anonymous downloads of result URLs on other hosts (for
        example a private-network guard; `transport` when None). `secrets` are scrubbed from
        every error besides the key (add more later with `add_secret`). A download longer than
        `max_download_bytes` raises `DownloadTooLargeError` (None: no limit)."""
        key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        secret = key.get_secret_value()
        if not secret or not header_safe(secret):
            # Never echo the key: a bad value would otherwise surface in an h11 header error.
            raise ValueError(
                "the apixo API key is empty or contains whitespace, control or non-ASCII characters"
            )
        self._api_key = key
        self._scrubber = Scrubber([key, *secrets])
        with _LIVE_LOCK:
            _LIVE_SCRUBBERS.add(self._scrubber)
        self.base_url = base_url.strip().rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        self.timeout = timeout or httpx.Timeout(30.0, connect=10.0)
        self.retry = retry or RetryPolicy()
        self.max_download_bytes = max_download_bytes
        self._sleep = sleep
        self._retry_submit = (
            _retry_submit
            if retry_rate_limited_submits
            else lambda exc: not isinstance(exc, RateLimitedError) and _retry_submit(exc)
        )
        self._http = build_http_client(
            self.base_url, key, timeout=self.timeout, transport=transport, follow_redirects=False
        )
        # downloads from the API origin carry the key and follow redirects by hand: a hop to
        # another host continues on the anonymous client below
        self._http_downloads = build_http_client(
            self.base_url, key, timeout=self.timeout, transport=transport, follow_redirects=False
        )
        self._http_anonymous = build_http_client(
            "",
            None,
            timeout=self.timeout,
            transport=download_transport if download_transport is not None else transport,
            follow_redirects=True,
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

    # --- secrets --------------------------------------------------------------------------------

    def add_secret(self, secret: str | SecretStr | None) -> None:
        """Scrub `secret` (e.g. the callback token, once known) from everything from now on."""
        self._scrubber.add(secret)

    def scrub(self, text: str) -> str:
        """`text` without the API key, any added secret or callback URL, or a signed URL's query."""
        return self._scrubber.scrub(text)

    # --- public calls ---------------------------------------------------------------------------

    def submit(
        self, request: GenerateRequest, *, may_retry: Callable[[], bool] | None = None
    ) -> str:
        """Create a task; return its taskId. See the module docstring for the retry policy.
        `may_retry` is asked before each retry: when it says no (the caller's lease lapsed), the
        last refusal is raised, and it proves nothing was created."""
        if request.callback_url:
            self._add_callback_url(request.callback_url)
        try:
            return self._request(
                "POST",
                SUBMIT_PATH,
                retry=self._retry_submit,
                may_retry=may_retry,
                parse=lambda r: _submit_task_id(_envelope_data(r, self._scrubber)),
                json=request.to_payload(),
            )
        except ApixoError as exc:
            if _retry_submit(exc) or not _maybe_created(exc):
                raise
            ambiguous = AmbiguousSubmitError(
                f"submit outcome unknown, the task may have been created: {exc}", cause=exc
            )
            ambiguous.attempts = exc.attempts
            ambiguous.__cause__ = exc
            self._scrubber.scrub_exception(ambiguous)
            raise ambiguous from exc

    def get_status(self, task_id: str) -> TaskStatus:
        """Read a task's status (retries 429, 5xx, transport errors and non-envelope answers).

        Raises `MalformedAnswerError` at once, with its `.fail_code`, for an answer that is not
        a well-formed status of `task_id` (see `hailuo_batch.apixo.errors`).
        """
        if not task_id:
            raise ValueError("task_id must not be empty")
        return self._request(
            "GET",
            STATUS_PATH,
            retry=_retry_read,
            parse=lambda r: self._scrubbed(_status_of(task_id, _envelope_data(r, self._scrubber))),
            params={"taskId": task_id},
        )

    def _scrubbed(self, status: TaskStatus) -> TaskStatus:
        """`status` whose failCode and failMsg hold no secret and no signed URL's query: both
        go into results, artifacts and logs."""
        texts = {"fail_code": status.fail_code, "fail_msg": status.fail_msg}
        clean = {k: self.scrub(v) for k, v in texts.items() if v}
        if all(clean[k] == texts[k] for k in clean):
            return status
        return status.model_copy(update=clean)

    def get_balance(self) -> float:
        """The remaining account balance in USD."""
        return self._request(
            "GET",
            BALANCE_PATH,
            retry=_retry_read,
            parse=lambda r: _balance_of(_envelope_data(r, self._scrubber)),
        )

    @contextmanager
    def stream_download(self, url: str, *, chunk_size: int = 1 << 20) -> Iterator[Download]:
        """Open `url` for a streamed download (retrying 429/5xx/transport errors on open).

        403/404/410 raise ForbiddenError/NotFoundError at once (expired result URL). The API key
        is only sent while the URL (and every redirect) stays on the origin of `base_url`.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("download URL must be an http:// or https:// URL")
        try:
            same_origin = _origin(url) == _origin(self.base_url)
        except httpx.InvalidURL:
            raise ValueError("download URL is not a valid URL") from None
        response = self._request(
            "GET",
            url,
            retry=_retry_read,
            parse=self._open_download,
            http=self._http_downloads if same_origin else self._http_anonymous,
            stream=True,
        )
        try:
            yield Download(response, chunk_size, self._scrubber, self.max_download_bytes)
        finally:
            response.close()

    # --- the one request path -------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        retry: Retry,
        parse: Callable[[httpx.Response], T],
        http: httpx.Client | None = None,
        stream: bool = False,
        may_retry: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> T:
        """Send `method url` and `parse` the answer, retrying what `retry` says within the
        policy; every error that leaves (and every retry logged) is scrubbed.

        `url` is a path on `base_url` (API calls) or an absolute URL (downloads, with `http`).
        Only its path is ever named in a message or log line, never its query. The response is
        streamed; `parse` reads what it needs and, unless it returns the open response, the
        response is closed after it.
        """
        client = http if http is not None else self._http
        path = urlsplit(url).path or "/"
        last_retry_after: float | None = None

        def attempt() -> T:
            nonlocal last_retry_after
            try:
                response = self._send(client, method, url, path, **kwargs)
                try:
                    result = parse(response)
                except BaseException:
                    response.close()
                    raise
                if not (stream and result is response):
                    response.close()
                return result
            except ApixoError as exc:
                if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                    last_retry_after = exc.retry_after
                self._scrubber.scrub_exception(exc)
                raise

        try:
            return retry_call(
                attempt,
                policy=self.retry,
                should_retry=retry,
                method=method,
                path=path,
                sleep=self._sleep,
                may_retry=may_retry,
            )
        except RateLimitedError as exc:
            if exc.retry_after is None:
                exc.retry_after = last_retry_after
            raise

    def _send(
        self, http: httpx.Client, method: str, url: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        """One streamed HTTP exchange; httpx failures become ApixoError (no headers, no key)."""
        if http.is_closed:  # a worker thread's call (a retry, a poll) after the run closed it
            raise _closed(method, path)
        try:
            request = http.build_request(method, url, **kwargs)
        except (httpx.InvalidURL, UnicodeError, IndexError) as exc:  # never sent: nothing made
            raise ApixoTransportError(f"{method} {path}: invalid URL", request_sent=False) from exc
        try:
            return http.send(request, stream=True)
        except RuntimeError as exc:  # httpx: "the client has been closed", since the check
            if http.is_closed:
                raise _closed(method, path) from exc
            raise
        except _NOT_SENT as exc:
            raise ApixoTransportError(
                f"{method} {path}: {type(exc).__name__}: {exc}", request_sent=False
            ) from exc
        except httpx.TooManyRedirects as exc:
            raise UnexpectedResponseError(f"{method} {path}: too many redirects") from exc
        except httpx.TransportError as exc:
            raise ApixoTransportError(
                f"{method} {path}: {type(exc).__name__}: {exc}", request_sent=True
            ) from exc
        except httpx.DecodingError as exc:  # a redirect's body that cannot be decoded
            raise UnexpectedResponseError(f"{method} {path}: {exc}") from exc
        except (httpx.InvalidURL, UnicodeError, IndexError) as exc:
            # e.g. a redirect to a URL httpx cannot parse, or to a malformed "xn--" host
            raise UnexpectedResponseError(f"{method} {path}: invalid URL") from exc

    def _open_download(self, response: httpx.Response) -> httpx.Response:
        """The open response of a download, after following the API origin's redirects by hand
        (the key stays on that origin; a hop elsewhere continues without it)."""
        for _ in range(MAX_REDIRECTS):
            if not (response.is_redirect and "location" in response.headers):
                break
            response.close()
            try:
                target = str(response.url.join(response.headers["location"]))
                same_origin = _origin(target) == _origin(self.base_url)
            except httpx.InvalidURL:
                raise UnexpectedResponseError("download redirected to an invalid URL") from None
            http = self._http_downloads if same_origin else self._http_anonymous
            response = self._send(http, "GET", target, urlsplit(target).path or "/")
        else:
            response.close()
            raise UnexpectedResponseError(f"download redirected more than {MAX_REDIRECTS} times")
        if response.is_success:
            return response
        code = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        response.close()
        path = response.url.path or "/"
        raise error_for(code, f"download of {path} failed: HTTP {code}", retry_after)

    def _add_callback_url(self, url: str) -> None:
        """Scrub a callback URL, and its last path segment when it is long enough to be the
        secret token of a capability URL (the receiver's `/callbacks/{token}`)."""
        self._scrubber.add(url)
        segment = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
        if len(segment) >= _CAPABILITY_SEGMENT:
            self._scrubber.add(segment)


# --- parsing answers (plain functions over the response) ------------------------------------------


def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that is all of it."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], False
    except httpx.TransportError as exc:
        raise ApixoTransportError(
            f"{response.request.method} {response.url.path}: answer interrupted: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    except httpx.DecodingError:
        raise NotAnEnvelopeError(
            f"{response.request.method} {response.url.path}: answer cannot be decoded "
            f"(HTTP {response.status_code})",
            response.status_code,
        ) from None
    return b"".join(chunks), True


def _loads(content: bytes) -> Any:
    """The decoded JSON of `content`, or None when it is not JSON (or nests absurdly deep)."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def _envelope_data(response: httpx.Response, scrubber: Scrubber) -> Any:
    """Check an API answer's HTTP status and envelope `code`; return the envelope's `data`.
    Secrets the answer echoes are replaced before anything is read from it: a message or
    value cut short later would otherwise keep a part of a secret no scrubber recognises."""
    method, path = response.request.method, response.url.path
    limit = MAX_ANSWER_BYTES if response.is_success else _MAX_ERROR_BODY
    content, complete = _read_capped(response, limit)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    body: Any = _without_secrets(_loads(content), scrubber) if complete else None
    if not response.is_success:
        message = _envelope_message(body) or response.reason_phrase or "error"
        raise error_for(response.status_code, message, retry_after)
    if not complete:
        raise NotAnEnvelopeError(
            f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes "
            f"(HTTP {response.status_code})",
            response.status_code,
        )
    if not isinstance(body, dict) or "code" not in body:
        raise NotAnEnvelopeError(
            f"{method} {path}: answer is not a JSON envelope (HTTP {response.status_code})",
            response.status_code,
        )
    code_int = _as_code(body.get("code"))
    if code_int is None:
        raise NotAnEnvelopeError(
            f"{method} {path}: envelope code {_short(body.get('code'))} is not a number",
            response.status_code,
        )
    if code_int != 200:
        message = _envelope_message(body) or f"error code {code_int}"
        raise error_for(code_int, message, retry_after)
    return body.get("data")


def _without_secrets(value: Any, scrubber: Scrubber) -> Any:
    """A decoded JSON answer with every secret `scrubber` knows masked in its strings (keys
    included), whatever encoding the answer came in; walked without recursion."""
    if isinstance(value, str):
        return scrubber.scrub_secrets(value)
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [value]
    todo: list[tuple[Any, Any]] = [(root, 0)]  # (container, index or key) holding a value
    while todo:
        holder, at = todo.pop()
        item = holder[at]
        if isinstance(item, str):
            holder[at] = scrubber.scrub_secrets(item)
        elif isinstance(item, list):
            todo += [(item, i) for i in range(len(item))]
        elif isinstance(item, dict):
            clean = {scrubber.scrub_secrets(k): v for k, v in item.items()}
            item.clear()
            item.update(clean)
            todo += [(item, k) for k in item]
    return root[0]


def _submit_task_id(data: Any) -> str:
    """The answer's taskId: a word of up to 256 printable characters. Anything else is a
    malformed answer (the task may still have been created: the caller reports it)."""
    task_id = data.get("taskId") if isinstance(data, dict) else None
    if not isinstance(task_id, str) or not task_id:
        raise MalformedAnswerError("submit answer has no data.taskId", 200, MALFORMED_SUBMIT)
    if len(task_id) > MAX_TASK_ID or not task_id.isprintable() or " " in task_id:
        raise MalformedAnswerError(
            f"submit answer's taskId {_short(task_id)} is not a task id "
            f"(up to {MAX_TASK_ID} printable characters, no spaces)",
            200,
            MALFORMED_SUBMIT,
        )
    return task_id


def _status_of(task_id: str, data: Any) -> TaskStatus:
    """The status in `data`, which must be a well-formed status of `task_id`."""
    try:
        status = TaskStatus.from_data(data)
    except MalformedStatus as exc:
        code, problem = exc.fail_code, str(exc)
    except ValueError:  # not reached: from_data raises MalformedStatus only
        code, problem = MALFORMED_STATUS, "status data does not parse"
    else:
        if status.task_id == task_id:
            return status
        code = FOREIGN_TASK
        problem = f"the answer is for task {_short(status.task_id)}"
    raise MalformedAnswerError(f"status of task {task_id}: {problem}", 200, code)


def _balance_of(data: Any) -> float:
    value: float | None = None
    if isinstance(data, int | float) and not isinstance(data, bool):
        value = float(data) if not isinstance(data, int) or abs(data) < 2**63 else None
    elif isinstance(data, str):
        try:
            value = float(data)
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise MalformedAnswerError("balance answer's data is not a number", 200, MALFORMED_BALANCE)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    return provider_text(": ".join(parts), MAX_PROVIDER_MESSAGE) or None
