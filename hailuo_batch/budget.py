"""The run's money guard and stop flags. No Prefect, no I/O.

A `Budget` is shared by every item of one run. Each POST first reserves its estimated price;
a refusal that proves nothing was created gives the reservation back; an ambiguous outcome
keeps it (the provider may have charged). `reserve` and `refund` have no await inside, so items
on one event loop can never overshoot the cap between a check and its update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

_EPS = 1e-9


class Stop(StrEnum):
    """Why a run stopped submitting; the run's final state is named after the first one."""

    AUTH = "AuthenticationFailed"  # HTTP 401 anywhere: nothing can work
    BALANCE = "InsufficientBalance"  # HTTP 402 / INSUFFICIENT_CREDITS
    LEASE = "LeaseLost"  # this run could not renew its lease: another run may take its items
    UNREACHABLE = "ApiUnreachable"  # the API did not answer the run's first call
    ENDPOINT = "ApiEndpointNotFound"  # the submit endpoint answered 404: a wrong base URL
    RATE_LIMITED = "RateLimited"  # every POST refused with 429 for the whole patience


@dataclass
class Budget:
    """This run's estimated spend against its cap, and the reasons it stopped submitting."""

    cap_usd: float | None = None
    spent_usd: float = 0.0  # reserved by this run's POSTs and not refunded
    capped: int = 0  # items left unsubmitted because of the cap
    cap_is_balance: bool = False  # the cap is the balance (--fit-to-balance), not a max cost
    cap_is_share: bool = False  # a part's run on a worker: the cap is its share of the run's
    stops: dict[Stop, str] = field(default_factory=dict)

    def stop(self, why: Stop, message: str) -> None:
        """Stop submitting (first message per reason wins)."""
        self.stops.setdefault(why, message)

    @property
    def stopped(self) -> tuple[Stop, str] | None:
        """The reason that names the run's end, most severe first."""
        for why in Stop:
            if why in self.stops:
                return why, self.stops[why]
        return None

    def reserve(self, unit_usd: float) -> str | None:
        """Reserve the spend of one POST, or say why not to submit."""
        if (s := self.stopped) is not None:
            return s[1]
        cap = self.cap_usd
        # a cap of 0 pays for nothing, even an item priced at 0 (HAILUO_PRICE_*=0)
        if cap is not None and (cap <= 0 or self.spent_usd + unit_usd > cap + _EPS):
            self.capped += 1
            if self.cap_is_share and cap <= 0:
                return (
                    "nothing of the run's spending cap was left for this part when it started "
                    "(the parts before it hold it all)"
                )
            if self.cap_is_share:
                return (
                    f"this part's share of the run's spending cap is reserved: "
                    f"${self.spent_usd:.2f} of ${self.cap_usd:.2f}, this item would add "
                    f"${unit_usd:.2f}"
                )
            if self.cap_is_balance:
                return (
                    f"the balance of ${self.cap_usd:.2f} would not pay for it (--fit-to-balance): "
                    f"${self.spent_usd:.2f} reserved, this item would add ${unit_usd:.2f}"
                )
            return (
                f"max cost reached: ${self.spent_usd:.2f} of ${self.cap_usd:.2f} reserved, "
                f"this item would add ${unit_usd:.2f}"
            )
        self.spent_usd += unit_usd
        return None

    def refund(self, unit_usd: float) -> None:
        """Give back a reservation whose POST provably created nothing."""
        self.spent_usd = max(0.0, self.spent_usd - unit_usd)


class InsufficientBalance(RuntimeError):
    """The batch would cost more than the account holds; nothing was submitted."""


def cap_for_balance(
    estimate_usd: float,
    balance_usd: float | None,
    *,
    fit_to_balance: bool,
    max_cost_usd: float | None,
) -> float | None:
    """The balance policy, before the first payment: the run's spending cap.

    An unknown balance changes nothing (`max_cost_usd`), nor does one that pays for what the
    run may spend: the estimate, or `max_cost_usd` if lower (the cap already keeps the run
    within the balance). Otherwise `InsufficientBalance` (with what to do next), unless
    `fit_to_balance` asks to submit what fits: then the cap is the balance.
    """
    may_spend = estimate_usd if max_cost_usd is None else min(estimate_usd, max_cost_usd)
    # nothing left to pay (videos to fetch, tasks to read) needs no balance, even a negative one
    if balance_usd is None or may_spend <= max(balance_usd, 0.0) + _EPS:
        return max_cost_usd
    if not fit_to_balance:
        if max_cost_usd is not None:
            raise InsufficientBalance(
                f"the max cost of ${max_cost_usd:.2f} is more than the balance of "
                f"${balance_usd:.2f} (the batch needs about ${estimate_usd:.2f}): top up, lower "
                "max_cost_usd (--max-cost), or run with fit_to_balance (--fit-to-balance) to "
                "submit what the balance pays for"
            )
        raise InsufficientBalance(
            f"the batch needs about ${estimate_usd:.2f} but the balance is ${balance_usd:.2f}: "
            "top up, or run with fit_to_balance (--fit-to-balance) or max_cost_usd (--max-cost) "
            "to submit what fits"
        )
    return balance_usd


