"""Resuming a run into the same output, claims between concurrent runs, and reruns."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)

from flows.batch import run_flow_sync
from flows.rerun import rerun_failed
from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState
from hailuo_batch.manifest import load_manifest
from hailuo_batch.options import RunOptions
from hailuo_batch.settings import get_settings
from hailuo_batch.storage import OutputStore
from tests.flows.flowkit import generate_videos, items, results_of, served_sha256, write_csv


def test_second_run_resumes_without_paying_or_downloading_again(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 4))
    out = tmp_path / "out"
    first = generate_videos(manifest=str(m), output=str(out))
    assert first.is_completed()
    videos = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    before = emulator.stats()

    second = generate_videos(manifest=str(m), output=str(out))
    assert second.is_completed()
    after = emulator.stats()
    assert after["submissions"] == before["submissions"] == 4  # nothing paid twice
    assert sum(after["downloads"].values()) == sum(before["downloads"].values())  # not downloaded
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == videos
    res = results_of(second.result())
    assert len(res) == 4  # the resumed run's results are complete
    assert all(r.status == "succeeded" and "already stored" in r.note for r in res.values())
    assert all(r.sha256 for r in res.values())
    # what the videos are stays in the latest results file, not only in the first run's
    facts = {i: (r.video_duration_s, r.video_resolution) for i, r in res.items()}
    assert facts == {
        i: (r.video_duration_s, r.video_resolution) for i, r in results_of(first.result()).items()
    }
    assert all(d == 6.0 and w.endswith("x768") for d, w in facts.values()), facts


def test_changed_row_is_a_new_item(flow_env, emulator, tmp_path, images_dir, make_image):
    rows = items(images_dir, make_image, emulator, 2)
    out = tmp_path / "out"
    assert generate_videos(
        manifest=str(write_csv(tmp_path / "a.csv", rows)), output=str(out)
    ).is_completed()
    rows[1]["prompt"] = "a brand new prompt"
    state = generate_videos(manifest=str(write_csv(tmp_path / "b.csv", rows)), output=str(out))
    res = results_of(state.result())
    assert "already stored" in res["i0"].note
    assert res["i1"].status == "succeeded" and "inputs changed" in res["i1"].note
    assert emulator.stats()["submissions_by_prompt"]["a brand new prompt"] == 1
    assert res["i1"].sha256 == served_sha256(emulator.base_url, res["i1"].task_id)


def _uncertain_record(out: Path, manifest: Path) -> None:
    """What a run killed between the POST and recording its taskId leaves behind."""
    item = load_manifest(str(manifest)).items[0]
    Ledger(OutputStore(str(out)), "crashed-run").put(
        LedgerRecord(
            id=item.id, input_hash=item.input_hash, state=LedgerState.SUBMITTING, attempts=1
        )
    )


def test_uncertain_item_is_resubmitted_and_reported(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    _uncertain_record(out, m)
    res = results_of(generate_videos(manifest=str(m), output=str(out)).result())
    r = res["i0"]
    assert r.status == "succeeded" and r.uncertain and "possible duplicate" in r.note
    assert r.attempts == 2  # the unknown POST counts: it may have been charged


def test_uncertain_item_can_be_held(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_UNCERTAIN_POLICY", "hold")
    get_settings.cache_clear()
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    _uncertain_record(out, m)
    state = generate_videos(manifest=str(m), output=str(out))
    assert state.name == "NothingSucceeded"  # a held item is not a success: the state says so
    res = results_of(state.result(raise_on_failure=False))
    assert res["i0"].status == "uncertain" and "held" in res["i0"].note
    assert emulator.stats()["submissions"] == 0


def test_posts_of_unknown_outcome_leave_a_flaky_item_its_resubmission(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """The soak's flake: a run killed while its POST waited (nothing reached the provider), a
    resumed run whose POST gets an HTTP 500 (outcome unknown, nothing created), then a rerun
    whose POST creates the first task, which fails transiently. Two POSTs of unknown outcome
    came before, but no resubmission: the rerun resubmits it and pays for what it reports."""
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    prompt = "f [flaky:GENERATION_FAILED]"
    row = {"id": "i0", "image_url": f"{emulator.base_url}/files/a.jpg", "prompt": prompt}
    m = write_csv(tmp_path / "m.csv", [row])
    out = tmp_path / "out"
    _uncertain_record(out, m)  # run 1, killed
    emulator.script_faults("submit", "500")
    second = generate_videos(manifest=str(m), output=str(out))
    r = results_of(second.result(raise_on_failure=False))["i0"]
    assert (r.status, r.fail_code, r.attempts) == ("uncertain", "AMBIGUOUS_SUBMIT", 2)
    assert emulator.stats()["submissions"] == 0  # neither POST created a task

    state = run_flow_sync(rerun_failed, results=second.result(raise_on_failure=False)["results"])
    assert state.is_completed(), state.message
    r = results_of(state.result())["i0"]
    assert r.status == "succeeded" and r.uncertain, r
    assert "transient GENERATION_FAILED: resubmitted" in r.note
    assert r.attempts == 4  # every POST stays counted as possibly paid
    # one task, its transient resubmission; the rerun reported the possible charges
    assert emulator.stats()["submissions_by_prompt"] == {prompt: 2}


def test_a_rerun_into_another_output_reports_what_may_already_have_been_paid(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """The first run's POSTs were billed and their answers lost. A rerun into a new output
    resubmits them (the default policy) and says so, as a rerun into the same output does;
    a rerun of a results file moved out of its output as well."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 2))
    emulator.script_faults("submit", "drop_after_create", count=2)
    first = generate_videos(manifest=str(m), output=str(tmp_path / "a"))
    results = first.result(raise_on_failure=False)["results"]
    assert {r.status for r in results_of(first.result(raise_on_failure=False)).values()} == {
        "uncertain"
    }
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(Path(results).read_bytes())
    for source, output in ((results, tmp_path / "b"), (str(moved), tmp_path / "c")):
        state = run_flow_sync(rerun_failed, results=source, options=RunOptions(output=str(output)))
        assert state.is_completed(), state.message
        assert state.result()["possible_duplicate_charges"] == 2
        for r in results_of(state.result()).values():
            assert r.status == "succeeded" and r.uncertain, r
            assert "possible duplicate charge" in r.note, r.note
    assert emulator.stats()["submissions"] == 6  # 2 lost answers, then 2 reported per rerun


