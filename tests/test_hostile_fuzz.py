"""Fuzzing manifests: all three formats, hostile cells, encodings, quoting, sizes and URL forms.

Each generated row carries its own label (valid or not) from the way it was built; the checks
are what a user would see:

- `load_manifest` raises nothing but `ManifestError`; `preflight` raises nothing at all;
- every row ends as exactly one result (an item or its errors), with its row number and, when
  it had a valid one, its own id;
- a row is valid (would be submitted) exactly when it was built valid: nothing broken is paid;
- `hailuo-batch validate` exits as documented (0 all valid, 1 any invalid) with no traceback;
- with the private-network guard on, no connection reaches the loopback listeners that every
  hostile URL points at (counted on the listening sockets).

A second property mutates the rendered bytes (stray quotes, cut lines, random bytes); labels
no longer hold, but the invariants above that do not depend on them must.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from hailuo_batch.cli import main
from hailuo_batch.manifest import ID_PATTERN, Manifest, ManifestError, load_manifest
from hailuo_batch.netguard import image_url_kind
from hailuo_batch.settings import Settings, get_settings
from hailuo_batch.validation import preflight

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class CountingListener:
    """A loopback TCP listener that only counts the connections it accepts."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@dataclass(frozen=True)
class World:
    v4: CountingListener
    v6: CountingListener
    good_images: tuple[str, ...]
    bad_images: tuple[str, ...]

    @property
    def connections(self) -> int:
        return self.v4.accepted + self.v6.accepted


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("fuzz-images")
    good, bad = [], []
    for name, size, fmt in [
        ("wide.jpg", (640, 360), "JPEG"),
        ("tall.png", (400, 720), "PNG"),
        ("name with spaces, commas and 'quotes'.jpg", (800, 600), "JPEG"),
    ]:
        Image.new("RGB", size, (20, 140, 90)).save(d / name, fmt)
        good.append(str(d / name))
    for name, size, fmt in [("short.jpg", (451, 300), "JPEG"), ("anim.webp", (800, 800), "WEBP")]:
        Image.new("RGB", size, (20, 140, 90)).save(d / name, fmt)
        bad.append(str(d / name))
    bad.append(str(d / "missing.jpg"))
    v4, v6 = CountingListener("127.0.0.1"), CountingListener("::1")
    yield World(v4, v6, tuple(good), tuple(bad))
    v4.sock.close()
    v6.sock.close()


def hostile_urls(w: World) -> list[str]:
    """URLs that must never be valid with the guard on; every network one aims at a listener."""
    p4, p6, good = w.v4.port, w.v6.port, w.good_images[0]
    return [
        f"http://127.0.0.1:{p4}/a.jpg",
        f"https://127.0.0.1:{p4}/a.jpg",
        f"http://localhost:{p4}/a.jpg",
        f"http://127.1:{p4}/a.jpg",
        f"http://2130706433:{p4}/a.jpg",
        f"http://0x7f.0.0.1:{p4}/a.jpg",
        f"http://[::1]:{p6}/a.jpg",
        f"http://[::ffff:127.0.0.1]:{p4}/a.jpg",
        f"http://0.0.0.0:{p4}/a.jpg",
        f"http://user:pw@127.0.0.1:{p4}/a.jpg?x=1#f",
        f"ftp://127.0.0.1:{p4}/a.jpg",
        f"webhdfs://127.0.0.1:{p4}/a.jpg",
        f"sftp://127.0.0.1:{p4}/a.jpg",
        f"smb://127.0.0.1:{p4}/share/a.jpg",
        f"simplecache::http://127.0.0.1:{p4}/a.jpg",
        f"blockcache::http://127.0.0.1:{p4}/a.jpg",
        f"zip://a.jpg::http://127.0.0.1:{p4}/x.zip",
        f"tar://a.jpg::http://[::1]:{p6}/x.tar",
        f"http:/127.0.0.1:{p4}/a.jpg",
        f"http:127.0.0.1:{p4}/a.jpg",
        f"http://127.0.0.1:{p4}/a b.jpg",
        f"http://[::1:{p6}/a.jpg",
        f"http://127.0.0.1:{p4}99999/a.jpg",
        "file://" + good,
        "file:" + good,
        good + "::x",
        "data:image/png;base64,iVBORw0KGgo=",
        "memory://a.jpg",
        "gs://bucket/a.jpg",
        "s3:/bucket/a.jpg",
        "s3:bucket/a.jpg",
        "S3://bucket/a.jpg",
        "s3://",
        "C:\\images\\a.jpg",
        *w.bad_images,
    ]


