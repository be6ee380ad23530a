"""The balance policy before the first payment, as a plain function on the run's budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hailuo_batch.apixo import ApixoError, AuthenticationError
from hailuo_batch.budget import Budget, InsufficientBalance, Stop, apply_balance


def test_an_affordable_batch_keeps_the_cap():
    b = Budget(cap_usd=3.0)
    assert apply_balance(b, 2.0, 10.0, fit_to_balance=False, api_url="u") is None
    assert b.cap_usd == 3.0 and b.stopped is None


def test_unknown_balance_changes_nothing():
    b = Budget()
    assert apply_balance(b, 50.0, None, fit_to_balance=False, api_url="u") is None
    assert b.cap_usd is None


def test_too_expensive_fails_before_spending_unless_fit_to_balance():
    with pytest.raises(InsufficientBalance, match="fit_to_balance"):
        apply_balance(Budget(), 20.0, 5.0, fit_to_balance=False, api_url="u")
    b = Budget()
    warning = apply_balance(b, 20.0, 5.0, fit_to_balance=True, api_url="u")
    assert b.cap_usd == 5.0 and warning and "submitting what fits" in warning
    capped = Budget(cap_usd=2.0)  # a lower max_cost_usd stays the cap
    assert apply_balance(capped, 20.0, 5.0, fit_to_balance=True, api_url="u") is None
    assert capped.cap_usd == 2.0


def test_a_run_with_nothing_left_to_pay_starts_on_a_negative_balance():
    """Its items were paid for by an earlier run: the videos are fetched, nothing is spent."""
    b = Budget()
    assert apply_balance(b, 0.0, -3.5, fit_to_balance=False, api_url="u") is None
    assert b.stopped is None


def test_a_max_cost_the_balance_pays_for_lets_a_larger_batch_start():
    """The cap keeps the run within the balance: the batch's whole estimate does not matter."""
    b = Budget(cap_usd=3.0)
    assert apply_balance(b, 9.5, 5.0, fit_to_balance=False, api_url="u") is None
    assert b.cap_usd == 3.0
    with pytest.raises(InsufficientBalance, match=r"max cost of \$6.00 is more than the bal"):
        apply_balance(Budget(cap_usd=6.0), 9.5, 5.0, fit_to_balance=False, api_url="u")


_USD = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(
    estimate=_USD, balance=st.none() | _USD | st.floats(-100, 0), max_cost=st.none() | _USD,
    fit=st.booleans(),
)  # fmt: skip
def test_a_run_allowed_to_start_can_never_spend_past_the_balance_or_its_max_cost(
    estimate, balance, max_cost, fit
):
    """Whatever the numbers: a run either does not start (nothing paid), or what it may spend
    (its estimate, bounded by the cap it is given) fits the balance and the user's max cost; a
    run whose max cost the balance pays for always starts."""
    from hailuo_batch.budget import cap_for_balance

    eps = 1e-6
    try:
        cap = cap_for_balance(estimate, balance, fit_to_balance=fit, max_cost_usd=max_cost)
    except InsufficientBalance:
        assert balance is not None and not fit
        assert min(estimate, max_cost if max_cost is not None else estimate) > balance
        return
    may_spend = estimate if cap is None else min(estimate, cap)
    assert balance is None or may_spend <= max(balance, 0) + eps
    assert max_cost is None or may_spend <= max_cost + eps


def test_401_and_no_answer_stop_the_run():
    b = Budget()
    apply_balance(b, 1.0, None, AuthenticationError("bad key"), fit_to_balance=False, api_url="u")
    assert b.stopped is not None and b.stopped[0] == Stop.AUTH
    assert b.stopped[1].startswith("AUTH_FAILED")
    b = Budget()
    apply_balance(b, 1.0, None, ApixoError("down"), fit_to_balance=False, api_url="http://x")
    assert b.stopped is not None and b.stopped[0] == Stop.UNREACHABLE
    assert "http://x" in b.stopped[1] and "nothing was submitted" in b.stopped[1]


