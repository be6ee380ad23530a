"""Opening a run that submits: its runtime, ledger lease and the jobs that go on beside its items
(the lease, the Prefect server's record count, the callback waiter). The batch flow and a part
run on a worker open theirs the same way."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.item import GLOBAL_LIMIT, RunState
from flows.runtime import Runtime, open_runtime
from hailuo_batch.budget import Budget, Stop
from hailuo_batch.jobs import running
from hailuo_batch.ledger import Ledger, LedgerUnavailable, keep_lease
from hailuo_batch.options import RunOptions
from hailuo_batch.orchestrator import recording_advice
from hailuo_batch.pacing import AdaptiveLimit, AdaptiveSlots
from hailuo_batch.policy import Prices
from hailuo_batch.secrets import redact_urls
from hailuo_batch.settings import get_settings

Job = Callable[[], Coroutine[Any, Any, Any]]


def new_run_id() -> str:
    fr_id = flow_run.get_id() or uuid.uuid4().hex
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{str(fr_id).replace('-', '')[:8]}"


NOT_STARTED = "NotStarted"  # the final state's name: the CLI exits 2 on it


class RunNotStarted(Exception):
    """The run could not open: a credentials or storage block, an API key, an output store or a
    callback setting that does not work. Raised before anything is paid."""


def not_started(exc: Exception) -> Any:
    """The final state of a run that could not open (`RunNotStarted`): its reason in one line,
    no traceback; the CLI exits 2 on it, as for any bad setting."""
    cause = exc.__cause__ if isinstance(exc, RunNotStarted) and exc.__cause__ else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    why = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    msg = f"the run could not start ({redact_urls(why)}); nothing was submitted"
    get_run_logger().error(msg)
    return Failed(name=NOT_STARTED, message=msg)


@contextlib.asynccontextmanager
async def opened_run(
    options: RunOptions,
    run_id: str,
    *,
    force: bool = False,
    resubmit_lost: bool = False,
    dry_run: bool = False,
    advise: bool = True,
) -> AsyncIterator[RunState]:
    """The run's shared state, with its lease held and its side jobs going until it ends; a
    missing key, block or dead store fails here as `RunNotStarted`, before anything is paid.
    `advise`: log how to make the Prefect server cheaper if it records one event at a time (a
    batch's parts do not)."""
    started = False
    try:
        async with _opened_run(
            options, run_id, force=force, resubmit_lost=resubmit_lost, dry_run=dry_run,
            advise=advise,
        ) as run:  # fmt: skip
            started = True
            yield run
    except Exception as exc:
        if started:  # the run's own trouble, after it opened
            raise
        raise RunNotStarted(str(exc)) from exc


@contextlib.asynccontextmanager
async def _opened_run(
    options: RunOptions,
    run_id: str,
    *,
    force: bool,
    resubmit_lost: bool,
    dry_run: bool,
    advise: bool,
) -> AsyncIterator[RunState]:
    settings = get_settings()
    async with open_runtime(options, settings) as rt:
        get_run_logger().info("run %s -> %s", run_id, rt.store.url)
        if advise and (advice := await _recording_advice()):
            rt.log(advice)
        run = RunState(
            rt,
            Ledger(rt.store, run_id, lease_ttl_s=settings.lease_ttl_s),
            run_id,
            Prices.from_settings(settings),
            AdaptiveSlots(AdaptiveLimit(ceiling=options.concurrency)),
            budget=Budget(cap_usd=options.max_cost_usd),
            force=force,
            resubmit_lost=resubmit_lost,
            use_global_limit=await _global_limit_exists(GLOBAL_LIMIT),
            dry_run=dry_run,
            checks=asyncio.Semaphore(max(4, options.concurrency)),
            ahead=asyncio.Semaphore(max(8, 2 * options.concurrency)),
        )
        await rt.blocking(run.ledger.heartbeat)  # a lease before any claim; a dead store fails
        lease = partial(
            keep_lease, run.ledger, blocking=rt.blocking, warn=rt.warn,
            lapsed=partial(run.budget.stop, Stop.LEASE),
        )  # fmt: skip
        jobs: list[Job] = [lease, partial(_follow_records, rt)]
        jobs += [rt.waiter.run] if rt.waiter else []
        try:
            async with running(*jobs):
                yield run
        finally:
            with contextlib.suppress(LedgerUnavailable):  # an unended lease simply expires
                await rt.blocking(run.ledger.end_lease)


async def _follow_records(rt: Runtime) -> None:
    """Keep the run's back-pressure (`RecorderLag`) on what the Prefect server has recorded."""
    async with get_client() as client:
        await rt.recorder.follow(partial(_count_recorded, client), warn=rt.warn)


async def _count_recorded(client: PrefectClient) -> int:
    """Finished task runs of this run and its child runs that the Prefect server has recorded."""
    me, done = flow_run.get_id(), ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
    counts = [
        await client._client.post(
            "/task_runs/count",
            json={"flow_runs": runs, "task_runs": {"state": {"type": {"any_": done}}}},
        )
        for runs in ({"id": {"any_": [me]}}, {"parent_flow_run_id": {"any_": [me]}})
    ]
    return sum(int(c.json()) for c in counts)


async def _recording_advice() -> str | None:
    """`orchestrator.recording_advice` for the Prefect server this run reports to; None when
    it does not answer within 5 s (the client's own retries are not waited for)."""
    async with get_client() as client:
        try:
            answer = await asyncio.wait_for(client._client.get("/admin/settings"), 5)
            answer.raise_for_status()
            return recording_advice(answer.json())
        except Exception:  # noqa: BLE001 - advice only: a server that will not say is left alone
            return None


async def _global_limit_exists(name: str) -> bool:
    """Whether the Prefect global concurrency limit `name` exists and is active."""
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            get_run_logger().info(
                "no global concurrency limit %r: items limited per run only", name
            )
            return False
    get_run_logger().info("global concurrency limit %r: %s slots", name, limit.limit)
    return bool(limit.active)