def dry_run_money(
    would_cost_usd: float,
    estimate_usd: float,
    balance_usd: float | None,
    error: Exception | None = None,
    *,
    fit_to_balance: bool,
    max_cost_usd: float | None,
    api_url: str = "",
) -> str:
    """What a dry run says of the money guards a real run would apply now, as a clause to
    append to its verdict ("" when they change nothing). The real run's own policy decides,
    `apply_balance` on the budget it would start with, on the same `estimate_usd` (every row
    not yet paid for, counted before the images are checked) and balance read (`error`: what
    reading it raised); `would_cost_usd` is what the items that passed the checks would cost,
    which a cap below it holds back."""
    trial = Budget(cap_usd=max_cost_usd)
    try:
        apply_balance(
            trial, estimate_usd, balance_usd, error, fit_to_balance=fit_to_balance, api_url=api_url
        )
    except InsufficientBalance as exc:
        counted = ""
        if estimate_usd > would_cost_usd + _EPS:
            counted = (
                f" (the check counts every row before its image is checked: ${estimate_usd:.2f};"
                " fix or remove the invalid rows to bring it down)"
            )
        return f"; a real run would not start now: {exc}{counted}"
    if (stopped := trial.stopped) is not None:  # a key refused, an API that did not answer
        return f"; a real run would not start now: {stopped[1]}"
    cap = trial.cap_usd
    if cap is not None and cap <= 0 < would_cost_usd:
        return f"; a real run would submit nothing: its cap is ${cap:.2f}"
    if cap is not None and would_cost_usd > cap + _EPS:
        what = "balance" if trial.cap_is_balance else "max cost"
        return (
            f"; a real run would stop at the {what} of ${cap:.2f}, holding back the items past it"
        )
    return ""


def apply_balance(
    budget: Budget,
    estimate_usd: float,
    balance_usd: float | None,
    error: Exception | None = None,
    *,
    fit_to_balance: bool,
    api_url: str,
) -> str | None:
    """The balance policy applied to the run's budget, before the first payment.

    `error` is what reading the balance raised: a 401 stops the run (`Stop.AUTH`), an API that
    did not answer stops it (`Stop.UNREACHABLE`); other errors are left out by the caller (the
    balance is then unknown). Then `cap_for_balance` sets the cap, and raises
    `InsufficientBalance` for a batch the balance cannot pay. Returns a warning to log when the
    cap came down to what the balance holds.
    """
    from hailuo_batch.apixo import AuthenticationError
    from hailuo_batch.steps import AUTH_FAILED

    if isinstance(error, AuthenticationError):
        budget.stop(Stop.AUTH, f"{AUTH_FAILED}: {error}")
        return None
    if error is not None:
        budget.stop(
            Stop.UNREACHABLE,
            f"the apixo API at {api_url} did not answer ({error}); nothing was submitted: "
            "check APIXO_BASE_URL and the network, then run again",
        )
        return None
    cap = cap_for_balance(
        estimate_usd, balance_usd, fit_to_balance=fit_to_balance, max_cost_usd=budget.cap_usd
    )
    if cap == budget.cap_usd:
        return None
    budget.cap_usd, budget.cap_is_balance = cap, True
    return f"balance ${balance_usd:.2f} < estimate ${estimate_usd:.2f}: submitting what fits"


def overspend_warning(
    balance_spent_usd: float | None, estimated_usd: float, cap_usd: float | None
) -> str | None:
    """What to say when the account's balance fell by more than this run's estimated spend:
    the prices the estimate and the cap use (`HAILUO_PRICE_*`) may be below what the provider
    charges, and the cap then held nothing back. None when the balance is unknown or agrees
    (within a cent). Other use of the same account during the run counts in the fall too."""
    if balance_spent_usd is None or balance_spent_usd <= estimated_usd + 0.01:
        return None
    past_cap = ""
    if cap_usd is not None and balance_spent_usd > cap_usd + 0.01:
        past_cap = f", past the max cost of ${cap_usd:.2f}"
    return (
        f"the balance fell by ${balance_spent_usd:.2f} during this run{past_cap}, but the run "
        f"estimated ${estimated_usd:.2f} for its submissions: check the HAILUO_PRICE_* "
        "settings against the provider's prices (other use of the same account during the "
        "run counts too)"
    )
