"""Manifests as they arrive from people, spreadsheets and other systems: malformed CSV, hostile
JSON, odd encodings, control characters and URL forms. A file that does not parse cleanly is
refused with its line; a broken row is reported invalid with its row, id and field; nothing
broken becomes an item (an item is what gets paid for)."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hailuo_batch.apixo.models import Mode
from hailuo_batch.manifest import ManifestError, RowError, load_manifest

IMG = "https://cdn.example.com/a.jpg"


def write(tmp_path: Path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return str(path)


def rows_of(m) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """row -> "item" or the fields of its errors: every row exactly once."""
    out: dict[int, str] = {}
    for item in m.items:
        assert item.row not in out
        out[item.row] = "item"
    for e in m.errors:
        assert out.get(e.row, "err").startswith("err"), f"row {e.row} is an item and an error"
        out[e.row] = out.get(e.row, "err") + ":" + e.field
    assert sorted(out) == list(range(1, m.total_rows + 1))
    return out


# --- CSV: strict parsing ----------------------------------------------------------------------


def test_an_unterminated_quote_refuses_the_file_with_its_line(tmp_path: Path) -> None:
    """The review's case: the quote swallowed three rows into one prompt, paid as one item."""
    text = (
        "id,image_url,prompt\n"
        f"a,{IMG},first\n"
        f'b,{IMG},"never closed\n'
        f"c,{IMG},third\n"
        f"d,{IMG},fourth\n"
        f"e,{IMG},fifth\n"
    )
    with pytest.raises(ManifestError, match=r"starts on line 3 is never closed"):
        load_manifest(write(tmp_path, "m.csv", text))


def test_text_after_a_closing_quote_refuses_the_file(tmp_path: Path) -> None:
    text = f'id,image_url,prompt\na,{IMG},"quoted" then more\nb,{IMG},ok\n'
    with pytest.raises(ManifestError, match=r"not valid CSV at line 2"):
        load_manifest(write(tmp_path, "m.csv", text))


def test_rows_glued_by_a_stray_quote_are_one_invalid_row(tmp_path: Path) -> None:
    """A stray quote closed by another stray quote further down: the parse succeeds, but the
    glued cell holds lines that look like rows; it is reported, never submitted."""
    text = (
        "id,image_url,prompt\n"
        f"a,{IMG},first\n"
        f'b,{IMG},"oops\n'
        f"c,{IMG},third\n"
        f'd,{IMG},fourth"\n'
        f"e,{IMG},fifth\n"
    )
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["a", "e"]
    [err] = m.errors
    assert (err.row, err.field, err.id) == (2, "row", "b")
    assert "lines 3-5" in err.reason and "never closed" in err.reason


def test_a_multi_line_prompt_without_row_lookalikes_is_kept(tmp_path: Path) -> None:
    text = f'id,image_url,prompt,mode\na,{IMG},"line one\nline two",pro\n'
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [(i.prompt, i.mode) for i in m.items] == [("line one\nline two", Mode.PRO)]


@pytest.mark.parametrize("header", ["id,image_url,prompt,PROMPT", "image_url, Prompt ,prompt"])
def test_a_column_named_twice_refuses_the_file(tmp_path: Path, header: str) -> None:
    with pytest.raises(ManifestError, match=r"names column 'prompt' twice"):
        load_manifest(write(tmp_path, "m.csv", f"{header}\n{IMG},a,b,c\n"))


def test_ragged_rows_are_each_reported(tmp_path: Path) -> None:
    text = (
        "id,image_url,prompt,mode\n"
        f"a,{IMG},short row\n"  # 3 cells
        f"b,{IMG},fine,pro\n"
        f"c,{IMG},too,pro,many\n"  # 5 cells
        f"d,{IMG},trailing empty,pro,,\n"  # trailing empty cells are harmless
    )
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["b", "d"]
    assert [(e.row, e.field, e.id) for e in m.errors] == [(1, "row", "a"), (3, "row", "c")]
    assert "3 cells but the header has 4 columns (line 2)" in m.errors[0].reason
    assert "5 cells" in m.errors[1].reason