CSV_SAFE = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
SAFE_TEXT = st.text(CSV_SAFE, min_size=1, max_size=30).filter(lambda t: t.strip())
ID_TEXT = st.text(
    st.sampled_from("abcXYZ019._-"), min_size=0, max_size=12
)  # made valid below with a prefix
BAD_IDS = ["../x", "a/b", ".h", "-a", "a..b", "x" * 129, "a b", "é", "a\x00", "a\x1b"]
CONTROL = st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\x08", "\x0b", "\x0c", "\x85"])


@dataclass
class Row:
    cells: dict[str, Any]
    valid: bool
    explicit_id: str | None


@st.composite
def rows(draw: st.DrawFn, w: World, json_only: bool, duplicates: bool = True) -> list[Row]:
    n = draw(st.integers(min_value=1, max_value=8))
    built: list[Row] = []
    used_ids: list[str] = []
    for i in range(n):
        ok = True
        cells: dict[str, Any] = {}
        # id
        choice = draw(
            st.sampled_from(["none", "valid", "valid", "bad", "dup"][: 5 if duplicates else 4])
        )
        explicit: str | None = None
        if choice == "valid":
            explicit = f"r{i}{draw(ID_TEXT)}".replace("..", "_")
            cells["id"] = explicit
        elif choice == "bad":
            bad_pool = BAD_IDS + (["a\ud800", 7.5, True, ["x"]] if json_only else [])
            cells["id"] = draw(st.sampled_from(bad_pool))
            ok = False
        elif choice == "dup" and used_ids:
            explicit = draw(st.sampled_from(used_ids))
            cells["id"] = explicit
            ok = False  # an earlier row holds it
            explicit = None
        if explicit is not None:
            used_ids.append(explicit)
        # image
        if draw(st.integers(0, 3)) == 0:
            cells["image_url"] = draw(st.sampled_from(hostile_urls(w)))
            ok = False
        else:
            cells["image_url"] = draw(st.sampled_from(w.good_images))
        # prompt: unique per row, so two rows never share a derived id
        kind = draw(st.sampled_from(["good", "good", "good", "blank", "control"]))
        if kind == "good":
            cells["prompt"] = f"{draw(SAFE_TEXT)} #{i}"
        elif kind == "blank":
            cells["prompt"] = draw(st.sampled_from(["", "   ", "\t"]))
            ok = False
        else:
            text = draw(SAFE_TEXT)
            cut = draw(st.integers(0, len(text)))
            cells["prompt"] = text[:cut] + draw(CONTROL) + text[cut:] + f" #{i}"
            ok = False
        if json_only and draw(st.integers(0, 9)) == 0:
            cells["prompt"] = draw(st.sampled_from([None, 5, ["p"], {"p": 1}, "bad \ud800"]))
            ok = False
        # mode and duration
        mode = draw(
            st.sampled_from(
                [
                    *["", "standard", "pro", "PRO", " pro-image-to-video "],
                    *["standard-image-to-video", "text-to-video", "fast", "pro\x00"],
                ]
            )
        )
        if mode in ("text-to-video", "fast", "pro\x00"):
            ok = False
        if mode:
            cells["mode"] = mode
        good_durations: list[Any] = ["", "6", "10", " 10 ", "10.0"]
        bad_durations: list[Any] = ["7", "six", "6.5", "-6", "1e1", "0x6", "\u0661\u0660"]
        if json_only:
            good_durations += [6, 10, 10.0, None]
            bad_durations += [7, True, [], 1e300]
        if draw(st.booleans()):
            cells["duration"] = draw(st.sampled_from(good_durations))
        else:
            cells["duration"] = draw(st.sampled_from(bad_durations))
            ok = False
        # (pro accepts and drops the same values standard accepts, and refuses the others)
        # provider
        provider = draw(st.sampled_from(["", "auto", "value", "OFFICIAL", "cheap", "auto\x00"]))
        if provider in ("cheap", "auto\x00"):
            ok = False
        if provider:
            cells["provider"] = provider
        if draw(st.booleans()):
            cells["notes"] = draw(st.text(CSV_SAFE, max_size=20))
        built.append(Row(cells, ok, cells.get("id") if ok and "id" in cells else None))
    return built


