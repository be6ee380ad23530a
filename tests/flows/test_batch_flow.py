"""The batch flow end to end: real Prefect (test harness), real HTTP to the emulator, real files,
real MP4 bytes, and a real S3 protocol through s3fs against moto."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import av
import pytest
import s3fs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from hailuo_batch.results import from_jsonl
from tests.flows.flowkit import (
    API_KEY,
    generate_videos,
    items,
    results_of,
    served_sha256,
    write_csv,
)


async def flow_run_name(flow_run_id) -> str:
    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).name


async def artifacts_of(flow_run_id) -> list:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


@pytest.fixture
def mixed_manifest(tmp_path: Path, images_dir: Path, make_image, emulator) -> Path:
    base = emulator.base_url + "/files"

    def img(name, w, h, fmt="JPEG"):
        p = make_image(w, h, fmt)
        (images_dir / name).write_bytes(p.read_bytes())
        return f"{base}/{name}"

    rows = [
        {"id": "ok-jpeg", "image_url": img("a.jpg", 640, 360), "prompt": "pan left"},
        {
            "id": "ok-png-10s",
            "image_url": img("b.png", 301, 301, "PNG"),
            "prompt": "zoom",
            "duration": "10",
        },
        {
            "id": "ok-pro",
            "image_url": img("c.jpg", 401, 1000),
            "prompt": "tilt",
            "mode": "pro",
            "duration": "10",
        },
        {
            "id": "flagged",
            "image_url": img("d.jpg", 640, 360),
            "prompt": "x [fail:CONTENT_VIOLATION]",
        },
        {
            "id": "flaky",
            "image_url": img("e.jpg", 640, 360),
            "prompt": "y [flaky:GENERATION_FAILED]",
        },
        {
            "id": "bad-input",
            "image_url": img("f.jpg", 640, 360),
            "prompt": "z [fail:PROMPT_TOO_LONG]",
        },
        {"id": "short-side", "image_url": img("g.jpg", 451, 300), "prompt": "refused"},
        {"id": "too-tall", "image_url": img("h.jpg", 400, 1000), "prompt": "refused"},
        {"id": "webp", "image_url": img("i.webp", 640, 360, "WEBP"), "prompt": "refused"},
        {"id": "missing", "image_url": f"{base}/nope.jpg", "prompt": "refused"},
        {"id": "../escape", "image_url": img("j.jpg", 640, 360), "prompt": "bad id"},
        {"id": "no-prompt", "image_url": img("k.jpg", 640, 360), "prompt": ""},
        {"id": "bad-duration", "image_url": img("l.jpg", 640, 360), "prompt": "p", "duration": "7"},
    ]
    return write_csv(tmp_path / "manifest.csv", rows)


def test_mixed_batch_to_local_output(flow_env, emulator, mixed_manifest, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    state = generate_videos(
        manifest=str(mixed_manifest), output=str(out), concurrency=4, return_state=True
    )
    assert state.is_completed(), state.message
    summary = state.result()
    res = results_of(summary)
    assert len(res) == 13  # one line per manifest row, valid or not

    # valid items: stored, with the bytes the provider served and a playable video
    for item_id in ("ok-jpeg", "ok-png-10s", "ok-pro", "flaky"):
        r = res[item_id]
        assert r.status == "succeeded", (item_id, r)
        video = Path(r.video)
        assert video == out / "videos" / f"{item_id}.mp4"
        data = video.read_bytes()
        assert len(data) == r.bytes and hashlib.sha256(data).hexdigest() == r.sha256
        assert r.sha256 == served_sha256(emulator.base_url, r.task_id)
        assert r.cost_time_ms and r.cost_time_ms > 0
    with av.open(str(out / "videos" / "ok-pro.mp4")) as c:
        assert c.streams.video[0].height == 1080  # pro is 1080p
    with av.open(str(out / "videos" / "ok-jpeg.mp4")) as c:
        assert c.streams.video[0].height == 768

    assert res["flaky"].attempts == 2  # transient failure resubmitted once, then recovered
    assert res["flagged"].status == "skipped" and res["flagged"].fail_code == "CONTENT_VIOLATION"
    assert res["bad-input"].status == "failed" and res["bad-input"].fail_code == "PROMPT_TOO_LONG"
    assert res["bad-input"].attempts == 1

    # invalid before paying: rule named, never submitted
    assert "short side" in " ".join(res["short-side"].errors).lower()
    assert "aspect" in " ".join(res["too-tall"].errors).lower()
    assert "webp" in " ".join(res["webp"].errors).lower()
    assert res["missing"].status == "invalid" and "404" in res["missing"].fail_msg
    # invalid rows keep their own id; a row whose id is itself invalid gets a name no valid id
    # can take (`row#N`), so it never collides with a real `row-1`
    row_errors = {r.row: r for r in res.values() if r.row in (11, 12, 13)}
    assert {r.status for r in row_errors.values()} == {"invalid"}
    assert [row_errors[n].id for n in (11, 12, 13)] == ["row#11", "no-prompt", "bad-duration"]
    assert row_errors[11].field == "id" and row_errors[13].field == "duration"
    assert row_errors[12].field == "prompt"

    stats = emulator.stats()
    by_prompt = stats["submissions_by_prompt"]
    assert by_prompt["x [fail:CONTENT_VIOLATION]"] == 1  # skipped, never resubmitted
    assert by_prompt["y [flaky:GENERATION_FAILED]"] == 2
    assert by_prompt["pan left"] == 1 and by_prompt["zoom"] == 1 and by_prompt["tilt"] == 1
    assert "refused" not in by_prompt and "bad id" not in by_prompt
    assert stats["submissions"] == 7

    s = json.loads((out / "runs" / summary["run_id"] / "summary.json").read_text())
    assert s["by_status"]["succeeded"] == 4 and s["by_status"]["invalid"] == 7
    # the file names the results and the review page, as the README says
    assert s["results"].endswith(f"runs/{summary['run_id']}/results.jsonl")
    assert s["review_page"].endswith(f"runs/{summary['run_id']}/index.html")
    assert s["balance_spent_usd"] == pytest.approx(s["estimated_cost_usd"])

    arts = asyncio.run(artifacts_of(state.state_details.flow_run_id))
    assert asyncio.run(flow_run_name(state.state_details.flow_run_id)).startswith(
        "videos-manifest.csv-"
    )
    kinds = {a.type for a in arts}
    assert {"table", "markdown", "progress"} <= kinds
    table = next(a for a in arts if a.type == "table")
    assert len(json.loads(table.data) if isinstance(table.data, str) else table.data) == 13
    progress = next(a for a in arts if a.type == "progress")
    assert float(progress.data) == 100.0

    # the key appears nowhere the user or Prefect can see
    everything = [
        p.read_bytes().decode("utf-8", "replace") for p in (out / "runs").rglob("*") if p.is_file()
    ]
    everything += [json.dumps(a.data) for a in arts]
    everything += [caplog.text]
    assert not any(API_KEY in text for text in everything)


def test_s3_manifest_and_output_through_moto(flow_env, emulator, s3_env, make_image, images_dir):
    fs = s3fs.S3FileSystem()
    good = make_image(800, 600)
    (images_dir / "good.jpg").write_bytes(good.read_bytes())
    fs.put(str(make_image(700, 500)), f"{s3_env}/inputs/in-bucket.jpg")
    lines = [
        {"id": "http-image", "image_url": f"{emulator.base_url}/files/good.jpg", "prompt": "a"},
        {"id": "s3-image", "image_url": f"s3://{s3_env}/inputs/in-bucket.jpg", "prompt": "b"},
    ]
    fs.pipe(f"{s3_env}/manifests/m.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    state = generate_videos(
        manifest=f"s3://{s3_env}/manifests/m.jsonl", output=f"s3://{s3_env}/out", return_state=True
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["results"] == f"s3://{s3_env}/out/runs/{summary['run_id']}/results.jsonl"
    res = {r.id: r for r in from_jsonl(fs.cat(summary["results"]).decode())}
    for item_id in ("http-image", "s3-image"):
        r = res[item_id]
        assert r.status == "succeeded", r
        assert r.video == f"s3://{s3_env}/out/videos/{item_id}.mp4"
        data = fs.cat(r.video)
        assert (
            hashlib.sha256(data).hexdigest()
            == r.sha256
            == served_sha256(emulator.base_url, r.task_id)
        )
    assert not [k for k in fs.find(f"{s3_env}/out") if ".part" in k]


def test_broken_download_leaves_no_partial_object(
    flow_env, emulator, s3_env, make_image, images_dir, tmp_path
):
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    m = write_csv(
        tmp_path / "m.csv",
        [{"id": "cut", "image_url": f"{emulator.base_url}/files/a.jpg", "prompt": "cut"}],
    )
    emulator.script_faults("download", "truncate", count=10)  # every attempt breaks mid-body
    state = generate_videos(manifest=str(m), output=f"s3://{s3_env}/out", return_state=True)
    # the only item failed: the run says so in its state, and still writes every result
    assert state.is_failed() and state.name == "NothingSucceeded", state.message
    fs = s3fs.S3FileSystem()
    summary = state.result(raise_on_failure=False)
    res = {r.id: r for r in from_jsonl(fs.cat(summary["results"]).decode())}
    assert res["cut"].status == "failed" and res["cut"].fail_code == "DOWNLOAD_FAILED"
    assert not fs.exists(f"{s3_env}/out/videos/cut.mp4")
    assert not [k for k in fs.find(f"{s3_env}/out") if "videos/" in k]


def test_wrong_key_stops_the_run_before_paying(
    flow_env, emulator, mixed_manifest, tmp_path, monkeypatch
):
    from hailuo_batch.settings import get_settings

    monkeypatch.setenv("APIXO_API_KEY", "sk-wrong-key")
    get_settings.cache_clear()
    state = generate_videos(
        manifest=str(mixed_manifest), output=str(tmp_path / "o"), return_state=True
    )
    assert state.is_failed()
    assert "401" in state.message
    assert emulator.stats()["submissions"] == 0
    res = results_of(state.result(raise_on_failure=False))
    assert {r.status for r in res.values()} == {"invalid", "not_submitted"}


def _six_items(tmp_path, images_dir, make_image, emulator):
    return write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 6))


def test_http_402_mid_run_stops_new_submissions(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    emulator.set_balance(0.40)  # room for two 6 s clips at 0.19
    emulator.script_faults("balance", "503", count=100)  # balance unknown: no pre-check
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), concurrency=1)
    assert state.is_failed() and "402" in state.message and "4 items not submitted" in state.message
    assert state.name == "InsufficientBalance"
    res = results_of(state.result(raise_on_failure=False))
    statuses = sorted(r.status for r in res.values())
    assert statuses == ["not_submitted"] * 4 + ["succeeded"] * 2
    assert all("402" in r.fail_msg for r in res.values() if r.status == "not_submitted")
    assert emulator.stats()["submissions"] == 2


def test_balance_too_low_fails_before_spending(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    emulator.set_balance(0.40)
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"))
    assert state.is_failed()
    assert "needs about $1.14" in state.message and "balance is $0.40" in state.message
    assert emulator.stats()["submissions"] == 0


def test_a_max_cost_the_balance_pays_for_starts_the_run(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    """The batch needs $1.14, the balance holds $0.40, the user capped the run at $0.38: the
    cap already keeps it within the balance, so it runs to the cap (it was refused, and told
    to use the --max-cost it had used)."""
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    emulator.set_balance(0.40)
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), max_cost_usd=0.38)
    assert state.name == "CostCapReached", state.message
    assert emulator.stats()["submissions"] == 2


def test_fit_to_balance_submits_what_fits(flow_env, emulator, tmp_path, images_dir, make_image):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    emulator.set_balance(0.60)  # three clips at 0.19
    state = generate_videos(
        manifest=str(m), output=str(tmp_path / "o"), fit_to_balance=True, concurrency=2
    )
    assert state.is_completed() and state.name == "CostCapReached", state.message
    assert "the balance of $0.60 paid for what fit" in state.message  # no max cost was set
    assert "max cost" not in state.message
    res = results_of(state.result())
    assert sorted(r.status for r in res.values()) == ["not_submitted"] * 3 + ["succeeded"] * 3
    held = [r for r in res.values() if r.status == "not_submitted"]
    assert all("the balance of $0.60 would not pay for it" in r.fail_msg for r in held)
    assert emulator.stats()["submissions"] == 3


def test_max_cost_caps_submissions(flow_env, emulator, tmp_path, images_dir, make_image):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    state = generate_videos(
        manifest=str(m), output=str(tmp_path / "o"), max_cost_usd=0.5, concurrency=3
    )
    assert state.is_completed() and "4 items not submitted" in state.message
    res = results_of(state.result())
    capped = [r for r in res.values() if r.status == "not_submitted"]
    assert len(capped) == 4 and all("max cost reached" in r.fail_msg for r in capped)
    assert emulator.stats()["submissions"] == 2  # 2 x 0.19 <= 0.50 < 3 x 0.19


def test_a_balance_that_falls_past_the_estimate_and_cap_is_said_loudly(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """Prices set below what the provider charges: the cap holds the estimate, not the real
    spend. The balance read before and after tells; the run says so in its state message,
    log, summary.json and summary artifact."""
    from hailuo_batch.settings import get_settings

    monkeypatch.setenv("HAILUO_PRICE_STANDARD_6S_USD", "0.05")  # the emulator charges 0.19
    get_settings.cache_clear()
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    state = generate_videos(
        manifest=str(m), output=str(tmp_path / "o"), max_cost_usd=0.15, concurrency=3
    )
    summary = state.result(raise_on_failure=False)
    assert emulator.stats()["submissions"] == 3 and summary["balance_spent_usd"] == 0.57
    warning = summary["spend_warning"]
    assert "fell by $0.57" in warning and "past the max cost of $0.15" in warning
    assert "HAILUO_PRICE_" in warning and "WARNING: the balance fell" in state.message
    on_disk = json.loads(Path(summary["results"]).with_name("summary.json").read_text())
    assert on_disk["spend_warning"] == warning


def test_a_green_run_that_spent_past_its_estimate_still_says_so_in_its_state(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """Every item made it, no cap: the state stays Completed, and its message still carries
    the balance's fall past the estimate (a plain return would drop it)."""
    from hailuo_batch.settings import get_settings

    monkeypatch.setenv("HAILUO_PRICE_STANDARD_6S_USD", "0.05")  # the emulator charges 0.19
    get_settings.cache_clear()
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), concurrency=3)
    summary = state.result(raise_on_failure=False)
    assert summary["by_status"]["succeeded"] == 6 and "spend_warning" in summary
    assert state.is_completed() and state.name == "Completed"
    assert "WARNING: the balance fell by $1.14" in (state.message or "")


