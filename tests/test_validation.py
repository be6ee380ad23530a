"""preflight: the one verdict on an item before money is spent; it never raises."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hailuo_batch import validation
from hailuo_batch.apixo.models import Mode, Provider
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.settings import Settings
from hailuo_batch.storage import OutputStore
from hailuo_batch.validation import preflight

MakeImage = Callable[..., Path]


def item(image_url: str, **kw: object) -> ManifestItem:
    values: dict[str, object] = {
        "id": "i1",
        "row": 1,
        "image_url": image_url,
        "prompt": "a slow pan",
        "mode": Mode.STANDARD,
        "duration": 6,
        "provider": Provider.AUTO,
    }
    values.update(kw)
    return ManifestItem(**values)  # type: ignore[arg-type]


def settings(**kw: object) -> Settings:
    values: dict[str, object] = {"allow_private_networks": False, "fetch_timeout_s": 2.0}
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def no_io(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if preflight reads or stages anything; records what it tried."""
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"{name} must not be called")

        return call

    monkeypatch.setattr(validation, "inspect_image", refuse("inspect_image"))
    monkeypatch.setattr(validation, "stage_image", refuse("stage_image"))
    return calls


@pytest.mark.parametrize(
    "url",
    [
        "simplecache::http://127.0.0.1/a.jpg",
        "zip://a.jpg::http://127.0.0.1/x.zip",
        "file:///etc/hostname",
        "ftp://127.0.0.1/a.jpg",
        "webhdfs://127.0.0.1:50070/a.jpg",
        "memory://a.jpg",
        "gs://bucket/a.jpg",
        "s3:/bucket/a.jpg",
        "http://exa\x00mple.com/a.jpg",
        "http://[::1/a.jpg",
    ],
)
def test_unaccepted_forms_never_reach_io_or_staging(
    url: str, no_io: list[str], tmp_path: Path
) -> None:
    """Items can be built without the manifest (reruns): preflight checks the form itself."""
    for store in (None, OutputStore(str(tmp_path / "out"))):
        verdict = preflight(item(url), settings=settings(), store=store)
        assert not verdict.ok and verdict.field == "image_url"
    assert no_io == []


def test_validate_and_run_agree_on_local_images_with_a_local_output(
    make_image: MakeImage, tmp_path: Path, no_io: list[str]
) -> None:
    """`validate` (no store, output known to be local) and a run (a local store) both refuse
    a local image path, with the same reason, before reading it."""
    it = item(str(make_image(800, 600)))
    as_validate = preflight(it, settings=settings(), output_is_local=True)
    as_run = preflight(it, settings=settings(), store=OutputStore(str(tmp_path / "out")))
    assert not as_validate.ok and not as_run.ok
    assert as_validate.errors == as_run.errors
    assert "s3:// output" in as_validate.errors[0]
    assert no_io == []


def test_a_local_image_with_an_s3_output_is_staged(
    make_image: MakeImage, s3_env: str, tmp_path: Path
) -> None:
    it = item(str(make_image(800, 600)))
    assert preflight(it, settings=settings(), output_is_local=False).ok
    verdict = preflight(it, settings=settings(), store=OutputStore(f"s3://{s3_env}/out"))
    assert verdict.ok and verdict.request is not None
    assert verdict.request.input.image_urls[0].startswith("http")


def test_an_unexpected_error_is_a_verdict_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(validation, "inspect_image", boom)
    verdict = preflight(item("https://cdn.example.com/a.jpg"), settings=settings())
    assert not verdict.ok
    assert verdict.field == "image_url"
    assert "RuntimeError" in verdict.errors[0] and "not submitted" in verdict.errors[0]


def test_loopback_images_are_refused_with_the_guard_on() -> None:
    verdict = preflight(item("http://127.0.0.1:9/a.jpg"), settings=settings())
    assert not verdict.ok and "HAILUO_ALLOW_PRIVATE_NETWORKS=1" in verdict.errors[0]


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://cdn.example.com/good.jpg\u200b", "U+200B ZERO WIDTH SPACE at position 32"),
        ("http://cdn.example.com/good.jpg\u200e", "U+200E LEFT-TO-RIGHT MARK at position 32"),
        (
            "\ufeffhttps://cdn.example.com/good.jpg",
            "U+FEFF ZERO WIDTH NO-BREAK SPACE at position 1",
        ),
        ("/data/in/good.jpg\u2060", "U+2060 WORD JOINER at position 18"),
    ],
)
def test_an_invisible_character_in_the_image_url_is_refused_before_any_fetch(
    url: str, named: str, no_io: list[str]
) -> None:
    """A URL pasted with a trailing zero-width space looks right on screen but names another
    file: it was fetched and refused as 'image not found: http://.../good.jpg (HTTP 404)', a
    reason that looked wrong. It is refused before any I/O, naming the character."""
    verdict = preflight(item(url), settings=settings())
    assert not verdict.ok and verdict.field == "image_url"
    assert verdict.errors == [
        f"image URL contains an invisible format character ({named}): remove it "
        "(in an http(s) URL, percent-encode it if the name really contains it)"
    ]
    assert no_io == []


def _malformed_dds() -> bytes:
    """256 bytes: a DDS header whose pixel format Pillow does not implement."""
    import struct

    header = b"DDS " + struct.pack("<7I", 124, 0x1007, 720, 1280, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<8I", 32, 0x4, int.from_bytes(b"ZZZZ", "little"), 0, 0, 0, 0, 0)
    return (header + pixel_format).ljust(256, b"\0")


def test_a_file_pillow_half_recognises_is_not_an_image_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pillow's DDS plugin raises NotImplementedError on this file: the row said 'the item
    could not be checked (NotImplementedError)' under a full traceback in the log."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(_malformed_dds())
    verdict = preflight(item(str(path)), settings=settings(), output_is_local=False)
    assert not verdict.ok and verdict.field == "image_url"
    assert verdict.errors == ["not a recognisable image (JPEG or PNG only)"]
    assert not [r for r in caplog.records if r.exc_info]
