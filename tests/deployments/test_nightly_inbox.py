"""The nightly flow against a real inbox: each manifest is run exactly once across scheduled
runs, bad ones are moved aside with a report, claims hold across concurrent runs (local, S3)."""

from __future__ import annotations

import asyncio
import csv
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_helpers import API_KEY, PrefectServer, prefect_api

from flows.batch import flow_parameters, generate_videos
from flows.nightly import nightly_batch
from hailuo_batch.emulator import EmulatorHandle
from hailuo_batch.inbox import Inbox
from hailuo_batch.results import from_jsonl
from hailuo_batch.settings import get_settings
from hailuo_batch.storage import OutputStore
from tests.flows.flowkit import FAST_FLOW_ENV

pytestmark = pytest.mark.slow  # real processes and servers: `make test-fast` skips it


@pytest.fixture
def flow_env(
    prefect_server: PrefectServer, emulator: EmulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """This process runs flows against the test server, with the emulator and fast polling."""
    env = {**FAST_FLOW_ENV, "APIXO_API_KEY": API_KEY, "APIXO_BASE_URL": emulator.base_url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    with prefect_api(prefect_server.api):
        yield
    get_settings.cache_clear()


def run_nightly(**params: Any) -> Any:
    async def _run() -> Any:
        return await nightly_batch(  # type: ignore[call-overload]
            **flow_parameters(nightly_batch, **params), return_state=True
        )

    return asyncio.run(_run())


def drop_csv(inbox: Path, name: str, rows: list[dict[str, str]]) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    with (inbox / name).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def submissions(emulator: EmulatorHandle) -> int:
    return int(emulator.stats()["submissions"])


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def test_each_manifest_is_processed_once_across_scheduled_runs(
    flow_env: None, emulator: EmulatorHandle, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    inbox = out / "inbox"  # the default: {output}/inbox/
    files = f"{emulator.base_url}/files"
    drop_csv(
        inbox,
        "first.csv",
        [
            {"id": "first-a", "image_url": f"{files}/dusk.jpg", "prompt": "pan"},
            {"id": "first-b", "image_url": f"{files}/garden.jpg", "prompt": "dolly"},
        ],
    )
    drop_csv(inbox, "broken.csv", [{"id": "x", "image_url": f"{files}/dusk.jpg"}])  # no prompt
    (inbox / "notes.txt").write_text("not a manifest")
    before = submissions(emulator)

    # night 1: the good manifest runs as a subflow, the broken one is moved aside; the night
    # is not Failed for one bad file, but its state names it
    state = run_nightly(output=str(out), concurrency=4)
    assert state.is_completed() and state.name == "CompletedWithFailures", state.message
    assert "broken.csv" in state.message and "first.csv" not in state.message
    assert submissions(emulator) - before == 2
    record = json.loads(only(inbox / "done", "*/first.csv.run.json").read_text())
    assert only(inbox / "done", "*/first.csv").read_text().startswith("id,image_url,prompt")
    assert record["state"] == "COMPLETED" and record["flow_run_name"] == "nightly-first.csv"
    results = from_jsonl(Path(record["results"]).read_text())
    assert {r.id: r.status for r in results} == {"first-a": "succeeded", "first-b": "succeeded"}
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == ["first-a.mp4", "first-b.mp4"]
    report = json.loads(only(inbox / "failed", "*/broken.csv.report.json").read_text())
    assert report["stage"] == "validation" and "prompt" in report["error"]
    assert only(inbox / "failed", "*/broken.csv").exists()
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["notes.txt"]

    # the subflow run is named after the manifest, in Prefect too, and so are the steps
    api = prefect_server.api
    run = httpx.get(f"{api}/flow_runs/{record['flow_run_id']}", timeout=10).json()
    assert run["name"] == "nightly-first.csv" and run["parent_task_run_id"] is not None
    query = {"flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}}}
    wanted = {"claim-first.csv", "done-first.csv", "claim-broken.csv", "failed-broken.csv"}
    # task runs reach the server through its event pipeline, which lags on a busy machine
    deadline = time.monotonic() + 60
    while True:
        steps = {t["name"] for t in httpx.post(f"{api}/task_runs/filter", json=query).json()}
        if wanted <= steps or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= steps

    # night 2: nothing new, nothing done, nothing paid
    before = submissions(emulator)
    state = run_nightly(output=str(out))
    assert state.is_completed()
    report2 = state.result()
    assert report2["done"] == [] and report2["failed"] == []
    assert submissions(emulator) == before

    # night 3: only the newly dropped manifest runs
    (inbox / "second.jsonl").write_text(
        json.dumps({"id": "second-a", "image_url": f"{files}/tower.png", "prompt": "tilt"}) + "\n"
    )
    state = run_nightly(output=str(out))
    assert state.is_completed()
    assert [d["manifest"] for d in state.result()["done"]] == ["second.jsonl"]
    assert submissions(emulator) - before == 1
    assert len(list((inbox / "done").glob("*/first.csv"))) == 1


def test_a_run_that_fails_moves_its_manifest_aside_with_the_reason(
    flow_env: None, emulator: EmulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIXO_API_KEY", "sk-wrong-key")  # the provider answers 401
    get_settings.cache_clear()
    inbox = tmp_path / "drop"
    files = f"{emulator.base_url}/files"
    drop_csv(inbox, "batch.csv", [{"image_url": f"{files}/dusk.jpg", "prompt": "pan"}])
    state = run_nightly(inbox=str(inbox), output=str(tmp_path / "out"))
    assert state.is_failed() and "batch.csv" in state.message  # no manifest ran: Failed
    report = json.loads(only(inbox / "failed", "*/batch.csv.report.json").read_text())
    assert report["stage"] == "run" and report["state"] == "FAILED"
    assert "401" in report["error"] or "authentication" in report["error"].lower()
    assert "sk-wrong-key" not in json.dumps(report)


def test_a_bad_setting_leaves_every_manifest_in_the_inbox(
    flow_env: None, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """A block that does not exist is the night's setting, not the manifests' fault: none is
    claimed or moved to failed/, and the next night (setting fixed) takes them all."""
    inbox = tmp_path / "drop"
    files = f"{emulator.base_url}/files"
    for name in ("a.csv", "b.csv"):
        drop_csv(inbox, name, [{"id": name[0], "image_url": f"{files}/dusk.jpg", "prompt": "p"}])
    before = submissions(emulator)
    state = run_nightly(inbox=str(inbox), output=str(tmp_path / "out"), credentials_block="typo")
    assert state.is_failed() and state.name == "NotStarted", state.message
    assert "typo" in state.message
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv", "b.csv"]
    assert submissions(emulator) == before


@pytest.mark.parametrize("case", ["output is a file", "callback mode without its URL"])
def test_a_run_that_cannot_open_leaves_the_manifests_in_the_inbox(
    flow_env: None, emulator: EmulatorHandle, tmp_path: Path, case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A setting that fails only when a run opens it (a file where the output folder should
    be; callback mode with no callback URL, found by the first manifest's run): no manifest
    is moved to failed/, and the first one claimed goes back to the inbox."""
    inbox = tmp_path / "drop"
    files = f"{emulator.base_url}/files"
    for name in ("a.csv", "b.csv"):
        drop_csv(inbox, name, [{"id": name[0], "image_url": f"{files}/dusk.jpg", "prompt": "p"}])
    options: dict[str, Any] = {"output": str(tmp_path / "out")}
    if case == "output is a file":
        (tmp_path / "out").write_text("a file, not a folder")
    else:
        monkeypatch.delenv("HAILUO_CALLBACK_URL", raising=False)
        monkeypatch.setenv("HAILUO_CALLBACK_TOKEN", "t" * 40)
        get_settings.cache_clear()
        options["request_type"] = "callback"
    before = submissions(emulator)
    state = run_nightly(inbox=str(inbox), **options)
    assert state.is_failed() and state.name == "NotStarted", state.message
    if case != "output is a file":
        assert "left in the inbox" in state.message
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["a.csv", "b.csv"]
    assert not list(inbox.glob("failed/**/*.csv")) and not list(inbox.glob("processing/**/*"))
    assert submissions(emulator) == before


@pytest.mark.parametrize(
    ("inbox", "says"),
    [
        ("{tmp}/typo-inbox", "is not a folder"),
        ("{tmp}/a-file", "is a file: it must be a folder"),
        ("file://{tmp}/typo-inbox", "is not a folder"),
        ("s3:/bucket/in", "lacks '//'"),
        ("gs://bucket/in", "not supported"),
        ("  ", "inbox is empty"),
    ],
)
def test_an_inbox_that_cannot_be_one_is_a_bad_setting(
    flow_env: None, emulator: EmulatorHandle, tmp_path: Path, inbox: str, says: str
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    state = run_nightly(inbox=inbox.format(tmp=tmp_path), output=str(tmp_path / "out"))
    assert state.is_failed() and state.name == "NotStarted", state.message
    assert says in state.message and "Traceback" not in state.message
    assert not (tmp_path / "typo-inbox").exists() and not Path("s3:").exists()


def test_nightly_forwards_only_parameters_generate_videos_takes() -> None:
    nightly = set(nightly_batch.parameters.properties) - {"inbox"}
    assert nightly <= set(generate_videos.parameters.properties)


@pytest.fixture(params=["local", "s3"])
def inbox_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "inbox")
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/hailuo/inbox"


def test_a_manifest_is_claimed_by_one_run_only(inbox_url: str) -> None:
    box = Inbox(OutputStore(inbox_url))
    box.store.write_text_atomic("m.csv", "image_url,prompt\nhttps://x/y.jpg,pan\n")
    winners: list[Any] = []
    start = threading.Barrier(6)

    def contender(n: int) -> None:
        start.wait()
        winners.append(box.claim("m.csv", f"run-{n}"))

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = [c for c in winners if c is not None]
    assert len(claims) == 1
    assert box.pending() == []
    [claim] = claims
    assert box.store.read_text(claim.key).startswith("image_url,prompt")
    # a later run finds nothing to take, and the claim marker is gone
    assert box.claim("m.csv", "late") is None
    assert not box.store.exists("processing/m.csv.claim")

    url = box.finish(claim, "done", {"flow_run_id": "abc"})
    assert json.loads(box.store.read_text(f"done/{claim.claim_id}/m.csv.run.json")) == {
        "flow_run_id": "abc"
    }
    assert url.endswith("m.csv.run.json")
    assert box.store.exists(f"done/{claim.claim_id}/m.csv")
    assert not box.store.exists(claim.key)


def test_a_manifest_claimed_by_a_live_run_is_left_alone(inbox_url: str) -> None:
    box = Inbox(OutputStore(inbox_url))
    box.store.write_text_atomic("m.csv", "image_url,prompt\n")
    box.store.write_text_atomic("processing/m.csv.claim", "other-run")
    assert box.claim("m.csv", "mine") is None
    assert box.pending() == ["m.csv"]  # still there for the run that holds it


def test_stranded_manifests_are_found_by_their_claims_lease(inbox_url: str) -> None:
    """A manifest under processing/ whose claim's lease is over was left by a killed run: it is
    put back and claimed again; a live claim's manifest, or one whose name waits in the inbox
    again, stays where it is."""
    from hailuo_batch.ledger import Ledger

    box = Inbox(OutputStore(inbox_url))
    for name in ("dead.csv", "live.csv", "clash.csv"):
        box.store.write_text_atomic(name, "image_url,prompt\n")
    assert box.claim("dead.csv", "C-dead") is not None
    assert box.claim("clash.csv", "C-dead") is not None
    assert box.claim("live.csv", "C-live") is not None
    box.store.write_text_atomic("clash.csv", "image_url,prompt\n")  # dropped again meanwhile
    Ledger(box.store, "C-live", lease_ttl_s=60).heartbeat()
    me = Ledger(box.store, "C-me", lease_ttl_s=60)
    stranded = box.stranded(me.lease_alive)
    assert sorted(c.key for c in stranded) == [
        "processing/C-dead/clash.csv",
        "processing/C-dead/dead.csv",
    ]
    assert [box.recover(c) for c in stranded] == [False, True]  # name order: clash, dead
    assert box.pending() == ["clash.csv", "dead.csv"]
    assert box.store.exists("processing/C-dead/clash.csv")  # the older one is not overwritten
    assert box.store.exists("processing/C-live/live.csv")
    assert box.recover(stranded[1]) is True  # another run put it back first: no error


def test_each_stop_of_a_manifest_is_counted_until_it_finishes(inbox_url: str) -> None:
    """Every nightly run that stopped on a manifest is counted when it is put back; the third
    stop is one too many; finishing the manifest clears the count for a later drop."""
    from hailuo_batch.inbox import stopped_too_often

    box = Inbox(OutputStore(inbox_url))
    box.store.write_text_atomic("m.csv", "image_url,prompt\n")
    stops = []
    for claim_id in ("C1", "C2", "C3"):
        claim = box.claim("m.csv", claim_id)
        assert claim is not None
        stops.append(stopped_too_often(box.earlier_stops(claim)))
        if not stops[-1]:
            assert box.recover(claim)
            assert box.recover(claim)  # put back twice (two nights at once): counted once
    assert stops == [False, False, True]
    assert box.earlier_stops(claim) == ["C1", "C2"]
    assert box.finish(claim, "failed", {}) is not None
    assert box.finish(claim, "failed", {}) is None  # gone: another run finished it
    box.store.write_text_atomic("m.csv", "image_url,prompt\n")  # dropped again
    again = box.claim("m.csv", "C4")
    assert again is not None and box.earlier_stops(again) == []
    assert box.stranded(lambda _: False) == [again]


def test_two_nights_that_find_one_stranded_manifest_count_its_stop_once(inbox_url: str) -> None:
    """Nights X and Y both list the manifest C2 left; X counts the stop, then Y reads the count
    before X has moved the file: C2's stop is not counted again, and a third night sees two
    earlier stops, not three."""
    from hailuo_batch.inbox import stopped_too_often

    box = Inbox(OutputStore(inbox_url))
    box.store.write_text_atomic("m.csv", "image_url,prompt\n")
    first = box.claim("m.csv", "C1")
    assert first is not None and box.recover(first)
    left = box.claim("m.csv", "C2")
    assert left is not None
    [seen_by_y] = box.stranded(lambda _: False)
    night_x = Inbox(box.store)
    night_x.release = lambda claim: None  # type: ignore[method-assign] # X stops after counting
    assert night_x.recover(left)
    assert box.earlier_stops(seen_by_y) == ["C1"]  # night Y: C2's stop is not an earlier one
    assert not stopped_too_often(box.earlier_stops(seen_by_y))
    assert box.recover(seen_by_y)
    assert box.recover(left)  # Y put it back first: nothing to do
    third = box.claim("m.csv", "C3")
    assert third is not None and box.earlier_stops(third) == ["C1", "C2"]


def test_a_new_file_dropped_under_a_stopped_manifests_name_starts_afresh(inbox_url: str) -> None:
    from hailuo_batch.inbox import stopped_too_often

    box = Inbox(OutputStore(inbox_url))
    box.store.write_text_atomic("batch.csv", "image_url,prompt\nhttps://x/1.jpg,a\n")
    for claim_id in ("C1", "C2"):
        claim = box.claim("batch.csv", claim_id)
        assert claim is not None and box.recover(claim)
    box.store.delete("batch.csv")  # taken out by hand; next week a new batch.csv
    box.store.write_text_atomic("batch.csv", "image_url,prompt\nhttps://x/2.jpg,b\n")
    claim = box.claim("batch.csv", "C3")
    assert claim is not None and box.earlier_stops(claim) == []
    assert not stopped_too_often(box.earlier_stops(claim))


def test_a_manifest_that_stopped_its_nightly_run_three_times_is_moved_aside(
    flow_env: None,
    emulator: EmulatorHandle,
    prefect_server: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two nights already put it back after their runs were killed on it, and a third run was
    killed on it too: it goes to failed/ with a report naming every claim, nothing is paid, and
    the manifest dropped behind it runs."""
    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "2")
    get_settings.cache_clear()
    out = tmp_path / "out"
    inbox = out / "inbox"
    files = f"{emulator.base_url}/files"
    drop_csv(inbox, "heavy.csv", [{"id": "h0", "image_url": f"{files}/dusk.jpg", "prompt": "p"}])
    box = Inbox(OutputStore(str(inbox)))
    for claim_id in ("C1", "C2", "C3"):  # as three killed nights left it
        claim = box.claim("heavy.csv", claim_id)
        assert claim is not None
        if claim_id != "C3":
            assert box.recover(claim)
    drop_csv(inbox, "later.csv", [{"id": "l0", "image_url": f"{files}/dusk.jpg", "prompt": "q"}])
    before = submissions(emulator)
    state = run_nightly(output=str(out))
    assert state.name == "CompletedWithFailures", state.message
    assert "failed: heavy.csv" in (state.message or "")
    report = state.result(raise_on_failure=False)
    [failed] = report["failed"]
    assert failed["stage"] == "stopped" and failed["stopped_claims"] == ["C1", "C2", "C3"]
    assert "drop it in the inbox again" in failed["error"]
    assert (inbox / "failed" / "C3" / "heavy.csv").exists()
    assert [d["manifest"] for d in report["done"]] == ["later.csv"]
    assert submissions(emulator) - before == 1  # later.csv's item only
    assert not list((inbox / "processing").rglob("*.csv*"))


def test_a_killed_nightly_runs_its_manifest_again_the_next_night_paying_once(
    flow_env: None,
    emulator: EmulatorHandle,
    prefect_server: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL a nightly run once every item of its manifest is paid for and before the videos
    are stored: the manifest sits in processing/ with nobody to finish it. The next night takes
    it back, its batch run resumes from the ledger, stores every video and pays nothing again."""
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "2")
    get_settings.cache_clear()
    out = tmp_path / "out"
    files = f"{emulator.base_url}/files"
    rows = [
        {"id": f"k{i}", "image_url": f"{files}/dusk.jpg", "prompt": f"late {i}"} for i in range(3)
    ]
    drop_csv(out / "inbox", "late.csv", rows)
    before = submissions(emulator)
    emulator.script_faults("download", "slow", count=3)  # no video is stored before the kill
    code = (
        "import asyncio, sys; from flows.batch import flow_parameters; "
        "from flows.nightly import nightly_batch; "
        "asyncio.run(nightly_batch(**flow_parameters(nightly_batch, output=sys.argv[1])))"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_server.api}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def every_task_recorded() -> bool:
        states = [json.loads(p.read_text())["state"] for p in (out / "ledger").glob("*.json")]
        return len(states) == 3 and "submitting" not in states

    deadline = time.monotonic() + 90
    while not every_task_recorded():
        assert proc.poll() is None, "the nightly run ended before it was killed"
        assert time.monotonic() < deadline, "no task recorded in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list((out / "inbox" / "processing").glob("*/late.csv"))
    assert len(left) == 1 and not list((out / "videos").glob("*.mp4"))
    time.sleep(2.5)  # the killed run's leases lapse

    state = run_nightly(output=str(out))
    report = state.result(raise_on_failure=False)
    assert state.is_completed() and state.name == "Completed", state.message
    [done] = report["done"]
    assert done["manifest"] == "late.csv" and done["recovered_from_claim"] == left[0].parent.name
    assert not list((out / "inbox" / "processing").rglob("*.csv"))
    assert len(list((out / "videos").glob("*.mp4"))) == 3
    assert submissions(emulator) - before == 3  # every item paid once, in the killed run


def test_a_cancelled_nightlys_manifest_is_not_resumed_on_its_own(
    flow_env: None,
    emulator: EmulatorHandle,
    prefect_server: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user cancelled the nightly run (the worker stops its process): the next night does
    not pay for what the user stopped; it moves the manifest aside, saying how to run the rest."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    monkeypatch.setenv("HAILUO_LEASE_TTL_S", "2")
    get_settings.cache_clear()
    out = tmp_path / "out"
    inbox = out / "inbox"
    drop_csv(inbox, "stopped.csv", [{"id": "s0", "image_url": "x", "prompt": "p"}])
    box = Inbox(OutputStore(str(inbox)))
    assert box.claim("stopped.csv", "C-stopped") is not None  # as the cancelled run left it

    async def a_cancelled_flow_run() -> str:
        async with get_client() as client:
            created = await client.create_flow_run(
                nightly_batch, name=f"cancelled-{uuid.uuid4().hex[:6]}"
            )
            await client.set_flow_run_state(created.id, Cancelled(), force=True)
            return str(created.id)

    box.store.write_text_atomic("leases/C-stopped.flow_run", asyncio.run(a_cancelled_flow_run()))
    before = submissions(emulator)
    state = run_nightly(output=str(out))
    assert state.is_failed() and "stopped.csv" in (state.message or ""), state.message
    [failed] = state.result(raise_on_failure=False)["failed"]
    assert failed["stage"] == "cancelled" and "drop it in the inbox again" in failed["error"]
    assert (inbox / "failed" / "C-stopped" / "stopped.csv").exists()
    assert not list((inbox / "processing").rglob("*.csv")) and not (inbox / "stopped.csv").exists()
    assert submissions(emulator) == before


def test_a_night_that_cannot_end_its_lease_still_removes_its_flow_run_record(
    flow_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hailuo_batch.ledger import Ledger

    def refused(self: Ledger) -> None:
        raise OSError("the store refused the write")

    monkeypatch.setattr(Ledger, "end_lease", refused)
    out = tmp_path / "out"
    (out / "inbox").mkdir(parents=True)
    state = run_nightly(output=str(out))
    assert state.is_completed(), state.message
    assert list((out / "inbox" / "leases").glob("*.json"))  # the lease, left to expire
    assert not list((out / "inbox" / "leases").glob("*.flow_run"))


def test_an_s3_inbox_in_a_bucket_that_does_not_exist_is_a_bad_setting(
    flow_env: None, emulator: EmulatorHandle, s3_env: str, tmp_path: Path
) -> None:
    before = submissions(emulator)
    state = run_nightly(inbox="s3://no-such-bucket-here/inbox/", output=str(tmp_path / "out"))
    assert state.is_failed() and state.name == "NotStarted", state.message
    assert "takes no writes" in state.message and "Traceback" not in state.message
    assert submissions(emulator) == before
