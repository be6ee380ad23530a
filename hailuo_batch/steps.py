"""What each event in an item's life leads to, as plain functions over typed values. No I/O.

An item moves submit -> poll -> store. After every event (a POST refused, a task ended, a
status read that cannot be trusted, a download that is not a video) one of these functions
returns a `Step`: the ledger state to write, whether the item's run is over and with which
status and reason, whether the POST's reservation is given back, and any signal for the whole
run (stop everything on 401, stop submitting on 402). `hailuo_batch.lifecycle` applies steps;
the tests drive these functions directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    AuthenticationError,
    ForbiddenError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import ClientClosedError, RateLimitedError
from hailuo_batch.budget import Stop
from hailuo_batch.ledger import LedgerState
from hailuo_batch.policy import after_failure, classify_fail_code
from hailuo_batch.results import ItemStatus
from hailuo_batch.settings import FailClass
from hailuo_batch.storage import video_key
from hailuo_batch.video import NotAVideoError

# fail codes the pipeline itself gives (the provider's own failCodes pass through unchanged)
AUTH_FAILED = "AUTH_FAILED"
INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
AMBIGUOUS_SUBMIT = "AMBIGUOUS_SUBMIT"
RATE_LIMITED = "RATE_LIMITED"
SUBMIT_ERROR = "SUBMIT_ERROR"
TASK_NOT_FOUND = "TASK_NOT_FOUND"
POLL_TIMEOUT = "POLL_TIMEOUT"
BAD_ANSWER = "BAD_ANSWER"
NO_RESULT_URL = "NO_RESULT_URL"
FAILED_AFTER_SUCCESS = "FAILED_AFTER_SUCCESS"
TASK_ID_REUSED = "TASK_ID_REUSED"
RESULT_OF_ANOTHER_ITEM = "RESULT_OF_ANOTHER_ITEM"
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
NOT_A_VIDEO = "NOT_A_VIDEO"
LEDGER_UNAVAILABLE = "LEDGER_UNAVAILABLE"
CLAIM_LOST = "CLAIM_LOST"
NOT_SUBMITTED_STOP = "RUN_STOPPED"
COST_CAP = "COST_CAP"


class TaskLost(Exception):
    """The provider no longer knows a task we created (404 past the grace) or never ended it
    within the poll timeout. `code` is TASK_NOT_FOUND or POLL_TIMEOUT."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LeaseLapsed(Exception):
    """The run's lease went stale after its last ownership check (a slow ledger write, a store
    outage): the POST was not sent, and another run may own the item now."""


class TaskIdReused(Exception):
    """The provider answered a POST with a taskId another item already holds: this item's own
    task (it may have been charged) is unknown."""


class ResultOfAnotherItem(Exception):
    """A finished task's result URL is the one another item's task gave: storing it would
    file another item's video under this one."""


class TaskOwners:
    """Which item each provider task and each result belongs to, in one run (and the ledger
    records it read). A provider that answers two POSTs with one taskId, or two tasks with one
    result, is caught here instead of two items showing one video while a paid one is lost."""

    def __init__(self) -> None:
        self._tasks: dict[str, str] = {}
        self._results: dict[str, str] = {}

    def know(
        self, item_id: str, task_ids: Iterable[str | None], results: Iterable[str | None] = ()
    ) -> None:
        """Tasks and stored results (`result_identity`) a ledger record says are `item_id`'s
        (the first owner named stays)."""
        for task_id in task_ids:
            if task_id:
                self._tasks.setdefault(task_id, item_id)
        for result in results:
            if result:
                self._results.setdefault(result, item_id)

    def claim_task(self, task_id: str, item_id: str) -> str | None:
        """Take `task_id` for `item_id`; the other item that holds it, else None."""
        owner = self._tasks.setdefault(task_id, item_id)
        return None if owner == item_id else owner

    def claim_result(self, url: str, item_id: str) -> str | None:
        """Take the result at `url` for `item_id`; the other item whose task gave it, else
        None. A URL signed again (another signature or expiry) is the same result."""
        owner = self._results.setdefault(result_identity(url), item_id)
        return None if owner == item_id else owner


#: the query parameters of the signing schemes a result URL may carry (S3 and GCS ones start
#: with x-amz- / x-goog-; CloudFront's; an Azure SAS's; the emulator's `exp` / `sig`): they say
#: who may read an object and until when, never which object it is. Generic names (`key`,
#: `token`, `file`) are kept: a download endpoint may name its object with them.
_SIGNING_PARAMS = frozenset(
    {"expires", "signature", "key-pair-id", "policy", "sig", "se", "st", "sv", "sp", "sr",
     "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "exp"}
)  # fmt: skip


def result_identity(url: str) -> str:
    """`url` without its fragment and its signing parameters: what names the object itself."""
    parts = urlsplit(url)
    kept = sorted(
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in _SIGNING_PARAMS and not k.lower().startswith(("x-amz-", "x-goog-"))
    )
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, urlencode(kept), ""))


