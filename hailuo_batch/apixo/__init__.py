"""Client of the apixo hailuo-2-3-fast image-to-video API (sync httpx, thread-safe)."""

from hailuo_batch.apixo.client import ApixoClient, Download
from hailuo_batch.apixo.errors import (
    AmbiguousSubmitError,
    ApixoError,
    ApixoTransportError,
    AuthenticationError,
    ForbiddenError,
    InsufficientCreditsError,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
    error_for,
)
from hailuo_batch.apixo.models import (
    GenerateInput,
    GenerateRequest,
    Mode,
    Provider,
    RequestType,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.transport import RetryPolicy, build_http_client, retry_call

__all__ = [
    "AmbiguousSubmitError",
    "ApixoClient",
    "ApixoError",
    "ApixoTransportError",
    "AuthenticationError",
    "Download",
    "ForbiddenError",
    "GenerateInput",
    "GenerateRequest",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "MissingAPIKeyError",
    "Mode",
    "NotFoundError",
    "Provider",
    "RateLimitedError",
    "RequestType",
    "RetryPolicy",
    "ServerError",
    "TaskState",
    "TaskStatus",
    "UnexpectedResponseError",
    "build_http_client",
    "error_for",
    "retry_call",
]
