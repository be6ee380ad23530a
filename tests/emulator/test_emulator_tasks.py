"""Task lifecycle, result videos, failure markers, image checks and result URL expiry."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import av
import httpx
import pytest
from emulator_helpers import read, submit, task_body, wait_done

from hailuo_batch.emulator import EmulatorHandle, input_key

pytestmark = pytest.mark.timeout(60)


def _result_url(data: dict[str, Any]) -> str:
    assert isinstance(data["resultJson"], str)  # a JSON *string*
    urls = json.loads(data["resultJson"])["resultUrls"]
    assert isinstance(urls, list) and len(urls) == 1
    return str(urls[0])


def _probe(video: bytes) -> tuple[int, int, float, int]:
    with av.open(io.BytesIO(video), mode="r") as box:
        stream = box.streams.video[0]
        frames = len(list(box.decode(stream)))
        assert stream.codec_context.name == "h264"
        assert stream.pix_fmt == "yuv420p"
        duration = box.duration / 1_000_000 if box.duration else 0.0
        return stream.width, stream.height, duration, frames


def test_states_progress_to_success_with_a_playable_video(make_emulator: Any) -> None:
    emu = make_emulator(time_scale=0.005)  # pending ~25 ms, processing ~0.6 s
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        task_id = submit(c, task_body(emu.base_url, duration="10"))
        seen = [read(c, task_id)["state"]]
        while seen[-1] not in ("success", "failed"):
            time.sleep(0.01)
            seen.append(read(c, task_id)["state"])
        data = read(c, task_id)
        video = httpx.get(_result_url(data))
    assert "processing" in seen and seen[-1] == "success"
    order = ["pending", "processing", "success"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert 96_000 <= data["costTime"] <= 144_000  # nominal, unscaled, ms
    assert data["completeTime"] >= data["createTime"]
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4"
    assert int(video.headers["content-length"]) == len(video.content)
    width, height, duration, frames = _probe(video.content)
    assert (width, height) == (1024, 768)  # 4:3 input at 768p
    assert frames == 10 * 4
    assert duration == pytest.approx(10, abs=0.3)
    assert emu.stats()["downloads"] == {task_id: 1}


def test_pro_mode_is_1080p_six_seconds_following_the_image_aspect(
    emu: EmulatorHandle, client: httpx.Client
) -> None:
    body = task_body(emu.base_url, mode="pro-image-to-video", image="portrait.png")
    data = wait_done(client, submit(client, body))
    assert data["state"] == "success"
    width, height, duration, _ = _probe(httpx.get(_result_url(data)).content)
    assert (width, height) == (810, 1080)  # 3:4 input, even width
    assert duration == pytest.approx(6, abs=0.3)


def test_one_image_is_encoded_once_for_many_tasks(make_emulator: Any, tmp_path: Any) -> None:
    emu = make_emulator(cache_dir=str(tmp_path))
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        ids = [submit(c, task_body(emu.base_url, prompt=f"p{i}")) for i in range(5)]
        results = [wait_done(c, t) for t in ids]
    assert [r["state"] for r in results] == ["success"] * 5
    assert emu.video_encodes == 1
    assert len(list(tmp_path.glob("*.mp4"))) == 1


@pytest.mark.parametrize("code", ["CONTENT_VIOLATION", "GENERATION_FAILED", "SensitiveContent"])
def test_fail_marker_fails_the_task_with_that_code(
    emu: EmulatorHandle, client: httpx.Client, code: str
) -> None:
    data = wait_done(client, submit(client, task_body(emu.base_url, prompt=f"x [fail:{code}]")))
    assert data["state"] == "failed"
    assert data["failCode"] == code
    assert data["failMsg"]
    assert "resultJson" not in data


def test_flaky_marker_fails_only_the_first_submission_of_an_input(
    emu: EmulatorHandle, client: httpx.Client
) -> None:
    body = task_body(emu.base_url, prompt="wobbly [flaky:GENERATION_FAILED]")
    first = wait_done(client, submit(client, body))
    second = wait_done(client, submit(client, body))
    other_image = wait_done(
        client,
        submit(
            client, task_body(emu.base_url, prompt=body["input"]["prompt"], image="portrait.png")
        ),
    )
    assert (first["state"], first["failCode"]) == ("failed", "GENERATION_FAILED")
    assert second["state"] == "success"
    assert other_image["state"] == "failed"  # a different input is a different first time
    key = input_key(body["input"]["prompt"], body["input"]["image_urls"][0])
    assert emu.stats()["submissions_by_input"][key] == 2


@pytest.mark.parametrize(
    ("image", "code"),
    [
        ("missing.jpg", "IMAGE_DOWNLOAD_FAILED"),
        ("not-accepted.jpg", "UNSUPPORTED_FORMAT"),
        ("garbage.png", "UNSUPPORTED_FORMAT"),
        ("too-small.jpg", "INVALID_IMAGE_URL"),
    ],
)
def test_bad_input_images_fail_the_task(
    emu: EmulatorHandle, client: httpx.Client, image: str, code: str
) -> None:
    data = wait_done(client, submit(client, task_body(emu.base_url, image=image)))
    assert (data["state"], data["failCode"]) == ("failed", code)


def test_unreachable_image_host_fails_with_download_error(
    emu: EmulatorHandle, client: httpx.Client
) -> None:
    body = task_body(emu.base_url)
    body["input"]["image_urls"] = ["http://127.0.0.1:9/closed-port.jpg"]
    data = wait_done(client, submit(client, body))
    assert (data["state"], data["failCode"]) == ("failed", "IMAGE_DOWNLOAD_FAILED")


def test_result_urls_expire_and_a_fresh_read_issues_a_new_one(make_emulator: Any) -> None:
    emu = make_emulator(result_ttl_s=1000)  # x0.001 -> 1 s
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        task_id = submit(c, task_body(emu.base_url))
        old_url = _result_url(wait_done(c, task_id))
        time.sleep(1.1)
        expired = httpx.get(old_url)
        fresh = httpx.get(_result_url(read(c, task_id)))
    assert expired.status_code == 403
    assert expired.json()["message"] == "result URL expired"
    assert fresh.status_code == 200 and fresh.content[4:8] == b"ftyp"


def test_tampered_result_url_is_refused(emu: EmulatorHandle, client: httpx.Client) -> None:
    url = _result_url(wait_done(client, submit(client, task_body(emu.base_url))))
    other = submit(client, task_body(emu.base_url, prompt="other"))
    assert httpx.get(url.replace("sig=", "sig=0")).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403
    task_id = url.split("/results/")[1].split("/")[0]
    assert httpx.get(url.replace(task_id, other)).status_code == 403


def test_stats_count_what_clients_did(emu: EmulatorHandle, client: httpx.Client) -> None:
    a = submit(client, task_body(emu.base_url, prompt="alpha"))
    b = submit(client, task_body(emu.base_url, prompt="alpha"))
    c = submit(client, task_body(emu.base_url, prompt="beta [fail:NSFW]"))
    for t in (a, b, c):
        wait_done(client, t)
    stats = emu.stats()
    assert stats["submissions"] == 3
    assert stats["submissions_by_prompt"] == {"alpha": 2, "beta [fail:NSFW]": 1}
    assert stats["tasks"][c] == {"prompt": "beta [fail:NSFW]", "state": "failed"}
    assert stats["tasks"][a]["state"] == "success"
    assert stats["status_reads_total"] == sum(stats["status_reads"].values())
    assert stats["in_flight"] == 0 and stats["peak_in_flight"] >= 1
    assert stats["balance_usd"] == pytest.approx(1000 - 3 * 0.19)
    emu.reset_stats()
    after = emu.stats()
    assert after["submissions"] == 0 and after["tasks"] == {} and after["status_reads_total"] == 0
    assert read(client, a)["state"] == "success"  # tasks survive a stats reset


def test_files_are_served_without_path_escape(emu: EmulatorHandle) -> None:
    with httpx.Client(base_url=emu.base_url) as c:
        ok = c.get("/files/landscape.jpg")
        assert ok.status_code == 200 and ok.content[:2] == b"\xff\xd8"
        for path in (
            "/files/..%2F..%2F..%2Fetc%2Fpasswd",
            "/files/%2Fetc%2Fpasswd",
            "/files/link.txt",
        ):
            resp = c.get(path)
            assert resp.status_code in (403, 404), path
            assert b"root:" not in resp.content and b"top secret" not in resp.content
        assert c.get("/files/nothing-here.jpg").status_code == 404