def test_a_balance_falling_past_the_estimate_is_said_and_past_the_cap_too():
    from hailuo_batch.budget import overspend_warning

    assert overspend_warning(None, 1.0, 0.5) is None  # balance unknown
    assert overspend_warning(0.57, 0.57, 0.6) is None  # it agrees
    assert overspend_warning(0.575, 0.57, None) is None  # within a cent
    assert overspend_warning(0.0, 0.57, 0.6) is None  # the provider charged less
    w = overspend_warning(0.57, 0.15, 0.15)
    assert w is not None and "fell by $0.57" in w and "past the max cost of $0.15" in w
    assert "estimated $0.15" in w and "HAILUO_PRICE_" in w
    w = overspend_warning(0.57, 0.15, None)
    assert w is not None and "max cost" not in w
    w = overspend_warning(0.57, 0.15, 1.0)  # past the estimate, within the cap
    assert w is not None and "max cost" not in w


def test_a_cap_of_zero_pays_for_nothing_even_at_a_price_of_zero():
    from hailuo_batch.budget import Budget

    b = Budget(cap_usd=0.0)
    assert b.reserve(0.0) is not None and b.capped == 1 and b.spent_usd == 0
    free = Budget(cap_usd=None)
    assert free.reserve(0.0) is None  # no cap: a free item goes


def test_each_kind_of_cap_names_itself_when_it_holds_an_item_back():
    said = {}
    for kind, budget in {
        "max cost": Budget(cap_usd=0.25),
        "balance": Budget(cap_usd=0.25, cap_is_balance=True),
        "share": Budget(cap_usd=0.25, cap_is_share=True),
    }.items():
        assert budget.reserve(0.19) is None
        said[kind] = budget.reserve(0.19)
    assert said["max cost"].startswith("max cost reached: $0.19 of $0.25")
    assert "balance of $0.25" in said["balance"] and "--fit-to-balance" in said["balance"]
    assert "part's share of the run's spending cap" in said["share"]
    assert "$0.19 of $0.25" in said["share"] and "max cost" not in said["share"]
    nothing_left = Budget(cap_usd=0.0, cap_is_share=True).reserve(0.19)
    assert nothing_left is not None and "$0.00 of $0.00" not in nothing_left
    assert "nothing of the run's spending cap was left for this part" in nothing_left


def test_a_dry_run_says_what_the_money_guards_would_do_to_the_real_run():
    from hailuo_batch.budget import dry_run_money

    ok = dry_run_money(0.57, 0.57, 10.0, fit_to_balance=False, max_cost_usd=None)
    assert ok == ""  # nothing to say: the balance pays, no cap
    refused = dry_run_money(0.57, 1.14, 0.60, fit_to_balance=False, max_cost_usd=None)
    assert "a real run would not start now" in refused and "balance is $0.60" in refused
    assert "every row before its image is checked: $1.14" in refused
    capped = dry_run_money(1.14, 1.14, None, fit_to_balance=False, max_cost_usd=0.40)
    assert "would stop at the max cost of $0.40" in capped
    fitted = dry_run_money(1.14, 1.14, 0.60, fit_to_balance=True, max_cost_usd=None)
    assert "would stop at the balance of $0.60" in fitted
    assert dry_run_money(0.3, 1.0, None, fit_to_balance=False, max_cost_usd=None) == ""
    broke = dry_run_money(0.57, 0.57, -3.0, fit_to_balance=True, max_cost_usd=None)
    assert broke == "; a real run would submit nothing: its cap is $-3.00"
    # the real run's own policy: a refused key, an API that does not answer
    refused = dry_run_money(
        0.57, 0.57, None, AuthenticationError("bad key"), fit_to_balance=False,
        max_cost_usd=None, api_url="u",
    )  # fmt: skip
    assert refused.startswith("; a real run would not start now: AUTH_FAILED")
    silent = dry_run_money(
        0.57, 0.57, None, ApixoError("down"), fit_to_balance=False, max_cost_usd=1.0,
        api_url="http://x",
    )  # fmt: skip
    assert "would not start now: the apixo API at http://x did not answer" in silent