@pytest.mark.parametrize("again", ["id,image_url,prompt", " ID , Image_URL,PROMPT,,"])
def test_a_header_line_repeated_mid_file_says_so_and_the_neighbours_run(
    tmp_path: Path, again: str
) -> None:
    """Two CSV files pasted together: the second header was a row with id "id" and an image
    URL "image_url" ("cannot give the provider the local image image_url"). It is now named
    for what it is, and its "id" cell claims no id (a later row may be called "id")."""
    text = f"id,image_url,prompt\na,{IMG},first\n{again}\nid,{IMG},third\n"
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["a", "id"]
    assert [(e.row, e.field, e.id) for e in m.errors] == [(2, "row", None)]
    assert str(m.errors[0]).startswith(
        "row 2, field 'row': repeats the header (id, image_url, prompt) on line 3: "
    )
    assert "delete this line" in m.errors[0].reason


def test_a_value_under_a_nameless_column_is_reported(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "m.csv", f"image_url,,prompt\n{IMG},x,p\n{IMG},,q\n"))
    assert [i.prompt for i in m.items] == ["q"]
    assert "no name in the header" in m.errors[0].reason


def test_nul_bytes_and_control_characters(tmp_path: Path) -> None:
    text = (
        "id,image_url,prompt\n"
        f'a,{IMG},"nul \x00 inside"\n'
        f"b,{IMG}\x1b[2J,escape in url\n"
        f"c,{IMG},tab\tis fine\n"
        "d\x07,https://cdn.example.com/d.jpg,bell in id\n"
    )
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["c"]
    assert [(e.row, e.field) for e in m.errors] == [(1, "prompt"), (2, "image_url"), (4, "id")]
    assert all("U+00" in e.reason for e in m.errors[:2])
    assert "not a valid id" in m.errors[2].reason and "\\x07" in m.errors[2].reason
    # the rows kept their ids where they were readable, and not where the id was the problem
    assert [e.id for e in m.errors] == ["a", "b", None]


# --- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bom", [codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE])
def test_utf16_with_bom_is_read(tmp_path: Path, bom: bytes) -> None:
    codec = "utf-16-le" if bom == codecs.BOM_UTF16_LE else "utf-16-be"
    data = bom + f"image_url,prompt\n{IMG},café ☕\n".encode(codec)
    m = load_manifest(write(tmp_path, "m.csv", data))
    assert [i.prompt for i in m.items] == ["café ☕"]


@pytest.mark.parametrize(
    "data",
    [
        b"image_url,prompt\nhttps://x/a.jpg,caf\xe9\n",  # Latin-1
        b"image_url,prompt\nhttps://x/a.jpg,\xed\xa0\x80\n",  # an encoded surrogate
        b"\xff\xfe\x00\x00i\x00\x00\x00",  # UTF-32
        b"\x00\x01\x02\xff" * 10,
    ],
)
def test_other_encodings_are_refused_with_a_line(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ManifestError, match=r"line \d+"):
        load_manifest(write(tmp_path, "m.csv", data))


@pytest.mark.parametrize("end", ["\r", "\u2028", "\x85"])
def test_jsonl_with_lines_ended_otherwise_than_lf_says_so(tmp_path: Path, end: str) -> None:
    rows = [json.dumps({"image_url": IMG, "prompt": f"p{k}"}) for k in range(3)]
    with pytest.raises(ManifestError, match="save it with LF"):
        load_manifest(write(tmp_path, "m.jsonl", end.join(rows) + end))


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_bom_says_so(tmp_path: Path, codec: str) -> None:
    data = f"id,image_url,prompt\na,{IMG},p\n".encode(codec)
    with pytest.raises(ManifestError, match="UTF-16 text without a byte order mark"):
        load_manifest(write(tmp_path, "m.csv", data))


# --- JSON and JSON Lines ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.json", "m.jsonl"])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            '{"image_url": "x", "prompt": "p", "duration": ' + "9" * 5000 + "}",
            "unusable JSON value.*a number of 5000 digits is too long",
        ),
        ('{"image_url": "x", "prompt": "p", "duration": NaN}', "unusable JSON"),
        ('{"image_url": "x", "prompt": "p", "duration": -Infinity}', "unusable JSON"),
        ('{"image_url": "x", "prompt": "p",}', "malformed JSON"),
    ],
)
def test_whole_file_json_problems_are_one_clean_error(
    tmp_path: Path, name: str, body: str, message: str
) -> None:
    text = body if name.endswith("l") else f"[{body}]"
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(write(tmp_path, name, text))
    assert "sys." not in str(err.value)  # no interpreter internals