def test_dropped_submit_is_uncertain_not_retried(
    flow_env, emulator, tmp_path, images_dir, make_image, caplog
):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    emulator.script_faults("submit", "drop_after_create")  # created and billed, answer lost
    caplog.set_level(logging.INFO)
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"))
    # the run's log never says "not submitted" of a POST that may have created a task
    assert "item i0 may have been submitted (and billed)" in caplog.text
    assert "item i0 not submitted" not in caplog.text
    res = results_of(state.result(raise_on_failure=False))
    assert res["i0"].status == "uncertain" and res["i0"].fail_code == "AMBIGUOUS_SUBMIT"
    assert emulator.stats()["submissions"] == 1  # the client did not blindly retry


def test_item_claimed_by_a_live_run_is_left_alone(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "1")
    get_settings.cache_clear()
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 2))
    out = tmp_path / "out"
    other = Ledger(OutputStore(str(out)), "other-run", lease_ttl_s=1)
    other.heartbeat()
    assert other.claim("i0") is None
    alive = threading.Event()
    alive.set()

    def beat() -> None:  # the other run is alive and keeps its lease fresh
        while alive.is_set():
            other.heartbeat()
            time.sleep(0.1)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        res = results_of(generate_videos(manifest=str(m), output=str(out)).result())
    finally:
        alive.clear()
        beater.join()
    assert res["i0"].status == "not_submitted" and "other-run" in res["i0"].fail_msg
    assert res["i1"].status == "succeeded"
    assert emulator.stats()["submissions_by_prompt"] == {"p1": 1}


def test_claim_of_a_crashed_run_is_taken_over(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "1")
    get_settings.cache_clear()
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    crashed = Ledger(OutputStore(str(out)), "crashed-run", lease_ttl_s=1)
    crashed.heartbeat()  # it was alive a moment ago, then died holding the claim
    assert crashed.claim("i0") is None
    res = results_of(generate_videos(manifest=str(m), output=str(out)).result())
    assert res["i0"].status == "succeeded"
    assert not (out / "claims" / "i0.json").exists()