COLUMNS = ["id", "image_url", "prompt", "mode", "duration", "provider", "notes"]


def render(fmt: str, built: list[Row], style: dict[str, Any]) -> bytes:
    if fmt == "csv":
        present = [c for c in COLUMNS if any(c in r.cells for r in built)]
        for required in ("image_url", "prompt"):
            if required not in present:
                present.append(required)
        header = [style["case"](c) for c in present]
        buf = io.StringIO()
        writer = csv.writer(buf, quoting=style["quoting"], lineterminator=style["eol"])
        writer.writerow(header)
        for r in built:
            writer.writerow(["" if r.cells.get(c) is None else str(r.cells[c]) for c in present])
        text = buf.getvalue()
    else:
        objs = [{style["case"](k): v for k, v in r.cells.items()} for r in built]

        def dump(o: object) -> str:
            text = json.dumps(o, ensure_ascii=style["ascii"])
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate is only writable as an escape
                text = json.dumps(o, ensure_ascii=True)
            return text

        text = "\n".join(dump(o) for o in objs) if fmt == "jsonl" else dump(objs)
    encoding = style["encoding"]
    if encoding == "utf-16":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le", "surrogatepass")
    data = text.encode("utf-8", "surrogatepass")
    return codecs.BOM_UTF8 + data if encoding == "utf-8-sig" else data


STYLES = st.fixed_dictionaries(
    {
        "quoting": st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
        "eol": st.sampled_from(["\n", "\r\n", "\r"]),
        "case": st.sampled_from([str, str.upper, lambda s: f" {s.title()} "]),
        "ascii": st.booleans(),
        "encoding": st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
    }
)


def check_settings() -> Settings:
    return Settings(allow_private_networks=False, fetch_timeout_s=1.0, connect_timeout_s=0.5)  # type: ignore[call-arg]


def one_result_per_row(m: Manifest) -> dict[int, tuple[str, str | None]]:
    """row -> ("item", id) or ("invalid", id); fails on a row with none or two results."""
    out: dict[int, tuple[str, str | None]] = {}
    for item in m.items:
        assert item.row not in out, f"row {item.row} has two items"
        out[item.row] = ("item", item.id)
    for e in m.errors:
        if e.row in out:
            assert out[e.row][0] == "invalid", f"row {e.row} is an item and an error"
            assert out[e.row][1] == e.id, f"row {e.row} has errors with different ids"
        out[e.row] = ("invalid", e.id)
    assert sorted(out) == list(range(1, m.total_rows + 1))
    return out


def verdicts(m: Manifest) -> dict[int, bool]:
    settings_ = check_settings()
    result = {e.row: False for e in m.errors}
    for item in m.items:
        result[item.row] = preflight(item, settings=settings_, output_is_local=False).ok
    return result


