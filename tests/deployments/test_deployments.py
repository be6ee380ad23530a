"""prefect.yaml for real: a Prefect server, the documented CLI commands, `prefect deploy`, a
process worker, and a generate-videos run triggered through the API as the UI's form does."""

from __future__ import annotations

import csv
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import s3fs
from deploy_helpers import (
    API_KEY,
    POOL,
    PREFECT,
    REPO,
    PrefectServer,
    stop_group,
    tail,
)

from hailuo_batch.emulator import EmulatorHandle
from hailuo_batch.results import from_jsonl
from tests.flows.flowkit import FAST_FLOW_ENV

pytestmark = pytest.mark.slow  # real processes and servers: `make test-fast` skips it

SAVE_CREDENTIALS = (  # the block-creation command of deployments/README.md
    "import os; from blocks import ApixoCredentials; "
    "ApixoCredentials(api_key=os.environ['APIXO_API_KEY'], "
    "base_url=os.environ['APIXO_BASE_URL']).save('apixo', overwrite=True)"
)


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ITEMS_PER_PART = 2
MODES = ["standard-image-to-video", "pro-image-to-video"]
PROVIDERS = ["auto", "value", "official"]


@dataclass
class Deployed:
    server: PrefectServer
    deployments: dict[str, dict[str, Any]]


def api_post(server: PrefectServer, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{server.api}{path}", json=body, timeout=30)
    assert r.status_code < 300, f"POST {path}: {r.status_code} {r.text}"
    return r.json()


def api_get(server: PrefectServer, path: str) -> Any:
    r = httpx.get(f"{server.api}{path}", timeout=30)
    assert r.status_code < 300, f"GET {path}: {r.status_code} {r.text}"
    return r.json()


@pytest.fixture(scope="module")
def work_pool(prefect_server: PrefectServer) -> PrefectServer:
    """Step 1 of the guide (deployments/README.md): pool, global limit, block types."""
    prefect_server.run(
        [PREFECT, "work-pool", "create", POOL, "--type", "process"],
        [PREFECT, "gcl", "create", "apixo", "--limit", "20"],
        [PREFECT, "block", "register", "-m", "blocks"],
    )
    return prefect_server


@pytest.fixture(scope="module")
def worker(work_pool: PrefectServer) -> Iterator[Path]:
    """`prefect worker start --pool hailuo-process` (started early: it takes seconds to boot).
    The API key reaches flow runs through the `apixo` block only, not this environment."""
    s = work_pool
    log = s.home.parent / "worker.log"
    env = {
        **s.env,
        **FAST_FLOW_ENV,
        "HAILUO_PROJECT_DIR": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        # a batch of more than 2 items is a large one here: its parts go to the workers
        "HAILUO_ITEMS_PER_FLOW_RUN": str(ITEMS_PER_PART),
    }
    proc = s.spawn([PREFECT, "worker", "start", "--pool", POOL, "--name", "test-worker"], log, env)
    try:
        yield log
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def deployed(work_pool: PrefectServer, worker: Path, emulator: EmulatorHandle) -> Deployed:
    """The rest of the guide: the `apixo` block, then `prefect deploy` from prefect.yaml."""
    s = work_pool
    names = ["--all"]
    s.run(
        [sys.executable, "-c", SAVE_CREDENTIALS],
        [PREFECT, "deploy", *names, "--no-prompt"],
        env={
            "APIXO_API_KEY": API_KEY,
            "APIXO_BASE_URL": emulator.base_url,
            "HAILUO_PROJECT_DIR": str(REPO),
        },
    )
    found = api_post(s, "/deployments/filter", {})
    return Deployed(s, {d["name"]: d for d in found})


def write_manifest(path: Path, base_url: str) -> list[str]:
    rows = [
        {"id": "dusk-pan", "image_url": f"{base_url}/files/dusk.jpg", "prompt": "slow pan"},
        {"id": "tower-tilt", "image_url": f"{base_url}/files/tower.png", "prompt": "tilt up"},
    ]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "image_url", "prompt"])
        w.writeheader()
        w.writerows(rows)
    return [r["id"] for r in rows]


