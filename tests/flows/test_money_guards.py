"""Pay once, lose nothing, end to end: real Prefect, real HTTP to the emulator, real files.

Each test is one class of failure from the hostile review: rate limiting past the account's
real limit, 401 while polling, an unreachable API, tasks the provider forgot, the spend of a
resumed run, a changed row under an id that already has a paid video, a storage outage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hailuo_batch.emulator import EmulatorConfig
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import generate_videos, items, results_of, served_sha256, write_csv


@pytest.fixture
def emulator_config(images_dir: Path, request: pytest.FixtureRequest) -> EmulatorConfig:
    limit = getattr(request, "param", 20)
    return EmulatorConfig(
        port=0,
        api_key=None,
        time_scale=0.002,
        fps=4,
        files_dir=str(images_dir),
        seed=5,
        concurrency=limit,  # the account's real limit: 429 above it
    )


@pytest.mark.parametrize("emulator_config", [2], indirect=True)
def test_rate_limiting_above_the_real_limit_never_drops_an_item(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    monkeypatch.setenv("HAILUO_RETRY_MAX_ATTEMPTS", "2")  # the client gives up on 429 quickly
    get_settings.cache_clear()
    rows = items(images_dir, make_image, emulator, 8)
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)),
        output=str(tmp_path / "out"),
        concurrency=8,  # four times what the provider accepts
        return_state=True,
    )
    assert state.is_completed(), state.message
    res = results_of(state.result())
    assert {r.status for r in res.values()} == {"succeeded"}
    stats = emulator.stats()
    assert stats["rejected_429"] > 0  # the limit was really hit
    assert stats["rejected_429"] <= 8  # at most one refusal per item: the run learned the limit
    assert stats["submissions"] == 8  # and nothing was paid twice
    assert all(n == 1 for n in stats["submissions_by_prompt"].values())
    learned = state.result()["concurrency"]
    assert learned["ceiling"] == 8 and learned["learned_limit"] is not None
    assert learned["learned_limit"] <= 3  # found near the provider's real limit of 2


def test_a_provider_that_refuses_every_submission_stops_the_run_after_one_patience(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    """Every POST answered 429 (an account suspended, a provider outage): the run stops once
    the patience has passed with nothing accepted, and every item still waiting ends then,
    not each after a patience of its own, one after another."""
    monkeypatch.setenv("HAILUO_RETRY_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("HAILUO_RATE_LIMIT_PATIENCE_S", "2")
    get_settings.cache_clear()
    emulator.script_faults("submit", "429", count=10_000)
    rows = items(images_dir, make_image, emulator, 6)
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(tmp_path / "out"),
        concurrency=6, return_state=True,
    )  # fmt: skip
    assert state.is_failed() and state.name == "RateLimited", (state.name, state.message)
    assert "HAILUO_RATE_LIMIT_PATIENCE_S" in (state.message or "")
    res = results_of(state.result(raise_on_failure=False))
    assert {r.status for r in res.values()} == {"not_submitted"}
    assert emulator.stats()["submissions"] == 0
    # one patience in all: the refusals the run saw fit in ~2 s of cool-downs, not 6 x 2 s
    assert emulator.stats()["rejected_429"] < 6 * 4


def test_an_unreachable_api_stops_the_run_before_anything_is_paid(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    from hailuo_batch.sockets import bind_tcp

    dead = bind_tcp("127.0.0.1", 0)  # a port that refuses: bound, never listening
    port = dead.getsockname()[1]
    dead.close()
    monkeypatch.setenv("APIXO_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HAILUO_RETRY_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    rows = items(images_dir, make_image, emulator, 3)
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)),
        output=str(tmp_path / "out"),
        return_state=True,
    )
    assert state.is_failed() and state.name == "ApiUnreachable"
    assert "did not answer" in state.message and "APIXO_BASE_URL" in state.message
    summary = state.result(raise_on_failure=False)
    assert {r.status for r in results_of(summary).values()} == {"not_submitted"}
    assert emulator.stats()["submissions"] == 0


def test_a_base_url_with_a_path_stops_at_the_first_404_and_says_what_to_fix(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    """APIXO_BASE_URL=.../api/v1: every endpoint answers 404. The first POST's 404 stops the
    run (no item POSTs after it), named ApiEndpointNotFound, with the setting to check."""
    monkeypatch.setenv("APIXO_BASE_URL", f"{emulator.base_url}/api/v1")
    get_settings.cache_clear()
    rows = items(images_dir, make_image, emulator, 4)
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(tmp_path / "o"),
        concurrency=1,
    )  # fmt: skip
    assert state.is_failed() and state.name == "ApiEndpointNotFound", state.name
    assert "APIXO_BASE_URL" in state.message
    res = results_of(state.result(raise_on_failure=False))
    assert {r.status for r in res.values()} == {"not_submitted"}
    assert emulator.stats()["submissions"] == 0
    codes = sorted(r.fail_code or "" for r in res.values())
    assert codes == ["HTTP_404", "RUN_STOPPED", "RUN_STOPPED", "RUN_STOPPED"], codes


def test_a_resumed_run_counts_only_its_own_spend(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 3)
    out = str(tmp_path / "out")
    first = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=out, return_state=True
    ).result()
    assert first["estimated_cost_usd"] == pytest.approx(0.57)
    rows.append({**rows[0], "id": "new", "prompt": "fresh"})
    second = generate_videos(
        manifest=str(write_csv(tmp_path / "m2.csv", rows)), output=out, return_state=True
    ).result()
    assert second["estimated_cost_usd"] == pytest.approx(0.19)  # only the new item
    assert second["lifetime_estimated_cost_usd"] == pytest.approx(0.76)
    assert second["balance_spent_usd"] == pytest.approx(0.19)


def test_a_changed_row_never_overwrites_a_paid_video(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 1)
    out = tmp_path / "out"
    first = results_of(
        generate_videos(
            manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out), return_state=True
        ).result()
    )["i0"]
    rows[0]["prompt"] = "another prompt"
    second = results_of(
        generate_videos(
            manifest=str(write_csv(tmp_path / "m2.csv", rows)), output=str(out), return_state=True
        ).result()
    )["i0"]
    assert first.status == second.status == "succeeded"
    assert first.video != second.video
    for r in (first, second):  # both results still point at their own, intact bytes
        data = Path(r.video).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256
        assert r.sha256 == served_sha256(emulator.base_url, r.task_id)
    assert "earlier video stays at" in (second.note or "")


def test_a_lost_task_is_read_again_by_rerun_and_resubmitted_only_when_asked(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    from flows.batch import run_flow_sync
    from flows.rerun import rerun_failed

    monkeypatch.setenv("HAILUO_NOT_FOUND_GRACE_S", "0")
    get_settings.cache_clear()
    rows = items(images_dir, make_image, emulator, 2)
    out = tmp_path / "out"
    emulator.script_faults("status", "404", 100)  # the provider forgot every task
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out), return_state=True
    )
    summary = state.result(raise_on_failure=False)
    res = results_of(summary)
    assert {r.fail_code for r in res.values()} == {"TASK_NOT_FOUND"}
    assert all("--resubmit-lost" in r.fail_msg for r in res.values())
    emulator.clear_faults()
    # a plain rerun reads the same tasks again (they exist after all): nothing paid twice
    again = run_flow_sync(rerun_failed, results=summary["results"]).result()
    assert {r.status for r in results_of(again).values()} == {"succeeded"}
    assert emulator.stats()["submissions"] == 2


def test_a_lost_task_resubmitted_on_request_is_reported_as_a_possible_duplicate(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    from flows.batch import run_flow_sync
    from flows.rerun import rerun_failed

    monkeypatch.setenv("HAILUO_NOT_FOUND_GRACE_S", "0")
    get_settings.cache_clear()
    rows = items(images_dir, make_image, emulator, 1)
    emulator.script_faults("status", "404", 100)
    summary = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)),
        output=str(tmp_path / "out"),
        return_state=True,
    ).result(raise_on_failure=False)
    emulator.clear_faults()
    again = run_flow_sync(rerun_failed, results=summary["results"], resubmit_lost=True).result()
    r = results_of(again)["i0"]
    assert r.status == "succeeded" and r.uncertain and "possible duplicate" in r.note
    assert emulator.stats()["submissions"] == 2


def test_a_storage_outage_at_the_end_still_leaves_a_results_file(
    flow_env, emulator, images_dir, make_image, tmp_path, monkeypatch
):
    """The output's `runs/` folder is replaced by a file: no results can be written there."""
    monkeypatch.chdir(tmp_path)
    rows = items(images_dir, make_image, emulator, 2)
    out = tmp_path / "out"
    (out / "runs").parent.mkdir(parents=True)
    (out / "runs").write_text("not a folder")
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out), return_state=True
    )
    summary = state.result(raise_on_failure=False)
    fallback = Path(summary["results"])
    assert fallback.is_relative_to(tmp_path / "hailuo-results")
    lines = [json.loads(x) for x in fallback.read_text().splitlines()]
    assert {x["status"] for x in lines} == {"succeeded"} and len(lines) == 2
    assert summary["results_fallback"] == str(fallback)