def test_rerun_failed_items_only(flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch):
    monkeypatch.setenv("HAILUO_TRANSIENT_MAX_RESUBMITS", "0")
    get_settings.cache_clear()
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    img = f"{emulator.base_url}/files/a.jpg"
    rows = [
        {"id": "ok", "image_url": img, "prompt": "fine"},
        {"id": "flaky", "image_url": img, "prompt": "f [flaky:GENERATION_FAILED]"},
        {"id": "nsfw", "image_url": img, "prompt": "n [fail:CONTENT_VIOLATION]"},
        {"id": "long", "image_url": img, "prompt": "l [fail:PROMPT_TOO_LONG]"},
    ]
    out = tmp_path / "out"
    first = generate_videos(manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out))
    res = results_of(first.result())
    assert [res[i].status for i in ("ok", "flaky", "nsfw", "long")] == [
        "succeeded",
        "failed",
        "skipped",
        "failed",
    ]
    results_url = first.result()["results"]

    state = run_flow_sync(rerun_failed, results=results_url, fail_codes=["GENERATION_FAILED"])
    assert state.is_completed(), state.message
    summary = state.result()

    async def name_of_run() -> str:  # the run the CLI links to is found by the run it reruns
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).name

    assert asyncio.run(name_of_run()) == f"rerun-of-{first.result()['run_id']}"
    assert summary["rerun_of"] == results_url
    again = results_of(summary)
    assert set(again) == {"flaky"} and again["flaky"].status == "succeeded"
    by_prompt = emulator.stats()["submissions_by_prompt"]
    assert by_prompt["f [flaky:GENERATION_FAILED]"] == 2
    assert by_prompt["n [fail:CONTENT_VIOLATION]"] == 1 and by_prompt["fine"] == 1
    assert by_prompt["l [fail:PROMPT_TOO_LONG]"] == 1

    # skipped content violations come back only when named; overrides change the inputs
    state = run_flow_sync(
        rerun_failed, results=results_url, statuses=["skipped"], prompt_suffix=" (v2)"
    )
    again = results_of(state.result(raise_on_failure=False))
    assert set(again) == {"nsfw"} and again["nsfw"].prompt == "n [fail:CONTENT_VIOLATION] (v2)"
    assert "inputs changed" in again["nsfw"].note

    # a bad-input failure is never sent again unchanged (the contract): a default rerun
    # leaves it out, saying how to include it
    state = run_flow_sync(rerun_failed, results=results_url)
    assert set(results_of(state.result(raise_on_failure=False))) == {"flaky"}
    assert emulator.stats()["submissions_by_prompt"]["l [fail:PROMPT_TOO_LONG]"] == 1


