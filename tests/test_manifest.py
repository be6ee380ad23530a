from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import s3fs

from hailuo_batch import manifest as manifest_module
from hailuo_batch.apixo.models import Mode, Provider
from hailuo_batch.manifest import (
    ItemDefaults,
    ManifestError,
    ManifestItem,
    RowError,
    load_manifest,
)

IMG = "https://cdn.example.com/a.jpg"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def csv_manifest(
    tmp_path: Path, *rows: str, header: str = "id,image_url,prompt,mode,duration"
) -> str:
    return write(tmp_path, "m.csv", "\n".join([header, *rows]) + "\n")


def one_error(
    tmp_path: Path, row: str, header: str = "id,image_url,prompt,mode,duration"
) -> RowError:
    m = load_manifest(csv_manifest(tmp_path, row, header=header))
    assert m.items == []
    [err] = m.errors
    return err


# --- good rows and defaults -------------------------------------------------------------------


def test_csv_rows_load_with_defaults(tmp_path: Path) -> None:
    m = load_manifest(
        csv_manifest(
            tmp_path,
            f"a,{IMG},a cat,,",
            f'b,{IMG},"slow pan, dusk",pro,',
            f"c,{IMG},zoom,standard-image-to-video,10",
        )
    )
    assert m.errors == []
    assert m.total_rows == 3
    a, b, c = m.items
    assert (a.id, a.row, a.mode, a.duration, a.provider) == (
        "a",
        1,
        Mode.STANDARD,
        6,
        Provider.AUTO,
    )
    assert (b.prompt, b.mode, b.duration, b.row) == ("slow pan, dusk", Mode.PRO, None, 2)
    assert (c.mode, c.duration) == (Mode.STANDARD, 10)


def test_defaults_apply_to_empty_cells(tmp_path: Path) -> None:
    defaults = ItemDefaults(mode=Mode.STANDARD, duration=10, provider=Provider.VALUE)
    m = load_manifest(csv_manifest(tmp_path, f"a,{IMG},p,,"), defaults)
    assert (m.items[0].duration, m.items[0].provider) == (10, Provider.VALUE)
    m = load_manifest(csv_manifest(tmp_path, f"a,{IMG},p,,"), ItemDefaults(mode=Mode.PRO))
    assert (m.items[0].mode, m.items[0].duration) == (Mode.PRO, None)


def test_bad_default_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="6 or 10"):
        ItemDefaults(duration=7)


@pytest.mark.parametrize(
    ("cell", "mode"),
    [("standard", Mode.STANDARD), ("PRO", Mode.PRO), (" pro-image-to-video ", Mode.PRO)],
)
def test_mode_short_and_full_names(tmp_path: Path, cell: str, mode: Mode) -> None:
    m = load_manifest(csv_manifest(tmp_path, f"a,{IMG},p,{cell},"))
    assert m.items[0].mode == mode


@pytest.mark.parametrize("cell", ["6", "10", " 10 ", "10.0"])
def test_duration_as_numeric_text(tmp_path: Path, cell: str) -> None:
    m = load_manifest(csv_manifest(tmp_path, f"a,{IMG},p,standard,{cell}"))
    assert m.items[0].duration == int(float(cell))


def test_pro_drops_a_standard_duration_and_says_so(tmp_path: Path) -> None:
    m = load_manifest(csv_manifest(tmp_path, f"a,{IMG},p,pro,10", f"b,{IMG},p,pro,"))
    assert [(i.duration, i.dropped_duration) for i in m.items] == [(None, True), (None, False)]


def test_provider_column(tmp_path: Path) -> None:
    m = load_manifest(
        csv_manifest(
            tmp_path, f"a,{IMG},p,official", f"b,{IMG},p,", header="id,image_url,prompt,provider"
        )
    )
    assert [i.provider for i in m.items] == [Provider.OFFICIAL, Provider.AUTO]


def test_extra_columns_and_header_case_are_tolerated(tmp_path: Path) -> None:
    m = load_manifest(csv_manifest(tmp_path, f"{IMG},p,x", header=" Image_URL ,PROMPT,notes"))
    assert m.errors == []
    assert m.items[0].image_url == IMG


def test_blank_lines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(f"\ufeffimage_url,prompt\n\n{IMG},one\n,\n{IMG},two\n".encode())
    m = load_manifest(str(path))
    assert [(i.row, i.prompt) for i in m.items] == [(1, "one"), (2, "two")]


# --- ids and the input hash -------------------------------------------------------------------


