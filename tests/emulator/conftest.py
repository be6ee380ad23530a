"""Fixtures: input images on disk, an emulator factory, an authenticated client."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from hailuo_batch.emulator import EmulatorConfig, EmulatorHandle, run_emulator


def _picture(width: int, height: int) -> Image.Image:
    im = Image.new("RGB", (width, height), (30, 60, 90))
    draw = ImageDraw.Draw(im)
    for i in range(0, width, 50):
        draw.rectangle([i, i % height, i + 40, i % height + 60], fill=(i % 255, 120, 200))
    return im


@pytest.fixture(scope="session")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    _picture(640, 480).save(root / "landscape.jpg", "JPEG")
    _picture(480, 640).save(root / "portrait.png", "PNG")
    buf = io.BytesIO()
    _picture(640, 480).save(buf, "GIF")
    (root / "not-accepted.jpg").write_bytes(buf.getvalue())  # GIF bytes behind a .jpg name
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    _picture(451, 300).save(root / "too-small.jpg", "JPEG")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("top secret")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-cache")


EmulatorFactory = Callable[..., EmulatorHandle]


def _test_config(files: Path, cache: Path, **overrides: Any) -> EmulatorConfig:
    settings: dict[str, Any] = {
        "port": 0,
        "time_scale": 0.001,
        "fps": 4,
        "seed": 7,
        "files_dir": str(files),
        "cache_dir": str(cache),
    }
    settings.update(overrides)
    return EmulatorConfig(**settings)


@pytest.fixture
def make_emulator(files_dir: Path, cache_dir: Path) -> Iterator[EmulatorFactory]:
    """Start an emulator with fast test defaults plus overrides; stopped after the test."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> EmulatorHandle:
            config = _test_config(files_dir, cache_dir, **overrides)
            return stack.enter_context(run_emulator(config))

        yield make


@pytest.fixture(scope="module")
def _module_emulator(files_dir: Path, cache_dir: Path) -> Iterator[EmulatorHandle]:
    with run_emulator(_test_config(files_dir, cache_dir)) as handle:
        yield handle


@pytest.fixture
def emu(_module_emulator: EmulatorHandle) -> EmulatorHandle:
    """An emulator with the test defaults, shared by a module: counters, scripted faults and
    balance are reset for each test (tasks and the flaky memory are not)."""
    _module_emulator.reset_stats()
    _module_emulator.clear_faults()
    _module_emulator.set_balance(1000.0)
    return _module_emulator


@pytest.fixture
def client(emu: EmulatorHandle) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=emu.base_url, headers={"Authorization": "Bearer test-key"}, timeout=10
    ) as c:
        yield c