@dataclass(frozen=True)
class Step:
    """What an event leads to.

    next: "submit" (POST again: a transient failure), "poll", "store", "wait" (rate limited:
    wait `wait_s` for a slot, then POST again) or "end" (the item's fate in this run is `status`).
    ledger: the state to write to the item's ledger record, or None to leave it as it is.
    refund: the reservation of the POST just made is given back (the POST created nothing),
    and the ledger's attempt count goes back down.
    """

    next: Literal["submit", "poll", "store", "wait", "end"]
    ledger: LedgerState | None = None
    status: ItemStatus | None = None
    fail_code: str | None = None
    fail_msg: str | None = None
    refund: bool = False
    uncertain: bool = False
    signal: Stop | None = None
    wait_s: float | None = None


def _not_submitted_or_failed(attempts: int) -> ItemStatus:
    """An item that ends without a task: `not_submitted` if it never had one, else `failed`."""
    return ItemStatus.NOT_SUBMITTED if attempts <= 1 else ItemStatus.FAILED


def on_submit_error(
    err: Exception, attempts: int, *, backoff_s: float = 5.0, uncertain_before: bool = False
) -> Step:
    """A POST that did not return a taskId. `attempts` counts this POST.

    Only an ambiguous outcome keeps the reservation (the task may exist and be charged); every
    other refusal proves nothing was created, and the record goes back to what it was:
    `uncertain` when an earlier POST's outcome is unknown (`uncertain_before`), so a refusal
    never hides a possible charge from the next run, else `not_submitted`.
    """
    # the task may exist and be charged: an answer lost, or the taskId of another item's task
    unknown = {AmbiguousSubmitError: AMBIGUOUS_SUBMIT, TaskIdReused: TASK_ID_REUSED}
    for kind, code in unknown.items():
        if isinstance(err, kind):
            return Step(
                "end",
                ledger=LedgerState.UNCERTAIN,
                status=ItemStatus.UNCERTAIN,
                fail_code=code,
                fail_msg=str(err),
                uncertain=True,
            )
    if isinstance(err, LeaseLapsed):  # nothing sent; the record may be another run's by now
        return Step(
            "end", refund=True, status=ItemStatus.NOT_SUBMITTED, fail_code=CLAIM_LOST,
            fail_msg=str(err), signal=Stop.LEASE,
        )  # fmt: skip
    # every other refusal: nothing was created, the reservation goes back
    back = Step(
        "end",
        ledger=LedgerState.UNCERTAIN if uncertain_before else LedgerState.NOT_SUBMITTED,
        refund=True,
        fail_msg=str(err),
    )
    if isinstance(err, AuthenticationError):
        return replace(
            back, status=ItemStatus.NOT_SUBMITTED, fail_code=AUTH_FAILED, signal=Stop.AUTH
        )
    if isinstance(err, InsufficientCreditsError):
        return replace(
            back,
            status=ItemStatus.NOT_SUBMITTED,
            fail_code=INSUFFICIENT_BALANCE,
            signal=Stop.BALANCE,
        )
    if isinstance(err, RateLimitedError):
        wait = err.retry_after if err.retry_after is not None else backoff_s
        return replace(back, next="wait", fail_code=RATE_LIMITED, wait_s=max(0.0, wait))
    if isinstance(err, InvalidRequestError):
        return replace(back, status=ItemStatus.INVALID, fail_code=_http_code(err))
    if isinstance(err, NotFoundError):  # no such endpoint: every other POST would say the same
        return replace(
            back,
            status=ItemStatus.NOT_SUBMITTED,
            fail_code=_http_code(err),
            fail_msg=f"{err}: the API has no such endpoint; check APIXO_BASE_URL (the API's "
            "root, such as https://api.apixo.ai, with no path)",
            signal=Stop.ENDPOINT,
        )
    if isinstance(err, ForbiddenError):
        return replace(back, status=ItemStatus.FAILED, fail_code=_http_code(err))
    return replace(back, status=_not_submitted_or_failed(attempts), fail_code=_http_code(err))


def _auth_failed(message: str) -> Step:
    """A 401 after the task exists: the item fails (its task stays in the ledger for a rerun
    with a valid key) and the whole run stops."""
    return Step(
        "end", status=ItemStatus.FAILED, fail_code=AUTH_FAILED, fail_msg=message, signal=Stop.AUTH
    )


def _http_code(err: Exception) -> str:
    code = getattr(err, "status_code", None)
    return f"HTTP_{code}" if code else SUBMIT_ERROR


