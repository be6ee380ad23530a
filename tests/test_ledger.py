import asyncio
import hashlib
import json
import time
from functools import partial

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.ledger import (
    Ledger,
    LedgerCorrupt,
    LedgerRecord,
    LedgerState,
    LedgerUnavailable,
    claim_or_wait,
    keep_lease,
    plan_in_batch,
    plan_item,
    planned_costs,
    refetch_key,
    stored_intact,
    stored_unrecorded,
)
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.storage import OutputStore

H = "a" * 64


def rec(state, **kw):
    return LedgerRecord(id="x", input_hash=kw.pop("input_hash", H), state=state, run_id="r0", **kw)


def test_never_seen_item_is_submitted():
    assert plan_item(None, H).action == "submit"


def test_changed_inputs_make_a_new_item():
    p = plan_item(rec(LedgerState.STORED, task_id="t", attempts=1), "b" * 64)
    assert p.action == "submit" and "inputs changed since run r0" in p.note


def test_stored_is_done_and_not_downloaded_again():
    p = plan_item(rec(LedgerState.STORED, task_id="t", attempts=1), H)
    assert p.action == "done" and p.attempts == 1


@pytest.mark.parametrize("state", [LedgerState.SUBMITTED, LedgerState.SUCCEEDED])
def test_known_task_id_is_polled_not_resubmitted(state):
    p = plan_item(rec(state, task_id="t", attempts=1), H)
    assert p.action == "poll" and "t" in p.note


@pytest.mark.parametrize("state", [LedgerState.SUBMITTING, LedgerState.UNCERTAIN])
def test_uncertain_window_resubmits_by_default_and_says_so(state):
    p = plan_item(rec(state, attempts=1), H)
    assert p.action == "submit" and p.uncertain and "possible duplicate" in p.note


@pytest.mark.parametrize("state", [LedgerState.SUBMITTING, LedgerState.UNCERTAIN])
def test_uncertain_window_can_be_held_for_a_person(state):
    p = plan_item(rec(state, attempts=1), H, uncertain_policy="hold")
    assert p.action == "hold" and p.uncertain


def test_forced_rerun_resubmits_uncertain_even_when_held():
    assert plan_item(rec(LedgerState.UNCERTAIN), H, uncertain_policy="hold", force=True).action == (
        "submit"
    )


@pytest.mark.parametrize("state", [LedgerState.FAILED, LedgerState.SKIPPED])
def test_final_failures_are_cached_unless_forced(state):
    assert plan_item(rec(state, task_id="t", attempts=1), H).action == "cached"
    assert plan_item(rec(state, task_id="t", attempts=1), H, force=True).action == "submit"


def test_refused_submission_is_submitted_again():
    assert plan_item(rec(LedgerState.NOT_SUBMITTED), H).action == "submit"


ALL_STATES = list(LedgerState)


@pytest.mark.parametrize("state", ALL_STATES)
def test_a_resumed_item_keeps_its_transient_resubmissions_and_its_attempts(state):
    p = plan_item(rec(state, task_id="t", attempts=3, resubmits=1), H)
    assert (p.attempts, p.resubmits) == (3, 1)  # a resume never widens the budget


@pytest.mark.parametrize("state", ALL_STATES)
def test_a_forced_rerun_gives_the_item_the_whole_resubmit_budget_again(state):
    # a rerun is the user's decision to pay again for the item: a transient failure of the
    # task it polls or submits is resubmitted as in a first run; its paid attempts stay counted
    p = plan_item(rec(state, task_id="t", attempts=3, resubmits=2), H, force=True)
    assert (p.attempts, p.resubmits) == (3, 0)


def test_a_record_written_before_resubmits_were_counted_reads_as_none_used():
    old = LedgerRecord.model_validate(
        {"id": "x", "input_hash": H, "state": "submitted", "task_id": "t", "attempts": 2}
    )
    assert old.resubmits == 0 and plan_item(old, H).resubmits == 0


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_env")
    return OutputStore(f"s3://{bucket}/out")


def test_records_round_trip(store):
    led = Ledger(store, "run-1")
    assert led.get("x") is None
    led.put(rec(LedgerState.SUBMITTED, task_id="t1", attempts=1))
    got = led.get("x")
    assert got.state == LedgerState.SUBMITTED and got.task_id == "t1" and got.run_id == "run-1"


