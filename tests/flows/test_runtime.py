"""What a run's tasks share: background jobs run in a task group for the body's length (errors
come out as themselves), and the runtime's poster allowance."""

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


def test_posters_are_made_while_downloading_for_as_many_videos_as_the_review_page_shows(
    tmp_path,
):
    """The first `MAX_CARDS` downloads of a run make their poster in the same pass; the rest
    do not (the page shows no more cards, so a poster for them would be wasted work)."""
    from flows.runtime import Runtime
    from hailuo_batch.apixo import ApixoClient
    from hailuo_batch.pacing import RecorderLag
    from hailuo_batch.policy import PollSchedule
    from hailuo_batch.polling import stats_board
    from hailuo_batch.review import MAX_CARDS
    from hailuo_batch.settings import Settings
    from hailuo_batch.storage import OutputStore

    settings = Settings()
    with ApixoClient("key", "http://127.0.0.1:9") as client:
        rt = Runtime(
            settings, client, OutputStore(str(tmp_path / "out")), anyio.CapacityLimiter(4),
            stats_board(None, PollSchedule.from_settings(settings)), RecorderLag(100),
        )  # fmt: skip
        taken = [rt.take_poster() for _ in range(MAX_CARDS + 25)]
    assert taken == [True] * MAX_CARDS + [False] * 25


def test_the_run_steps_a_person_sees_in_the_ui_are_task_runs():
    """The run graph shows one box per reporting step (publish_previews among them); the
    rewrite of summary.json is a plain write inside the run, not a box of its own."""
    from prefect import Task

    from flows import report

    for step in (report.write_results, report.publish_previews, report.publish_report):
        assert isinstance(step, Task), step
    assert not isinstance(report.rewrite_summary, Task)
