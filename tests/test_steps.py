"""The steps of an item's life: every class of event leads to the right next step."""

from __future__ import annotations

import pytest

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    AuthenticationError,
    ForbiddenError,
    InsufficientCreditsError,
    InvalidRequestError,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ApixoTransportError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
)
from hailuo_batch.budget import Budget, Stop
from hailuo_batch.ledger import LedgerState
from hailuo_batch.netguard import BlockedAddressError
from hailuo_batch.results import ItemStatus
from hailuo_batch.steps import (
    TaskLost,
    choose_video_key,
    on_poll_error,
    on_store_error,
    on_submit_error,
    on_task_final,
)
from hailuo_batch.video import NotAVideoError


def test_ambiguous_submit_keeps_the_reservation_and_reports_uncertain() -> None:
    step = on_submit_error(AmbiguousSubmitError("read timeout after sending"), 1)
    assert (step.next, step.status, step.ledger) == (
        "end",
        ItemStatus.UNCERTAIN,
        LedgerState.UNCERTAIN,
    )
    assert step.uncertain and not step.refund


@pytest.mark.parametrize(
    ("err", "status", "signal"),
    [
        (AuthenticationError("bad key"), ItemStatus.NOT_SUBMITTED, Stop.AUTH),
        (InsufficientCreditsError("top up"), ItemStatus.NOT_SUBMITTED, Stop.BALANCE),
        (InvalidRequestError("Invalid mode type"), ItemStatus.INVALID, None),
        (ForbiddenError("content refused"), ItemStatus.FAILED, None),
        (ServerError("model unavailable", 503), ItemStatus.NOT_SUBMITTED, None),
        (ApixoTransportError("refused", request_sent=False), ItemStatus.NOT_SUBMITTED, None),
    ],
)
def test_refusals_that_prove_nothing_was_created_give_the_money_back(
    err: Exception, status: ItemStatus, signal: Stop | None
) -> None:
    step = on_submit_error(err, 1)
    assert step.refund and step.ledger == LedgerState.NOT_SUBMITTED
    assert (step.next, step.status, step.signal) == ("end", status, signal)
    assert step.fail_code and step.fail_msg


def test_a_refusal_keeps_an_earlier_possible_charge_on_record() -> None:
    step = on_submit_error(ServerError("busy", 503), 1, uncertain_before=True)
    assert step.refund and step.ledger == LedgerState.UNCERTAIN


def test_a_resubmission_refused_ends_failed_not_unsubmitted() -> None:
    assert on_submit_error(ServerError("down", 503), 2).status == ItemStatus.FAILED


def test_rate_limiting_never_drops_an_item_it_waits_as_told() -> None:
    step = on_submit_error(RateLimitedError("slow down", retry_after=7.5), 1)
    assert (step.next, step.wait_s, step.refund, step.status) == ("wait", 7.5, True, None)
    assert on_submit_error(RateLimitedError("slow down"), 1, backoff_s=3).wait_s == 3


def _final(state: TaskState, **kw: object) -> TaskStatus:
    return TaskStatus(task_id="t1", state=state, **kw)  # type: ignore[arg-type]


def test_success_goes_to_store_and_success_without_url_fails() -> None:
    ok = on_task_final(_final(TaskState.SUCCESS, result_urls=["https://cdn/x.mp4"]), 0)
    assert (ok.next, ok.ledger) == ("store", LedgerState.SUCCEEDED)
    bad = on_task_final(_final(TaskState.SUCCESS), 0)
    assert (bad.status, bad.fail_code) == (ItemStatus.FAILED, "NO_RESULT_URL")


@pytest.mark.parametrize("code", ["GENERATION_FAILED", "NSFW", "INSUFFICIENT_CREDITS", None])
def test_a_task_that_succeeded_before_is_never_resubmitted(code: str | None) -> None:
    st = _final(TaskState.FAILED, fail_code=code, fail_msg="gone")
    step = on_task_final(st, 0, succeeded_before=True)
    assert (step.next, step.ledger, step.status) == ("end", LedgerState.LOST, ItemStatus.FAILED)
    assert step.fail_code == "FAILED_AFTER_SUCCESS" and step.signal is None
    assert "--resubmit-lost" in (step.fail_msg or "")
    ok = on_task_final(_final(TaskState.SUCCESS, result_urls=["u"]), 0, succeeded_before=True)
    assert ok.next == "store"