def test_claims_exclude_a_live_run_and_take_over_a_dead_one(store):
    a = Ledger(store, "run-a", lease_ttl_s=60)
    b = Ledger(store, "run-b", lease_ttl_s=60)
    a.heartbeat()
    assert a.claim("x") is None
    assert a.claim("x") is None  # idempotent for the owner
    assert b.claim("x") == "run-a"  # live owner: hands off
    # the owner dies: its lease goes stale
    store.write_text_atomic(
        "leases/run-a.json", json.dumps({"run_id": "run-a", "beat": time.time() - 120})
    )
    assert b.claim("x") is None
    assert json.loads(store.read_text("claims/x.json"))["run_id"] == "run-b"
    b.release("x")
    assert not store.exists("claims/x.json")


def test_a_run_with_a_shorter_ttl_never_takes_a_live_runs_items(store):
    """Each run judges other runs' leases by the TTL they wrote, not only by its own: a
    second run started with HAILUO_LEASE_TTL_S=1 must not take over the items of a live run
    that beats every 15 s."""
    a = Ledger(store, "run-a", lease_ttl_s=120)
    a.heartbeat()
    assert a.claim("x") is None
    lease = json.loads(store.read_text("leases/run-a.json"))
    lease["beat"] = time.time() - 20  # between two of a's beats
    store.write_text_atomic("leases/run-a.json", json.dumps(lease))
    hasty = Ledger(store, "run-b", lease_ttl_s=1)
    assert hasty.lease_alive("run-a")
    assert hasty.claim("x") == "run-a"
    assert json.loads(store.read_text("claims/x.json"))["run_id"] == "run-a"
    # past a's own TTL it is dead for everyone
    lease["beat"] = time.time() - 121
    store.write_text_atomic("leases/run-a.json", json.dumps(lease))
    assert hasty.claim("x") is None


@pytest.mark.parametrize("ttl", [None, "120", -5, float("nan"), True, [1]])
def test_a_lease_without_a_usable_ttl_is_judged_by_the_readers_own(store, ttl):
    body = {"run_id": "old", "beat": time.time() - 30}
    if ttl is not None:
        body["ttl"] = ttl
    store.write_text_atomic("leases/old.json", json.dumps(body))
    assert Ledger(store, "r", lease_ttl_s=60).lease_alive("old")
    assert not Ledger(store, "r", lease_ttl_s=10).lease_alive("old")


def test_claim_without_any_lease_is_stale(store):
    Ledger(store, "ghost").claim("y")  # a run that never wrote a lease (killed at start)
    assert Ledger(store, "run-b").claim("y") is None


def test_create_exclusive_is_exclusive(store):
    assert store.create_exclusive("claims/z.json", b"1") is True
    assert store.create_exclusive("claims/z.json", b"2") is False
    assert store.read_text("claims/z.json") == "1"


def test_lost_tasks_are_read_again_unless_resubmitting_lost_is_asked_for():
    lost = rec(LedgerState.LOST, task_id="t", attempts=1)
    p = plan_item(lost, H)
    assert p.action == "poll" and "--resubmit-lost" in p.note and not p.uncertain
    p = plan_item(lost, H, force=True)  # a plain rerun does not pay again either
    assert p.action == "poll"
    p = plan_item(lost, H, resubmit_lost=True)
    assert p.action == "submit" and p.uncertain and "possible duplicate" in p.note
    assert "gone at the provider" in p.note  # no fail code: as a 404 reported it
    timed_out = rec(LedgerState.LOST, task_id="t", attempts=1, fail_code="POLL_TIMEOUT")
    p = plan_item(timed_out, H, resubmit_lost=True)  # not gone: it may still end, and bill
    assert "gone" not in p.note and "may still end" in p.note


def test_a_changed_row_never_takes_the_stored_video_of_the_old_one():
    p = plan_item(
        rec(LedgerState.STORED, task_id="t", attempts=1, video="/o/videos/x.mp4"), "b" * 64
    )
    assert p.action == "submit" and p.keep_video == "videos/x.mp4"
    assert "/o/videos/x.mp4" in p.note
    kept = rec(LedgerState.STORED, task_id="t", attempts=1, video_key="videos/x/abc.mp4")
    assert plan_item(kept, "b" * 64).keep_video == "videos/x/abc.mp4"