def write_tmp(fmt: str, data: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=f".{fmt}")
    with open(fd, "wb") as f:
        f.write(data)
    return path


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["csv", "jsonl", "json"]), style=STYLES)
def test_every_row_gets_exactly_the_verdict_it_was_built_with(
    world: World, data: st.DataObject, fmt: str, style: dict[str, Any]
) -> None:
    built = data.draw(rows(world, json_only=fmt != "csv"))
    path = write_tmp(fmt, render(fmt, built, style))
    before = world.connections
    try:
        m = load_manifest(path)
    finally:
        Path(path).unlink()
    results = one_result_per_row(m)
    assert m.total_rows == len(built)
    for row, r in enumerate(built, start=1):
        if r.explicit_id is not None:
            assert results[row][1] == r.explicit_id, f"row {row} lost its id"
        elif results[row][0] == "invalid" and results[row][1] is not None:
            # an invalid row's id is its own (never another row's)
            assert results[row][1] == str(r.cells.get("id", "")).strip()
    got = verdicts(m)
    expected = {row: r.valid for row, r in enumerate(built, start=1)}
    assert got == expected
    assert world.connections == before == 0


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HAILUO_ALLOW_PRIVATE_NETWORKS", "0")
    monkeypatch.setenv("HAILUO_FETCH_TIMEOUT_S", "1")
    monkeypatch.setenv("HAILUO_CONNECT_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), fmt=st.sampled_from(["csv", "jsonl", "json"]), style=STYLES)
def test_validate_exits_as_documented_without_a_traceback(
    world: World,
    clean_env: None,
    capsys: pytest.CaptureFixture[str],
    data: st.DataObject,
    fmt: str,
    style: dict[str, Any],
) -> None:
    built = data.draw(rows(world, json_only=fmt != "csv"))
    path = write_tmp(fmt, render(fmt, built, style))
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exc:  # anything else is a traceback
            main(["validate", path, "--json", "--output", "s3://fuzz-bucket/out"])
    finally:
        Path(path).unlink()
    out = capsys.readouterr().out
    report = json.loads(out)
    invalid_rows = {row for row, r in enumerate(built, start=1) if not r.valid}
    assert exc.value.code == (1 if invalid_rows else 0)
    assert report["rows"] == len(built)
    assert report["valid"] == len(built) - len(invalid_rows)
    assert report["invalid"] == len(invalid_rows)
    assert {p["row"] for p in report["problems"]} == invalid_rows
    for p in report["problems"]:
        r = built[p["row"] - 1]
        own = r.cells.get("id")
        if own is None or own == "":  # no id given: none, or the one derived from the inputs
            assert p["id"] is None or p["id"].startswith("item-")
        else:
            assert p["id"] in (None, str(own).strip())
    assert world.connections == 0


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["quote", "insert", "delete", "dup-line", "truncate", "newline"]),
        st.integers(min_value=0, max_value=10_000),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, int, bytes]]) -> bytes:
    for op, pos, blob in steps:
        at = pos % (len(data) + 1)
        if op == "quote":
            data = data[:at] + b'"' + data[at:]
        elif op == "insert":
            data = data[:at] + blob + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(blob) :]
        elif op == "newline":
            data = data[:at] + b"\n" + data[at:]
        elif op == "truncate":
            data = data[:at]
        else:
            lines = data.split(b"\n")
            k = pos % len(lines)
            data = b"\n".join([*lines[: k + 1], lines[k], *lines[k + 1 :]])
    return data


