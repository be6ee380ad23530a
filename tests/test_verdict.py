"""A run's final state says at a glance whether every item made it."""

from __future__ import annotations

import pytest

from hailuo_batch.budget import Stop
from hailuo_batch.verdict import run_verdict


def counts(**kw: int) -> dict[str, int]:
    base = dict.fromkeys(
        ("succeeded", "skipped", "failed", "invalid", "not_submitted", "uncertain"), 0
    )
    return {**base, **kw}


def test_all_succeeded_is_a_plain_completed():
    v = run_verdict(counts(succeeded=3), run_id="r")
    assert (v.kind, v.name) == ("completed", "Completed")


def test_some_problems_are_named_in_a_completed_state():
    v = run_verdict(counts(succeeded=3, failed=1, invalid=2), run_id="r")
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert "1 failed" in v.message and "2 invalid" in v.message and "3 of 6" in v.message


def test_every_item_invalid_is_a_failed_run_not_a_green_one():
    v = run_verdict(counts(invalid=5), run_id="r")
    assert (v.kind, v.name) == ("failed", "NothingSucceeded")
    assert "5 invalid" in v.message


def test_all_skipped_for_content_is_failed_too():
    assert run_verdict(counts(skipped=2), run_id="r").kind == "failed"


def test_failure_share_above_the_limit_fails_the_run():
    c = counts(succeeded=6, failed=4)
    assert run_verdict(c, run_id="r", max_failure_share=0.5).name == "CompletedWithFailures"
    v = run_verdict(c, run_id="r", max_failure_share=0.3)
    assert (v.kind, v.name) == ("failed", "TooManyFailures") and "40%" in v.message


def test_a_stopped_run_is_failed_and_named_after_why():
    for why in Stop:
        v = run_verdict(counts(succeeded=1, not_submitted=4), run_id="r", stopped=(why, "msg"))
        assert (v.kind, v.name) == ("failed", why.value)
        assert "msg" in v.message and "4 items not submitted" in v.message


def test_the_cost_cap_is_named():
    v = run_verdict(counts(succeeded=2, not_submitted=3), run_id="r", capped=3, cap_usd=0.5)
    assert (v.kind, v.name) == ("completed", "CostCapReached") and "$0.50" in v.message


@pytest.mark.parametrize("other", ["failed", "uncertain", "skipped", "invalid"])
def test_the_cost_cap_never_hides_other_problems(other: str) -> None:
    """A cap that left items out says so, but a failure, a possible duplicate charge, a
    content violation or a bad row beside it makes the run CompletedWithFailures, counted."""
    v = run_verdict(
        counts(succeeded=5, not_submitted=1, **{other: 2}), run_id="r", capped=1, cap_usd=1.5
    )
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert f"2 {other}" in v.message and "5 of 8 items succeeded" in v.message
    assert "max cost $1.50 reached: 1 item not submitted" in v.message


def test_a_dry_run_completes():
    v = run_verdict(counts(not_submitted=4), run_id="r", dry_run=True, would_cost_usd=0.76)
    assert (v.kind, v.name) == ("completed", "DryRun")
    assert "would cost about $0.76" in v.message and "4 of the 4 valid items" in v.message
    # over an output where everything is stored already: nothing left, and it says so
    v = run_verdict(counts(not_submitted=7), run_id="r", dry_run=True, would_submit=0)
    assert "0 of the 7 valid items still need paying for" in v.message
    assert "the other 7 are stored, final or in flight" in v.message


@pytest.mark.parametrize("cap", [0.0, -0.0, 0.1])
def test_a_cap_too_small_for_one_item_is_cost_cap_reached_not_a_failure(cap: float) -> None:
    """`--max-cost 0`: every valid item held back by the cap, nothing paid. The run did what
    it was told: CostCapReached (Completed), as for any cap, not NothingSucceeded."""
    v = run_verdict(counts(not_submitted=3), run_id="r", capped=3, cap_usd=cap)
    assert (v.kind, v.name) == ("completed", "CostCapReached")
    assert "$0.00" in v.message or "$0.10" in v.message
    # a bad row beside it is still to be fixed: said, not hidden behind a green cap
    v = run_verdict(counts(not_submitted=3, invalid=1), run_id="r", capped=3, cap_usd=cap)
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert "1 invalid" in v.message and "reached: 3 items not submitted" in v.message
    # an item that failed for another reason is still a run where nothing succeeded
    v = run_verdict(counts(not_submitted=2, failed=1), run_id="r", capped=2, cap_usd=cap)
    assert (v.kind, v.name) == ("failed", "NothingSucceeded")


