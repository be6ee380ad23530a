"""Errors of the apixo client: one class per meaning of the contract's error table.

Every error has `.status_code` (the HTTP status or the body `code`; None for transport failures)
and `.message` (the provider's message, or ours). Messages never contain the API key or request
headers. All errors pickle (Prefect may move them between processes).
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


class UnexpectedResponseError(ApixoError):
    """The answer could not be understood: unparseable body, missing fields or an unknown code."""


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


class MissingAPIKeyError(ValueError):
    """No API key configured."""


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
