"""The emulator's HTTP face: the apixo endpoints, result downloads, /files and /_emulator.

A raw ASGI layer in front of the Starlette routes checks the Bearer key of API calls and applies
faults, because some faults (a dropped connection, a truncated body) can only be produced below
the framework.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hailuo_batch.emulator.config import MAX_BALANCE_USD, EmulatorConfig
from hailuo_batch.emulator.contract import (
    MODEL,
    InvalidRequest,
    parse_submit,
    reject_marker,
)
from hailuo_batch.emulator.faults import (
    BAD_BODY_KINDS,
    BAD_STATUS_KINDS,
    FAULT_KINDS,
    SCRIPT_ROUTES,
)
from hailuo_batch.emulator.state import EmulatorState, Refused, format_retry_after
from hailuo_batch.emulator.video import VideoCache
from hailuo_batch.emulator.worker import Worker

MESSAGES = {
    400: "invalid parameters",
    401: "missing or invalid API key",
    402: "insufficient balance",
    403: "content refused",
    404: "not found",
    429: "rate limit exceeded",
    500: "internal server error",
    503: "model temporarily unavailable",
}


def envelope(
    code: int,
    message: str | None = None,
    data: Any = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The apixo envelope; the HTTP status is the envelope code unless told otherwise."""
    body = {"code": code, "message": message or MESSAGES.get(code, "error"), "data": data}
    return JSONResponse(body, status_code=status or code, headers=headers)


def classify(method: str, path: str) -> str | None:
    """The fault route of a request; "api" for other API paths (auth only); None: no checks."""
    if path.startswith("/api/"):
        if method == "POST" and path.startswith("/api/v1/generateTask/"):
            return "submit"
        if method == "GET" and path.startswith("/api/v1/statusTask/"):
            return "status"
        if method == "GET" and path == "/api/v1/apikeys/current-balance":
            return "balance"
        return "api"
    if method == "GET" and path.startswith("/results/"):
        return "download"
    return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            key = key.strip()
            if scheme.lower() == "bearer" and key:
                return key
    return None


