"""Errors of the apixo client: one class per meaning of the contract's error table.

Every error has `.status_code` (the HTTP status or the body `code`; None for transport failures)
and `.message` (the provider's message, or ours). Every error the client raises has been through
its `Scrubber` (`hailuo_batch.secrets`): no message, argument or chained exception holds the API
key, the callback URL or token, or a signed URL's query. All errors pickle (Prefect may move them
between processes).

An answer that cannot be trusted is an `UnexpectedResponseError`; its `.fail_code` is what the
pipeline records for the item. The codes (stable: they end up in results files):

- `BAD_ANSWER` (UnexpectedResponseError): an unknown envelope code, too many redirects, a body
  that cannot be decoded.
- `NOT_AN_ENVELOPE` (NotAnEnvelopeError): a 2xx body that is not a JSON envelope (proxy HTML,
  empty, cut, too large, a `code` that is not a number). Reads retry it like a 5xx; after a
  submit it makes the outcome ambiguous.
- `MALFORMED_STATUS` (MalformedAnswerError): status `data` that is not an object, lacks taskId
  or state, or has a field of the wrong type (an object, list, boolean, fraction, NaN or an
  out-of-range number where a whole number or a string belongs).
- `FOREIGN_TASK`: a status answer for another taskId than the one asked for.
- `UNKNOWN_STATE`: a state that is none of pending/processing/success/failed.
- `BAD_RESULT_JSON`: on success, a resultJson that does not parse or is not an object, or a
  resultUrls that is not a list of strings.
- `NO_RESULT_URL`: on success, no result URL at all.
- `BAD_RESULT_URL`: on success, a result URL that is not an absolute http(s) URL.
- `MALFORMED_SUBMIT`: a 2xx create-task answer without a usable data.taskId (the submit is
  then ambiguous: `AmbiguousSubmitError` with this error as its cause).
- `MALFORMED_BALANCE`: a balance answer whose data is not a finite number.

The client never retries a `MalformedAnswerError`: the same read would give the same answer.
"""

from __future__ import annotations


class ApixoError(Exception):
    """Base class of every error raised by the apixo client."""

    default_status: int | None = None

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code if status_code is not None else self.default_status
        self.attempts = 1  # how many attempts were made before giving up (set by the retry loop)

    def __str__(self) -> str:
        if self.status_code is None:
            return self.message
        return f"[{self.status_code}] {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code!r}, message={self.message!r})"


class InvalidRequestError(ApixoError):
    """400: invalid parameters (e.g. `Invalid mode type`). Never retried."""

    default_status = 400


class AuthenticationError(ApixoError):
    """401: missing or invalid API key. Nothing can work: stop the run."""

    default_status = 401


class InsufficientCreditsError(ApixoError):
    """402: insufficient balance. Stop submitting new items."""

    default_status = 402


class ForbiddenError(ApixoError):
    """403: content refused or key lacks permission (or an expired download URL)."""

    default_status = 403


class NotFoundError(ApixoError):
    """404 (unknown task id or model) or 410 (expired result URL)."""

    default_status = 404


class RateLimitedError(ApixoError):
    """429: rate limited. `.retry_after` holds the server's Retry-After in seconds, if any."""

    default_status = 429

    def __init__(
        self, message: str, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code)
        self.retry_after = retry_after


class ServerError(ApixoError):
    """500, 503 (model temporarily unavailable) or any other 5xx."""

    default_status = 500


# fail codes of answers that cannot be trusted (see the table above)
BAD_ANSWER = "BAD_ANSWER"
NOT_AN_ENVELOPE = "NOT_AN_ENVELOPE"
MALFORMED_STATUS = "MALFORMED_STATUS"
FOREIGN_TASK = "FOREIGN_TASK"
UNKNOWN_STATE = "UNKNOWN_STATE"
BAD_RESULT_JSON = "BAD_RESULT_JSON"
NO_RESULT_URL = "NO_RESULT_URL"
BAD_RESULT_URL = "BAD_RESULT_URL"
MALFORMED_SUBMIT = "MALFORMED_SUBMIT"
MALFORMED_BALANCE = "MALFORMED_BALANCE"


class UnexpectedResponseError(ApixoError):
    """The answer could not be understood: an unknown code, a body that cannot be decoded.

    `.fail_code` is the code the pipeline records for the item (`BAD_ANSWER` here; the
    subclasses say more).
    """

    fail_code: str = BAD_ANSWER


class DownloadTooLargeError(UnexpectedResponseError):
    """A download longer than the client's `max_download_bytes` (said by its Content-Length, or
    counted while its decoded bytes arrive): refused there, so an endless or inflating body
    never fills the disk."""


class NotAnEnvelopeError(UnexpectedResponseError):
    """A 2xx answer whose body is not a JSON envelope: HTML from a proxy, an empty or cut body.

    Likely transient (a proxy or CDN in the way), so reads retry it within their budget; when
    the budget runs out this is what they raise. After a submit it means the task may exist.
    """

    fail_code = NOT_AN_ENVELOPE


class MalformedAnswerError(UnexpectedResponseError):
    """A well-formed envelope whose `data` breaks the contract (wrong-typed field, another
    task's answer, an unknown state, an unusable result). Never retried. `.fail_code` says which
    rule was broken (see the module's table)."""

    def __init__(
        self, message: str, status_code: int | None = 200, fail_code: str = MALFORMED_STATUS
    ) -> None:
        super().__init__(message, status_code)
        self.fail_code = fail_code

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fail_code={self.fail_code!r}, "
            f"status_code={self.status_code!r}, message={self.message!r})"
        )


class ApixoTransportError(ApixoError):
    """Connect/read/write errors, timeouts, dropped connections. `.status_code` is None.

    `.request_sent` is False only when the request provably never reached the server
    (connection refused, connect timeout, pool timeout).
    """

    def __init__(
        self, message: str, status_code: int | None = None, request_sent: bool = True
    ) -> None:
        super().__init__(message, None)
        self.request_sent = request_sent


class ClientClosedError(ApixoError):
    """The client was closed before this call (the run is stopping): nothing was sent. Never
    retried; a poll that meets it ends instead of reading on."""


class AmbiguousSubmitError(ApixoError):
    """A submit whose outcome is unknown: the task may or may not have been created.

    Never retried by the client. `.cause` is the underlying error; `.status_code` is the cause's.
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        if status_code is None and isinstance(cause, ApixoError):
            status_code = cause.status_code
        super().__init__(message, status_code)
        self.cause = cause


class MissingAPIKeyError(ApixoError, ValueError):
    """No API key configured. Also a ValueError, for callers that catch configuration errors."""


_BY_CODE: dict[int, type[ApixoError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    403: ForbiddenError,
    404: NotFoundError,
    410: NotFoundError,
    429: RateLimitedError,
}


def error_for(code: int, message: str, retry_after: float | None = None) -> ApixoError:
    """Map an HTTP status or body `code` to its error class.

    Unknown codes give `UnexpectedResponseError`; 410 (expired URL) gives `NotFoundError`.
    """
    if code == 429:
        return RateLimitedError(message, 429, retry_after=retry_after)
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message, code)
    if 500 <= code <= 599:
        return ServerError(message, code)
    return UnexpectedResponseError(message, code)