def test_force_from_the_form_never_pays_again_for_content_or_unchanged_bad_input(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """`force` (a box on the deployment's form) resubmits failed and skipped items, but not a
    content violation or a bad-input failure with the same inputs: the contract's rule, as
    `rerun-failed` keeps it. A rerun that names the failCode still resends it."""
    monkeypatch.setenv("HAILUO_TRANSIENT_MAX_RESUBMITS", "0")
    get_settings.cache_clear()
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    img = f"{emulator.base_url}/files/a.jpg"
    rows = [
        {"id": "flaky", "image_url": img, "prompt": "g [flaky:GENERATION_FAILED]"},
        {"id": "nsfw", "image_url": img, "prompt": "g [fail:CONTENT_VIOLATION]"},
        {"id": "bad", "image_url": img, "prompt": "g [fail:INVALID_PROMPT]"},
        {"id": "big", "image_url": img, "prompt": "g [fail:IMAGE_TOO_LARGE]"},
    ]
    m, out = write_csv(tmp_path / "m.csv", rows), tmp_path / "out"
    first_summary = generate_videos(manifest=str(m), output=str(out)).result(raise_on_failure=False)
    first = results_of(first_summary)
    assert [first[i].status for i in ("flaky", "nsfw", "bad", "big")] == [
        "failed", "skipped", "failed", "failed",
    ]  # fmt: skip
    posts = dict(emulator.stats()["submissions_by_prompt"])

    forced = generate_videos(manifest=str(m), output=str(out), force=True)
    res = results_of(forced.result(raise_on_failure=False))
    by_prompt = emulator.stats()["submissions_by_prompt"]
    assert res["flaky"].status == "succeeded"  # a transient failure is what force is for
    assert by_prompt["g [flaky:GENERATION_FAILED]"] == posts["g [flaky:GENERATION_FAILED]"] + 1
    for i, code in (("nsfw", "CONTENT_VIOLATION"), ("bad", "INVALID_PROMPT"),
                    ("big", "IMAGE_TOO_LARGE")):  # fmt: skip
        assert by_prompt[rows_prompt(rows, i)] == posts[rows_prompt(rows, i)], i  # not paid again
        assert res[i].status == first[i].status and code in (res[i].note or ""), res[i]
        assert "--fail-code" in (res[i].note or "")

    # a label typed into the form's `rerun_of` does not turn the guard off: only a rerun's
    # own selection does
    labelled = generate_videos(manifest=str(m), output=str(out), force=True, rerun_of="x")
    assert results_of(labelled.result(raise_on_failure=False))["nsfw"].status == "skipped"
    assert (
        emulator.stats()["submissions_by_prompt"]["g [fail:CONTENT_VIOLATION]"]
        == (posts["g [fail:CONTENT_VIOLATION]"])
    )
    state = run_flow_sync(
        rerun_failed, results=first_summary["results"], fail_codes=["INVALID_PROMPT"],
    )  # fmt: skip
    assert emulator.stats()["submissions_by_prompt"]["g [fail:INVALID_PROMPT]"] == (
        posts["g [fail:INVALID_PROMPT]"] + 1
    ), state.message


def rows_prompt(rows: list[dict[str, str]], item_id: str) -> str:
    return next(r["prompt"] for r in rows if r["id"] == item_id)


async def _rerun_report(flow_run_id) -> tuple[str, list[str]]:
    """The rerun's markdown artifact and the names of the flow runs it started."""
    async with get_client() as client:
        [art] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=["markdown"]),
            )
        )
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
    return str(art.data), [c.name for c in children]


def test_rerun_dry_run_shows_selection_and_cost_then_the_rerun_reports_its_outcome(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_TRANSIENT_MAX_RESUBMITS", "0")
    get_settings.cache_clear()
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    img = f"{emulator.base_url}/files/a.jpg"
    rows = [
        {"id": "ok", "image_url": img, "prompt": "fine"},
        {"id": "flaky", "image_url": img, "prompt": "f [flaky:GENERATION_FAILED]"},
    ]
    out = tmp_path / "out"
    first = generate_videos(manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out))
    results_url = first.result()["results"]
    run_id = first.result()["run_id"]
    paid = emulator.stats()["submissions"]

    dry = run_flow_sync(rerun_failed, results=results_url, dry_run=True)
    assert dry.is_completed() and dry.name == "DryRun", dry.message
    assert "would cost about $0.19" in dry.message  # the one failed 6 s item
    assert emulator.stats()["submissions"] == paid  # nothing submitted
    assert dry.result()["by_status"]["not_submitted"] == 1  # the summary the CLI prints
    report, children = asyncio.run(_rerun_report(dry.state_details.flow_run_id))
    assert children == [f"rerun-{run_id}"]
    assert "1 items selected" in report and "outcome: DryRun" in report
    assert "| not_submitted | 1 |" in report

    state = run_flow_sync(rerun_failed, results=results_url)
    assert state.is_completed(), state.message
    assert results_of(state.result())["flaky"].status == "succeeded"
    report, children = asyncio.run(_rerun_report(state.state_details.flow_run_id))
    assert children == [f"rerun-{run_id}"]
    assert "| succeeded | 1 |" in report
    assert f"results: `{state.result()['results']}`" in report