def test_jsonl_names_the_line_of_a_whole_file_problem(tmp_path: Path) -> None:
    good = json.dumps({"image_url": IMG, "prompt": "p"})
    with pytest.raises(ManifestError, match="on line 3"):
        load_manifest(write(tmp_path, "m.jsonl", f"{good}\n\n{'[' * 50_000}\n"))


def test_lone_surrogates_make_the_row_invalid_not_the_run_crash(tmp_path: Path) -> None:
    lines = [
        '{"id": "a", "image_url": "https://x.example/a.jpg", "prompt": "bad \\ud800 here"}',
        '{"id": "b", "image_url": "https://x.example/\\udfff.jpg", "prompt": "p"}',
        '{"id": "c\\ud800", "image_url": "https://x.example/c.jpg", "prompt": "p"}',
        '{"id": "d", "image_url": "https://x.example/d.jpg", "prompt": "a pair \\ud83d\\ude00"}',
    ]
    m = load_manifest(write(tmp_path, "m.jsonl", "\n".join(lines)))
    assert [(i.id, i.prompt) for i in m.items] == [("d", "a pair \U0001f600")]
    assert [(e.row, e.field, e.id) for e in m.errors] == [
        (1, "prompt", "a"),
        (2, "image_url", "b"),
        (3, "id", None),
    ]
    assert all("surrogate" in e.reason for e in m.errors[:2])
    assert "not a valid id" in m.errors[2].reason
    assert all(str(e).encode("utf-8") for e in m.errors)  # printable: no surrogate in messages


def test_line_separators_inside_json_strings_do_not_split_lines(tmp_path: Path) -> None:
    row = json.dumps({"image_url": IMG, "prompt": "one\u2028two\u2029three"}, ensure_ascii=False)
    m = load_manifest(write(tmp_path, "m.jsonl", row + "\n"))
    assert [i.prompt for i in m.items] == ["one\u2028two\u2029three"]


def test_a_key_given_twice_is_an_invalid_row(tmp_path: Path) -> None:
    lines = [
        f'{{"id": "a", "image_url": "{IMG}", "prompt": "first", "prompt": "second"}}',
        f'{{"id": "b", "image_url": "{IMG}", "prompt": "x", "PROMPT": "y"}}',
        f'{{"id": "c", "image_url": "{IMG}", "prompt": "fine"}}',
    ]
    m = load_manifest(write(tmp_path, "m.jsonl", "\n".join(lines)))
    assert [i.id for i in m.items] == ["c"]
    assert [(e.row, e.id) for e in m.errors] == [(1, "a"), (2, "b")]
    assert all("more than once" in e.reason for e in m.errors)


@pytest.mark.parametrize(
    ("cell", "field"),
    [
        ({"nested": 1}, "prompt"),
        ([IMG], "image_url"),
        (True, "duration"),
        (6.5, "duration"),
        (1e300, "duration"),
        ("1" * 400, "duration"),
        ([], "mode"),
        ({"a": [1, [2, [3]]]}, "provider"),
        (None, "prompt"),
    ],
)
def test_wrongly_typed_cells_are_row_errors(tmp_path: Path, cell: object, field: str) -> None:
    row = {"id": "a", "image_url": IMG, "prompt": "p", field: cell}
    m = load_manifest(write(tmp_path, "m.json", json.dumps([row])))
    assert m.items == []
    assert {(e.row, e.field, e.id) for e in m.errors} == {(1, field, "a")}


@pytest.mark.parametrize("size", [131_073, 1_000_000])
def test_a_huge_csv_cell_is_a_row_error_not_the_files(tmp_path: Path, size: int) -> None:
    """Past csv's own field limit (131,072) too: the row is refused, the others go on."""
    text = f"id,image_url,prompt\na,{IMG},{'x' * size}\nb,{IMG},fine\n"
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["b"]
    assert [(e.row, e.field, e.id) for e in m.errors] == [(1, "prompt", "a")]


@pytest.mark.parametrize(
    ("value", "kind"),
    [({"a": 1}, "object"), ([1], "array"), (True, "boolean"), (None, "null"), (1.5, "number")],
)
def test_a_json_cell_of_the_wrong_type_is_named_by_its_json_type(
    tmp_path: Path, value: object, kind: str
) -> None:
    m = load_manifest(
        write(tmp_path, "m.json", json.dumps([{"id": "a", "image_url": IMG, "prompt": value}]))
    )
    assert [(e.field, e.id) for e in m.errors] == [("prompt", "a")]
    assert f"got {kind}" in m.errors[0].reason or kind == "null"


