"""A run's final state, from its counts: a plain function, so the UI tells the truth at a glance.

Prefect shows a state's *type* as its colour and its *name* as its label. A run that stopped
(401, 402, a lost lease, an unreachable API) is `Failed` named after the reason; a run where no
valid item succeeded is `Failed`; a run with some failed, skipped, invalid, uncertain or
unsubmitted items is `Completed` named `CompletedWithFailures` (`CostCapReached` when the cap
leaving items out is all that went wrong), unless their share passes `max_failure_share`,
which makes it `Failed` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hailuo_batch.budget import Stop


@dataclass(frozen=True)
class Verdict:
    kind: Literal["completed", "failed"]
    name: str  # the state's name in the UI
    message: str


#: every status but `succeeded`: a skipped content violation was paid for and has no video
PROBLEM_STATUSES = ("failed", "skipped", "invalid", "uncertain", "not_submitted")


def run_verdict(
    by_status: Mapping[str, int],
    *,
    run_id: str,
    stopped: tuple[Stop, str] | None = None,
    capped: int = 0,
    cap_usd: float | None = None,
    users_cap: bool = True,
    max_failure_share: float | None = None,
    dry_run: bool = False,
    would_cost_usd: float = 0.0,
    would_submit: int | None = None,
    money_note: str = "",
    not_as_ordered: int = 0,
    ledger_behind: int = 0,
) -> Verdict:
    """The final state of a run with these counts by item status. `users_cap`: the cap that
    held items back is the user's `max_cost_usd`, not the balance `fit_to_balance` fitted to.
    `money_note`: a dry run's word on the money guards (`budget.dry_run_money`)."""
    total = sum(by_status.values())
    problems = {s: by_status.get(s, 0) for s in PROBLEM_STATUSES if by_status.get(s, 0)}
    said = [f"{n} {s}" for s, n in problems.items()]
    if not_as_ordered:
        said.append(f"{not_as_ordered} videos not the clip paid for")
    if ledger_behind:
        said.append(
            f"{ledger_behind} items the ledger could not record (the next run takes their "
            "tasks from this run's results file; without it, it would pay again)"
        )
    listed = ", ".join(said)
    extra = not_as_ordered + ledger_behind  # succeeded, but something to look at
    if stopped is not None:
        why, message = stopped
        return Verdict(
            "failed",
            why.value,
            f"run {run_id} stopped submitting: {message}; "
            f"{by_status.get('not_submitted', 0)} items not submitted",
        )
    if dry_run:
        valid = by_status.get("not_submitted", 0)
        left = valid if would_submit is None else would_submit
        done = f" (the other {valid - left} are stored, final or in flight)" if left < valid else ""
        return Verdict(
            "completed",
            "DryRun",
            f"dry run {run_id}: nothing submitted; {left} of the {valid} valid items still need "
            f"paying for{done}: submitting them would cost about ${would_cost_usd:,.2f}"
            f"{money_note}",
        )
    succeeded = by_status.get("succeeded", 0)
    invalid = by_status.get("invalid", 0)
    # items the user's cap held back did not fail: they are not counted against the share
    held = capped if users_cap else 0
    share = (sum(problems.values()) - held) / total if total else 0.0
    if max_failure_share is not None and share > max_failure_share:
        beyond = f" beyond the {held} the cap held back" if held else ""
        return Verdict(
            "failed",
            "TooManyFailures",
            f"run {run_id}: {share:.0%} of items did not succeed{beyond} ({listed}), more than "
            f"the {max_failure_share:.0%} allowed",
        )
    # nothing submitted only because the user's cap held every valid item back: it did its
    # job (invalid rows beside it are still to be fixed: CompletedWithFailures, below)
    all_held = bool(users_cap and capped and capped == total - invalid)
    if all_held and not invalid:
        return _cost_cap_reached(capped, cap_usd, users_cap)
    if total and not succeeded and not all_held:
        every = ", ".join(f"{n} {s}" for s, n in by_status.items() if n)
        return Verdict("failed", "NothingSucceeded", f"run {run_id}: no item succeeded ({every})")
    beyond_cap = sum(problems.values()) - capped + extra  # what the cap does not explain
    if capped and not beyond_cap:
        return _cost_cap_reached(capped, cap_usd, users_cap)
    if problems or extra:
        cap_note = f"; {_cost_cap_reached(capped, cap_usd, users_cap).message}" if capped else ""
        return Verdict(
            "completed",
            "CompletedWithFailures",
            f"run {run_id}: {succeeded} of {total} items succeeded; {listed}{cap_note}",
        )
    return Verdict("completed", "Completed", f"run {run_id}: all {total} items succeeded")


def _cost_cap_reached(capped: int, cap_usd: float | None, users_cap: bool = True) -> Verdict:
    cap = f"${abs(cap_usd or 0):.2f}"
    if users_cap:
        why = f"max cost {cap} reached"
    else:
        why = f"the balance of {cap} paid for what fit (--fit-to-balance)"
    items = f"{capped} item{'' if capped == 1 else 's'} not submitted"
    return Verdict("completed", "CostCapReached", f"{why}: {items}")