def test_missing_id_is_derived_from_the_inputs(tmp_path: Path) -> None:
    m1 = load_manifest(csv_manifest(tmp_path, f"{IMG},p", f"{IMG},q", header="image_url,prompt"))
    m2 = load_manifest(csv_manifest(tmp_path, f"{IMG},q", f"{IMG},p", header="image_url,prompt"))
    ids1 = {i.prompt: i.id for i in m1.items}
    ids2 = {i.prompt: i.id for i in m2.items}
    assert ids1 == ids2  # stable, independent of the row order
    assert ids1["p"] != ids1["q"]
    assert all(i.id.startswith("item-") and len(i.id) == 17 for i in m1.items)


def test_input_hash_is_stable_and_tracks_every_input() -> None:
    base = {
        "id": "a",
        "row": 1,
        "image_url": IMG,
        "prompt": "p",
        "mode": Mode.STANDARD,
        "duration": 6,
        "provider": Provider.AUTO,
    }
    item = ManifestItem(**base)
    # id and row are not inputs: renumbering or renaming a row keeps its hash
    assert item.input_hash == ManifestItem(**{**base, "id": "b", "row": 9}).input_hash
    assert len(item.input_hash) == 64
    for change in (
        {"image_url": IMG + "?2"},
        {"prompt": "p2"},
        {"duration": 10},
        {"provider": Provider.VALUE},
        {"mode": Mode.PRO, "duration": None},
    ):
        assert ManifestItem(**{**base, **change}).input_hash != item.input_hash


def test_input_hash_known_value() -> None:
    item = ManifestItem(
        id="a",
        row=1,
        image_url=IMG,
        prompt="p",
        mode=Mode.STANDARD,
        duration=6,
        provider=Provider.AUTO,
    )
    # pinned canonical form: the hash must not depend on the machine, process or run
    canonical = json.dumps(
        {
            "duration": 6,
            "image_url": IMG,
            "mode": "standard-image-to-video",
            "prompt": "p",
            "provider": "auto",
        },
        separators=(",", ":"),
    )
    assert item.input_hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_duplicate_ids_name_the_first_row(tmp_path: Path) -> None:
    m = load_manifest(
        csv_manifest(tmp_path, f"a,{IMG},p,,", f"b,{IMG},q,,", f"a,{IMG},r,,", f"a,{IMG},s,,")
    )
    assert [i.id for i in m.items] == ["a", "b"]
    assert [str(e) for e in m.errors] == [
        "row 3, field 'id': duplicate id 'a' (first used on row 1)",
        "row 4, field 'id': duplicate id 'a' (first used on row 1)",
    ]


def test_ids_that_differ_only_in_case_are_duplicates(tmp_path: Path) -> None:
    """`A1` and `a1` would share `ledger/`, `claims/` and `videos/` files on a store that
    ignores case (macOS, Windows): one of the two rows is refused, named, before any payment."""
    m = load_manifest(
        csv_manifest(tmp_path, f"Clip-1,{IMG},p,,", f"b,{IMG},q,,", f"clip-1,{IMG},r,,")
    )
    assert [i.id for i in m.items] == ["Clip-1", "b"]
    assert [str(e) for e in m.errors] == [
        "row 3, field 'id': duplicate id 'clip-1': row 1 has 'Clip-1', which differs only in "
        "case (an id names the item's files, and some stores ignore case)"
    ]
    # a row refused for another reason still keeps its id from a later row that differs in case
    m = load_manifest(csv_manifest(tmp_path, f"X,{IMG},p,,,extra", f"x,{IMG},q,,"))
    assert m.errors[0].id == "X" and m.items == []
    assert "differs only in case" in m.errors[1].reason


def test_identical_rows_without_id_say_their_inputs_are_the_same(tmp_path: Path) -> None:
    """The second row used to be 'duplicate id 'item-2d9a1f58fad0' (first used on row 1)', an
    id nobody wrote. It now says what is the same and how to get several clips of it."""
    m = load_manifest(
        csv_manifest(tmp_path, f"{IMG},p,", f"{IMG},p,6", header="image_url,prompt,duration")
    )
    assert [i.row for i in m.items] == [1]
    [err] = m.errors
    assert (err.row, err.field, err.id) == (2, "id", None)
    assert err.reason.startswith("has the same inputs as row 1 (image, prompt, mode, duration")
    assert "give each row its own value in an id column" in err.reason
    assert "item-" not in err.reason


