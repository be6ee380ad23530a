"""Artifact keys a person finds again: one per deployment or manifest, valid for Prefect."""

from __future__ import annotations

import re

import pytest

from hailuo_batch.artifacts import MAX_SLUG, manifest_stem, report_keys, slugify, video_link
from hailuo_batch.results import ItemResult
from hailuo_batch.storage import OutputStore

KEY = re.compile(r"^[a-z0-9-]+$")


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("nightly-batch", "nightly-batch"),
        ("Nightly Batch", "nightly-batch"),
        ("videos_2026.11 (final)", "videos-2026-11-final"),
        ("--a__b--", "a-b"),
        ("Ünïcode ☃ clips", "n-code-clips"),
        ("", "manifest"),
        ("***", "manifest"),
    ],
)
def test_slugify_gives_a_valid_readable_key(text, slug):
    assert slugify(text) == slug
    assert KEY.match(slugify(text))


def test_slug_is_bounded_and_never_ends_in_a_dash():
    slug = slugify("a" * (MAX_SLUG - 1) + "-" + "b" * 50)
    assert len(slug) <= MAX_SLUG and not slug.endswith("-") and KEY.match(slug)


@pytest.mark.parametrize(
    ("manifest", "stem"),
    [
        ("/data/in/night.csv", "night"),
        ("s3://bucket/inbox/2026-11-24.orders.jsonl", "2026-11-24.orders"),
        ("https://host/m.json?sig=abc", "m"),
        ("manifest", "manifest"),
        (".hidden", ".hidden"),
    ],
)
def test_manifest_stem(manifest, stem):
    assert manifest_stem(manifest) == stem


def test_a_deployment_keeps_one_key_whatever_the_manifest():
    nights = [report_keys("Nightly Batch", f"s3://b/inbox/2026-11-{d}.csv") for d in (23, 24)]
    assert nights[0] == nights[1] == ("items-nightly-batch", "summary-nightly-batch")


def test_without_a_deployment_the_manifest_names_the_key():
    assert report_keys(None, "/data/Orders_Q4.csv") == ("items-orders-q4", "summary-orders-q4")
    assert report_keys("", "/data/orders.csv") == ("items-orders", "summary-orders")
    assert report_keys("☃", "/data/orders.csv")[0] == "items-orders"  # nothing usable left
    # every rerun's selection has a new file name: its keys must not be new each time
    for ts in ("20261125T155825079000Z", "20261126T010203000001Z"):
        assert report_keys(None, f"/o/reruns/{ts}-manifest.jsonl") == (
            "items-rerun",
            "summary-rerun",
        )


def test_a_name_a_person_gave_is_kept_a_generated_one_is_replaced():
    from hailuo_batch.artifacts import keeps_run_name

    for generated in ("strict-kiwi", "attractive-basilisk", None, ""):
        assert not keeps_run_name(generated)
    for given in ("November re-shoot", "client-x-2026-11", "nightly-first.csv", "Kiwi", "rerun-1"):
        assert keeps_run_name(given)


def _stored(video):
    return ItemResult(id="a", row=1, status="succeeded", video=video)


def test_a_local_video_link_is_its_path(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    path = store.url_for("videos/a.mp4")
    assert video_link(store, 3600, _stored(path)) == path
    assert video_link(store, 3600, _stored(None)) is None


def test_a_video_on_s3_gets_a_presigned_link_and_others_keep_their_url(s3_env):
    store = OutputStore(f"s3://{s3_env}/out")
    link = video_link(store, 3600, _stored(store.url_for("videos/a.mp4")))
    assert link.startswith("http") and "Signature" in link and "Expires" in link
    elsewhere = "s3://other-bucket/videos/a.mp4"
    assert video_link(store, 3600, _stored(elsewhere)) == elsewhere  # not under this output