def wait_final(server: PrefectServer, flow_run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = api_get(server, f"/flow_runs/{flow_run_id}")
        if run["state"] and run["state"]["type"] in FINAL:
            return dict(run)
        if time.monotonic() > deadline:
            return dict(run)
        time.sleep(0.5)


def task_runs_of(
    server: PrefectServer, flow_run_id: str, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The task runs the server holds for a flow run, once `done(them)` holds or after 60 s:
    they reach the server through its event pipeline, whose recorder writes in batches."""
    query = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    deadline = time.monotonic() + 60
    while True:
        runs: list[dict[str, Any]] = api_post(server, "/task_runs/filter", query)
        if done(runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_deploy_records_the_project_dir_from_the_environment(deployed: Deployed) -> None:
    for name in ("generate-videos", "nightly-batch"):
        dep = deployed.deployments[name]
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert dep["work_pool_name"] == POOL
        assert dep["enforce_parameter_schema"] is True
        assert "hailuo-batch" in dep["tags"]
    # no secret of any kind went into a deployment
    assert API_KEY not in json.dumps(deployed.deployments)


def options_form(schema: dict[str, Any], model: str = "BatchOptions") -> dict[str, Any]:
    """The batch options' fields as the UI's run form gets them: one object parameter
    `options` whose fields (types, choices, defaults, descriptions) sit in the definitions."""
    assert schema["properties"]["options"]["$ref"] == f"#/definitions/{model}"
    return dict(schema["definitions"][model]["properties"])


@pytest.mark.parametrize("name", ["generate-videos", "nightly-batch"])
def test_run_form_offers_choices_and_descriptions(deployed: Deployed, name: str) -> None:
    dep = deployed.deployments[name]
    schema = dep["parameter_openapi_schema"]
    defs = schema.get("definitions", {})
    props = options_form(schema)
    assert props["mode"]["$ref"] == "#/definitions/Mode" and defs["Mode"]["enum"] == MODES
    assert props["provider"]["$ref"] == "#/definitions/Provider"
    assert defs["Provider"]["enum"] == PROVIDERS
    assert props["duration"]["enum"] == [6, 10]
    assert props["concurrency"]["default"] == 10 and props["concurrency"]["maximum"] == 500
    for where, fields in (("parameters", schema["properties"]), ("options", props)):
        undescribed = sorted(p for p, spec in fields.items() if not spec.get("description"))
        assert not undescribed, (
            f"{name}: {where} without a description in the UI: {undescribed}. Prefect 3.8 "
            "drops Annotated[..., Field(description=...)] from the schema: describe every "
            "parameter in the flow's Google 'Args:' docstring, every option in its Field"
        )
    # the defaults prefect.yaml puts in the form are valid choices
    params = dep["parameters"]["options"]
    assert params["mode"] in MODES and params["provider"] in PROVIDERS
    assert params["duration"] in (6, 10) and params["credentials_block"] == "apixo"


@pytest.mark.parametrize("name", ["generate-videos", "nightly-batch"])
def test_run_form_offers_request_types(deployed: Deployed, name: str) -> None:
    schema = deployed.deployments[name]["parameter_openapi_schema"]
    spec = options_form(schema)["request_type"]
    assert spec["$ref"] == "#/definitions/RequestType"
    assert schema["definitions"]["RequestType"]["enum"] == ["async", "callback"]
    assert deployed.deployments[name]["parameters"]["options"]["request_type"] == "async"


def test_nightly_runs_on_a_cron_schedule_in_a_set_time_zone(deployed: Deployed) -> None:
    dep = deployed.deployments["nightly-batch"]
    [sched] = dep["schedules"]
    assert sched["active"] is True
    assert sched["schedule"]["cron"] == "0 2 * * *"
    assert sched["schedule"]["timezone"] == "Europe/Berlin"
    # overlapping nightly runs queue behind each other
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert "inbox" in dep["parameter_openapi_schema"]["properties"]


def test_the_server_schedules_the_nightly_runs(deployed: Deployed) -> None:
    """The server's scheduler turns the cron into upcoming runs at 02:00 Berlin time."""
    s = deployed.server
    dep = deployed.deployments["nightly-batch"]
    query = {
        "deployments": {"id": {"any_": [dep["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
    }
    deadline = time.monotonic() + 30
    while not (runs := api_post(s, "/flow_runs/filter", query)):
        log = s.log.read_text(errors="replace")
        if "Can't evaluate bulk DML statement" in log:
            pytest.fail(
                "the server's scheduler cannot insert scheduled runs: Prefect 3.8.8 with "
                "SQLAlchemy >= 2.1 (hybrid `FlowRun.state` in a bulk insert); pin sqlalchemy<2.1"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no scheduled nightly runs after 30 s; server log:\n{tail(s.log, 40)}")
        time.sleep(1)
    berlin = ZoneInfo("Europe/Berlin")
    for run in runs:
        start = datetime.fromisoformat(run["expected_start_time"]).astimezone(berlin)
        assert (start.hour, start.minute) == (2, 0)


def test_rerun_failed_is_deployed_with_a_described_form(deployed: Deployed) -> None:
    dep = deployed.deployments["rerun-failed"]
    schema = dep["parameter_openapi_schema"]
    props = schema["properties"]
    assert props, "rerun-failed has no parameters in the UI"
    for fields in (props, options_form(schema, "RunOptions")):
        undescribed = sorted(p for p, spec in fields.items() if not spec.get("description"))
        assert not undescribed, (
            f"rerun-failed: parameters without a description: {undescribed} "
            "(see test_run_form_offers_choices_and_descriptions)"
        )


def test_generate_videos_runs_on_a_worker_from_the_ui_form(
    deployed: Deployed, worker: Path, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    s = deployed.server
    manifest = tmp_path / "manifest.csv"
    ids = write_manifest(manifest, emulator.base_url)
    output = tmp_path / "store"
    dep = deployed.deployments["generate-videos"]
    # what the UI's run form posts: the deployment's defaults plus what the user typed/picked
    form = {
        **dep["parameters"],
        "manifest": str(manifest),
        "options": {
            **dep["parameters"]["options"],
            "output": str(output),
            "provider": "value",
            "concurrency": 4,
        },
    }
    created = api_post(s, f"/deployments/{dep['id']}/create_flow_run", {"parameters": form})
    run = wait_final(s, created["id"], timeout=150)
    state = run["state"]
    assert state["type"] == "COMPLETED", (
        f"flow run ended {state['type']}: {state.get('message')}\nworker log:\n{tail(worker)}"
    )

    # videos stored, one per item, and the results file says so
    videos = sorted(p.name for p in (output / "videos").glob("*.mp4"))
    assert videos == sorted(f"{i}.mp4" for i in ids)
    [results_file] = list((output / "runs").glob("*/results.jsonl"))
    results = {r.id: r for r in from_jsonl(results_file.read_text())}
    assert {r.status for r in results.values()} == {"succeeded"}
    assert all((output / "videos" / f"{i}.mp4").stat().st_size > 1000 for i in ids)

    # artifacts on the run: the item table, the summary, the progress bar
    arts = api_post(s, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    assert {"table", "markdown", "progress"} <= {a["type"] for a in arts}
    table = next(a for a in arts if a["type"] == "table")
    assert all(i in json.dumps(table["data"]) for i in ids)

    # task runs are named after the item and the provider's task id
    expected = {f"submit-{i}" for i in ids} | {f"poll-{i}-{results[i].task_id}" for i in ids}
    task_runs = task_runs_of(s, run["id"], lambda got: expected <= {t["name"] for t in got})
    names = {t["name"] for t in task_runs}
    for i in ids:
        assert f"submit-{i}" in names
        assert f"poll-{i}-{results[i].task_id}" in names

    # the key came from the block and stayed out of every log line
    assert API_KEY not in worker.read_text(errors="replace")

    # the provider-wide limit exists and every slot was given back
    gcl = api_get(s, "/v2/concurrency_limits/apixo")
    assert gcl["limit"] == 20 and gcl["active_slots"] == 0


def test_deployment_run_takes_the_options_as_one_json_param(
    deployed: Deployed, worker: Path, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """`prefect deployment run ... --param options='{...}'` (the README's command line)."""
    s = deployed.server
    manifest = tmp_path / "manifest.csv"
    ids = write_manifest(manifest, emulator.base_url)
    output = tmp_path / "store"
    # the server checks the object against the schema: enum values as they are listed there
    options = {"credentials_block": "apixo", "output": str(output), "mode": "pro-image-to-video"}
    out = s.cli(
        "deployment", "run", "generate-videos/generate-videos",
        "--param", f"manifest={manifest}", "--param", f"options={json.dumps(options)}",
    )  # fmt: skip
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert run_id, out
    run = wait_final(s, run_id.group(1), timeout=150)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{tail(worker)}"
    assert run["parameters"]["options"] == options  # replaces the deployment's whole object
    [results_file] = list((output / "runs").glob("*/results.jsonl"))
    results = {r.id: r for r in from_jsonl(results_file.read_text())}
    assert set(results) == set(ids)
    assert {r.mode for r in results.values()} == {"pro-image-to-video"}


SAVE_STORAGE = (  # an OutputStorage block for the moto server, as deployments/README.md shows
    "import os, sys; from blocks import OutputStorage; "
    "OutputStorage(url=sys.argv[1], endpoint_url=sys.argv[2], access_key_id='testing', "
    "secret_access_key='testing', region='us-east-1').save('moto-store', overwrite=True)"
)


def test_a_large_batch_runs_its_parts_on_the_workers_into_one_results_file(
    deployed: Deployed, worker: Path, emulator: EmulatorHandle, moto_server: str
) -> None:
    """A batch of more than HAILUO_ITEMS_PER_FLOW_RUN items, manifest and output in S3, started
    from the deployment: each part is a flow run of `generate-videos-part` that the worker
    starts in a process of its own; the parent writes one results file, one POST per item."""
    s = deployed.server
    bucket = f"parts-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": moto_server},
        skip_instance_cache=True,
    )  # fmt: skip
    fs.mkdir(bucket)
    ids = [f"clip-{k}" for k in range(4)]
    pictures = ["dusk.jpg", "tower.png", "garden.jpg"]
    lines = ["id,image_url,prompt"] + [
        f"{i},{emulator.base_url}/files/{pictures[k % 3]},slow pan {k}" for k, i in enumerate(ids)
    ]
    fs.pipe(f"{bucket}/in/manifest.csv", ("\n".join(lines) + "\n").encode())
    s.run([sys.executable, "-c", SAVE_STORAGE, f"s3://{bucket}/out", moto_server])
    before = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"]

    dep = deployed.deployments["generate-videos"]
    options = {"credentials_block": "apixo", "storage_block": "moto-store", "concurrency": 4}
    params = {"manifest": f"s3://{bucket}/in/manifest.csv", "options": options}
    created = api_post(s, f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    run = wait_final(s, created["id"], timeout=240)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{tail(worker, 120)}"

    # two child runs of the part deployment, each started by the worker in its own process
    part_dep = deployed.deployments["generate-videos-part"]
    children = api_post(
        s, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [part_dep["id"]]}}}
    )
    children = [c for c in children if c["name"].startswith(run["name"])]
    assert sorted(c["name"].rsplit("-part-", 1)[1] for c in children) == ["1-of-2", "2-of-2"]
    assert {c["state"]["type"] for c in children} == {"COMPLETED"}, (
        f"{[(c['name'], c['state']) for c in children]}\n{tail(worker, 150)}"
    )
    assert {c["work_pool_name"] for c in children} == {POOL}
    pids = {c["infrastructure_pid"] for c in children} | {run["infrastructure_pid"]}
    assert len(pids) == 3, pids  # three processes: the parent and one per part
    for c in children:  # linked to the parent, as subflows are
        link = api_get(s, f"/task_runs/{c['parent_task_run_id']}")
        assert link["flow_run_id"] == run["id"]
        rows = len(c["parameters"]["job"]["rows"])
        tasks = task_runs_of(
            s, c["id"], lambda got, n=rows: sum(t["name"].startswith("submit-") for t in got) >= n
        )
        assert sum(t["name"].startswith("submit-") for t in tasks) == rows
        assert c["parameters"]["job"]["options"]["concurrency"] == 2  # 4 slots, 2 parts

    # one results file with every row, each video stored once, one POST per item
    [results_file] = [f for f in fs.glob(f"{bucket}/out/runs/*/results.jsonl")]
    results = {r.id: r for r in from_jsonl(fs.cat(results_file).decode())}
    assert set(results) == set(ids) and {r.status for r in results.values()} == {"succeeded"}
    assert len(fs.glob(f"{bucket}/out/runs/*/parts/*/results.jsonl")) == 2
    assert sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{bucket}/out/videos/*.mp4")) == sorted(
        f"{i}.mp4" for i in ids
    )
    after = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"]
    assert after - before == len(ids)
    summary = json.loads(fs.cat(results_file.replace("results.jsonl", "summary.json")))
    assert summary["by_status"]["succeeded"] == sum(summary["by_status"].values()) == len(ids)


def test_docker_and_kubernetes_job_templates_make_work_pools(deployed: Deployed) -> None:
    """The templates are what `prefect work-pool create --base-job-template FILE` sends."""
    s = deployed.server
    for kind in ("docker", "kubernetes"):
        template = json.loads((REPO / "deployments" / kind / "base-job-template.json").read_text())
        api_post(
            s,
            "/work_pools/",
            {"name": f"hailuo-{kind}", "type": kind, "base_job_template": template},
        )
        pool = api_get(s, f"/work_pools/hailuo-{kind}")
        variables = pool["base_job_template"]["variables"]["properties"]
        assert variables["image"]["default"].startswith("hailuo-batch")
        env = variables["env"]["default"]
        assert env["HAILUO_PROJECT_DIR"] == "/opt/hailuo-batch"
        assert not any(k in env for k in ("APIXO_API_KEY", "AWS_SECRET_ACCESS_KEY"))
        # every {{ placeholder }} of the job has a variable to fill it
        placeholders = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
        assert placeholders <= set(variables)