def on_poll_error(err: Exception) -> Step:
    """A task whose status could not be read to the end.

    The ledger keeps the taskId in every case but a lost task, so a resumed run reads the same
    task again and never pays twice; a lost task is marked so that `--resubmit-lost` can pay for
    a new one, knowingly.
    """
    if isinstance(err, AuthenticationError):
        return _auth_failed(f"status read refused: {err}")
    if isinstance(err, TaskLost):
        return Step(
            "end",
            ledger=LedgerState.LOST,
            status=ItemStatus.FAILED,
            fail_code=err.code,
            fail_msg=f"{err.message}; a rerun polls it again, `--resubmit-lost` pays for a new "
            "task (possible duplicate charge)",
        )
    if isinstance(err, ClientClosedError):  # the run is stopping: the ledger keeps the task
        return Step(
            "end", status=ItemStatus.FAILED, fail_code=NOT_SUBMITTED_STOP,
            fail_msg=f"{err}; the next run reads the task again (it is not paid for again)",
        )  # fmt: skip
    code = getattr(err, "fail_code", None) or BAD_ANSWER
    return Step(
        "end",
        status=ItemStatus.FAILED,
        fail_code=str(code),
        fail_msg=f"status answer cannot be trusted: {err}; a rerun reads the task again",
    )


def on_task_final(
    st: TaskStatus,
    resubmits: int,
    *,
    overrides: Mapping[str, FailClass] | None = None,
    max_resubmits: int = 2,
    succeeded_before: bool = False,
) -> Step:
    """A task that ended: store its video, resubmit it, or record its failure. `resubmits`: the
    transient resubmissions the item has used (`LedgerRecord.resubmits`, not its POSTs).

    `succeeded_before`: the ledger saw this task succeed (its video was not stored). A task
    that was paid for and succeeded is never paid for again because a later read says
    otherwise: it is kept as lost, read again by the next run, and only `--resubmit-lost` pays
    for a new one."""
    if st.state != TaskState.SUCCESS and succeeded_before:
        said = " ".join(str(x) for x in (st.state, st.fail_code, st.fail_msg) if x)
        return Step(
            "end",
            ledger=LedgerState.LOST,
            status=ItemStatus.FAILED,
            fail_code=FAILED_AFTER_SUCCESS,
            fail_msg=f"the provider reported this task succeeded, and now says: {said}; not "
            "resubmitted (it was paid for): a rerun reads it again, `--resubmit-lost` pays for "
            "a new task",
        )
    if st.state == TaskState.SUCCESS:
        if not st.result_urls:
            return Step(
                "end",
                ledger=LedgerState.FAILED,
                status=ItemStatus.FAILED,
                fail_code=NO_RESULT_URL,
                fail_msg="success without resultUrls",
            )
        return Step("store", ledger=LedgerState.SUCCEEDED)
    fail_class = classify_fail_code(st.fail_code, overrides)
    action = after_failure(fail_class, resubmits, max_resubmits)
    failed = Step(
        "end",
        ledger=LedgerState.FAILED,
        status=ItemStatus.FAILED,
        fail_code=st.fail_code,
        fail_msg=st.fail_msg,
    )
    if action == "resubmit":
        return replace(failed, next="submit", ledger=LedgerState.NOT_SUBMITTED, status=None)
    if action == "skip":
        return replace(failed, ledger=LedgerState.SKIPPED, status=ItemStatus.SKIPPED)
    if action == "stop_submitting":
        return replace(failed, signal=Stop.BALANCE)
    return failed


def on_store_error(err: Exception) -> Step:
    """A finished video that could not be stored. The ledger stays `succeeded`: a rerun reads
    the task again (a fresh result URL) and fetches it, without paying. A 401 on a download
    from the API's own origin stops the run like any other 401."""
    if isinstance(err, AuthenticationError):
        return _auth_failed(f"video download refused: {err}; a rerun with a valid key fetches it")
    if isinstance(err, ResultOfAnotherItem):
        return Step(
            "end",
            status=ItemStatus.FAILED,
            fail_code=RESULT_OF_ANOTHER_ITEM,
            fail_msg=f"video NOT stored: {err}; a rerun reads the task again without paying",
        )
    code = NOT_A_VIDEO if isinstance(err, NotAVideoError) else DOWNLOAD_FAILED
    return Step(
        "end",
        status=ItemStatus.FAILED,
        fail_code=code,
        fail_msg=f"video NOT stored: {err}; a rerun fetches it again without paying",
    )


def choose_video_key(item_id: str, input_hash: str, taken: Callable[[str], bool]) -> str:
    """Where a newly paid video goes: the item's plain key, unless a video is already stored
    there (a paid video of other inputs under the same id), then a variant named after the
    inputs. A stored video is never overwritten by another one."""
    key = video_key(item_id)
    n = 1
    while taken(key):
        variant = input_hash[:12] if n == 1 else f"{input_hash[:12]}-{n}"
        key = video_key(item_id, variant)
        n += 1
    return key