class FlakyStore:
    """An OutputStore whose next `fail` calls raise, as an S3 outage or a full disk would."""

    def __init__(self, inner, fail=0):
        self.inner, self.fail, self.calls = inner, fail, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            self.calls += 1
            if self.fail > 0:
                self.fail -= 1
                raise OSError("storage unreachable")
            return attr(*a, **kw)

        return call


def test_a_storage_blip_costs_retries_not_the_write(tmp_path):
    flaky = FlakyStore(OutputStore(str(tmp_path / "o")), fail=3)
    pauses = []
    led = Ledger(flaky, "r1", sleep=pauses.append)
    led.put(rec(LedgerState.SUBMITTED, task_id="t"))
    assert led.get("x").task_id == "t"
    assert pauses == [0.2, 0.5, 1.0]  # backoff between attempts


def test_a_store_that_stays_down_raises_one_clear_error(tmp_path):
    flaky = FlakyStore(OutputStore(str(tmp_path / "o")), fail=100)
    led = Ledger(flaky, "r1", sleep=lambda s: None)
    with pytest.raises(LedgerUnavailable, match=r"ledger/x\.json failed 6 times.*unreachable"):
        led.put(rec(LedgerState.SUBMITTED, task_id="t"))
    # an OSError: callers that handle storage errors keep working
    assert issubclass(LedgerUnavailable, OSError)


def test_a_lease_that_cannot_be_renewed_goes_stale_for_its_owner_first(tmp_path):
    flaky = FlakyStore(OutputStore(str(tmp_path / "o")))
    led = Ledger(flaky, "r1", lease_ttl_s=60, sleep=lambda s: None)
    assert not led.lease_fresh()  # no lease yet: never act as an owner
    led.heartbeat()
    beat = led.last_beat
    assert led.lease_fresh(beat + 44) and not led.lease_fresh(beat + 46)  # margin: a quarter
    flaky.fail = 100
    with pytest.raises(LedgerUnavailable):
        led.heartbeat()
    assert led.last_beat == beat  # a failed renewal does not count
    # another run judges the lease by its file: it is still alive for the full TTL,
    # while the owner stops acting 15 s before that
    assert Ledger(OutputStore(str(tmp_path / "o")), "r2", lease_ttl_s=60).lease_alive("r1")


def test_before_a_post_the_owner_rechecks_claim_lease_and_record(store):
    a = Ledger(store, "run-a", lease_ttl_s=60)
    a.heartbeat()
    assert a.claim("x") is None
    seen = a.put(rec(LedgerState.NOT_SUBMITTED))
    assert a.still_ours("x", seen) is None
    # another run wrote the record in between (a manual resume beside a nightly run)
    b = Ledger(store, "run-b", lease_ttl_s=60)
    b.put(rec(LedgerState.SUBMITTED, task_id="t9"))
    assert "changed by run run-b" in a.still_ours("x", seen)
    # the claim moved to another run
    store.write_text_atomic("claims/x.json", json.dumps({"run_id": "run-b"}))
    assert "belongs to run-b" in a.still_ours("x", a.get("x"))
    # the owner's own lease lapsed
    a.last_beat = time.monotonic() - 50
    assert "lease" in a.still_ours("x", a.get("x"))


def test_a_run_releases_only_its_own_claim(store):
    a = Ledger(store, "run-a", lease_ttl_s=60)
    b = Ledger(store, "run-b", lease_ttl_s=60)
    a.heartbeat()
    b.heartbeat()
    assert a.claim("x") is None
    # a's lease lapsed and b took the item over; a then finishes its (refused) item
    store.write_text_atomic("claims/x.json", json.dumps({"run_id": "run-b", "at": "t"}))
    a.release("x")
    assert b.owner("x") == "run-b"  # b's claim survives: no third run can slip in
    b.release("x")
    assert b.owner("x") == ""