def test_a_cap_fitted_to_a_balance_below_one_item_is_no_success() -> None:
    """--fit-to-balance with less money than one item costs: nothing could be paid, and that
    is a failed run (nightly batches then keep the manifest for another night), not a
    cap the user chose."""
    v = run_verdict(counts(not_submitted=3), run_id="r", capped=3, cap_usd=0.05, users_cap=False)
    assert (v.kind, v.name) == ("failed", "NothingSucceeded")


def test_items_the_users_cap_held_back_are_not_counted_as_failures() -> None:
    """Half the items held back by the cap, the rest succeeded: the cap did its job, and the
    failure share (of items that failed) is 0, not 50%."""
    v = run_verdict(
        counts(succeeded=5, not_submitted=5), run_id="r", capped=5, cap_usd=1.0,
        max_failure_share=0.2,
    )  # fmt: skip
    assert (v.kind, v.name) == ("completed", "CostCapReached")
    v = run_verdict(
        counts(succeeded=5, not_submitted=3, failed=2), run_id="r", capped=3, cap_usd=1.0,
        max_failure_share=0.1,
    )  # fmt: skip
    assert v.name == "TooManyFailures" and "20% of items" in v.message
    assert "beyond the 3 the cap held back" in v.message
    # bad rows beside a cap that held back every valid item still count against the share
    v = run_verdict(
        counts(invalid=6, not_submitted=4), run_id="r", capped=4, cap_usd=0.0,
        max_failure_share=0.5,
    )  # fmt: skip
    assert v.name == "TooManyFailures"


def test_the_users_cap_holding_back_everything_is_not_too_many_failures() -> None:
    v = run_verdict(
        counts(not_submitted=3), run_id="r", capped=3, cap_usd=0.0, max_failure_share=0.1
    )
    assert (v.kind, v.name) == ("completed", "CostCapReached")


def test_a_skipped_content_violation_is_no_plain_completed() -> None:
    """A content violation was paid for and has no video: `Completed` would say every item
    succeeded. It is counted with the others, and in the failure share."""
    v = run_verdict(counts(succeeded=1, skipped=1), run_id="r")
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert "1 of 2 items succeeded; 1 skipped" in v.message
    v = run_verdict(counts(succeeded=1, skipped=1), run_id="r", max_failure_share=0.0)
    assert (v.kind, v.name) == ("failed", "TooManyFailures")


def test_videos_that_are_not_the_clip_paid_for_are_no_plain_completed() -> None:
    """Every item stored, but some clips are shorter, longer or smaller than what was billed:
    the run says so in its name and message, also beside a cost cap."""
    v = run_verdict(counts(succeeded=3), run_id="r", not_as_ordered=1)
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert "3 of 3 items succeeded" in v.message and "1 videos not the clip paid for" in v.message
    v = run_verdict(
        counts(succeeded=3, not_submitted=1), run_id="r", capped=1, cap_usd=0.6, not_as_ordered=2
    )
    assert v.name == "CompletedWithFailures" and "max cost $0.60 reached" in v.message
    assert run_verdict(counts(succeeded=3), run_id="r").name == "Completed"


def test_items_the_ledger_could_not_record_are_no_plain_completed() -> None:
    """Every video stored, but the store refused the ledger's writes: the next run would not
    know the tasks and may pay again. Green would hide it."""
    v = run_verdict(counts(succeeded=2), run_id="r", ledger_behind=2)
    assert (v.kind, v.name) == ("completed", "CompletedWithFailures")
    assert "2 items the ledger could not record" in v.message