@pytest.mark.parametrize(
    ("value", "named"), [({"a": 1}, "an object"), ("x", "a string"), (3, "a number")]
)
def test_a_json_manifest_that_is_not_an_array_names_what_it_is(
    tmp_path: Path, value: object, named: str
) -> None:
    with pytest.raises(ManifestError, match=f"got {named}"):
        load_manifest(write(tmp_path, "m.json", json.dumps(value)))


def test_a_manifest_that_is_a_pipe_is_refused_not_read_forever(tmp_path: Path) -> None:
    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(str(fifo))
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(f"file://{fifo}")


def test_a_huge_cell_is_a_row_error(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "image_url": IMG, "prompt": "x" * 200_000},
        {"image_url": IMG, "prompt": "p"},
    ]
    m = load_manifest(write(tmp_path, "m.json", json.dumps(rows)))
    assert len(m.items) == 1
    assert (m.errors[0].field, m.errors[0].id) == ("prompt", "a")
    assert "longer than" in m.errors[0].reason


# --- URL forms, before any I/O -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "simplecache::http://127.0.0.1/a.jpg",
        "zip://a.jpg::http://127.0.0.1/x.zip",
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.jpg",
        "webhdfs://127.0.0.1:50070/a.jpg",
        "data:image/png;base64,AAAA",
        "s3:/bucket/a.jpg",
        "http:/example.com/a.jpg",
        "http://[::1/a.jpg",
        "http://example.com:70000/a.jpg",
        # hosts in IDNA ("xn--") form that do not decode: httpx raises only when asked the host
        "http://xn--/a.jpg",
        "http://XN--/a.jpg",
        "http://xn--zz/a.jpg",
        "http://xn--a/a.jpg",
        "http://xn--ls8h.la/a.jpg",
        "http://xn--zz:8080/a.jpg",
    ],
)
def test_unaccepted_image_url_forms_are_row_errors(tmp_path: Path, url: str) -> None:
    rows = [
        {"id": "x", "image_url": url, "prompt": "p"},
        {"id": "ok", "image_url": IMG, "prompt": "p"},
    ]
    m = load_manifest(write(tmp_path, "m.json", json.dumps(rows)))
    assert [i.id for i in m.items] == ["ok"]  # the good row goes on
    assert [(e.row, e.field, e.id) for e in m.errors] == [(1, "image_url", "x")]
    # the same in a CSV
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        [["id", "image_url", "prompt"], ["x", url, "p"], ["ok", IMG, "p"]]
    )
    m = load_manifest(write(tmp_path, "m.csv", out.getvalue()))
    assert [i.id for i in m.items] == ["ok"]
    assert [(e.row, e.field, e.id) for e in m.errors] == [(1, "image_url", "x")]


# --- ids on invalid rows ---------------------------------------------------------------------


def test_invalid_rows_keep_their_own_id_but_never_another_rows(tmp_path: Path) -> None:
    text = (
        "id,image_url,prompt,duration\n"
        f"a,{IMG},p,7\n"  # invalid, own id a
        f"b,{IMG},p,\n"  # valid
        f"b,{IMG},q,\n"  # duplicate of a valid row: must not take b's name
        f"a,{IMG},r,\n"  # duplicate of an invalid row: a is taken by row 1
        f",{IMG},,\n"  # no id at all
        f"../x,{IMG},p,\n"  # an id that is not valid is not readable
    )
    m = load_manifest(write(tmp_path, "m.csv", text))
    assert [i.id for i in m.items] == ["b"]
    assert [(e.row, e.field, e.id) for e in m.errors] == [
        (1, "duration", "a"),
        (3, "id", None),
        (4, "id", None),
        (5, "prompt", None),
        (6, "id", None),
    ]
    assert rows_of(m) == {
        1: "err:duration",
        2: "item",
        3: "err:id",
        4: "err:id",
        5: "err:prompt",
        6: "err:id",
    }


def test_row_error_is_still_built_positionally() -> None:
    err = RowError(3, "prompt", "is required")
    assert (err.row, err.field, err.reason, err.id) == (3, "prompt", "is required", None)
    assert str(err) == "row 3, field 'prompt': is required"