@pytest.mark.parametrize(
    ("code", "resubmits", "next_", "status", "signal"),
    [
        ("NSFW", 0, "end", ItemStatus.SKIPPED, None),
        ("GENERATION_FAILED", 0, "submit", None, None),
        ("GENERATION_FAILED", 1, "submit", None, None),
        ("GENERATION_FAILED", 2, "end", ItemStatus.FAILED, None),  # resubmits used up
        ("INVALID_PROMPT", 0, "end", ItemStatus.FAILED, None),
        ("INSUFFICIENT_CREDITS", 0, "end", ItemStatus.FAILED, Stop.BALANCE),
        ("SOMETHING_NEW", 0, "end", ItemStatus.FAILED, None),
    ],
)
def test_failed_tasks_follow_the_failcode_policy(
    code: str, resubmits: int, next_: str, status: ItemStatus | None, signal: Stop | None
) -> None:
    step = on_task_final(_final(TaskState.FAILED, fail_code=code, fail_msg="m"), resubmits)
    assert (step.next, step.status, step.signal) == (next_, status, signal)
    assert step.fail_code == code and step.fail_msg == "m"


def test_a_failcode_moved_by_the_user_is_honoured() -> None:
    st = _final(TaskState.FAILED, fail_code="GENERATION_FAILED")
    assert (
        on_task_final(st, 0, overrides={"GENERATION_FAILED": "content"}).status
        == ItemStatus.SKIPPED
    )


def test_401_while_polling_stops_the_run_with_one_clean_code() -> None:
    step = on_poll_error(AuthenticationError("invalid key", 401))
    assert (step.status, step.fail_code, step.signal) == (
        ItemStatus.FAILED,
        "AUTH_FAILED",
        Stop.AUTH,
    )
    assert step.ledger is None  # the task id stays: a rerun with a good key reads it
    assert "invalid key" in (step.fail_msg or "")


def test_lost_tasks_are_marked_lost_so_they_can_be_resubmitted_knowingly() -> None:
    step = on_poll_error(TaskLost("TASK_NOT_FOUND", "404 for 5 minutes"))
    assert (step.ledger, step.fail_code) == (LedgerState.LOST, "TASK_NOT_FOUND")
    assert "--resubmit-lost" in (step.fail_msg or "")


def test_an_untrustworthy_answer_fails_the_item_at_once_and_keeps_the_task() -> None:
    err = UnexpectedResponseError("taskId t2 is not t1", 200)
    err.fail_code = "FOREIGN_TASK"  # type: ignore[attr-defined]
    step = on_poll_error(err)
    assert (step.next, step.status, step.fail_code, step.ledger) == (
        "end",
        ItemStatus.FAILED,
        "FOREIGN_TASK",
        None,
    )
    assert on_poll_error(UnexpectedResponseError("garbage")).fail_code == "BAD_ANSWER"


def test_store_errors_name_what_went_wrong() -> None:
    assert on_store_error(NotAVideoError("not an MP4 container")).fail_code == "NOT_A_VIDEO"
    # a result URL on a private address is refused by the guard: a download failure
    blocked = BlockedAddressError("127.0.0.1 is a loopback address")
    assert on_store_error(blocked).fail_code == "DOWNLOAD_FAILED"
    assert on_store_error(OSError("disk full")).fail_code == "DOWNLOAD_FAILED"
    assert on_store_error(ApixoTransportError("cut")).fail_code == "DOWNLOAD_FAILED"


def test_budget_never_reserves_past_the_cap_and_refunds() -> None:
    b = Budget(cap_usd=0.5)
    assert b.reserve(0.19) is None and b.reserve(0.19) is None
    assert b.reserve(0.19) is not None and b.capped == 1
    b.refund(0.19)
    assert b.reserve(0.19) is None
    assert b.spent_usd == pytest.approx(0.38)


def test_budget_stops_name_the_most_severe_reason() -> None:
    b = Budget()
    b.stop(Stop.BALANCE, "402")
    b.stop(Stop.AUTH, "401")
    b.stop(Stop.AUTH, "401 again")
    assert b.stopped == (Stop.AUTH, "401")
    assert b.reserve(0.1) == "401"


def test_a_stored_video_is_never_the_key_of_a_new_one() -> None:
    taken = {"videos/a.mp4"}
    first = choose_video_key("b", "f" * 64, taken.__contains__)
    assert first == "videos/b.mp4"
    second = choose_video_key("a", "e" * 64, taken.__contains__)
    assert second not in taken
    taken.add(second)
    third = choose_video_key("a", "e" * 64, taken.__contains__)
    assert third not in taken


def test_the_balance_policy_before_the_first_payment():
    from hailuo_batch.budget import InsufficientBalance, cap_for_balance

    assert cap_for_balance(5.0, None, fit_to_balance=False, max_cost_usd=3.0) == 3.0  # unknown
    assert cap_for_balance(5.0, 10.0, fit_to_balance=False, max_cost_usd=None) is None
    with pytest.raises(InsufficientBalance, match=r"needs about \$5.00 but the balance is \$2.00"):
        cap_for_balance(5.0, 2.0, fit_to_balance=False, max_cost_usd=None)
    assert cap_for_balance(5.0, 2.0, fit_to_balance=True, max_cost_usd=None) == 2.0
    assert cap_for_balance(5.0, 2.0, fit_to_balance=True, max_cost_usd=1.5) == 1.5
    assert cap_for_balance(5.0, 2.0, fit_to_balance=True, max_cost_usd=4.0) == 2.0


