import json
import time

import pytest

from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState, plan_item
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


def test_claim_without_any_lease_is_stale(store):
    Ledger(store, "ghost").claim("y")  # a run that never wrote a lease (killed at start)
    assert Ledger(store, "run-b").claim("y") is None


def test_create_exclusive_is_exclusive(store):
    assert store.create_exclusive("claims/z.json", b"1") is True
    assert store.create_exclusive("claims/z.json", b"2") is False
    assert store.read_text("claims/z.json") == "1"
