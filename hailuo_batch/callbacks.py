"""The callback store: where the receiver records deliveries and the flow reads them.

One JSON object per task, `deliveries/{taskId}.json`, under an fsspec URL (a local folder, or
`s3://bucket/prefix` when the receiver and the flow run on different machines). The object
holds the delivered envelope as received plus the time it arrived:

    {"taskId": "task_…", "receivedAt": 1730000000000, "body": {"code": 200, "data": {…}}}

Recording is idempotent by taskId: the first terminal delivery (success or failed) is kept and
later deliveries of the same task are not written again. A non-terminal delivery (the provider
only calls back on completion, so this is unexpected) is recorded but may be replaced by a
terminal one. Task ids are checked against a strict charset so none can escape the folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
from pydantic import ValidationError

from hailuo_batch.apixo.models import TaskStatus
from hailuo_batch.storage import OutputStore

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

log = logging.getLogger(__name__)

DELIVERIES = "deliveries"
CALLBACK_PATH = "/callbacks/"
MIN_TOKEN_LENGTH = 16

_TASK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_LOCK_STRIPES = 64


class InvalidTaskId(ValueError):
    """A task id that is empty, too long or holds characters outside [A-Za-z0-9_.-]."""


def check_task_id(task_id: object) -> str:
    """`task_id` if it is safe as a file name (1-128 of [A-Za-z0-9_.-], not starting with '.')."""
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        shown = repr(task_id)[:80] if isinstance(task_id, str) else type(task_id).__name__
        raise InvalidTaskId(f"invalid taskId {shown}: expected 1-128 of [A-Za-z0-9_.-]")
    return task_id


def check_token(token: str | None) -> str:
    """`token` if it can guard the receiver: at least 16 URL-safe characters. Never echoed."""
    if not token:
        raise ValueError(
            "HAILUO_CALLBACK_TOKEN is not set: the receiver needs a secret path token "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"HAILUO_CALLBACK_TOKEN is too short ({len(token)} characters): use at least "
            f"{MIN_TOKEN_LENGTH}, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not _TOKEN.fullmatch(token):
        raise ValueError(
            "HAILUO_CALLBACK_TOKEN may only hold URL-safe characters [A-Za-z0-9._~-] "
            "(secrets.token_urlsafe() produces such tokens)"
        )
    return token


def callback_url_for(base_url: str, token: str) -> str:
    """The full URL the provider must POST to: `{base_url}/callbacks/{token}`.

    `base_url` is the receiver's public base URL (HAILUO_CALLBACK_URL), with or without a path
    prefix. The result holds the secret: never log it.
    """
    base = base_url.strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("HAILUO_CALLBACK_URL must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("HAILUO_CALLBACK_URL must not hold a query string or fragment")
    secret = quote(check_token(token), safe="")
    if token in base or secret in base:  # the whole callback URL given as the base
        raise ValueError(
            "HAILUO_CALLBACK_URL holds the callback token: give only the receiver's public base "
            f"URL (the run adds {CALLBACK_PATH}<token> itself)"
        )
    return f"{base}{CALLBACK_PATH}{secret}"


def delivery_key(task_id: str) -> str:
    """Store key of a task's delivery."""
    return f"{DELIVERIES}/{check_task_id(task_id)}.json"