def test_a_401_on_a_result_download_stops_the_run():
    step = on_store_error(AuthenticationError("bad key", 401))
    assert (step.status, step.fail_code, step.signal) == (
        ItemStatus.FAILED,
        "AUTH_FAILED",
        Stop.AUTH,
    )


def test_a_lease_that_lapsed_before_the_post_sends_nothing_and_leaves_the_record_alone() -> None:
    """The `submitting` write can be slow (a store outage): if the lease went stale meanwhile,
    another run may own the item and have written its record; this run must neither POST nor
    write that record back, and it stops submitting."""
    from hailuo_batch.budget import Stop
    from hailuo_batch.steps import CLAIM_LOST, LeaseLapsed, on_submit_error

    step = on_submit_error(LeaseLapsed("lapsed"), 1)
    assert step.refund and step.ledger is None and step.signal == Stop.LEASE
    assert step.status == "not_submitted" and step.fail_code == CLAIM_LOST


def test_task_owners_catch_one_task_or_one_result_for_two_items() -> None:
    from hailuo_batch.steps import TaskOwners

    owners = TaskOwners()
    owners.know("old", ["t0", None])  # a ledger record read at planning
    assert owners.claim_task("t1", "a") is None and owners.claim_task("t1", "a") is None
    assert owners.claim_task("t1", "b") == "a" and owners.claim_task("t0", "b") == "old"
    url = "https://cdn.example/v/t1.mp4?exp=1&sig=abc&variant=hd"
    assert owners.claim_result(url, "a") is None
    resigned = "https://CDN.example/v/t1.mp4?variant=hd&sig=zzz&exp=2#x"
    assert owners.claim_result(resigned, "a") is None and owners.claim_result(resigned, "b") == "a"
    # another object (path or a naming parameter) is another result
    assert owners.claim_result("https://cdn.example/v/t2.mp4?exp=1&sig=abc", "b") is None
    assert owners.claim_result("https://cdn.example/dl?file=t3&X-Amz-Date=1", "c") is None
    assert owners.claim_result("https://cdn.example/dl?file=t4&X-Amz-Date=2", "d") is None
    assert owners.claim_result("https://cdn.example/dl?X-Amz-Date=9&file=t3", "d") == "c"
    # generic names may be what names the object: kept, so two objects stay two
    for name in ("token", "key", "file_token", "id"):
        assert owners.claim_result(f"https://api.example/download?{name}=A", f"{name}-a") is None
        assert owners.claim_result(f"https://api.example/download?{name}=B", f"{name}-b") is None
    # a stored result an earlier run recorded is its item's
    owners.know("stored", [], ["https://cdn.example/v/t9.mp4", None])
    assert owners.claim_result("https://cdn.example/v/t9.mp4?exp=5&sig=x", "e") == "stored"


def test_a_reused_task_id_is_uncertain_and_another_items_result_is_not_stored() -> None:
    from hailuo_batch.steps import ResultOfAnotherItem, TaskIdReused, on_store_error

    step = on_submit_error(TaskIdReused("task t1 is item a's"), 1)
    assert (step.next, step.ledger, step.status) == ("end", LedgerState.UNCERTAIN, "uncertain")
    assert step.fail_code == "TASK_ID_REUSED" and step.uncertain and not step.refund
    step = on_store_error(ResultOfAnotherItem("the one item a's task gave"))
    assert (step.status, step.fail_code, step.ledger) == ("failed", "RESULT_OF_ANOTHER_ITEM", None)
    assert "without paying" in (step.fail_msg or "")


def test_a_submit_answered_404_stops_the_run_with_a_hint_at_the_base_url() -> None:
    from hailuo_batch.apixo import NotFoundError
    from hailuo_batch.budget import Stop

    step = on_submit_error(NotFoundError("[404] not found", 404), 1)
    assert (step.next, step.status, step.signal) == ("end", "not_submitted", Stop.ENDPOINT)
    assert (
        step.refund and step.fail_code == "HTTP_404" and "APIXO_BASE_URL" in (step.fail_msg or "")
    )


def test_a_poll_ended_by_a_stopping_run_keeps_the_task_for_the_next_run():
    from hailuo_batch.apixo.errors import ClientClosedError
    from hailuo_batch.steps import on_poll_error

    step = on_poll_error(ClientClosedError("GET /status: not sent: the client is closed"))
    assert step.ledger is None  # the record keeps its taskId: read again, never paid again
    assert step.fail_code == "RUN_STOPPED" and "reads the task again" in (step.fail_msg or "")