async def close_connection(send: Send) -> None:
    """Close the client's connection without (more of) a response.

    uvicorn hands the app a bound method of its request cycle, whose `transport` we close.
    Elsewhere, fall back to promising a body that never comes.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        transport.close()
        for _ in range(3):  # let connection_lost run, so uvicorn sees a disconnected client
            await asyncio.sleep(0)
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"64")]}
    )


class FaultAndAuth:
    """Outermost ASGI layer: API key check, then the fault plan's verdict for the request."""

    def __init__(self, app: ASGIApp, state: EmulatorState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = classify(scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        if route != "download":
            key = _bearer(scope)
            expected = self.state.config.api_key
            if key is None or (
                expected is not None and not hmac.compare_digest(key.encode(), expected.encode())
            ):
                await envelope(401)(scope, receive, send)
                return
            key_id = hashlib.sha256(key.encode()).hexdigest()[:16]
            scope.setdefault("state", {})["key_id"] = key_id
            if route == "api":
                await self.app(scope, receive, send)
                return
        with self.state.lock:
            kind = self.state.faults.draw(route)
            if kind is not None:
                self.state.stats_data.faults[kind] += 1
        if kind is None:
            await self.app(scope, receive, send)
        else:
            await self._fault(kind, route, scope, receive, send)

    async def _fault(
        self, kind: str, route: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        config = self.state.config
        if kind in ("500", "503", "429"):
            code = int(kind)
            headers = (
                {"Retry-After": format_retry_after(config.scaled(1.0))} if code == 429 else None
            )
            await envelope(code, headers=headers)(scope, receive, send)
        elif kind in ("401", "404"):
            await envelope(int(kind))(scope, receive, send)
        elif kind in BAD_STATUS_KINDS and route == "status":
            await self.app(scope, receive, _bad_status_send(send, kind))
        elif kind in ("body500", "body429"):
            code = int(kind[4:])
            await envelope(code, status=200)(scope, receive, send)
        elif kind == "slow":
            await asyncio.sleep(config.slow_s)
            await self.app(scope, receive, send)
        elif kind == "drop_after_create" and route == "submit":
            await self.app(scope, receive, _closing_send(send))
        elif kind == "truncate" and route == "download":
            await self.app(scope, receive, _truncating_send(send))
        elif kind == "trickle" and route == "download":
            await self.app(scope, receive, _trickling_send(send, config.slow_s))
        elif kind in BAD_BODY_KINDS and route == "download":
            await self.app(scope, receive, _bad_body_send(send, kind))
        elif kind == "reused_task" and route == "submit":
            await self.app(scope, receive, _data_edited_send(send, self._reuse_first_task))
        elif kind == "swapped_result" and route == "status":
            await self.app(scope, receive, _data_edited_send(send, self._first_tasks_result))
        else:  # drop, and the route-specific kinds elsewhere
            await close_connection(send)

    def _first_task(self) -> str | None:
        with self.state.lock:
            ids = self.state.stats_data.task_ids
            return ids[0] if ids else None

    def _reuse_first_task(self, data: dict[str, Any]) -> None:
        first = self._first_task()
        if first is not None and "taskId" in data:
            data["taskId"] = first

    def _first_tasks_result(self, data: dict[str, Any]) -> None:
        first = self._first_task()
        if first is not None and data.get("state") == "success":
            data["resultJson"] = json.dumps({"resultUrls": [self.state.result_url(first)]})


def _data_edited_send(send: Send, edit: Callable[[dict[str, Any]], None]) -> Send:
    """A send that lets `edit` change the `data` of a 200 envelope before it is served; other
    answers pass unchanged."""

    async def serve(send: Send, start: Message, body: bytes) -> None:
        try:
            doc = json.loads(body)
            data = doc["data"]
            assert isinstance(data, dict) and start["status"] == 200
        except (ValueError, KeyError, TypeError, AssertionError):
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        edit(data)
        body = json.dumps(doc).encode()
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return _holding_send(send, serve)


def _closing_send(send: Send) -> Send:
    """A send that closes the connection instead of starting the response."""
    closed = False

    async def closing(message: Message) -> None:
        nonlocal closed
        if not closed:
            closed = True
            await close_connection(send)

    return closing


def _trickling_send(send: Send, over_s: float) -> Send:
    """A send that dribbles the body out in small pieces spread over about `over_s` seconds."""
    total = 0

    async def trickling(message: Message) -> None:
        nonlocal total
        if message["type"] == "http.response.start":
            for name, value in message.get("headers", []):
                if name.lower() == b"content-length":
                    total = int(value)
            await send(message)
            return
        body: bytes = message.get("body", b"")
        if not body or total <= 0:
            await send(message)
            return
        step = max(1, total // 50)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            more = message.get("more_body", False) if last else True
            await send({"type": "http.response.body", "body": piece, "more_body": more})
            await asyncio.sleep(over_s * len(piece) / total)

    return trickling


def _truncating_send(send: Send) -> Send:
    """A send that lets the headers and half the promised body through, then closes."""
    cut = 1
    sent = 0
    closed = False

    async def truncating(message: Message) -> None:
        nonlocal cut, sent, closed
        if closed:
            return
        if message["type"] == "http.response.start":
            for name, value in message.get("headers", []):
                if name.lower() == b"content-length":
                    cut = max(1, int(value) // 2)
            await send(message)
            return
        body: bytes = message.get("body", b"")
        if sent + len(body) < cut:
            sent += len(body)
            await send(message)
            return
        await send({"type": "http.response.body", "body": body[: cut - sent], "more_body": True})
        closed = True
        await close_connection(send)

    return truncating


CDN_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>502 Bad Gateway</h1><p>The origin did not answer in time.</p></body></html>\n"
)


def _holding_send(send: Send, serve: Callable[[Send, Message, bytes], Awaitable[None]]) -> Send:
    """A send that holds the app's whole response back, then lets `serve(send, start, body)`
    answer in its place (to replace a good answer with a hostile one)."""
    start: Message | None = None
    parts: list[bytes] = []

    async def holding(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            await serve(send, start, b"".join(parts))

    return holding


def _bad_status_send(send: Send, kind: str) -> Send:
    """Serve a hostile variant of a status answer (see `faults.BAD_STATUS_KINDS`); answers that
    are not a 200 envelope pass unchanged."""
    return _holding_send(send, partial(_serve_bad_status, kind))


async def _serve_bad_status(kind: str, send: Send, start: Message, body: bytes) -> None:
    content_type = b"application/json"
    try:
        doc = json.loads(body)
        data = doc["data"]
        assert isinstance(data, dict)
    except (ValueError, KeyError, AssertionError):
        doc = None
    if start["status"] != 200 or doc is None:
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return
    if kind == "bad_status":
        data["costTime"], data["createTime"] = {"ms": 1}, [1, 2]
    elif kind == "foreign_task":
        data["taskId"] = "task_" + "0" * 32
    elif kind == "unknown_state":
        data["state"] = "finished"
    if kind == "html200":
        body, content_type = CDN_ERROR_PAGE, b"text/html; charset=utf-8"
    else:
        body = json.dumps(doc).encode()
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bad_body_send(send: Send, kind: str) -> Send:
    """If the app's answer is a 200, serve the bad body `kind` (see `faults.BAD_BODY_KINDS`)
    in its place; other answers pass unchanged."""
    return _holding_send(send, lambda s, start, body: _serve_bad_body(s, kind, start, body))


async def _serve_bad_body(send: Send, kind: str, start: Message, body: bytes) -> None:
    status = start["status"]
    kept = [
        (name, value)
        for name, value in start.get("headers", [])
        if name.lower() not in (b"content-length", b"content-type", b"content-encoding")
    ]
    if status != 200:
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return
    if kind == "cut_body":
        await _send_close_delimited(send, kept, body[: max(1, len(body) // 2)])
        return
    content_type = b"video/mp4"
    extra: list[tuple[bytes, bytes]] = []
    if kind == "html_body":
        body, content_type = CDN_ERROR_PAGE, b"text/html; charset=utf-8"
    elif kind == "empty_body":
        body = b""
    elif kind == "gzip_body":
        body = gzip.compress(body)
        extra = [(b"content-encoding", b"gzip")]
    headers = [
        *kept,
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_close_delimited(
    send: Send, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """An HTTP/1.1 200 whose body is delimited by closing the connection (no Content-Length, no
    chunked encoding), carrying only `body`: the client reads a short body as if complete.

    uvicorn would add chunked framing to a response without a length, so the bytes go straight
    to its transport. Without one, fall back to a chunked answer ending after `body`, which a
    client cannot tell from a complete one either.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        chunked = [*headers, (b"content-type", b"video/mp4")]
        await send({"type": "http.response.start", "status": 200, "headers": chunked})
        await send({"type": "http.response.body", "body": body})
        return
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(
        name + b": " + value + b"\r\n"
        for name, value in [*headers, (b"content-type", b"video/mp4"), (b"connection", b"close")]
    )
    transport.write(head + b"\r\n" + body)
    await close_connection(send)  # close() flushes what was written first


class Emulator:
    """The emulator's state, back end and ASGI app, ready for uvicorn."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.state = EmulatorState(config)
        self.worker = Worker(
            self.state, VideoCache(config.resolved_cache_dir(), config.encode_workers)
        )
        self.files_root = Path(config.files_dir).resolve() if config.files_dir else None
        routes = [
            Route("/api/v1/generateTask/{model}", self.submit, methods=["POST"]),
            Route("/api/v1/statusTask/{model}", self.status, methods=["GET"]),
            Route("/api/v1/apikeys/current-balance", self.balance, methods=["GET"]),
            Route("/api/{rest:path}", self.api_not_found, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/results/{task_id}/0.mp4", self.download, methods=["GET"]),
            Route("/files/{path:path}", self.files, methods=["GET", "HEAD"]),
            Route("/_emulator/stats", self.get_stats, methods=["GET"]),
            Route("/_emulator/timings", self.get_timings, methods=["GET"]),
            Route("/_emulator/faults", self.post_faults, methods=["POST", "DELETE"]),
            Route("/_emulator/balance", self.post_balance, methods=["POST"]),
            Route("/_emulator/reset", self.post_reset, methods=["POST"]),
        ]
        starlette = Starlette(routes=routes, lifespan=self._lifespan)
        self.asgi: ASGIApp = FaultAndAuth(starlette, self.state)

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.worker.start()
        try:
            yield
        finally:
            await self.worker.stop()
            if self.config.timings_file:
                self.write_timings(Path(self.config.timings_file))

    def write_timings(self, path: Path) -> None:
        """Write the record of task timings as JSON (atomically: a reader never sees half)."""
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(self.state.timings()))
        part.replace(path)

    # --- the apixo API ------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        if request.path_params["model"] != MODEL:
            return envelope(404, "model not found")
        try:
            body = await request.json()
        except ValueError:
            return self._refuse(400, "invalid JSON body")
        try:
            parsed = parse_submit(body)
        except InvalidRequest as exc:
            return self._refuse(400, str(exc))
        rejected = reject_marker(parsed.prompt)
        if rejected is not None:
            retry = format_retry_after(self.config.scaled(1.0)) if rejected == 429 else None
            return self._refuse(rejected, MESSAGES[rejected], retry)
        try:
            task = self.state.create_task(request.state.key_id, parsed)
        except Refused as exc:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            return envelope(exc.code, exc.message, headers=headers)
        self.worker.submit(task)
        return envelope(200, "success", {"taskId": task.task_id})

    def _refuse(self, code: int, message: str, retry_after: str | None = None) -> JSONResponse:
        self.state.count("rejected", str(code))
        data = {"error": message} if code == 400 else None
        headers = {"Retry-After": retry_after} if retry_after else None
        return envelope(code, message, data, headers=headers)

    async def status(self, request: Request) -> Response:
        if request.path_params["model"] != MODEL:
            return envelope(404, "model not found")
        task_id = request.query_params.get("taskId", "").strip()
        if not task_id:
            return envelope(400, "taskId is required", {"error": "taskId is required"})
        data = self.state.read_status(task_id)
        if data is None:
            return envelope(404, "task not found")
        return envelope(200, "success", data)

    async def balance(self, _request: Request) -> Response:
        return envelope(200, "success", self.state.balance_usd())

    async def api_not_found(self, _request: Request) -> Response:
        return envelope(404, "not found")

    # --- results and files --------------------------------------------------------------------
    async def download(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        verdict = self.state.verify(
            task_id, request.query_params.get("exp", ""), request.query_params.get("sig", "")
        )
        if verdict == "bad":
            return envelope(403, "invalid signature")
        if verdict == "expired":
            return envelope(403, "result URL expired")
        video = self.state.video_for_download(task_id)
        if video is None or not video.is_file():
            return envelope(404, "result not found")
        self.state.count("downloads", task_id)
        return FileResponse(video, media_type="video/mp4")

    async def files(self, request: Request) -> Response:
        if self.files_root is None:
            return envelope(404, "no files directory configured")
        target = (self.files_root / request.path_params["path"]).resolve()
        if not target.is_relative_to(self.files_root):
            return envelope(403, "path outside the files directory")
        if not target.is_file():
            return envelope(404, "file not found")
        return FileResponse(target)

    # --- control ------------------------------------------------------------------------------
    async def get_stats(self, _request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def get_timings(self, _request: Request) -> Response:
        return JSONResponse(self.state.timings())

    async def post_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            with self.state.lock:
                self.state.faults.clear()
            return JSONResponse({"ok": True})
        try:
            body = await request.json()
            route, kind = str(body.get("route", "any")), str(body["kind"])
            count = int(body.get("count", 1))
            with self.state.lock:
                self.state.faults.script(route, kind, count)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            detail = f"{exc}; routes {SCRIPT_ROUTES}, kinds {FAULT_KINDS}"
            return JSONResponse({"ok": False, "error": detail}, status_code=400)
        return JSONResponse({"ok": True})

    async def post_balance(self, request: Request) -> Response:
        try:
            usd = float((await request.json())["usd"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=400)
        if not 0 <= usd <= MAX_BALANCE_USD:  # nan and inf included
            error = f"usd must be from 0 to {MAX_BALANCE_USD:g}"
            return JSONResponse({"ok": False, "error": error}, status_code=400)
        self.state.set_balance(usd)
        return JSONResponse({"ok": True, "balance_usd": self.state.balance_usd()})

    async def post_reset(self, _request: Request) -> Response:
        self.state.reset_stats()
        return JSONResponse({"ok": True})


def create_app(config: EmulatorConfig) -> Emulator:
    """Build an emulator; serve `.asgi` with uvicorn (lifespan on)."""
    return Emulator(config)