def test_a_record_that_does_not_parse_is_never_taken_as_absent(store):
    store.write_text_atomic("ledger/x.json", '{"id": "x", "state": "subm')
    with pytest.raises(LedgerCorrupt, match="is not a ledger record"):
        Ledger(store, "r1").get("x")
    assert issubclass(LedgerCorrupt, LedgerUnavailable)  # items treat it like a dead store


@pytest.mark.parametrize("state", [LedgerState.SUBMITTED, LedgerState.SUCCEEDED, LedgerState.LOST])
def test_a_changed_row_says_which_paid_task_of_the_old_inputs_has_no_stored_video(state):
    p = plan_item(rec(state, task_id="t1", task_ids=["t1"], attempts=1), "b" * 64)
    assert p.action == "submit" and p.keep_video is None
    assert "t1" in p.note and "may have been paid" in p.note


@pytest.mark.parametrize("state", [LedgerState.SUBMITTING, LedgerState.UNCERTAIN])
def test_a_changed_row_says_an_earlier_charge_is_possible(state):
    p = plan_item(rec(state, attempts=1), "b" * 64)
    assert p.action == "submit" and "possible charge" in p.note


async def _sync(fn, *args):
    return fn(*args)


def test_a_lease_that_stays_unrenewed_stops_the_run_with_a_reason(tmp_path):
    flaky = FlakyStore(OutputStore(str(tmp_path / "o")))
    led = Ledger(flaky, "r1", lease_ttl_s=1.0, retry_delays_s=())
    warnings, stops = [], []

    async def main():
        led.heartbeat()
        flaky.fail = 100  # the store goes away
        with anyio.move_on_after(2.5):
            await keep_lease(led, blocking=_sync, warn=warnings.append, lapsed=stops.append)

    asyncio.run(main())
    assert warnings and "lease renewal failed, trying again" in warnings[0]
    assert stops and "stopped submitting" in stops[0]


def test_a_renewed_lease_never_stops_the_run(tmp_path):
    led = Ledger(OutputStore(str(tmp_path / "o")), "r1", lease_ttl_s=1.0)
    stops = []

    async def main():
        led.heartbeat()
        with anyio.move_on_after(1.5):
            await keep_lease(led, blocking=_sync, warn=stops.append, lapsed=stops.append)

    asyncio.run(main())
    assert stops == [] and led.lease_alive("r1")


def test_an_item_held_by_a_live_run_is_waited_for_then_left_to_it(tmp_path):
    store = OutputStore(str(tmp_path / "o"))
    other = Ledger(store, "run-b", lease_ttl_s=0.4)
    other.heartbeat()
    assert other.claim("x") is None
    mine = Ledger(store, "run-a", lease_ttl_s=0.4)
    started = time.monotonic()
    assert asyncio.run(claim_or_wait(mine, "x", _sync)) is None  # b's lease went stale
    assert time.monotonic() - started >= 0.3
    store.write_text_atomic("leases/run-a.json", json.dumps({"run_id": "run-a", "beat": 2e9}))
    late = Ledger(store, "run-c", lease_ttl_s=0.2)
    assert asyncio.run(claim_or_wait(late, "x", _sync)) == "run-a"  # alive: left to its owner
    assert asyncio.run(claim_or_wait(mine, "y", _sync)) is None


def test_a_stored_video_counts_only_with_the_recorded_bytes(tmp_path):
    store = OutputStore(str(tmp_path / "o"))
    data = b"video bytes"
    r = rec(LedgerState.STORED, task_id="t", video_key="videos/x.mp4", bytes=len(data))
    assert not stored_intact(store, r)  # missing
    store.write_bytes_atomic("videos/x.mp4", data)
    assert stored_intact(store, r)
    assert stored_intact(store, r.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()}))
    assert not stored_intact(store, r.model_copy(update={"sha256": "0" * 64}))  # damaged
    assert not stored_intact(store, r.model_copy(update={"bytes": 3}))  # truncated


