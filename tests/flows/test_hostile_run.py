"""Hostile manifests through the real flow and the emulator: only valid rows are paid for,
every row gets one result with its own id, and a file that does not parse pays for nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hailuo_batch.cli import main
from tests.flows.flowkit import generate_videos, results_of


def test_hostile_rows_are_invalid_with_their_ids_and_only_good_rows_are_paid(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    local = make_image(800, 600)
    base = emulator.base_url
    port = base.rsplit(":", 1)[1]
    text = "\n".join(
        [
            "id,image_url,prompt,mode,duration",
            f"g1,{base}/files/a.jpg,pan left,,",
            f"h1,ftp://127.0.0.1:{port}/files/a.jpg,ftp form,,",
            f"h2,simplecache::{base}/files/a.jpg,chained form,,",
            f"h3,{local.as_uri()},file form,,",
            f"h4,webhdfs://127.0.0.1:{port}/a.jpg,webhdfs form,,",
            f'h5,"{base}/files/a.jpg\x1b",escape in url,,',
            f"g2,{base}/files/a.jpg,zoom,,10",
            f"h6,{base}/files/a.jpg,ragged",
            f"h7,{base}/files/a.jpg,pro with banana,pro,banana",
            f"h8,{base}/files/a.jpg,tilt,,",
            f"h8,{base}/files/a.jpg,duplicate of h8,,",
        ]
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(text + "\n", encoding="utf-8")
    state = generate_videos(manifest=str(manifest), output=str(tmp_path / "o"), return_state=True)
    assert state.is_completed(), state.message
    res = results_of(state.result())
    by_row = {r.row: r for r in res.values()}
    assert sorted(by_row) == list(range(1, 12))  # one result per row
    paid = {r.id for r in res.values() if r.status == "succeeded"}
    assert paid == {"g1", "g2", "h8"}
    for own in ("h1", "h2", "h3", "h4", "h5", "h6", "h7"):
        assert res[own].status == "invalid", res[own]
    assert by_row[11].status == "invalid" and by_row[11].id != "h8"  # never another row's id
    stats = emulator.stats()
    assert stats["submissions"] == 3
    assert set(stats["submissions_by_prompt"]) == {"pan left", "zoom", "tilt"}


def test_json_lines_with_surrogates_and_duplicate_keys(
    flow_env, emulator, images_dir, make_image, tmp_path
):
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    url = f"{emulator.base_url}/files/a.jpg"
    lines = [
        json.dumps({"id": "ok", "image_url": url, "prompt": "fine"}),
        json.dumps({"id": "sur", "image_url": url, "prompt": "bad \ud800 here"}),
        json.dumps({"id": "dup", "image_url": url, "prompt": "one"})[:-1] + ', "Prompt": "two"}',
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    state = generate_videos(manifest=str(manifest), output=str(tmp_path / "o"), return_state=True)
    assert state.is_completed(), state.message
    res = results_of(state.result())
    assert {k: r.status for k, r in res.items()} == {
        "ok": "succeeded",
        "sur": "invalid",
        "dup": "invalid",
    }
    assert emulator.stats()["submissions"] == 1


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.csv", 'id,image_url,prompt\na,{url},one\nb,{url},"never closed\nc,{url},three\n'),
        ("m.csv", "id,image_url,prompt,PROMPT\na,{url},one,two\n"),
        ("m.jsonl", '{{"image_url": "{url}", "prompt": "p", "duration": ' + "9" * 5000 + "}}\n"),
        ("m.json", "[" * 100_000),
    ],
)
def test_a_file_that_does_not_parse_pays_for_nothing_and_exits_1(
    flow_env, emulator, images_dir, make_image, tmp_path, capsys, name, text
):
    (images_dir / "a.jpg").write_bytes(make_image(640, 360).read_bytes())
    manifest = tmp_path / name
    manifest.write_text(text.format(url=f"{emulator.base_url}/files/a.jpg"), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(manifest), "--output", str(tmp_path / "o"), "--quiet"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "run failed" in err and "Traceback" not in err
    assert emulator.stats()["submissions"] == 0
    assert not list(Path(tmp_path / "o").rglob("*.mp4"))
