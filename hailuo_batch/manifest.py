"""Load a manifest of images and prompts (CSV, JSON Lines or a JSON array) from any fsspec URL.

Each row becomes a validated `ManifestItem`; each bad row becomes one or more `RowError`s while
the good rows still load. Problems with the file as a whole raise `ManifestError`, and nothing
else: `load_manifest` never lets another exception out.

Parsing is strict, because a row read wrongly is a row paid for wrongly:

- CSV: a quote that is never closed, text after a closing quote, or a NUL byte refuses the file
  with its line number; a header naming a column twice refuses the file; a row with fewer or
  more cells than the header, a value under a nameless column, a line that repeats the header
  (two files pasted together), or a quoted cell spanning lines that look like further rows (an
  unbalanced quote gluing rows together) is an invalid row.
- JSON / JSON Lines: malformed JSON, NaN/Infinity, numbers too long to convert and nesting too
  deep refuse the file (with the line for JSON Lines); an object with the same key twice is an
  invalid row.
- Every cell: control characters (except tab and line breaks in a prompt) and lone surrogates
  make the row invalid; an image URL must be one of the accepted forms (`http(s)://`, `s3://`,
  a plain local path; see `netguard.image_url_kind`), checked here before any I/O.

Row numbers count data rows from 1 in every format: for CSV the header line is not counted
(the first row under the header is row 1) nor are blank lines, for JSON Lines blank lines are
not counted, and for a JSON array row N is the N-th element.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import fsspec
from pydantic import BaseModel, ConfigDict, computed_field, field_validator

from hailuo_batch.apixo.models import Mode, Provider
from hailuo_batch.netguard import ImageUrlError, image_url_kind
from hailuo_batch.secrets import redact_urls
from hailuo_batch.storage import special_file

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image_url", "prompt")
OPTIONAL_COLUMNS = ("id", "mode", "duration", "provider")
STANDARD_DURATIONS = (6, 10)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODE_ALIASES = {
    "standard": Mode.STANDARD,
    "pro": Mode.PRO,
    Mode.STANDARD.value: Mode.STANDARD,
    Mode.PRO.value: Mode.PRO,
}
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""A larger manifest is refused before it is parsed."""
MAX_MANIFEST_ROWS = 100_000
"""More rows are a whole-file error, before they fill the worker's memory (64 MiB of
three-letter rows would be ~11 million of them)."""
MAX_CELL_CHARS = 100_000
"""A longer cell (prompt, URL, ...) makes its row invalid."""


class ManifestError(Exception):
    """The manifest as a whole cannot be used (the message says what to do)."""


class ItemDefaults(BaseModel):
    """Values for empty mode/duration/provider cells."""

    model_config = ConfigDict(frozen=True)

    mode: Mode = Mode.STANDARD
    duration: int = 6
    provider: Provider = Provider.AUTO

    @field_validator("duration")
    @classmethod
    def _check_duration(cls, v: int) -> int:
        if v not in STANDARD_DURATIONS:
            raise ValueError(f"default duration must be 6 or 10 (got {v})")
        return v