def test_an_id_written_and_one_made_from_the_inputs_say_which_is_which(tmp_path: Path) -> None:
    derived = "item-" + manifest_module.input_hash(IMG, "p", Mode.STANDARD, 6, Provider.AUTO)[:12]
    m = load_manifest(csv_manifest(tmp_path, f",{IMG},p,,", f"{derived},{IMG},q,,"))
    assert [str(e) for e in m.errors] == [
        f"row 2, field 'id': duplicate id '{derived}': row 1 has no id, and the id made from "
        "its inputs is this one; choose another id"
    ]
    m = load_manifest(csv_manifest(tmp_path, f"{derived},{IMG},q,,", f",{IMG},p,,"))
    assert [str(e) for e in m.errors] == [
        f"row 2, field 'id': has no id, and the id made from its inputs, '{derived}', is the "
        "one row 1 gives: give this row its own value in the id column"
    ]


@pytest.mark.parametrize("good", ["a", "A1", "0", "clip_01.v2-final", "x" * 128])
def test_valid_ids(tmp_path: Path, good: str) -> None:
    assert load_manifest(csv_manifest(tmp_path, f"{good},{IMG},p,,")).items[0].id == good


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "-a", "a..b", "x" * 129, "a b", "é"])
def test_invalid_ids(tmp_path: Path, bad: str) -> None:
    err = one_error(tmp_path, f"{bad},{IMG},p,,")
    assert (err.row, err.field) == (1, "id")
    assert "not a valid id" in err.reason


# --- bad rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["7", "0", "5", "11", "60"])
def test_standard_duration_must_be_6_or_10(tmp_path: Path, cell: str) -> None:
    err = one_error(tmp_path, f"a,{IMG},p,standard,{cell}")
    assert str(err) == f"row 1, field 'duration': must be 6 or 10 for standard mode (got {cell})"


@pytest.mark.parametrize("cell", ["six", "6.5", "-6"])
def test_non_numeric_duration(tmp_path: Path, cell: str) -> None:
    err = one_error(tmp_path, f"a,{IMG},p,standard,{cell}")
    assert err.field == "duration"
    assert "whole number" in err.reason


def test_unknown_mode_and_provider(tmp_path: Path) -> None:
    err = one_error(tmp_path, f"a,{IMG},p,text-to-video,")
    assert err.field == "mode" and "standard or pro" in err.reason
    err = one_error(tmp_path, f"a,{IMG},p,cheap", header="id,image_url,prompt,provider")
    assert err.field == "provider" and "auto or value or official" in err.reason


def test_empty_required_cells(tmp_path: Path) -> None:
    m = load_manifest(csv_manifest(tmp_path, "a,, ,,"))
    assert [(e.row, e.field) for e in m.errors] == [(1, "image_url"), (1, "prompt")]


def test_good_rows_still_load_around_bad_ones(tmp_path: Path) -> None:
    m = load_manifest(
        csv_manifest(tmp_path, f"a,{IMG},p,,", f"b,{IMG},p,,7", f"c,{IMG},p,,", f"d,{IMG},p,x,")
    )
    assert [i.id for i in m.items] == ["a", "c"]
    assert [(e.row, e.field) for e in m.errors] == [(2, "duration"), (4, "mode")]
    assert m.total_rows == 4


def test_too_many_cells_is_a_row_error(tmp_path: Path) -> None:
    m = load_manifest(
        csv_manifest(tmp_path, f"{IMG},slow pan, dusk", f"{IMG},ok", header="image_url,prompt")
    )
    assert [e.row for e in m.errors] == [1]
    assert "quote cells" in m.errors[0].reason
    assert len(m.items) == 1


# --- JSON and JSON Lines ----------------------------------------------------------------------


def test_jsonl_rows_count_data_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "image_url": IMG, "prompt": "p", "duration": "10"}),
        "",
        json.dumps({"id": "b", "image_url": IMG, "prompt": "p", "duration": 7}),
        json.dumps({"image_url": IMG, "prompt": "q", "mode": "pro", "duration": 10}),
        json.dumps(["not", "an", "object"]),
    ]
    m = load_manifest(write(tmp_path, "m.ndjson", "\n".join(lines)))
    assert (m.items[0].id, m.items[0].row, m.items[0].duration) == ("a", 1, 10)
    assert m.items[1].mode == Mode.PRO and m.items[1].row == 3
    assert [str(e) for e in m.errors] == [
        "row 2, field 'duration': must be 6 or 10 for standard mode (got 7)",
        "row 4, field 'row': must be a JSON object (got array)",
    ]


