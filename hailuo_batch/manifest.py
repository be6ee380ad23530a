"""Load a manifest of images and prompts (CSV, JSON Lines or a JSON array) from any fsspec URL.

Each row becomes a validated `ManifestItem`; each bad row becomes one or more `RowError`s while
the good rows still load. Problems with the file as a whole raise `ManifestError`.

Row numbers count data rows from 1 in every format: for CSV the header line is not counted
(the first row under the header is row 1), for JSON Lines blank lines are not counted, and for
a JSON array row N is the N-th element.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import fsspec
from pydantic import BaseModel, ConfigDict, computed_field, field_validator

from hailuo_batch.apixo.models import Mode, Provider

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
    """One problem with one field of one row."""

    row: int
    field: str
    reason: str

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
    """Read and validate the manifest at `url` (local path or fsspec URL such as s3://...)."""
    defaults = defaults or ItemDefaults()
    kind = _format_of(url)
    text = _read_text(url, storage_options)
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
            f"found: {', '.join(columns) or '(none)'}"
        )
    items, errors = _validate_rows(rows, defaults)
    return Manifest(items=items, errors=errors, source=url, total_rows=len(rows), columns=columns)


def _format_of(url: str) -> str:
    path = urlsplit(url).path if "://" in url else url
    lowered = path.lower()
    for ext, kind in FORMATS.items():
        if lowered.endswith(ext):
            return kind
    raise ManifestError(
        f"cannot tell the manifest format of {url}: name it .csv, .jsonl, .ndjson or .json"
    )


def _read_text(url: str, storage_options: dict | None) -> str:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest not found: {url}; check the path or URL") from exc
    except IsADirectoryError as exc:
        raise ManifestError(f"manifest {url} is a directory; give the manifest file") from exc
    except PermissionError as exc:
        raise ManifestError(f"no permission to read manifest {url}: {exc}") from exc
    except Exception as exc:
        raise ManifestError(
            f"cannot read manifest {url}: {type(exc).__name__}: {exc}; "
            "check the URL, credentials and network"
        ) from exc
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {url} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from exc


Row = tuple[int, Mapping[str, Any], str | None]
"""(row number, cells, a structural problem with the row or None)."""


def _csv_rows(text: str, url: str) -> tuple[list[str], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        columns = [h.strip().lower() for h in header]
        rows: list[Row] = []
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            problem = None
            if len(record) > len(columns):
                problem = (
                    f"has {len(record)} cells but the header has {len(columns)} columns "
                    "(quote cells that contain commas)"
                )
            cells = dict(zip(columns, record, strict=False))
            rows.append((len(rows) + 1, cells, problem))
    except csv.Error as exc:
        raise ManifestError(
            f"manifest {url} is not valid CSV (line {reader.line_num}): {exc}"
        ) from exc
    return [c for c in columns if c], rows


def _jsonl_rows(text: str, url: str) -> tuple[list[str], list[Row]]:
    rows: list[Row] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"manifest {url} has malformed JSON on line {line_no}: {exc.msg} "
                f"(column {exc.colno}); each line must be one JSON object"
            ) from exc
        rows.append(_json_row(len(rows) + 1, value))
    return _json_columns(rows), rows


def _json_rows(text: str, url: str) -> tuple[list[str], list[Row]]:
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"manifest {url} is malformed JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    if not isinstance(value, list):
        raise ManifestError(
            f"manifest {url} must be a JSON array of objects (got a {type(value).__name__}); "
            "use .jsonl for one object per line"
        )
    rows = [_json_row(i, v) for i, v in enumerate(value, start=1)]
    return _json_columns(rows), rows


def _json_row(row: int, value: Any) -> Row:
    if isinstance(value, dict):
        return (row, {str(k).strip().lower(): v for k, v in value.items()}, None)
    return (row, {}, f"must be a JSON object (got {type(value).__name__})")


def _json_columns(rows: list[Row]) -> list[str]:
    """Every key seen in any object, first-seen order (a column exists if any row has it)."""
    seen: dict[str, None] = {}
    for _, cells, problem in rows:
        if problem is None:
            seen.update(dict.fromkeys(cells))
    # Rows that are not objects are row errors; they must not make a column look missing.
    if not seen and any(p for _, _, p in rows):
        return list(REQUIRED_COLUMNS)
    return list(seen)


# --- validation -------------------------------------------------------------------------------


def _validate_rows(
    rows: list[Row], defaults: ItemDefaults
) -> tuple[list[ManifestItem], list[RowError]]:
    items: list[ManifestItem] = []
    errors: list[RowError] = []
    first_row_of: dict[str, int] = {}
    for row, cells, problem in rows:
        if problem is not None:
            errors.append(RowError(row, "row", problem))
            continue
        row_errors: list[RowError] = []
        fields = _RowFields(row, cells, defaults, row_errors)
        explicit_id = fields.explicit_id()
        if row_errors:
            _claim_id(explicit_id, row, first_row_of, row_errors)
            errors.extend(row_errors)
            continue
        item_id = (
            explicit_id
            or "item-"
            + input_hash(
                fields.image_url, fields.prompt, fields.mode, fields.duration, fields.provider
            )[:12]
        )
        _claim_id(item_id, row, first_row_of, row_errors)
        if row_errors:
            errors.extend(row_errors)
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


def _claim_id(item_id: str | None, row: int, first: dict[str, int], errors: list[RowError]) -> None:
    if item_id is None:
        return
    if item_id in first:
        errors.append(
            RowError(row, "id", f"duplicate id {item_id!r} (first used on row {first[item_id]})")
        )
    else:
        first[item_id] = row


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _RowFields:
    """Parses the cells of one row, appending a RowError for every bad field."""

    def __init__(
        self, row: int, cells: Mapping[str, Any], defaults: ItemDefaults, errors: list[RowError]
    ) -> None:
        self.row, self.cells, self.errors = row, cells, errors
        self.image_url = self._required_text("image_url")
        self.prompt = self._required_text("prompt")
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

    def _required_text(self, name: str) -> str:
        value = self.cells.get(name)
        if _blank(value):
            self._error(name, "is required and must not be empty")
            return ""
        if not isinstance(value, str):
            self._error(name, f"must be text (got {type(value).__name__})")
            return ""
        return value.strip()

    def _choice(self, name: str, default: Any, allowed: Mapping[str, Any], shown: str) -> Any:
        value = self.cells.get(name)
        if _blank(value):
            return default
        key = str(value).strip().lower()
        if key not in allowed:
            self._error(name, f"must be {shown} (got {value!r})")
            return default
        return allowed[key]

    def _duration(self, default: int) -> int | None:
        value = self.cells.get("duration")
        if self.mode == Mode.PRO:
            self.dropped_duration = not _blank(value)
            return None
        if _blank(value):
            return default
        number = _as_int(value)
        if number is None:
            self._error("duration", f"must be a whole number of seconds, 6 or 10 (got {value!r})")
            return default
        if number not in STANDARD_DURATIONS:
            self._error("duration", f"must be 6 or 10 for standard mode (got {number})")
            return default
        return number

    def explicit_id(self) -> str | None:
        value = self.cells.get("id")
        if _blank(value):
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            self._error("id", f"must be text (got {type(value).__name__})")
            return None
        text = str(value).strip()
        if not ID_PATTERN.fullmatch(text) or ".." in text:
            self._error(
                "id",
                f"{text!r} is not a valid id: use 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit, without '..' or slashes",
            )
            return None
        return text


def _as_int(value: Any) -> int | None:
    """An int from an int, an integral float or a numeric string ("10", "10.0"); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.0*)?\s*", value):
        return int(float(value))
    return None