def test_401_while_polling_stops_the_run_with_one_clean_code(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 3)
    emulator.script_faults("status", "401", 1)  # the key is revoked while tasks run
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)),
        output=str(tmp_path / "out"),
        concurrency=1,
        return_state=True,
    )
    assert state.is_failed() and state.name == "AuthenticationFailed", state.message
    res = results_of(state.result(raise_on_failure=False))
    codes = [r.fail_code for r in res.values() if r.status != "succeeded"]
    assert "AUTH_FAILED" in codes
    polled = next(r for r in res.values() if r.fail_code == "AUTH_FAILED" and r.task_id)
    assert polled.fail_msg and "401" in polled.fail_msg  # the message, not the code, says why
    assert emulator.stats()["submissions"] == 1  # nothing submitted after the 401


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("bad_status", "MALFORMED_STATUS"),
        ("foreign_task", "FOREIGN_TASK"),
        ("unknown_state", "UNKNOWN_STATE"),
    ],
)
def test_an_untrustworthy_status_answer_fails_the_item_at_once_and_a_resume_recovers_it(
    kind, code, flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 1)
    out = str(tmp_path / "out")
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    emulator.script_faults("status", kind, 1)
    first = generate_videos(manifest=manifest, output=out, return_state=True)
    r = results_of(first.result(raise_on_failure=False))["i0"]
    assert (r.status, r.fail_code) == ("failed", code)
    assert emulator.stats()["status_reads_total"] == 1  # not waited on for the poll timeout
    # the task id was kept: the next run reads the same task and stores it without paying
    again = results_of(generate_videos(manifest=manifest, output=out, return_state=True).result())
    assert again["i0"].status == "succeeded" and again["i0"].task_id == r.task_id
    assert emulator.stats()["submissions"] == 1