def test_the_spend_estimate_counts_only_items_still_to_submit(tmp_path):
    store = OutputStore(str(tmp_path / "o"))
    led = Ledger(store, "r1")
    items = [
        ManifestItem(
            id=i,
            row=n,
            image_url="https://x/a.png",
            prompt="p",
            mode=Mode.STANDARD,
            duration=6,
            provider=Provider.AUTO,
        )
        for n, i in enumerate(["new", "done", "broken"], start=1)
    ]
    led.put(LedgerRecord(id="done", input_hash=items[1].input_hash, state=LedgerState.STORED))
    store.write_text_atomic("ledger/broken.json", "{not json")

    def plan(item, record):
        return plan_item(record, item.input_hash)

    costs = planned_costs(led, items, plan, lambda item: 0.25)
    assert sum(costs.values()) == 0.25  # only "new"


@settings(max_examples=200, deadline=None)
@given(
    state=st.sampled_from(list(LedgerState)),
    same_inputs=st.booleans(),
    force=st.booleans(),
    policy=st.sampled_from(["resubmit", "hold"]),
    resubmit_lost=st.booleans(),
    by_part=st.booleans(),
)
def test_finishing_a_part_never_pays_again_for_what_its_child_run_decided(
    state, same_inputs, force, policy, resubmit_lost, by_part
):
    """The parent finishing a part its child run left (crashed, results lost) plans a record
    that child wrote as the child's own decision: it submits only what the child never
    submitted; what the child may have paid for is held and reported uncertain, whatever
    the batch's force, uncertain policy or resubmit_lost. Other runs' records plan as usual."""
    r = LedgerRecord(
        id="x", input_hash=H, state=state, task_id="t1", task_ids=["t1"], attempts=1,
        run_id="R-part-2" if by_part else "earlier",
    )  # fmt: skip
    h = H if same_inputs else "b" * 64
    p = plan_in_batch(
        r, h, part_runs={"R-part-1", "R-part-2"}, force=force, uncertain_policy=policy,
        resubmit_lost=resubmit_lost,
    )  # fmt: skip
    if not by_part:
        expected = plan_item(
            r, h, force=force, uncertain_policy=policy, resubmit_lost=resubmit_lost
        )
        assert p == expected
    elif p.action == "submit":
        assert state == LedgerState.NOT_SUBMITTED
    if by_part and state in (LedgerState.SUBMITTING, LedgerState.UNCERTAIN):
        assert p.action == "hold" and p.uncertain
    assert plan_in_batch(None, h, part_runs={"R-part-2"}, force=force).action == "submit"


