"""deployments/automations.yaml for real: created with the documented CLI command against a
started `prefect server`, read back through `/automations/filter`, and fired by flow-run state
changes the way hailuo-batch runs end (Failed/Crashed, InsufficientBalance, CostCapReached)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from deploy_helpers import REPO, PrefectServer

pytestmark = pytest.mark.slow  # a real server: `make test-fast` skips it

AUTOMATIONS = "deployments/automations.yaml"
CREATE = f"prefect automation create --from-file {AUTOMATIONS}"  # as documented
FLOWS = ["generate-videos", "nightly-batch", "rerun-failed"]
RUN_FAILED = "hailuo-run-failed"
BALANCE = "hailuo-insufficient-balance"
COST_CAP = "hailuo-cost-cap-reached"


def post(server: PrefectServer, path: str, body: dict[str, Any]) -> Any:
    for _ in range(20):  # SQLite: a busy server answers 503 for a moment
        r = httpx.post(f"{server.api}{path}", json=body, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    assert r.status_code < 300, f"POST {path}: {r.status_code} {r.text}"
    return r.json()


@pytest.fixture(scope="module")
def automations(prefect_server: PrefectServer) -> dict[str, dict[str, Any]]:
    out = prefect_server.cli(*CREATE.split()[1:])
    assert "Created 3 automation(s)" in out, out
    found = post(prefect_server, "/automations/filter", {})
    return {a["name"]: a for a in found if a["name"].startswith("hailuo-")}


def test_the_guide_documents_the_command_that_creates_them() -> None:
    assert CREATE in (REPO / "deployments" / "README.md").read_text()


def test_created_automations_read_back_with_their_triggers(
    automations: dict[str, dict[str, Any]],
) -> None:
    assert sorted(automations) == sorted([RUN_FAILED, BALANCE, COST_CAP])
    expect = {
        RUN_FAILED: ["prefect.flow-run.*"],
        BALANCE: ["prefect.flow-run.InsufficientBalance"],
        COST_CAP: ["prefect.flow-run.CostCapReached"],
    }
    for name, auto in automations.items():
        trigger = auto["trigger"]
        assert auto["enabled"] is True
        assert trigger["type"] == "event"
        assert trigger["posture"] == "Reactive"
        assert trigger["threshold"] == 1
        assert sorted(trigger["expect"]) == expect[name]
        assert trigger["for_each"] == ["prefect.resource.id"]
        assert trigger["match"]["prefect.resource.id"] == "prefect.flow-run.*"
        assert trigger["match_related"] == {
            "prefect.resource.role": "flow",
            "prefect.resource.name": FLOWS,
        }
        assert [a["type"] for a in auto["actions"]] == ["do-nothing"]
    assert automations[RUN_FAILED]["trigger"]["match"]["prefect.state-type"] == [
        "FAILED",
        "CRASHED",
    ]


def _run_ending(server: PrefectServer, flow: str, state_type: str, state_name: str) -> str:
    """A flow run of `flow` forced into a final state, as the flow's end would set it."""
    flow_id = post(server, "/flows/", {"name": flow})["id"]
    run = post(server, "/flow_runs/", {"flow_id": flow_id, "name": f"t-{uuid.uuid4().hex[:8]}"})
    state = {"type": state_type, "name": state_name, "message": "test"}
    result = post(server, f"/flow_runs/{run['id']}/set_state", {"state": state, "force": True})
    assert result["status"] == "ACCEPT", result
    return str(run["id"])


def _fired(server: PrefectServer, run_ids: set[str]) -> set[tuple[str, str]]:
    """(automation name, flow run id) of every `prefect.automation.triggered` event."""
    body = {
        "filter": {"event": {"name": ["prefect.automation.triggered"]}},
        "limit": 50,  # the newest first; the most the API gives at once
    }
    events = post(server, "/events/filter", body)["events"]
    pairs = set()
    for e in events:
        resource = e["payload"]["triggering_labels"].get("prefect.resource.id", "")
        run_id = resource.removeprefix("prefect.flow-run.")
        if run_id in run_ids:
            pairs.add((e["resource"]["prefect.resource.name"], run_id))
    return pairs


def test_run_endings_fire_the_right_automations(
    prefect_server: PrefectServer, automations: dict[str, dict[str, Any]]
) -> None:
    s = prefect_server
    time.sleep(2)  # the server's trigger service loads the new automations
    balance = _run_ending(s, "generate-videos", "FAILED", "InsufficientBalance")
    failed = _run_ending(s, "nightly-batch", "FAILED", "Failed")
    crashed = _run_ending(s, "rerun-failed", "CRASHED", "Crashed")
    capped = _run_ending(s, "generate-videos", "COMPLETED", "CostCapReached")
    completed = _run_ending(s, "generate-videos", "COMPLETED", "Completed")
    other = _run_ending(s, "some-other-flow", "FAILED", "Failed")
    other_capped = _run_ending(s, "some-other-flow", "COMPLETED", "CostCapReached")
    runs = {balance, failed, crashed, capped, completed, other, other_capped}
    want = {
        (RUN_FAILED, balance),
        (BALANCE, balance),
        (RUN_FAILED, failed),
        (RUN_FAILED, crashed),
        (COST_CAP, capped),
    }
    deadline = time.monotonic() + 60
    while (fired := _fired(s, runs)) != want and time.monotonic() < deadline:
        if fired - want:
            break
        time.sleep(1)
    time.sleep(2)  # nothing more arrives late for the runs that must not fire
    assert _fired(s, runs) == want