def test_a_task_id_answered_for_two_items_is_reported_not_shared(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    """The provider bills two more POSTs but answers each with the first item's taskId. Those
    two items never show the first item's video as theirs: each is `uncertain` (its own task
    may have been charged), and the run is not green."""
    rows = items(images_dir, make_image, emulator, 3)
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    out = str(tmp_path / "out")
    first_row = str(write_csv(tmp_path / "first.csv", rows[:1]))
    assert generate_videos(manifest=first_row, output=out).is_completed()
    emulator.script_faults("submit", "reused_task", 2)
    state = generate_videos(manifest=manifest, output=out, concurrency=1)
    res = results_of(state.result(raise_on_failure=False))
    first = res["i0"].task_id
    assert emulator.stats()["submissions"] == 3  # all three were billed
    for i in ("i1", "i2"):
        assert (res[i].status, res[i].fail_code) == ("uncertain", "TASK_ID_REUSED"), res[i]
        assert first in res[i].fail_msg and "i0" in res[i].fail_msg
        assert not res[i].video
    assert state.name == "CompletedWithFailures", state.name


def test_a_result_that_is_another_items_video_is_not_stored_as_this_ones(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    """Every success answer names the first task's video: only its own item stores it; the
    others fail without storing and without paying, and a later run fetches their own."""
    rows = items(images_dir, make_image, emulator, 3)
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    out = str(tmp_path / "out")
    emulator.script_faults("status", "swapped_result", 10_000)
    state = generate_videos(manifest=manifest, output=out, concurrency=1)
    res = results_of(state.result(raise_on_failure=False))
    first_task = next(iter(emulator.stats()["tasks"]))  # whose video every answer names
    (owner,) = [i for i, r in res.items() if r.task_id == first_task]
    assert res[owner].status == "succeeded", res
    for i in {"i0", "i1", "i2"} - {owner}:
        assert (res[i].status, res[i].fail_code) == ("failed", "RESULT_OF_ANOTHER_ITEM"), res[i]
        assert owner in res[i].fail_msg and not res[i].video
    videos = tmp_path / "out" / "videos"
    assert sorted(p.name for p in videos.glob("*.mp4")) == [f"{owner}.mp4"]
    # the next run, the provider still naming that video: the stored item's result is known
    # from the ledger, so the others are still refused (and nothing is paid)
    still = results_of(
        generate_videos(manifest=manifest, output=out).result(raise_on_failure=False)
    )
    for i in {"i0", "i1", "i2"} - {owner}:
        assert still[i].fail_code == "RESULT_OF_ANOTHER_ITEM", still[i]
    emulator.clear_faults()
    again = results_of(generate_videos(manifest=manifest, output=out).result())
    statuses = {i: (r.status, r.fail_code, r.fail_msg) for i, r in again.items()}
    assert {i: r.status for i, r in again.items()} == dict.fromkeys(
        ("i0", "i1", "i2"), "succeeded"
    ), statuses
    for i in {"i0", "i1", "i2"} - {owner}:
        assert again[i].sha256 == served_sha256(emulator.base_url, again[i].task_id)
    assert emulator.stats()["submissions"] == 3


@pytest.mark.parametrize("kind", ["html_body", "empty_body", "cut_body"])
def test_bytes_that_are_not_a_video_are_never_stored(
    kind, flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 1)
    out = tmp_path / "out"
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    emulator.script_faults("download", kind, 10)  # every attempt gets the bad body
    first = results_of(
        generate_videos(manifest=manifest, output=str(out), return_state=True).result(
            raise_on_failure=False
        )
    )["i0"]
    assert first.status == "failed" and first.fail_code in ("NOT_A_VIDEO", "DOWNLOAD_FAILED")
    assert not (out / "videos" / "i0.mp4").exists()
    emulator.clear_faults()
    again = results_of(
        generate_videos(manifest=manifest, output=str(out), return_state=True).result()
    )["i0"]
    assert again.status == "succeeded" and "already stored" not in (again.note or "")
    assert again.video_resolution and again.video_duration_s
    assert emulator.stats()["submissions"] == 1


def test_a_gzip_encoded_video_is_stored_decoded(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 1)
    emulator.script_faults("download", "gzip_body", 1)
    r = results_of(
        generate_videos(
            manifest=str(write_csv(tmp_path / "m.csv", rows)),
            output=str(tmp_path / "out"),
            return_state=True,
        ).result()
    )["i0"]
    assert r.status == "succeeded"
    assert r.sha256 == served_sha256(emulator.base_url, r.task_id)


def test_secrets_in_a_providers_message_never_reach_ledger_or_results(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    """A failMsg that echoes the key and a signed URL, recorded by an earlier run: the cached
    result of the next run, its summary and review page carry neither."""
    import json as _json

    from tests.flows.flowkit import API_KEY

    rows = items(images_dir, make_image, emulator, 1)
    rows[0]["prompt"] = "x [fail:INVALID_PROMPT]"
    out = tmp_path / "out"
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    generate_videos(manifest=manifest, output=str(out), return_state=True)
    record = _json.loads((out / "ledger" / "i0.json").read_text())
    leak = f"echo {API_KEY} https://s3.example/x.mp4?X-Amz-Signature=deadbeefSIGNATURE&a=1"
    record["fail_msg"] = leak  # as an older version, or an echoing provider, left it
    (out / "ledger" / "i0.json").write_text(_json.dumps(record))
    state = generate_videos(manifest=manifest, output=str(out), return_state=True)
    summary = state.result(raise_on_failure=False)
    written = "".join(
        p.read_bytes().decode("utf-8", "replace") for p in (out / "runs").rglob("*") if p.is_file()
    )
    assert results_of(summary)["i0"].status == "failed"
    for secret in (API_KEY, "deadbeefSIGNATURE"):
        assert secret not in written and secret not in _json.dumps(summary)


def test_a_corrupt_ledger_record_fails_its_item_only(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 2)
    out = tmp_path / "out"
    (out / "ledger").mkdir(parents=True)
    (out / "ledger" / "i0.json").write_text('{"id": "i0", "state": "subm')  # cut mid-write
    state = generate_videos(
        manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out), return_state=True
    )
    res = results_of(state.result(raise_on_failure=False))
    assert res["i1"].status == "succeeded"
    assert res["i0"].status == "not_submitted" and res["i0"].fail_code == "LEDGER_UNAVAILABLE"
    assert "is not a ledger record" in res["i0"].fail_msg
    assert emulator.stats()["submissions"] == 1  # the item whose record is unreadable: not paid


def test_a_damaged_stored_video_of_the_same_size_is_fetched_again(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    rows = items(images_dir, make_image, emulator, 1)
    out = tmp_path / "out"
    manifest = str(write_csv(tmp_path / "m.csv", rows))
    first = results_of(
        generate_videos(manifest=manifest, output=str(out), return_state=True).result()
    )["i0"]
    video = out / "videos" / "i0.mp4"
    video.write_bytes(b"\0" * video.stat().st_size)
    again = results_of(
        generate_videos(manifest=manifest, output=str(out), return_state=True).result()
    )["i0"]
    assert again.status == "succeeded" and "damaged" in (again.note or "")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == again.sha256 == first.sha256
    assert emulator.stats()["submissions"] == 1


def test_a_changed_row_never_forgets_a_paid_task_whose_video_was_not_stored(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    import json as _json

    rows = items(images_dir, make_image, emulator, 1)
    out = tmp_path / "out"
    emulator.script_faults("download", "html_body", 10)  # paid, succeeded, never stored
    first = results_of(
        generate_videos(
            manifest=str(write_csv(tmp_path / "m.csv", rows)), output=str(out), return_state=True
        ).result(raise_on_failure=False)
    )["i0"]
    assert first.fail_code == "NOT_A_VIDEO" and first.task_id
    emulator.clear_faults()
    rows[0]["prompt"] = "changed"
    second = results_of(
        generate_videos(
            manifest=str(write_csv(tmp_path / "m2.csv", rows)), output=str(out), return_state=True
        ).result()
    )["i0"]
    assert second.status == "succeeded"
    assert first.task_id in (second.note or "") and "may have been paid" in second.note
    record = _json.loads((out / "ledger" / "i0.json").read_text())
    assert record["task_ids"] == [first.task_id, second.task_id]  # the old task is kept