@FUZZ
@given(
    data=st.data(),
    fmt=st.sampled_from(["csv", "jsonl", "json"]),
    style=STYLES,
    steps=MUTATIONS,
)
def test_mutated_manifests_fail_cleanly_or_yield_only_sound_items(
    world: World,
    data: st.DataObject,
    fmt: str,
    style: dict[str, Any],
    steps: list[tuple[str, int, bytes]],
) -> None:
    built = data.draw(rows(world, json_only=fmt != "csv"))
    original = render(fmt, built, {**style, "encoding": "utf-8"})
    mutated = mutate(original, steps)
    assume(mutated != original)
    path = write_tmp(fmt, mutated)
    try:
        m = load_manifest(path)
    except ManifestError as exc:
        assert "could not be parsed" not in str(exc), f"an unexpected error: {exc}"
        return
    finally:
        Path(path).unlink()
    one_result_per_row(m)
    ids = [i.id for i in m.items]
    assert len(ids) == len(set(ids))
    for item in m.items:
        assert ID_PATTERN.fullmatch(item.id)
        image_url_kind(item.image_url)  # an accepted form, or this raises
        assert not any(ord(c) < 32 and c not in "\t\n\r" for c in item.prompt)
        item.prompt.encode("utf-8")  # no lone surrogate
        item.model_dump_json()  # serialisable as the results file will need
    verdicts(m)  # never raises
    assert world.connections == 0


def csv_cell(value: object, quote_all: bool) -> str:
    text = "" if value is None else str(value)
    if quote_all or any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


@FUZZ
@given(
    data=st.data(),
    op=st.sampled_from(["stray-quote", "drop-separator", "extra-cell"]),
    quote_all=st.booleans(),
    eol=st.sampled_from(["\n", "\r\n"]),
)
def test_a_broken_csv_row_is_never_paid_for(
    world: World, data: st.DataObject, op: str, quote_all: bool, eol: str
) -> None:
    """One row is broken the way spreadsheets and hand edits break rows: a quote that is
    opened and never closed, a lost separator, a stray extra cell. The file is refused, or
    every item is exactly a row that was written valid, and the broken row is not an item."""
    # no repeated ids: a damaged row may free an id a later row repeated, rightly making it valid
    built = data.draw(rows(world, json_only=False, duplicates=False))
    present = [c for c in COLUMNS if any(c in r.cells for r in built)]
    for required in ("image_url", "prompt"):
        if required not in present:
            present.append(required)
    header = ",".join(present)
    written = [",".join(csv_cell(r.cells.get(c), quote_all) for c in present) for r in built]
    j = data.draw(st.integers(0, len(built) - 1), label="broken row")
    cells = [csv_cell(built[j].cells.get(c), quote_all) for c in present]
    k = data.draw(st.integers(0, len(cells) - 1), label="cell")
    if op == "stray-quote":
        cells[k] = '"' + cells[k]
    elif op == "extra-cell":
        cells.insert(k + 1, "x")
    elif len(cells) > 1:
        k = min(k, len(cells) - 2)
        cells[k : k + 2] = [cells[k] + cells[k + 1]]
    else:
        cells.append("x")
    broken = [*written[:j], ",".join(cells), *written[j + 1 :]]
    # what the author meant: the file as written, before the damage
    original = csv_file([header, *written], eol)
    try:
        intended = {i.prompt: i for i in load_manifest(original).items}
    finally:
        Path(original).unlink()
    path = csv_file([header, *broken], eol)
    try:
        m = load_manifest(path)
    except ManifestError:
        return  # refused as a whole, with its line: nothing paid
    finally:
        Path(path).unlink()
    results = one_result_per_row(m)
    if op == "drop-separator" or (op == "extra-cell" and k == len(present) - 1):
        # a cell too few, or a value past the last column: reported, whatever the row held
        assert results[j + 1][0] == "invalid"
    if m.total_rows != len(built):  # rows glued together: the glued row says so
        assert any(e.field == "row" and "lines" in e.reason for e in m.errors)
    ok = verdicts(m)
    for item in m.items:
        if not ok[item.row]:
            continue
        # a valid item is exactly a row the author wrote valid: never glued, never shifted
        assert item.prompt in intended, f"row {item.row}'s prompt was never written: {item}"
        meant = intended[item.prompt]
        assert built[meant.row - 1].valid
        assert item.model_dump(exclude={"row"}) == meant.model_dump(exclude={"row"})
    assert world.connections == 0


def csv_file(lines: list[str], eol: str) -> str:
    return write_tmp("csv", (eol.join(lines) + eol).encode("utf-8"))