def test_a_cap_of_zero_pays_nothing_and_says_the_cap_was_reached(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), max_cost_usd=0)
    assert state.is_completed() and state.name == "CostCapReached", state.message
    assert "6 items not submitted" in state.message and "$0.00" in state.message
    assert emulator.stats()["submissions"] == 0


def test_fit_to_balance_below_one_item_is_a_failed_run(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = _six_items(tmp_path, images_dir, make_image, emulator)
    emulator.set_balance(0.05)  # less than one clip
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), fit_to_balance=True)
    assert state.is_failed(), state.message
    assert emulator.stats()["submissions"] == 0


def test_dry_run_submits_nothing(flow_env, emulator, mixed_manifest, tmp_path):
    state = generate_videos(
        manifest=str(mixed_manifest), output=str(tmp_path / "o"), dry_run=True, return_state=True
    )
    assert state.is_completed() and state.name == "DryRun"
    assert "would cost about $1.41" in state.message  # 4 x 6 s + 1 x 10 s + 1 pro
    summary = state.result()
    assert summary["by_status"]["not_submitted"] == 6 and summary["by_status"]["invalid"] == 7
    assert emulator.stats()["submissions"] == 0
    assert summary["estimated_batch_cost_usd"] == pytest.approx(0.19 * 4 + 0.32 + 0.33)
    assert not (tmp_path / "o" / "inputs").exists()  # a dry run uploads nothing