def test_json_array(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "image_url": IMG, "prompt": "p", "duration": 6.0},
        {"id": 7, "image_url": IMG, "prompt": "p", "duration": True},
        {"id": "c", "image_url": 5, "prompt": "p"},
    ]
    m = load_manifest(write(tmp_path, "m.json", json.dumps(rows)))
    assert [(i.id, i.duration) for i in m.items] == [("a", 6)]
    assert [(e.row, e.field) for e in m.errors] == [(2, "duration"), (3, "image_url")]


def test_json_row_missing_a_required_key_is_a_row_error(tmp_path: Path) -> None:
    rows = [{"image_url": IMG, "prompt": "p"}, {"image_url": IMG}]
    m = load_manifest(write(tmp_path, "m.json", json.dumps(rows)))
    assert [(e.row, e.field) for e in m.errors] == [(2, "prompt")]


# --- whole-file errors ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(str(tmp_path / "none.csv"))


@pytest.mark.parametrize(
    "url",
    [
        "http://bob:hunter2pw@127.0.0.1:9/m.csv?X-Amz-Signature=sigsecret1",  # refused
        "http://bob:hunter2pw@127.0.0.1:9/m.xlsx?X-Amz-Signature=sigsecret1",  # format
        "http://bob:hunter2pw@[::1/m.csv?X-Amz-Signature=sigsecret1",  # does not parse
    ],
)
def test_a_manifest_links_password_and_signature_stay_out_of_its_errors(url: str) -> None:
    with pytest.raises(ManifestError) as err:
        load_manifest(url)
    assert "hunter2pw" not in str(err.value) and "sigsecret1" not in str(err.value)
    assert "bob" not in str(err.value)
    cause = str(err.value.__cause__ or "")  # nor in a chained error's text
    assert "hunter2pw" not in cause and "sigsecret1" not in cause


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"\.csv, \.jsonl, \.ndjson or \.json"):
        load_manifest(write(tmp_path, "m.xlsx", "x"))


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    text = json.dumps({"image_url": IMG, "prompt": "p"}) + "\n\n{oops\n"
    with pytest.raises(ManifestError, match="line 3"):
        load_manifest(write(tmp_path, "m.jsonl", text))


def test_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="malformed JSON"):
        load_manifest(write(tmp_path, "m.json", '[{"image_url": '))
    with pytest.raises(ManifestError, match="JSON array of objects"):
        load_manifest(write(tmp_path, "m.json", '{"image_url": "x"}'))


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="required column\\(s\\) prompt"):
        load_manifest(csv_manifest(tmp_path, f"a,{IMG}", header="id,image_url"))
    with pytest.raises(ManifestError, match="image_url"):
        load_manifest(write(tmp_path, "m.jsonl", json.dumps({"prompt": "p"})))


@pytest.mark.parametrize(
    ("name", "text"),
    [("m.csv", ""), ("m.csv", "image_url,prompt\n"), ("m.json", "[]"), ("m.jsonl", "\n\n")],
)
def test_empty_manifest(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ManifestError, match="no rows"):
        load_manifest(write(tmp_path, name, text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"image_url,prompt\nhttps://x/a.jpg,caf\xe9\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        load_manifest(str(path))


# --- s3 ---------------------------------------------------------------------------------------


def test_manifest_from_s3(s3_env: str) -> None:
    s3fs.S3FileSystem().pipe_file(
        f"{s3_env}/manifests/m.csv", f"image_url,prompt\n{IMG},p\n".encode()
    )
    m = load_manifest(f"s3://{s3_env}/manifests/m.csv")
    assert m.source == f"s3://{s3_env}/manifests/m.csv"
    assert [i.prompt for i in m.items] == ["p"]


def test_missing_s3_manifest(s3_env: str) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(f"s3://{s3_env}/manifests/none.jsonl")


def _manifest_of(n: int, fmt: str) -> str:
    rows = [{"id": f"r{k}", "image_url": IMG, "prompt": "p"} for k in range(n)]
    if fmt == "csv":
        return "id,image_url,prompt\n" + "".join(f"r{k},{IMG},p\n" for k in range(n))
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    return json.dumps(rows)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_manifest_of_too_many_rows_is_refused_whole(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows past MAX_MANIFEST_ROWS would fill the worker's memory before a single result is
    written: the file is refused as a whole, saying what to do, and nothing is paid."""
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_ROWS", 5)
    with pytest.raises(ManifestError, match="more than 5 rows: split it"):
        load_manifest(write(tmp_path, f"m.{fmt}", _manifest_of(6, fmt)))
    assert len(load_manifest(write(tmp_path, f"ok.{fmt}", _manifest_of(5, fmt))).items) == 5