def parse_delivery(body: Any) -> TaskStatus:
    """The status a callback body carries; ValueError if it is not a valid envelope."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise ValueError("callback body must be a JSON object with a 'data' object")
    data = body["data"]
    check_task_id(data.get("taskId"))
    try:
        return TaskStatus.from_data(data)
    except ValidationError as exc:  # a field of the wrong type
        raise ValueError(f"malformed callback data: {exc.error_count()} invalid field(s)") from None
    except TypeError as exc:  # e.g. a number field holding an object
        raise ValueError(f"malformed callback data: {exc}") from None


class CallbackStore:
    """Deliveries recorded by the receiver, read by the flow. Safe to share between threads."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.store = OutputStore(url, storage_options)
        self.url = self.store.url
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def __repr__(self) -> str:
        return f"CallbackStore({self.url!r})"

    def _lock(self, task_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(task_id.encode()) % _LOCK_STRIPES]

    def _read(self, task_id: str) -> tuple[dict[str, Any], TaskStatus] | None:
        """The stored record and its status; None if absent or unreadable (logged)."""
        try:
            raw = self.store.read_bytes(delivery_key(task_id))
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            return record, parse_delivery(record["body"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable callback record for %s: %s", task_id, exc)
            return None

    def record(self, task_id: str, body: dict[str, Any]) -> bool:
        """Store the delivery `body` of `task_id`; True if it was written.

        Idempotent: nothing is written when a terminal delivery of the task is already stored,
        or when both the stored and the new one are non-terminal. Raises ValueError if `body`
        is not a valid envelope or its data.taskId differs from `task_id`; errors of the store
        itself (OSError, ...) propagate so the receiver can answer 500 and be retried.
        """
        check_task_id(task_id)
        status = parse_delivery(body)
        if status.task_id != task_id:
            raise ValueError("the body's data.taskId differs from the task id")
        with self._lock(task_id):
            existing = self._read(task_id)
            if existing is not None and (existing[1].is_terminal or not status.is_terminal):
                return False
            record = {"taskId": task_id, "receivedAt": int(time.time() * 1000), "body": body}
            # escaped: a body may hold a lone surrogate ("\ud800", half a pair cut off), which
            # JSON parses but UTF-8 cannot hold; the receiver would answer 500 for ever
            data = json.dumps(record, separators=(",", ":"))
            self.store.write_bytes_atomic(delivery_key(task_id), data.encode("ascii"))
        return True

    def get(self, task_id: str) -> TaskStatus | None:
        """The recorded status of `task_id` (one small read), or None if nothing was delivered."""
        found = self._read(check_task_id(task_id))
        return found[1] if found else None

    def received_at(self, task_id: str) -> int | None:
        """When the stored delivery arrived (ms since the epoch), or None."""
        found = self._read(check_task_id(task_id))
        return int(found[0].get("receivedAt", 0)) if found else None

    def task_ids(self) -> set[str]:
        """Ids of every task with a recorded delivery (one listing)."""
        if not self.store.is_local:
            # s3fs caches listings; a poller must see deliveries recorded by another process.
            self.store.fs.invalidate_cache(self.store.url_for(DELIVERIES))
        ids = set()
        for key in self.store.list(DELIVERIES):
            name = key[len(DELIVERIES) + 1 :]
            if name.endswith(".json") and "/" not in name and _TASK_ID.fullmatch(name[:-5]):
                ids.add(name[:-5])
        return ids

    def poll_new(self, known: set[str], wanted: set[str] | None = None) -> dict[str, TaskStatus]:
        """Statuses of recorded tasks not in `known` (and, given `wanted`, among those): one
        listing, then one read per new id.

        Put an id in `known` once its terminal status has been consumed; a non-terminal
        record (unexpected) is returned again on later polls until it turns terminal. A store
        that keeps every delivery of every earlier run costs a reader with `wanted` only the
        listing: the other records are never read.
        """
        found: dict[str, TaskStatus] = {}
        ids = self.task_ids() - known
        for task_id in sorted(ids if wanted is None else ids & wanted):
            status = self.get(task_id)
            if status is not None:
                found[task_id] = status
        return found


class CallbackWaiter:
    """Callback mode: the run's one reader of deliveries, and the wake-up of the item waiting.

    `run()` (a background job of the run) lists new deliveries every `check_s` seconds: one
    listing per tick for the whole run, not a read per item. An item waiting for a task holds
    `waiting(task_id)`'s event, set when a terminal delivery for that task is seen (also when it
    was delivered before the item started waiting: at the next check). Only the deliveries of
    tasks an item waits for are read; the store may hold every earlier run's. A delivery is
    never trusted on its own: the waiter only wakes the item, whose status read confirms it.
    """

    def __init__(
        self,
        store: CallbackStore,
        check_s: float,
        *,
        blocking: Callable[..., Awaitable[Any]] | None = None,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.store = store
        self.check_s = check_s
        self._blocking = blocking or anyio.to_thread.run_sync
        self._warn = warn
        self._known: set[str] = set()  # terminal deliveries seen (ids only: small)
        self._events: dict[str, asyncio.Event] = {}
        self._store_down = False  # the last check could not read the store (warned once)
        self.missed = 0  # tasks the backstop poll found ended long before any delivery

    def missing(self, task_id: str, ended_s_ago: float) -> None:
        """The backstop poll found `task_id` ended `ended_s_ago` seconds ago with no delivery:
        said once per run (callbacks that never arrive only slow the run down, silently)."""
        self.missed += 1
        if self.missed == 1:
            self._warn(
                f"task {task_id} ended {ended_s_ago:.0f} s ago and no callback arrived for it: "
                "check that the provider can reach HAILUO_CALLBACK_URL, that the receiver runs "
                "with this run's HAILUO_CALLBACK_TOKEN and writes to the HAILUO_CALLBACK_STORE "
                "this run reads; until then each task is found by the slow backstop poll"
            )

    def waiting(self, task_id: str) -> asyncio.Event:
        """The event an item waits on for `task_id`; already set if delivered earlier."""
        event = self._events.setdefault(task_id, asyncio.Event())
        if task_id in self._known:
            event.set()
        return event

    def forget(self, task_id: str) -> None:
        """The item stopped waiting for `task_id` (ended, or gave up)."""
        self._events.pop(task_id, None)

    def seen(self, statuses: dict[str, TaskStatus]) -> None:
        """Take in new deliveries: remember terminal ones and wake their items."""
        for task_id, status in statuses.items():
            if status.is_terminal:
                self._known.add(task_id)
                if task_id in self._events:
                    self._events[task_id].set()

    async def check(self) -> None:
        """One look at the delivery store (a listing, then a read per new delivery)."""
        wanted = set(self._events) - self._known
        if not wanted:
            return
        try:
            # `wanted` holds no known id: no copy of the (growing) known set is needed
            new = await self._blocking(self.store.poll_new, set(), wanted)
        except Exception as exc:  # noqa: BLE001 - any store error: the backstop poll goes on
            if not self._store_down:  # once per outage, not every check_s for the whole run
                self._warn(
                    f"cannot read callback deliveries: {exc} (items are read on the backstop "
                    "poll meanwhile; said again only after the store was read in between)"
                )
            self._store_down = True
            return
        self._store_down = False
        self.seen(new)

    async def run(self) -> None:
        """Check for deliveries every `check_s` seconds until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.check_s)


def callback_mode(
    settings: Settings,
    *,
    add_secret: Callable[[str], None],
    blocking: Callable[..., Awaitable[Any]] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> tuple[str, CallbackWaiter]:
    """A run's secret callback URL and its waiter, from HAILUO_CALLBACK_URL, _TOKEN and _STORE.

    The token and the URL go to `add_secret` (the client's scrubber): never in a message,
    result, ledger or log line.
    """
    if not settings.callback_url or settings.callback_token is None:
        raise ValueError(
            "request_type callback needs HAILUO_CALLBACK_URL (the receiver's public base URL) "
            "and HAILUO_CALLBACK_TOKEN (its secret); start one with `hailuo-batch receiver`"
        )
    token = settings.callback_token.get_secret_value()
    url = callback_url_for(settings.callback_url, token)
    add_secret(token)
    add_secret(url)
    deliveries = CallbackStore(settings.callback_store)
    return url, CallbackWaiter(deliveries, settings.callback_check_s, blocking=blocking, warn=warn)
