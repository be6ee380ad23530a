"""The callback (webhook) receiver: an ASGI app recording provider deliveries in a CallbackStore.

Routes:

- `POST /callbacks/{token}`: a delivery. The token (HAILUO_CALLBACK_TOKEN, at least 16 URL-safe
  characters) is compared in constant time; a wrong token answers 404, like any unknown path,
  so the endpoint cannot be discovered (so does the same path with a trailing slash). A body
  not received within 10 s answers 408, a client that leaves mid-body gets one log line and
  no traceback. Bodies over 64 KiB answer 413, bad JSON or an envelope
  without a valid `data.taskId`/`data.state` 400, all without touching the store. A valid
  delivery is recorded (one small write, idempotent by taskId) and answered 200 `{"ok": true}`;
  if recording fails or takes over 20 s the answer is 500, so the provider retries (its limit
  is 30 s). Other methods on the right token's path answer 405.
- `GET /healthz`: 200 `{"status": "ok"}`.

Logs: uvicorn's access log is off (it prints the path, hence the token). Instead one JSON line
per request on the `hailuo_batch.receiver` logger, with the callback path shown as
`/callbacks/<redacted>`.

Public HTTPS: the receiver speaks plain HTTP, on 127.0.0.1:8788 by default. Put it behind a TLS
reverse proxy (Caddy: `hooks.example.com { reverse_proxy 127.0.0.1:8788 }`; nginx: a `location
/ { proxy_pass http://127.0.0.1:8788; access_log off; }` in an https server) or a tunnel
(`cloudflared tunnel --url http://127.0.0.1:8788`), and set HAILUO_CALLBACK_URL to the public
https base URL. The proxy's own access log also prints paths: turn it off or redact it.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hailuo_batch.apixo.models import TaskStatus
from hailuo_batch.callbacks import (
    CALLBACK_PATH,
    CallbackStore,
    callback_url_for,
    check_token,
    parse_delivery,
)
from hailuo_batch.settings import Settings, get_settings
from hailuo_batch.sockets import bind_tcp, serve_in_thread

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0  # a body that trickles in holds a connection: the provider sends at once
RECORD_TIMEOUT_S = 20.0
REDACTED = "<redacted>"
_LOG_KEY = "hailuo_batch.log"

OnRecord = Callable[[TaskStatus], None]
"""Called (after the 200 answer) with each newly recorded terminal status."""


class ReceiverConfigError(ValueError):
    """The receiver cannot start: no usable HAILUO_CALLBACK_TOKEN."""


def redact_path(path: str, token: str) -> str:
    """`path` safe to log: the callback path segment and any occurrence of the token hidden."""
    if path.startswith(CALLBACK_PATH):
        return CALLBACK_PATH + REDACTED
    return path.replace(token, REDACTED) if token else path


def log_event(level: int, event: str, **fields: Any) -> None:
    """One structured log line: a JSON object with `event` and the fields."""
    if log.isEnabledFor(level):
        log.log(level, "%s", json.dumps({"event": event, **fields}, default=str))


class _AccessLog:
    """ASGI middleware: one JSON line per request, path redacted; handlers add fields."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        fields: dict[str, Any] = {}
        scope[_LOG_KEY] = fields
        logged = False

        def write_line() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            client = scope.get("client")
            level = logging.INFO
            if status >= 500:
                level = logging.ERROR
            elif status in (400, 408, 413):
                level = logging.WARNING
            log_event(
                level,
                "request",
                method=scope.get("method"),
                path=redact_path(str(scope.get("path", "")), self._token),
                status=status,
                ms=round((time.perf_counter() - start) * 1000, 1),
                client=client[0] if client else None,
                **fields,
            )

        async def send_and_log(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                write_line()  # when answered, not after background tasks

        try:
            await self.app(scope, receive, send_and_log)
        finally:
            write_line()


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None if it is larger than `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _AnyMethod:
    """A request handler as a plain ASGI app: Starlette then routes every method to it (a
    function endpoint answers 405 itself for a method it does not list, token or not)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(handler)

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        await self._app(scope, receive, send)


def _safe_hook(hook: OnRecord, status: TaskStatus) -> None:
    try:
        hook(status)
    except Exception as exc:  # noqa: BLE001 - a hook must never break deliveries
        log_event(logging.WARNING, "on_record_failed", task_id=status.task_id, error=repr(exc))


def _token_of(settings: Settings) -> str:
    secret = settings.callback_token.get_secret_value() if settings.callback_token else None
    try:
        return check_token(secret)
    except ValueError as exc:
        raise ReceiverConfigError(str(exc)) from None


def create_app(
    settings: Settings | None = None,
    store: CallbackStore | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    record_timeout_s: float = RECORD_TIMEOUT_S,
    on_record: OnRecord | None = None,
) -> Starlette:
    """The receiver app. Raises ReceiverConfigError without a usable HAILUO_CALLBACK_TOKEN.

    `store` defaults to `CallbackStore(settings.callback_store)`. `on_record` runs after the
    answer for each newly recorded terminal delivery (e.g. to emit a Prefect event).
    """
    settings = settings or get_settings()
    token = _token_of(settings)
    expected = token.encode()
    store = store or CallbackStore(settings.callback_store)

    async def callback(request: Request) -> Response:
        fields: dict[str, Any] = request.scope.setdefault(_LOG_KEY, {})
        given = str(request.path_params["token"]).encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(404)
        if request.method != "POST":
            raise HTTPException(405, headers={"Allow": "POST"})
        try:
            with anyio.fail_after(body_timeout_s):
                body = await _read_limited(request, max_body_bytes)
        except TimeoutError:
            fields["error"] = f"body not received within {body_timeout_s:g} s"
            return JSONResponse({"ok": False, "error": "body too slow"}, status_code=408)
        except ClientDisconnect:
            fields["error"] = "the client left before its body was received"
            return Response(status_code=400)
        if body is None:
            fields["error"] = f"body over {max_body_bytes} bytes"
            return JSONResponse({"ok": False, "error": "body too large"}, status_code=413)
        try:
            payload = json.loads(body)
            status = parse_delivery(payload)
        except (ValueError, RecursionError) as exc:
            fields["error"] = str(exc)[:200]
            return JSONResponse({"ok": False, "error": "invalid callback body"}, status_code=400)
        fields.update(task_id=status.task_id, state=status.state.value)
        try:
            with anyio.fail_after(record_timeout_s):
                new = await anyio.to_thread.run_sync(
                    store.record, status.task_id, payload, abandon_on_cancel=True
                )
        except Exception as exc:  # noqa: BLE001 - any store failure: 500, the provider retries
            fields["error"] = f"recording failed: {type(exc).__name__}: {str(exc)[:200]}"
            return JSONResponse({"ok": False, "error": "not recorded"}, status_code=500)
        fields["recorded"] = new
        background = None
        if new and status.is_terminal and on_record is not None:
            background = BackgroundTask(_safe_hook, on_record, status)
        return JSONResponse({"ok": True}, background=background)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            # every method reaches the handler: a wrong token is 404 whatever the method
            Route("/callbacks/{token}", _AnyMethod(callback)),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    app.router.redirect_slashes = False  # `/callbacks/x/` is an unknown path: 404, not 307
    app.add_middleware(_AccessLog, token=token)
    app.state.store = store
    return app


def _uvicorn(app: Starlette, log_level: str, *, own_logging: bool) -> uvicorn.Server:
    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    config = uvicorn.Config(
        app,
        **extra,
        access_log=False,  # it would print the token; _AccessLog logs a redacted line instead
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=5,
        proxy_headers=True,
    )
    return uvicorn.Server(config)


def _url(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class ReceiverHandle:
    """A receiver running in a background thread."""

    base_url: str
    store: CallbackStore
    _token: str

    @property
    def callback_url(self) -> str:
        """The full callback URL (holds the token: do not log it)."""
        return callback_url_for(self.base_url, self._token)

    def __repr__(self) -> str:
        return f"ReceiverHandle(base_url={self.base_url!r}, store={self.store!r})"


@contextmanager
def run_receiver(
    settings: Settings | None = None,
    store: CallbackStore | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_record: OnRecord | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> Iterator[ReceiverHandle]:
    """Serve the receiver from a background thread until the block exits (tests, demos)."""
    settings = settings or get_settings()
    store = store or CallbackStore(settings.callback_store)
    app = create_app(settings, store, on_record=on_record, body_timeout_s=body_timeout_s)
    sock = bind_tcp(host, port)
    server = _uvicorn(app, "warning", own_logging=False)  # leave logging as it is
    with serve_in_thread(server, sock, "callback receiver"):
        yield ReceiverHandle(_url(host, sock.getsockname()[1]), store, _token_of(settings))


def serve(
    host: str = "127.0.0.1",
    port: int = 8788,
    settings: Settings | None = None,
    *,
    on_record: OnRecord | None = None,
) -> None:
    """Serve the receiver in the foreground until interrupted (Ctrl-C)."""
    settings = settings or get_settings()
    try:
        store = CallbackStore(settings.callback_store)
    except (OSError, ValueError) as exc:  # a path under a file, a bucket name, ...
        raise ReceiverConfigError(
            f"HAILUO_CALLBACK_STORE {settings.callback_store}: cannot keep deliveries there: {exc}"
        ) from None
    app = create_app(settings, store, on_record=on_record)  # refuses to start without a token
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    sock = bind_tcp(host, port)
    log_event(
        logging.INFO,
        "receiver_started",
        url=_url(host, sock.getsockname()[1]),
        callback_path=CALLBACK_PATH + REDACTED,
        store=store.url,
        public_base_url=_without_token(settings.callback_url, settings),
    )
    try:
        _uvicorn(app, "info", own_logging=True).run(sockets=[sock])
    finally:
        sock.close()


def _without_token(url: str | None, settings: Settings) -> str | None:
    """`url` for a log line: the callback token, if a mis-set HAILUO_CALLBACK_URL holds it,
    masked."""
    token = settings.callback_token.get_secret_value() if settings.callback_token else ""
    return url.replace(token, REDACTED) if url and token else url