def test_a_dry_run_says_when_the_balance_or_the_cap_would_stop_the_real_run(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    """Six rows, three of them with an image that is not there, a balance of $0.60: the dry
    run's three valid items fit, but the real run's balance check (before the images are
    checked) counts all six and refuses; the dry run says so, and what to do. A cap below the
    valid items' cost is said too."""
    rows = items(images_dir, make_image, emulator, 6)
    for r in rows[3:]:
        r["image_url"] = f"{emulator.base_url}/files/missing.jpg"
    m = write_csv(tmp_path / "m.csv", rows)
    emulator.set_balance(0.60)
    dry = generate_videos(manifest=str(m), output=str(tmp_path / "o"), dry_run=True)
    assert dry.name == "DryRun" and "would cost about $0.57" in dry.message, dry.message
    assert "a real run would not start now" in dry.message and "$1.14" in dry.message
    real = generate_videos(manifest=str(m), output=str(tmp_path / "o"))
    assert real.name == "InsufficientBalance"  # as the dry run said
    emulator.set_balance(10.0)
    capped = generate_videos(
        manifest=str(m), output=str(tmp_path / "o"), dry_run=True, max_cost_usd=0.40
    )
    assert "would stop at the max cost of $0.40" in capped.message, capped.message
    emulator.script_faults("balance", "503", count=100)  # the balance cannot be read
    unknown = generate_videos(manifest=str(m), output=str(tmp_path / "o"), dry_run=True)
    assert "the balance could not be read" in unknown.message, unknown.message
    assert emulator.stats()["submissions"] == 0


def test_empty_manifest_fails_before_paying(flow_env, emulator, tmp_path):
    m = tmp_path / "empty.csv"
    m.write_text("image_url,prompt\n")
    state = generate_videos(manifest=str(m), output=str(tmp_path / "o"), return_state=True)
    assert state.is_failed()
    assert emulator.stats()["submissions"] == 0


def test_a_dry_run_over_an_output_estimates_only_what_is_left_to_pay(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    """Items already stored in the output cost nothing again: the dry run's estimate is what
    the real run would pay, not every valid row's price."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 3))
    out = str(tmp_path / "o")
    done = generate_videos(manifest=str(m), output=out, return_state=True)
    assert done.is_completed()
    more = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 5))  # 2 new rows
    dry = generate_videos(manifest=str(more), output=out, dry_run=True, return_state=True)
    assert dry.name == "DryRun" and "would cost about $0.38" in dry.message  # 2 x 0.19
    assert "2 of the 5 valid items still need paying for" in dry.message
    assert "the other 3 are stored" in dry.message
    assert dry.result()["estimated_batch_cost_usd"] == pytest.approx(2 * 0.19)
    assert emulator.stats()["submissions"] == 3


def test_a_presigned_manifest_link_with_a_password_is_never_shown(
    flow_env, emulator, images_dir, make_image, tmp_path, caplog
):
    """A manifest handed over as a link with `user:password@` and a signature: the run reads
    it, and neither secret reaches the run's name, its log lines, its files or artifacts."""
    caplog.set_level(logging.DEBUG)
    rows = items(images_dir, make_image, emulator, 1)
    write_csv(images_dir / "shared.csv", rows)
    host = emulator.base_url.removeprefix("http://")
    url = f"http://bob:pw-{'x' * 12}@{host}/files/shared.csv?X-Amz-Signature=sig{'y' * 12}"
    out = tmp_path / "out"
    state = generate_videos(manifest=url, output=str(out))
    summary = state.result()
    assert results_of(summary)["i0"].status == "succeeded"
    name = asyncio.run(flow_run_name(state.state_details.flow_run_id))
    assert name.startswith("videos-shared.csv-")
    everything = [name, caplog.text, json.dumps(summary)]
    everything += [
        p.read_bytes().decode("utf-8", "replace") for p in (out / "runs").rglob("*") if p.is_file()
    ]
    everything += [
        json.dumps(a.data) for a in asyncio.run(artifacts_of(state.state_details.flow_run_id))
    ]
    assert "manifest http://**********@" in caplog.text
    for secret in ("pw-" + "x" * 12, "sig" + "y" * 12):
        assert not any(secret in text for text in everything), secret


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ({"output": ""}, "output is empty"),
        ({"output": "/"}, "file system's root"),
        ({"credentials_block": ""}, "credentials_block is empty"),
        ({"storage_block": " "}, "storage_block is empty"),
    ],
)
def test_an_empty_or_root_option_from_the_ui_form_is_a_bad_setting(
    flow_env, emulator, tmp_path, images_dir, make_image, option, says
):
    """What the UI form or an API call passes is held to the CLI's rules: an empty value is
    never read as "the default" (a run into ./output of the worker, the environment's key)."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    kw = {"output": str(tmp_path / "out"), **option}
    state = generate_videos(manifest=str(m), **kw)
    assert state.name == "NotStarted" and says in state.message, state.message
    assert emulator.stats()["submissions"] == 0