@pytest.mark.parametrize("state", [LedgerState.SUCCEEDED, LedgerState.LOST])
def test_a_video_stored_before_its_record_said_so_is_adopted(store, state):
    """A run killed between publishing the verified video and writing `stored` (or whose
    `stored` write kept failing) leaves `succeeded` with the key chosen; the next run records
    the video it finds there instead of reading (or paying for) the task again."""
    body = b"\x00\x00\x00\x18ftypmp42" + b"v" * 1000
    store.write_bytes_atomic("videos/x.mp4", body)
    left = rec(state, task_id="t1", attempts=1, video_key="videos/x.mp4", fail_code="X")
    found = stored_unrecorded(store, left, H)
    assert found is not None and found.state == LedgerState.STORED
    assert (found.bytes, found.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert found.video == store.url_for("videos/x.mp4") and found.task_id == "t1"
    assert found.fail_code is None and stored_intact(store, found)


def test_only_a_record_of_the_same_inputs_whose_task_succeeded_adopts_a_video(store):
    store.write_bytes_atomic("videos/x.mp4", b"video")
    adopt = dict(task_id="t1", attempts=1, video_key="videos/x.mp4")
    assert stored_unrecorded(store, rec(LedgerState.SUCCEEDED, **adopt), "b" * 64) is None
    for state in set(LedgerState) - {LedgerState.SUCCEEDED, LedgerState.LOST}:
        assert stored_unrecorded(store, rec(state, **adopt), H) is None, state
    no_key = rec(LedgerState.SUCCEEDED, task_id="t1", attempts=1)
    assert stored_unrecorded(store, no_key, H) is None
    elsewhere = rec(LedgerState.SUCCEEDED, task_id="t1", attempts=1, video_key="videos/y.mp4")
    assert stored_unrecorded(store, elsewhere, H) is None


def test_a_replaced_record_is_kept_for_its_inputs(store):
    led = Ledger(store, "r1")
    a = led.put(rec(LedgerState.SKIPPED, task_id="t1", attempts=1, fail_code="NSFW"))
    assert led.record_for("x", H) == a and led.earlier("x", H) is None
    led.keep(a)
    b = led.put(rec(LedgerState.STORED, input_hash="b" * 64, task_id="t2", attempts=1))
    assert led.get("x") == b
    assert led.record_for("x", H) == a  # the earlier inputs' own record
    assert led.record_for("x", "b" * 64) == b
    assert led.record_for("x", "c" * 64) == b  # never seen: the current one, as changed inputs
    assert plan_item(led.record_for("x", H), H).action == "cached"
    store.write_text_atomic(f"ledger/earlier/x/{H}.json", "{")
    with pytest.raises(LedgerCorrupt):
        led.record_for("x", H)


def test_planned_costs_count_nothing_for_inputs_an_earlier_record_holds(store):
    item = ManifestItem(
        id="x", row=1, image_url="https://h/a.jpg", prompt="p", mode=Mode.STANDARD,
        duration=6, provider=Provider.AUTO,
    )  # fmt: skip
    led = Ledger(store, "r1")
    led.keep(led.put(rec(LedgerState.STORED, input_hash=item.input_hash, task_id="t1")))
    led.put(rec(LedgerState.STORED, input_hash="b" * 64, task_id="t2", attempts=1))

    def plan(i, r):
        return plan_item(r, i.input_hash)

    assert planned_costs(led, [item], plan, lambda i: 0.19) == {1: 0.0}
    other = item.model_copy(update={"prompt": "never run"})
    assert planned_costs(led, [other], plan, lambda i: 0.19) == {1: 0.19}


class _Interleaved:
    """A store whose first `delete_if_unchanged` lets another run act first (`before`): run
    B has judged a claim stale, and run A takes the item over before B removes it."""

    def __init__(self, inner, before):
        self.inner, self.before = inner, before

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete_if_unchanged(self, key, expected):
        before, self.before = self.before, None
        if before is not None:
            before()
        return self.inner.delete_if_unchanged(key, expected)


def test_two_runs_taking_over_one_stale_claim_never_both_win(store):
    """C died holding the item. B reads C's claim and judges it stale; A does the same and
    takes the item over completely (removes C's claim, claims it, may POST). B then removes
    only C's claim, which is gone: A's stays, and B hands the item to A."""
    Ledger(store, "run-c", lease_ttl_s=1).claim("x")  # no lease ever written: dead
    a = Ledger(store, "run-a", lease_ttl_s=60)
    a.heartbeat()
    b = Ledger(_Interleaved(store, lambda: a.claim("x")), "run-b", lease_ttl_s=60)
    assert b.claim("x") == "run-a"
    assert json.loads(store.read_text("claims/x.json"))["run_id"] == "run-a"
    assert a.still_ours("x", None) is None


def test_delete_if_unchanged_removes_only_the_bytes_it_was_given(store):
    store.write_bytes_atomic("claims/k.json", b"old")
    assert store.delete_if_unchanged("claims/k.json", b"other") is False
    assert store.read_bytes("claims/k.json") == b"old"
    assert store.delete_if_unchanged("claims/k.json", b"old") is True
    assert not store.exists("claims/k.json")
    assert store.delete_if_unchanged("claims/k.json", b"old") is False  # gone: nothing to do
    assert [p for p in store.fs.find(store.url_for("claims"))] == []  # nothing left aside


def test_a_record_that_knew_its_videos_bytes_adopts_only_those_bytes(store):
    body = b"\x00\x00\x00\x18ftypmp42" + b"v" * 1000
    store.write_bytes_atomic("videos/x.mp4", body[:500])  # damaged since it was stored
    known = dict(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    lost = rec(LedgerState.LOST, task_id="t1", attempts=1, video_key="videos/x.mp4", **known)
    assert stored_unrecorded(store, lost, H) is None
    store.write_bytes_atomic("videos/x.mp4", body)
    assert stored_unrecorded(store, lost, H).state == LedgerState.STORED


def test_a_store_that_refuses_conditional_deletes_still_lets_a_stale_claim_go(s3_env, caplog):
    """Some S3-compatible stores answer a DELETE with If-Match by an error: a dead run's claim
    must still be taken over (plainly, with a warning), or its items would never run."""
    store = OutputStore(f"s3://{s3_env}/out")
    real = store.fs.call_s3

    def no_conditional_deletes(method, *args, **kw):
        if method == "delete_object" and "IfMatch" in kw:
            raise OSError("NotImplemented: conditional delete")
        return real(method, *args, **kw)

    store.fs.call_s3 = no_conditional_deletes
    try:
        Ledger(store, "dead", lease_ttl_s=1).claim("x")
        assert Ledger(store, "b", lease_ttl_s=60).claim("x") is None
        assert json.loads(store.read_text("claims/x.json"))["run_id"] == "b"
        assert "deleting plainly" in caplog.text
        store.write_bytes_atomic("claims/y.json", b"new")  # changed since it was judged
        assert store.delete_if_unchanged("claims/y.json", b"old") is False
        assert store.read_bytes("claims/y.json") == b"new"
    finally:
        store.fs.call_s3 = real


def test_an_earlier_record_keeps_its_video_key_only_if_it_stored_there(store):
    """A key only reserved in the ledger (download failed) may hold the other inputs' video
    by now: the earlier record comes back without it. A stored one keeps it."""
    led = Ledger(store, "r1")
    for state, kept in ((LedgerState.SUCCEEDED, None), (LedgerState.STORED, "videos/x.mp4")):
        led.keep(rec(state, task_id="t1", video_key="videos/x.mp4"))
        led.put(rec(LedgerState.STORED, input_hash="b" * 64, task_id="t2"))
        current, mine = led.records_for("x", H)
        assert current.input_hash == "b" * 64 and mine.task_id == "t1"
        assert mine.video_key == kept and led.record_for("x", H) == mine
    assert led.records_for("x", "b" * 64) == (current, current)


def test_a_bucket_that_disappears_is_a_store_failure_not_an_answer(s3_env, moto_server, tmp_path):
    """Writes into a bucket deleted mid-run: each ledger write and the lease's renewal fail as
    `LedgerUnavailable` (retried, then the item or the run goes on), never a FileNotFoundError
    that escapes; reads still take a missing record as "none"; and the results fall back to
    this machine."""
    import boto3

    from hailuo_batch.results import ItemResult, write_results

    store = OutputStore(f"s3://{s3_env}/out")
    led = Ledger(store, "r1", lease_ttl_s=60, retry_delays_s=(0.0,))
    led.heartbeat()
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=s3_env).get("Contents", []):
        s3.delete_object(Bucket=s3_env, Key=obj["Key"])
    s3.delete_bucket(Bucket=s3_env)
    store.fs.invalidate_cache()
    with pytest.raises(LedgerUnavailable):
        led.heartbeat()
    with pytest.raises(LedgerUnavailable):
        led.put(LedgerRecord(id="a", input_hash="h", state=LedgerState.SUBMITTING, attempts=1))
    with pytest.raises(LedgerUnavailable):
        led.claim("a")
    summary: dict = {}
    url, error = write_results(
        store, "r1", [ItemResult(id="a", row=1, status="succeeded")], summary,
        fallback_dir=str(tmp_path / "fallback"), retry_delays=(0.0,),
    )  # fmt: skip
    assert error is not None and url.startswith(str(tmp_path / "fallback"))
    assert (tmp_path / "fallback" / "r1" / "results.jsonl").exists()


def test_the_lease_keeper_survives_any_store_error() -> None:
    class Store:
        def write_text_atomic(self, key: str, text: str) -> None:
            raise FileNotFoundError("The specified bucket does not exist")

    led = Ledger(Store(), "r1", lease_ttl_s=8, retry_delays_s=())  # type: ignore[arg-type]
    warned: list[str] = []

    async def go() -> None:
        async def blocking(fn, *a):  # type: ignore[no-untyped-def]
            return fn(*a)

        job = asyncio.create_task(
            keep_lease(led, blocking=blocking, warn=warned.append, lapsed=warned.append)
        )
        await asyncio.sleep(1.2)
        job.cancel()

    asyncio.run(go())
    assert warned and "lease renewal failed" in warned[0]


def test_a_task_the_ledger_missed_comes_back_from_its_runs_results() -> None:
    from hailuo_batch.ledger import task_from_results
    from hailuo_batch.results import ItemResult

    behind = LedgerRecord(
        id="a", input_hash="h", state=LedgerState.SUBMITTING, attempts=1, run_id="r0"
    )
    key_of = {"s3://b/out/videos/a.mp4": "videos/a.mp4"}.get
    failed = ItemResult(id="a", row=1, status="failed", task_id="t1", input_hash="h")
    got = task_from_results(behind, [failed], key_of)
    assert got is not None and (got.state, got.task_id, got.task_ids) == ("submitted", "t1", ["t1"])
    stored = failed.model_copy(
        update={"status": "succeeded", "video": "s3://b/out/videos/a.mp4", "sha256": "ab",
                "bytes": 3}
    )  # fmt: skip
    got = task_from_results(behind, [stored], key_of)
    assert got is not None and (got.state, got.video_key, got.sha256) == (
        "succeeded", "videos/a.mp4", "ab",
    )  # fmt: skip
    # nothing to take: another item, other inputs, no task, a record that knows its task,
    # a video that is not this store's
    assert task_from_results(behind, [failed.model_copy(update={"id": "b"})], key_of) is None
    assert (
        task_from_results(behind, [failed.model_copy(update={"input_hash": "x"})], key_of) is None
    )
    assert task_from_results(behind, [failed.model_copy(update={"task_id": None})], key_of) is None
    known = behind.model_copy(update={"state": LedgerState.SUBMITTED, "task_id": "t0"})
    assert task_from_results(known, [failed], key_of) is None
    elsewhere = stored.model_copy(update={"video": "s3://other/videos/a.mp4"})
    assert task_from_results(behind, [elsewhere], key_of).state == "submitted"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("state", "code", "forced"),
    [
        (LedgerState.SKIPPED, "CONTENT_VIOLATION", False),
        (LedgerState.SKIPPED, "NSFW", False),
        (LedgerState.FAILED, "PROMPT_TOO_LONG", False),
        (LedgerState.FAILED, "INVALID_IMAGE_URL", False),
        (LedgerState.FAILED, "GENERATION_FAILED", True),
        (LedgerState.FAILED, "SOMETHING_NEW", True),
        (LedgerState.FAILED, None, True),
    ],
)
def test_force_leaves_content_violations_and_unchanged_bad_input(state, code, forced):
    from hailuo_batch.policy import not_forced_again

    rec = LedgerRecord(id="a", input_hash="h", state=state, fail_code=code, run_id="r1")
    plan = plan_item(rec, "h", force=True, not_forced=not_forced_again)
    assert (plan.action == "submit") is forced
    if not forced:
        assert plan.action == "cached" and code in (plan.note or "")
    # a rerun that chose its items (no `not_forced`) resubmits what it was given
    assert plan_item(rec, "h", force=True).action == "submit"
    # a failCode moved to another class by the user's policy follows its new class
    moved = partial(not_forced_again, overrides={code: "transient"}) if code else None
    if moved is not None:
        assert plan_item(rec, "h", force=True, not_forced=moved).action == "submit"


def test_a_missing_video_is_fetched_again_into_its_own_key_only_if_no_one_else_has_it():
    own = rec(LedgerState.STORED, task_id="t", video_key="videos/x.mp4")
    other_at_same_key = rec(LedgerState.STORED, input_hash="b" * 64, video_key="videos/x.mp4")
    other_elsewhere = rec(LedgerState.STORED, input_hash="b" * 64, video_key="videos/x-b.mp4")
    assert refetch_key(own, own, taken=True) == "videos/x.mp4"  # its own damaged copy
    assert refetch_key(own, None, taken=False) == "videos/x.mp4"
    assert refetch_key(own, other_at_same_key, taken=False) is None  # reserved by the other
    assert refetch_key(own, other_elsewhere, taken=True) is None  # a third record's bytes
    assert refetch_key(own, other_elsewhere, taken=False) == "videos/x.mp4"
    legacy = rec(LedgerState.STORED, task_id="t")  # no video_key: the plain key
    legacy_other = rec(LedgerState.STORED, input_hash="b" * 64, video_key="videos/x.mp4")
    assert refetch_key(legacy, legacy_other, taken=False) is None