@pytest.mark.parametrize(
    ("state", "resubmit_lost"),
    [(LedgerState.SUCCEEDED, False), (LedgerState.LOST, False), (LedgerState.LOST, True)],
)
def test_a_video_stored_just_before_a_crash_is_recorded_not_paid_for_again(
    flow_env, emulator, tmp_path, images_dir, make_image, state, resubmit_lost
):
    """Killed after the verified video was published and before `stored` was written: the
    record says `succeeded` (then `lost` once the provider forgets the task). The next run,
    even one told to pay for lost tasks, finds the video and records it: no POST, no read."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    assert generate_videos(manifest=str(m), output=str(out)).is_completed()
    ledger = Ledger(OutputStore(str(out)), "killed-run")
    stored = ledger.get("i0")
    assert stored is not None and stored.state == LedgerState.STORED
    ledger.put(
        stored.model_copy(
            update={
                "state": state,
                "task_id": "forgotten",
                "video": None,
                "bytes": None,
                "sha256": None,
            }
        )
    )
    mtime = (out / "videos" / "i0.mp4").stat().st_mtime_ns
    before = emulator.stats()
    again = generate_videos(manifest=str(m), output=str(out), resubmit_lost=resubmit_lost)
    after = emulator.stats()
    res = results_of(again.result())["i0"]
    assert res.status == "succeeded" and "found stored" in res.note and not res.uncertain
    assert res.sha256 == stored.sha256 and res.video == stored.video
    assert after["submissions"] == before["submissions"] == 1
    assert after["status_reads_total"] == before["status_reads_total"]
    assert (out / "videos" / "i0.mp4").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == ["i0.mp4"]
    assert ledger.get("i0").state == LedgerState.STORED


def test_going_back_to_earlier_inputs_pays_for_nothing_they_already_have(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """One id, two prompts, alternated: each prompt is paid for once. Its video stays where
    it was stored, and going back to it finds it there."""
    rows = items(images_dir, make_image, emulator, 1)
    a = write_csv(tmp_path / "a.csv", rows)
    b = write_csv(tmp_path / "b.csv", [{**rows[0], "prompt": "prompt B"}])
    out = tmp_path / "out"
    runs = [generate_videos(manifest=str(m), output=str(out)) for m in (a, b, a, b)]
    res = [results_of(r.result())["i0"] for r in runs]
    assert [r.status for r in res] == ["succeeded"] * 4
    assert emulator.stats()["submissions_by_prompt"] == {"p0": 1, "prompt B": 1}
    assert res[2].video == res[0].video and res[2].sha256 == res[0].sha256
    assert res[3].video == res[1].video and res[3].sha256 == res[1].sha256
    assert res[0].video != res[1].video
    assert "already stored" in res[2].note and "already stored" in res[3].note
    assert len(list((out / "videos").glob("*.mp4"))) == 2


def test_a_content_violation_is_not_resubmitted_after_other_inputs_ran(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """Skipped for content, then run with another duration (skipped again: a new choice the
    user paid for), then the first inputs again: still skipped, from the ledger, no POST."""
    rows = items(images_dir, make_image, emulator, 1)
    rows[0]["prompt"] = "a dancer [fail:NSFW]"
    six = write_csv(tmp_path / "six.csv", [{**rows[0], "duration": "6"}])
    ten = write_csv(tmp_path / "ten.csv", [{**rows[0], "duration": "10"}])
    out = tmp_path / "out"
    res = [
        results_of(
            generate_videos(manifest=str(m), output=str(out)).result(raise_on_failure=False)
        )["i0"]
        for m in (six, ten, six)
    ]
    assert [r.status for r in res] == ["skipped"] * 3
    assert emulator.stats()["submissions"] == 2
    assert "final in run" in res[2].note


def test_earlier_inputs_whose_download_failed_never_take_another_prompts_video(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """Prompt A's video could not be stored (its record keeps `succeeded` and the key it
    reserved); prompt B then stored its own video under that free key. Going back to A fetches
    A's video from its task into another key: B's video is neither adopted as A's nor
    overwritten."""
    rows = items(images_dir, make_image, emulator, 1)
    a = write_csv(tmp_path / "a.csv", rows)
    b = write_csv(tmp_path / "b.csv", [{**rows[0], "prompt": "prompt B"}])
    out = tmp_path / "out"
    emulator.script_faults("download", "html_body", 10)  # every download of run 1 refused
    first = results_of(
        generate_videos(manifest=str(a), output=str(out)).result(raise_on_failure=False)
    )["i0"]
    assert first.fail_code == "NOT_A_VIDEO"
    emulator.clear_faults()
    second = results_of(generate_videos(manifest=str(b), output=str(out)).result())["i0"]
    b_sha = (out / "videos" / "i0.mp4").read_bytes()
    third = results_of(generate_videos(manifest=str(a), output=str(out)).result())["i0"]
    assert third.status == "succeeded" and third.task_id == first.task_id
    assert third.sha256 == served_sha256(emulator.base_url, first.task_id)
    assert third.video != second.video
    assert (out / "videos" / "i0.mp4").read_bytes() == b_sha  # B's video untouched
    assert emulator.stats()["submissions_by_prompt"] == {"p0": 1, "prompt B": 1}


def test_refetching_a_deleted_video_never_overwrites_the_one_stored_under_its_name_since(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """Prompt A's video was deleted (a clean-up, a bucket's expiry rule); prompt B then stored
    its own under the freed name. Going back to A fetches A's video again from its task, into
    another key: B's paid video is not overwritten, and going back to B finds it intact."""
    rows = items(images_dir, make_image, emulator, 1)
    (images_dir / "b.jpg").write_bytes(make_image(720, 480).read_bytes())  # another video
    a = write_csv(tmp_path / "a.csv", rows)
    b_row = {**rows[0], "prompt": "prompt B", "image_url": f"{emulator.base_url}/files/b.jpg"}
    b = write_csv(tmp_path / "b.csv", [b_row])
    out = tmp_path / "out"
    first = results_of(generate_videos(manifest=str(a), output=str(out)).result())["i0"]
    (out / "videos" / "i0.mp4").unlink()
    second = results_of(generate_videos(manifest=str(b), output=str(out)).result())["i0"]
    assert second.video == first.video  # the freed name
    b_bytes = (out / "videos" / "i0.mp4").read_bytes()
    assert second.sha256 != first.sha256
    third = results_of(generate_videos(manifest=str(a), output=str(out)).result())["i0"]
    assert third.status == "succeeded" and "fetching it again" in (third.note or "")
    assert third.video != second.video
    assert third.sha256 == served_sha256(emulator.base_url, first.task_id)
    assert (out / "videos" / "i0.mp4").read_bytes() == b_bytes  # B's video untouched
    fourth = results_of(generate_videos(manifest=str(b), output=str(out)).result())["i0"]
    assert fourth.video == second.video and "already stored" in (fourth.note or "")
    assert emulator.stats()["submissions_by_prompt"] == {"p0": 1, "prompt B": 1}