class ManifestItem(BaseModel):
    """One validated manifest row. `duration` is None for pro mode (pro is always 6 s)."""

    model_config = ConfigDict(frozen=True)

    id: str
    row: int
    image_url: str
    prompt: str
    mode: Mode
    duration: int | None
    provider: Provider
    dropped_duration: bool = False
    """True when the row gave a duration for pro mode and it was dropped."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def input_hash(self) -> str:
        """sha256 of the canonical inputs; a changed row under the same id has another hash."""
        return input_hash(self.image_url, self.prompt, self.mode, self.duration, self.provider)


def input_hash(
    image_url: str, prompt: str, mode: Mode, duration: int | None, provider: Provider
) -> str:
    """Stable hex sha256 over the inputs that decide the video (same on every machine)."""
    canonical = json.dumps(
        {
            "image_url": image_url,
            "prompt": prompt,
            "mode": Mode(mode).value,
            "duration": duration,
            "provider": Provider(provider).value,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RowError:
    """One problem with one field of one row. `id` is the row's own id when it had a readable,
    valid one that no earlier row used (so its result keeps it); else None."""

    row: int
    field: str
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.reason}"


@dataclass
class Manifest:
    """The loaded manifest: good items, per-row errors, where it came from, how many rows."""

    items: list[ManifestItem]
    errors: list[RowError]
    source: str
    total_rows: int
    columns: list[str] = field(default_factory=list)


# --- reading ----------------------------------------------------------------------------------


def load_manifest(
    url: str, defaults: ItemDefaults | None = None, storage_options: dict | None = None
) -> Manifest:
    """Read and validate the manifest at `url` (local path or fsspec URL such as s3://...).

    Raises only `ManifestError` (a problem with the whole file, with its line when known, and
    the URL's password or signature redacted: a presigned manifest link is a credential);
    every problem confined to a row is a `RowError` in the result.
    """
    try:
        return _load_manifest(url, defaults, storage_options)
    except ManifestError as exc:
        shown = redact_urls(str(exc))
        if shown == str(exc):
            raise
        raise ManifestError(shown) from None


def _load_manifest(
    url: str, defaults: ItemDefaults | None, storage_options: dict | None
) -> Manifest:
    defaults = defaults or ItemDefaults()
    kind = _format_of(url)
    text = _read_text(url, storage_options)
    try:
        if kind == "csv":
            columns, rows = _csv_rows(text, url)
        elif kind == "jsonl":
            columns, rows = _jsonl_rows(text, url)
        else:
            columns, rows = _json_rows(text, url)
        if not rows:
            raise ManifestError(
                f"manifest {url} has no rows: add one row per video "
                f"(columns {', '.join(REQUIRED_COLUMNS)}, optional {', '.join(OPTIONAL_COLUMNS)})"
            )
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(
                f"manifest {url} lacks the required column(s) {', '.join(missing)}; "
                f"found: {', '.join(_shown(c, 40) for c in columns) or '(none)'}"
            )
        items, errors = _validate_rows(rows, defaults)
    except ManifestError:
        raise
    except Exception as exc:  # a bug must not turn into a traceback mid-run: refuse the file
        logger.debug("unexpected error while parsing manifest %s", url, exc_info=True)
        raise ManifestError(
            f"manifest {url} could not be parsed ({type(exc).__name__}); nothing was submitted"
        ) from exc
    return Manifest(items=items, errors=errors, source=url, total_rows=len(rows), columns=columns)


def _format_of(url: str) -> str:
    try:
        path = urlsplit(url).path if "://" in url else url
    except ValueError as exc:
        raise ManifestError(f"manifest URL {_shown(url)} does not parse: {exc}") from exc
    lowered = path.lower()
    for ext, kind in FORMATS.items():
        if lowered.endswith(ext):
            return kind
    raise ManifestError(
        f"cannot tell the manifest format of {_shown(url)}: name it .csv, .jsonl, .ndjson or .json"
    )


def _read_text(url: str, storage_options: dict | None) -> str:
    _refuse_special_file(url)
    options, timeout_s = _with_time_limit(url, dict(storage_options or {}))
    try:
        with fsspec.open(url, "rb", **options) as f:
            data = bytes(f.read(MAX_MANIFEST_BYTES + 1))
    except Exception as exc:
        if timeout_s is not None and _timed_out(exc):
            raise ManifestError(
                f"manifest {url} did not answer within {timeout_s:g} s "
                "(HAILUO_FETCH_TIMEOUT_S): check that its server is up and the URL is right "
                "(try it with curl), or raise HAILUO_FETCH_TIMEOUT_S for a slow server; "
                "nothing was submitted"
            ) from exc
        _refuse_unreadable(url, exc)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest {url} is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB: "
            "split it into several manifests"
        )
    return _decode(data, url)


def _with_time_limit(url: str, options: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """`options` with a time limit (HAILUO_FETCH_TIMEOUT_S) on each http(s) connection and on
    each wait for bytes, and that limit; fsspec's own waits forever for a server that accepts
    the connection and never answers."""
    if fsspec.utils.get_protocol(url) not in ("http", "https"):
        return options, None
    import aiohttp  # fsspec's http file system is built on it

    from hailuo_batch.settings import BadSettingError, get_settings

    try:
        timeout_s = get_settings().fetch_timeout_s
    except BadSettingError as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from None
    client = dict(options.get("client_kwargs") or {})
    # the limit is on each connection and each wait for bytes, not on the whole body: a large
    # manifest over a slow link still arrives, a server that goes silent does not hold the run
    client.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s))
    return {**options, "client_kwargs": client}, timeout_s


def _timed_out(exc: BaseException) -> bool:
    """Whether `exc` is, or was caused by, a timeout (fsspec reports a HEAD and GET that both
    timed out as FileNotFoundError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TimeoutError):  # asyncio's, aiohttp's and fsspec's included
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _refuse_unreadable(url: str, exc: Exception) -> NoReturn:
    """The `ManifestError` for a manifest that could not be read (`exc`)."""
    if isinstance(exc, FileNotFoundError):
        raise ManifestError(f"manifest not found: {url}; check the path or URL") from exc
    if isinstance(exc, IsADirectoryError):
        raise ManifestError(f"manifest {url} is a directory; give the manifest file") from exc
    if isinstance(exc, PermissionError):
        raise ManifestError(f"no permission to read manifest {url}: {exc}") from exc
    raise ManifestError(
        f"cannot read manifest {url}: {type(exc).__name__}: {exc}; "
        "check the URL, credentials and network"
    ) from exc


def _decode(data: bytes, url: str) -> str:
    """UTF-8 (with or without BOM), or UTF-16 when it starts with a UTF-16 BOM."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not data.startswith(
        codecs.BOM_UTF32_LE
    ):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
        if _utf16_without_bom(data[:200]):
            raise ManifestError(
                f"manifest {url} looks like UTF-16 text without a byte order mark: save it as "
                "UTF-8 (or UTF-16 with a BOM)"
            )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {url} is not {encoding.upper().removesuffix('-SIG')} text (line {line}, "
            f"byte {exc.start}); save it as UTF-8"
        ) from exc


def _utf16_without_bom(head: bytes) -> bool:
    """Every other byte a NUL and the others not: ASCII text written as UTF-16 (LE or BE)."""
    half = len(head) // 2
    if half < 4:
        return False
    even, odd = head[0::2].count(0), head[1::2].count(0)
    return (odd >= 0.9 * half and even <= 0.1 * half) or (even >= 0.9 * half and odd <= 0.1 * half)


@dataclass(frozen=True)
class _Raw:
    """One data row as read: its number, its cells, and a structural problem (or None)."""

    row: int
    cells: Mapping[str, Any]
    problem: str | None = None


def _refuse_special_file(url: str) -> None:
    """A local manifest that is a pipe, socket or device would be read forever (or never)."""
    if (kind := special_file(url)) is not None:
        raise ManifestError(
            f"manifest {_shown(url)} is not a regular file ({kind}): give the manifest file itself"
        )


def _csv_rows(text: str, url: str) -> tuple[list[str], list[_Raw]]:
    # a cell longer than MAX_CELL_CHARS is its row's error, not the whole file's: csv's own
    # limit (131,072) would refuse the file, so it is raised to the size of a whole manifest
    csv.field_size_limit(max(csv.field_size_limit(), MAX_MANIFEST_BYTES))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ManifestError(_csv_error(url, exc, 1, reader.line_num)) from exc
    if header is None:
        return [], []
    names = [h.strip().lower() for h in header]
    while names and not names[-1]:
        names.pop()  # trailing separators after the last column name
    _check_header(names, url)
    rows: list[_Raw] = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ManifestError(_csv_error(url, exc, start, reader.line_num)) from exc
        if not any(cell.strip() for cell in record):
            continue  # blank line
        _check_row_count(url, len(rows) + 1)
        if _repeats_header(record, names):  # its "id" cell is no id: the row claims none
            rows.append(_Raw(len(rows) + 1, {}, _repeated_header(names, start)))
            continue
        cells = {name: value for name, value in zip(names, record, strict=False) if name}
        problem = _csv_record_problem(record, names, start, reader.line_num)
        rows.append(_Raw(len(rows) + 1, cells, problem))
    return [c for c in names if c], rows


def _repeats_header(record: list[str], names: list[str]) -> bool:
    """Whether a data line is the header line again (names are case-insensitive and may carry
    spaces, as in the header): two CSV files pasted together, or an export that repeats it."""
    cells = [cell.strip().lower() for cell in record]
    while cells and not cells[-1]:
        cells.pop()
    return cells == names


def _repeated_header(names: list[str], line: int) -> str:
    return (
        f"repeats the header ({', '.join(n for n in names if n)}) on line {line}: a header "
        "belongs on the first line only; delete this line (were two files pasted together?)"
    )


def _check_row_count(url: str, rows: int) -> None:
    if rows > MAX_MANIFEST_ROWS:
        raise ManifestError(
            f"manifest {url} has more than {MAX_MANIFEST_ROWS:,} rows: split it into manifests "
            f"of at most {MAX_MANIFEST_ROWS:,} and run them one after another into the same "
            "output (what one run stored is never paid for again)"
        )


def _check_header(names: list[str], url: str) -> None:
    seen: dict[str, int] = {}
    for pos, name in enumerate(names, start=1):
        if problem := text_problem(name, allow_newlines=False):
            raise ManifestError(
                f"manifest {url}: header column {pos} ({_shown(name, 40)}) {problem}; "
                "fix the header line"
            )
        if not name:
            continue
        if name in seen:
            raise ManifestError(
                f"manifest {url}: the header names column {name!r} twice (columns {seen[name]} "
                f"and {pos}; names are case-insensitive); keep one"
            )
        seen[name] = pos


def _csv_error(url: str, exc: csv.Error, start: int, line: int) -> str:
    if "unexpected end of data" in str(exc):
        return (
            f"manifest {url} is not valid CSV: a quoted cell that starts on line {start} is "
            'never closed; close the quote (write a quote inside a quoted cell as "")'
        )
    return (
        f"manifest {url} is not valid CSV at line {line} (in the row starting on line "
        f"{start}): {exc}; quote cells that contain quotes, commas or line breaks"
    )


def _csv_record_problem(record: list[str], names: list[str], start: int, end: int) -> str | None:
    width = len(names)
    where = f"line {start}" if end == start else f"lines {start}-{end}"
    if len(record) < width:
        return (
            f"has {len(record)} cells but the header has {width} columns ({where}); "
            "give every column a cell, even an empty one"
        )
    if any(cell.strip() for cell in record[width:]):
        return (
            f"has {len(record)} cells but the header has {width} columns ({where}); "
            "quote cells that contain commas"
        )
    for pos, (name, value) in enumerate(zip(names, record, strict=False), start=1):
        if not name and value.strip():
            return f"has a value in column {pos}, which has no name in the header ({where})"
    if end > start:
        for cell in record:
            continuation = cell.replace("\r\n", "\n").replace("\r", "\n").split("\n")[1:]
            if any(line.count(",") >= width - 1 for line in continuation):
                return (
                    f"spans {where} and holds text that looks like further rows: a quote "
                    f"opened on line {start} is probably never closed; keep each row on one line"
                )
    return None


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers keys it saw twice (case-insensitively)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    seen: set[str] = set()
    dups: list[str] = []
    for key, value in pairs:
        norm = key.strip().lower()
        if norm in seen:
            dups.append(key)
        seen.add(norm)
        obj[key] = value
    obj.duplicates = tuple(dups)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in standard JSON")


def _json_value(text: str, url: str, where: str) -> Any:
    """Parse JSON strictly; every way it can fail becomes one clean `ManifestError`."""
    with _json_errors(text, url, where):
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)


@contextlib.contextmanager
def _json_errors(text: str, url: str, where: str) -> Iterator[None]:
    """Every way parsing `text` can fail becomes one clean `ManifestError` (with the line of a
    JSON Lines row in `where`, else the line and column the decoder names)."""
    try:
        yield
    except json.JSONDecodeError as exc:
        line = f"line {where}" if where else f"line {exc.lineno}"
        hint = "; each line must be one JSON object" if where else ""
        ends = {"\r": "CR (U+000D)", "\u2028": "U+2028", "\u2029": "U+2029", "\x85": "NEL"}
        odd = [name for end, name in ends.items() if end in text and "\n" not in text]
        if where and exc.msg == "Extra data" and odd:
            hint = f"; its lines end with {odd[0]} only: save it with LF (or CRLF) line ends"
        raise ManifestError(
            f"manifest {url} has malformed JSON ({line}, column {exc.colno}): {exc.msg}{hint}"
        ) from exc
    except RecursionError as exc:
        raise ManifestError(
            f"manifest {url}: JSON nested too deeply{f' on line {where}' if where else ''}"
        ) from exc
    except ValueError as exc:  # a number with thousands of digits, NaN, Infinity
        why = str(exc)[:200]
        digits = re.search(r"value has (\d+) digits", why)
        if digits:  # Python's own wording names an interpreter setting, not the manifest
            why = f"a number of {digits.group(1)} digits is too long (at most 4300)"
        raise ManifestError(
            f"manifest {url}: unusable JSON value{f' on line {where}' if where else ''}: {why}"
        ) from exc


def _jsonl_rows(text: str, url: str) -> tuple[list[str], list[_Raw]]:
    rows: list[_Raw] = []
    # only "\n" ends a line: str.splitlines() would also split inside strings at U+2028 etc.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        _check_row_count(url, len(rows) + 1)
        value = _json_value(line, url, str(line_no))
        rows.append(_json_row(len(rows) + 1, value))
    return _json_columns(rows), rows


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _json_rows(text: str, url: str) -> tuple[list[str], list[_Raw]]:
    """The rows of a JSON array, decoded one element at a time: a file of millions of tiny
    elements (`[{},{},...]`) is refused at the row limit instead of first filling gigabytes
    of memory with all of them."""
    rows: list[_Raw] = []
    if not text.strip():
        return [], rows
    start = _skip_space(text, 0)
    if not text.startswith("[", start):
        raise ManifestError(
            f"manifest {url} must be a JSON array of objects (got {_top_level(text, start, url)}); "
            "use .jsonl for one object per line"
        )
    with _json_errors(text, url, ""):
        for value in _json_elements(text, start + 1, lambda: _check_row_count(url, len(rows) + 1)):
            rows.append(_json_row(len(rows) + 1, value))
    return _json_columns(rows), rows


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
"""What JSON counts as white space (`str.isspace` counts more)."""


def _skip_space(text: str, pos: int) -> int:
    """The index of the first character at or after `pos` that is not JSON white space."""
    match = _JSON_SPACE.match(text, pos)
    return match.end() if match else pos


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant)


def _json_elements(text: str, pos: int, before_each: Callable[[], None]) -> Iterator[Any]:
    """The elements of the JSON array whose `[` is just before `pos`, one at a time, then a
    check that only white space follows it; `before_each` runs before an element is decoded.
    A malformed array raises the `json.JSONDecodeError` that `json.loads` would."""
    pos = _skip_space(text, pos)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            before_each()
            value, pos = _JSON_DECODER.raw_decode(text, pos)
            yield value
            pos = _skip_space(text, pos)
            if text.startswith("]", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = _skip_space(text, pos + 1)
            if text.startswith("]", pos):  # json.loads says the same of `[1,]`
                raise json.JSONDecodeError("Expecting value", text, pos)
    end = _skip_space(text, pos)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)


def _top_level(text: str, start: int, url: str) -> str:
    """What a JSON text that is not an array holds (`an object`, ...), from its first character
    for an object (never decoded: it may be huge), else by decoding it (a scalar is small)."""
    if text.startswith("{", start):
        return "an object"
    return _a(_json_type(_json_value(text, url, "")))


def _json_row(row: int, value: Any) -> _Raw:
    if not isinstance(value, dict):
        return _Raw(row, {}, f"must be a JSON object (got {_json_type(value)})")
    cells = {str(k).strip().lower(): v for k, v in value.items()}
    dups = getattr(value, "duplicates", ())
    if dups:
        return _Raw(
            row,
            cells,
            f"has the key {_shown(dups[0], 40)} more than once (keys are case-insensitive); "
            "keep one",
        )
    return _Raw(row, cells)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (an object parses as `_JsonObject`, a dict)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "number"


def _json_columns(rows: list[_Raw]) -> list[str]:
    """Every key seen in any object, first-seen order (a column exists if any row has it)."""
    seen: dict[str, None] = {}
    for raw in rows:
        seen.update(dict.fromkeys(raw.cells))
    # Rows that are not objects are row errors; they must not make a column look missing.
    if not seen and any(raw.problem for raw in rows):
        return list(REQUIRED_COLUMNS)
    return list(seen)


# --- validation -------------------------------------------------------------------------------


def _validate_rows(
    rows: list[_Raw], defaults: ItemDefaults
) -> tuple[list[ManifestItem], list[RowError]]:
    items: list[ManifestItem] = []
    errors: list[RowError] = []
    # by `id_key`: the first row, the id as it wrote it, and whether it was derived (no id)
    first_row_of: dict[str, tuple[int, str, bool]] = {}
    for raw in rows:
        row = raw.row
        if raw.problem is not None:
            own = _readable_id(raw.cells.get("id"))
            if own is not None and id_key(own) in first_row_of:
                own = None  # another row has it: the result must not take its name
            elif own is not None:
                first_row_of[id_key(own)] = (row, own, False)
            errors.append(RowError(row, "row", raw.problem, own))
            continue
        row_errors: list[RowError] = []
        fields = _RowFields(row, raw.cells, defaults, row_errors)
        explicit_id = fields.explicit_id()
        if row_errors:
            own = _claim_id(explicit_id, row, first_row_of, row_errors)
            errors.extend(_with_id(row_errors, own))
            continue
        item_id = (
            explicit_id
            or "item-"
            + input_hash(
                fields.image_url, fields.prompt, fields.mode, fields.duration, fields.provider
            )[:12]
        )
        own = _claim_id(item_id, row, first_row_of, row_errors, derived=explicit_id is None)
        if row_errors:
            errors.extend(_with_id(row_errors, own if explicit_id else None))
            continue
        items.append(
            ManifestItem(
                id=item_id,
                row=row,
                image_url=fields.image_url,
                prompt=fields.prompt,
                mode=fields.mode,
                duration=fields.duration,
                provider=fields.provider,
                dropped_duration=fields.dropped_duration,
            )
        )
    return items, errors


def _with_id(errors: list[RowError], item_id: str | None) -> list[RowError]:
    return [RowError(e.row, e.field, e.reason, item_id) for e in errors]


def _claim_id(
    item_id: str | None,
    row: int,
    first: dict[str, tuple[int, str, bool]],
    errors: list[RowError],
    *,
    derived: bool = False,
) -> str | None:
    """Claim `item_id` for `row`; the id if it is the row's own, None if taken (an error).
    `derived`: the row has no id and `item_id` comes from its inputs; the message then speaks
    of the inputs, never of an id the person did not write."""
    if item_id is None:
        return None
    taken = first.get(id_key(item_id))
    if taken is None:
        first[id_key(item_id)] = (row, item_id, derived)
        return item_id
    first_row, first_id, first_derived = taken
    if derived and first_derived:
        reason = (
            f"has the same inputs as row {first_row} (image, prompt, mode, duration and "
            "provider) and neither has an id, so both would be the same video, made once; to "
            "get several clips of the same inputs, give each row its own value in an id column"
        )
    elif derived:
        reason = (
            f"has no id, and the id made from its inputs, {item_id!r}, is the one row "
            f"{first_row} gives: give this row its own value in the id column"
        )
    elif first_derived:
        reason = (
            f"duplicate id {item_id!r}: row {first_row} has no id, and the id made from its "
            "inputs is this one; choose another id"
        )
    elif first_id != item_id:
        reason = (
            f"duplicate id {item_id!r}: row {first_row} has {first_id!r}, which differs only "
            "in case (an id names the item's files, and some stores ignore case)"
        )
    else:
        reason = f"duplicate id {item_id!r} (first used on row {first_row})"
    errors.append(RowError(row, "id", reason))
    return None


def id_key(item_id: str) -> str:
    """What two ids must not share: ids name files (`ledger/{id}.json`, `videos/{id}.mp4`), and
    a case-insensitive store (macOS, Windows, some S3-compatible ones) sees `A1` and `a1` as
    one."""
    return item_id.lower()


def _readable_id(value: Any) -> str | None:
    """`value` as an id if it is one (the same rules as the id column), else None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip() if isinstance(value, str) or abs(value) < 10**130 else ""
    return text if is_item_id(text) else None


def is_item_id(text: str) -> bool:
    """Whether `text` is an item id: safe as a file name in every store, never a path."""
    return bool(ID_PATTERN.fullmatch(text)) and ".." not in text


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def text_problem(text: str, *, allow_newlines: bool) -> str | None:
    """Why `text` cannot be used as a cell (control character, lone surrogate, too long)."""
    if len(text) > MAX_CELL_CHARS:
        return f"is longer than {MAX_CELL_CHARS} characters"
    for pos, ch in enumerate(text, start=1):
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return f"contains a lone surrogate (U+{ord(ch):04X}) at position {pos}"
        if cat == "Cc" and not (allow_newlines and ch in "\t\n\r"):
            return f"contains a control character (U+{ord(ch):04X}) at position {pos}"
    return None


def _shown(value: Any, limit: int = 80) -> str:
    """A cell value for a message: repr (control characters escaped), cut to `limit`."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return f"a JSON {_json_type(value)}"
    text = repr(redact_urls(value)[: limit + 1]) if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _RowFields:
    """Parses the cells of one row, appending a RowError for every bad field."""

    def __init__(
        self, row: int, cells: Mapping[str, Any], defaults: ItemDefaults, errors: list[RowError]
    ) -> None:
        self.row, self.cells, self.errors = row, cells, errors
        self.image_url = self._required_text("image_url")
        if self.image_url:
            try:
                image_url_kind(self.image_url)
            except ImageUrlError as exc:
                self._error("image_url", str(exc))
        self.prompt = self._required_text("prompt", allow_newlines=True)
        self.mode = self._choice("mode", defaults.mode, MODE_ALIASES, "standard or pro")
        self.provider = self._choice(
            "provider",
            defaults.provider,
            {p.value: p for p in Provider},
            " or ".join(p.value for p in Provider),
        )
        self.dropped_duration = False
        self.duration = self._duration(defaults.duration)

    def _error(self, name: str, reason: str) -> None:
        self.errors.append(RowError(self.row, name, reason))

    def _required_text(self, name: str, *, allow_newlines: bool = False) -> str:
        value = self.cells.get(name)
        if _blank(value):
            self._error(name, "is required and must not be empty")
            return ""
        if not isinstance(value, str):
            self._error(name, f"must be text (got {_json_type(value)})")
            return ""
        problem = text_problem(value, allow_newlines=allow_newlines)
        if problem:
            self._error(name, problem)
            return ""
        return value.strip()

    def _text(self, name: str) -> str | None:
        """The cell as stripped text for a choice field; None (with an error) if unusable."""
        value = self.cells.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self._error(name, f"must be text (got {_json_type(value)})")
            return None
        text = value if isinstance(value, str) else repr(value)
        problem = text_problem(text, allow_newlines=False)
        if problem:
            self._error(name, problem)
            return None
        return text.strip()

    def _choice(self, name: str, default: Any, allowed: Mapping[str, Any], shown: str) -> Any:
        if _blank(self.cells.get(name)):
            return default
        text = self._text(name)
        if text is None:
            return default
        key = text.lower()
        if key not in allowed:
            self._error(name, f"must be {shown} (got {_shown(text)})")
            return default
        return allowed[key]

    def _duration(self, default: int) -> int | None:
        value = self.cells.get("duration")
        pro = self.mode == Mode.PRO
        if _blank(value):
            return None if pro else default
        number = _as_int(value)
        if number is None:
            self._error(
                "duration",
                f"must be a whole number of seconds, 6 or 10 (got {_shown(value)})"
                + ("; pro mode is always 6 s, so it can be left empty" if pro else ""),
            )
            return None if pro else default
        if number not in STANDARD_DURATIONS:
            reason = (
                f"pro mode is always 6 s: leave duration empty, or give 6 or 10 (got {number})"
                if pro
                else f"must be 6 or 10 for standard mode (got {number})"
            )
            self._error("duration", reason)
            return None if pro else default
        if pro:
            self.dropped_duration = True
            return None
        return number

    def explicit_id(self) -> str | None:
        value = self.cells.get("id")
        if _blank(value):
            return None
        if isinstance(value, float) and math.isfinite(value):  # 1.0: "1" or "1.0"?
            self._error(
                "id",
                f"must be text or a whole number (got {value!r}): write it as text, "
                f'"{value!r}", if that is the id',
            )
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            self._error("id", f"must be text (got {_json_type(value)})")
            return None
        own = _readable_id(value)
        if own is None:
            self._error(
                "id",
                f"{_shown(str(value).strip() if isinstance(value, str) else value)} is not a "
                "valid id: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit, without '..' or slashes",
            )
        return own


def _as_int(value: Any) -> int | None:
    """An int from an int, an integral float or a numeric string ("10", "10.0"); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e15 else None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,9})(\.0*)?\s*", value)
        return int(match.group(1)) if match else None
    return None