# --- pro rows and durations ----------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["banana", "7", "6.5", "-6", "{}", "1e9"])
def test_pro_rows_do_not_accept_any_duration_text(tmp_path: Path, cell: str) -> None:
    m = load_manifest(
        write(tmp_path, "m.csv", f"id,image_url,prompt,mode,duration\na,{IMG},p,pro,{cell}\n")
    )
    assert m.items == []
    [err] = m.errors
    assert (err.field, err.id) == ("duration", "a")
    assert "pro mode is always 6 s" in err.reason


@pytest.mark.parametrize("cell", ["6", "10", " 10.0 "])
def test_pro_rows_drop_a_standard_duration_and_say_so(tmp_path: Path, cell: str) -> None:
    m = load_manifest(
        write(tmp_path, "m.csv", f"id,image_url,prompt,mode,duration\na,{IMG},p,pro,{cell}\n")
    )
    assert [(i.duration, i.dropped_duration) for i in m.items] == [(None, True)]


def test_a_manifest_over_the_size_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hailuo_batch import manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)
    text = "image_url,prompt\n" + f"{IMG},p\n" * 100
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(write(tmp_path, "m.csv", text))


@pytest.mark.parametrize(
    ("name", "says"),
    [("x" * 100_001, "is longer than"), ("a\x07b", "control character"), ("a\x1bb", "U\\+001B")],
)
def test_a_bad_header_name_says_what_is_wrong_with_it(tmp_path: Path, name: str, says: str) -> None:
    text = f"id,image_url,prompt,{name}\na,{IMG},p,x\n"
    with pytest.raises(ManifestError, match=f"header column 4 .*{says}"):
        load_manifest(write(tmp_path, "m.csv", text))


def test_a_json_id_with_a_fraction_says_to_write_it_as_text(tmp_path: Path) -> None:
    text = json.dumps([{"id": 1.0, "image_url": "https://h/a.jpg", "prompt": "p"}])
    [err] = load_manifest(write(tmp_path, "m.json", text)).errors
    assert err.field == "id" and 'write it as text, "1.0"' in err.reason


# --- JSON arrays are read one element at a time -----------------------------------------------

_PEAK_RSS = """
import resource, sys
from hailuo_batch.manifest import ManifestError, load_manifest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_manifest(sys.argv[1])
except ManifestError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_json_array_of_millions_of_tiny_rows_is_refused_without_filling_memory(
    tmp_path: Path,
) -> None:
    """The review's case: 6 MiB of `{}` elements (under the 64 MiB limit) took ~1 GB before the
    row limit was checked; the 63 MiB version ran the machine out of memory. The row limit is
    now checked element by element, as it is for CSV and JSON Lines."""
    path = write(tmp_path, "m.json", "[" + ",".join(["{}"] * 2_000_000) + "]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, path],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    said, grew_mb = done.stdout.strip().rsplit("\n", 1)
    assert "has more than 100,000 rows: split it into manifests" in said
    assert int(grew_mb) < 150, f"loading grew the process by {grew_mb} MB"


@pytest.mark.parametrize(
    "text",
    [
        "[",
        "[1",
        "[1,]",
        "[1 2]",
        "[,1]",
        "[]]",
        "[1] x",
        "[{}",
        "[{} {}]",
        "[1,\n\n  ]",
        '[{"a": "b}]',
        '[\n{"a": 1},\n{"a": 2,}\n]',
        "[tru]",
        '["\\x"]',
        "[[1, 2], [3]",
    ],
)
def test_a_malformed_json_array_names_the_line_and_column_json_itself_would(
    tmp_path: Path, text: str
) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    want = f"line {expected.value.lineno}, column {expected.value.colno}): {expected.value.msg}"
    with pytest.raises(ManifestError, match="malformed JSON") as err:
        load_manifest(write(tmp_path, "m.json", text))
    assert str(err.value).endswith(want)


def test_a_json_object_at_the_top_is_named_without_being_read(tmp_path: Path) -> None:
    """A huge object is never decoded: the first character says it is not an array."""
    text = '{"rows": [' + ",".join(["{}"] * 1000) + "]"  # not even closed
    with pytest.raises(ManifestError, match=r"must be a JSON array of objects \(got an object\)"):
        load_manifest(write(tmp_path, "m.json", text))