def test_a_video_damaged_after_it_was_stored_is_never_adopted(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """Stored, then cut in half; the provider has forgotten the task (the record goes `lost`).
    A run told to pay for lost tasks pays for a new one: the damaged copy is not recorded as
    the item's video."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    assert generate_videos(manifest=str(m), output=str(out)).is_completed()
    ledger = Ledger(OutputStore(str(out)), "test")
    stored = ledger.get("i0")
    ledger.put(stored.model_copy(update={"state": LedgerState.LOST, "task_id": "forgotten"}))
    video = out / "videos" / "i0.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    res = results_of(
        generate_videos(manifest=str(m), output=str(out), resubmit_lost=True).result()
    )["i0"]
    assert res.status == "succeeded" and "found stored" not in (res.note or "")
    assert emulator.stats()["submissions"] == 2 and res.uncertain
    assert res.sha256 == served_sha256(emulator.base_url, res.task_id)


def test_a_lease_that_lapses_while_a_post_is_retried_stops_the_retries(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """The provider answers 503 to the POST, and while the client waits to try again the
    run's lease cannot be renewed (its folder became a file): another run may take the item
    over now, so no further POST goes out. The item ends `not_submitted`, the run `LeaseLost`."""
    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "1")
    monkeypatch.setenv("HAILUO_RETRY_BASE_S", "1")  # waits of 0.5-1 s, 1-2 s, 2-4 s, ...
    monkeypatch.setenv("HAILUO_RETRY_MAX_S", "30")
    get_settings.cache_clear()
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    out = tmp_path / "out"
    emulator.script_faults("submit", "503", 6)  # every attempt the retry policy allows
    done = threading.Event()

    def break_lease_on_first_post() -> None:
        while not done.is_set() and not emulator.stats()["faults"]:
            time.sleep(0.01)
        leases = out / "leases"
        leases.rename(out / "leases-gone")
        leases.write_text("not a folder")

    breaker = threading.Thread(target=break_lease_on_first_post, daemon=True)
    breaker.start()
    try:
        state = generate_videos(manifest=str(m), output=str(out))
    finally:
        done.set()
        breaker.join()
    assert emulator.stats()["submissions"] == 0
    posts = sum(emulator.stats()["faults"].values())
    assert posts < 6, f"{posts} POSTs: the retries went on after the lease lapsed"
    assert emulator.stats()["pending_faults"]  # the retry budget was not spent
    summary = state.result(raise_on_failure=False)
    assert state.name == "LeaseLost", state.name
    res = results_of(summary)
    assert res["i0"].status == "not_submitted" and "lease lapsed" in res["i0"].fail_msg


@pytest.mark.parametrize("stored", [False, True])
def test_a_task_the_ledger_could_not_record_is_taken_from_the_runs_results(
    flow_env, emulator, tmp_path, images_dir, make_image, stored
):
    """What a run whose ledger writes were refused after the POST leaves: a `submitting`
    record, and a results file naming the task (and the video, if it was stored). The next
    run takes the task from those results: it pays nothing, and a stored video is adopted."""
    from hailuo_batch.apixo import ApixoClient
    from hailuo_batch.results import ItemResult, to_jsonl
    from tests.flows.flowkit import API_KEY

    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    item = load_manifest(str(m)).items[0]
    out = tmp_path / "out"
    store = OutputStore(str(out))
    first = generate_videos(manifest=str(m), output=str(out))  # a real task and video
    done = results_of(first.result())["i0"]
    ledger = Ledger(store, "r0")
    ledger.put(LedgerRecord(id="i0", input_hash=item.input_hash, state=LedgerState.SUBMITTING,
                            attempts=1))  # fmt: skip
    line = ItemResult(
        id="i0", row=1, status="succeeded" if stored else "failed", task_id=done.task_id,
        input_hash=item.input_hash, video=done.video if stored else None,
        sha256=done.sha256 if stored else None, bytes=done.bytes if stored else None,
    )  # fmt: skip
    store.write_text_atomic("runs/r0/results.jsonl", to_jsonl([line]))
    if not stored:
        (out / "videos" / "i0.mp4").unlink()
    before = emulator.stats()
    res = results_of(generate_videos(manifest=str(m), output=str(out)).result())["i0"]
    after = emulator.stats()
    assert res.status == "succeeded" and res.task_id == done.task_id, res
    assert "recovered from run r0's results" in (res.note or "")
    assert after["submissions"] == before["submissions"]  # nothing paid again
    assert not res.uncertain
    if stored:  # adopted: not even read again
        assert after["status_reads_total"] == before["status_reads_total"]
    with ApixoClient(API_KEY, emulator.base_url) as c:
        assert c.get_status(done.task_id).task_id == done.task_id


def test_a_rerun_of_results_left_outside_the_output_pays_nothing_for_the_tasks_they_name(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """The output refused the run's writes after the POST: its ledger record stayed
    `submitting`, its results went to ./hailuo-results/{run}/ naming the task, and the CLI said
    a rerun fetches the video without paying. `rerun` of that file does just that."""
    from hailuo_batch.results import ItemResult, to_jsonl

    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    item = load_manifest(str(m)).items[0]
    out = tmp_path / "out"
    store = OutputStore(str(out))
    done = results_of(generate_videos(manifest=str(m), output=str(out)).result())["i0"]
    Ledger(store, "r0").put(LedgerRecord(id="i0", input_hash=item.input_hash,
                                         state=LedgerState.SUBMITTING, attempts=1))  # fmt: skip
    (out / "videos" / "i0.mp4").unlink()
    line = ItemResult(
        id="i0", row=1, status="failed", fail_code="STORE_FAILED", task_id=done.task_id,
        input_hash=item.input_hash, image_url=item.image_url, prompt=item.prompt,
        ledger_behind=True, run_id="r0",
    )  # fmt: skip
    fallback = tmp_path / "hailuo-results" / "r0" / "results.jsonl"
    fallback.parent.mkdir(parents=True)
    fallback.write_text(to_jsonl([line]))
    before = emulator.stats()["submissions"]
    state = run_flow_sync(rerun_failed, results=str(fallback), options=RunOptions(output=str(out)))
    res = results_of(state.result())["i0"]
    assert res.status == "succeeded" and res.task_id == done.task_id, res
    assert "recovered from run r0's results" in (res.note or "")
    assert emulator.stats()["submissions"] == before  # nothing paid again
    assert not res.uncertain
