"""Background jobs run in a task group for the body's length; errors come out as themselves."""

from __future__ import annotations

import anyio
import pytest

from hailuo_batch.jobs import running


def test_jobs_run_with_the_body_and_are_cancelled_after_it():
    ticks: list[int] = []

    async def job() -> None:
        while True:
            ticks.append(1)
            await anyio.sleep(0.01)

    async def main() -> int:
        async with running(job):
            await anyio.sleep(0.05)
        seen = len(ticks)
        await anyio.sleep(0.05)
        assert len(ticks) == seen  # nothing outlives the body
        return seen

    assert anyio.run(main) >= 2


def test_an_error_in_the_body_or_a_job_is_raised_as_itself():
    async def forever() -> None:
        await anyio.sleep(10)

    async def body_fails() -> None:
        async with running(forever):
            raise ValueError("body")

    with pytest.raises(ValueError, match="body"):
        anyio.run(body_fails)

    async def broken() -> None:
        raise KeyError("job")

    async def job_fails() -> None:
        async with running(broken):
            await anyio.sleep(10)

    with pytest.raises(KeyError, match="job"):
        anyio.run(job_fails)
