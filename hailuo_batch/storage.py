"""The output store: videos, run records and staged inputs under one fsspec root.

`OutputStore` wraps a local directory or an object-store prefix (s3://bucket/prefix). Writes are
atomic: a reader never sees a partial object under its final key, whatever fails mid-write.
Locally that is a temp file in the same directory plus `os.replace`; on object stores the data
goes to a temporary key that is copied to the final key only once complete, and removed after.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hailuo_batch.images import sniff_image

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

T = TypeVar("T")
CHUNK = 1024 * 1024
REMOTE_BLOCK_SIZE = 8 * 1024 * 1024
"""Multipart part size on object stores: the most a streamed write holds in memory."""
_TEMP_NAME = re.compile(r"\.part-[0-9A-Za-z_]+$")


class IncompleteWriteError(OSError):
    """A streamed write did not produce the expected number of bytes; nothing was stored."""


class PresignUnsupported(RuntimeError):
    """The store cannot hand out URLs that someone else can fetch (e.g. a local directory)."""


class StagingError(RuntimeError):
    """An input image cannot be turned into a URL the provider can fetch."""


@dataclass(frozen=True)
class StoredObject:
    """What a completed write stored."""

    url: str
    size: int
    sha256: str


def video_key(item_id: str) -> str:
    """Key of the finished video of an item."""
    return f"videos/{item_id}.mp4"


def run_key(run_id: str, name: str) -> str:
    """Key of a file belonging to one run (state, report, ...)."""
    return f"runs/{run_id}/{name}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}: use relative 'a/b/c' keys without '..'")
    return key


class OutputStore:
    """A local directory or an fsspec URL prefix holding the outputs."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            root = os.path.abspath(root)
            os.makedirs(root, exist_ok=True)
        self.root: str = root.rstrip("/")
        self.url = self.root if self.is_local else fs.unstrip_protocol(self.root)

    def __repr__(self) -> str:
        return f"OutputStore({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def url_for(self, key: str) -> str:
        """Full URL of `key`: an absolute path locally, else protocol://bucket/prefix/key.

        An empty key gives the URL of the store's root.
        """
        if key == "":
            return self.url
        path = self._path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if it does not exist."""
        return bytes(self.fs.cat_file(self._path(key)))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_bytes_atomic(self, key: str, data: bytes) -> StoredObject:
        if not self.is_local and len(data) <= REMOTE_BLOCK_SIZE:
            # one PUT: an object store makes it visible only once complete
            self.fs.pipe_file(self._path(key), data)
            return StoredObject(self.url_for(key), len(data), hashlib.sha256(data).hexdigest())
        return self.write_stream_atomic(key, [data], expected_size=len(data))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` only if it does not exist; False if it already did.

        Locally a complete temp file is hard-linked into place (atomic, fails if the name
        exists); on S3 the PUT carries `If-None-Match: *`. Readers never see it half-written.
        """
        path = self._path(key)
        if not self.is_local:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except (FileExistsError, PermissionError):
                return False
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    return False
                raise
            return True
        try:
            _publish_local(path, lambda f: f.write(data), os.link)
        except FileExistsError:
            return False
        return True

    def write_text_atomic(self, key: str, text: str) -> StoredObject:
        return self.write_bytes_atomic(key, text.encode("utf-8"))

    def write_stream_atomic(
        self, key: str, chunks: Iterable[bytes], *, expected_size: int | None
    ) -> StoredObject:
        """Stream `chunks` to `key`, hashing as it goes; all or nothing.

        Raises `IncompleteWriteError` if `expected_size` is given and differs from the bytes
        received. On any error nothing is left under `key` (an existing object stays as it was)
        and the temporary data is removed.
        """
        path = self._path(key)
        if self.is_local:
            size, digest = self._write_local(path, chunks, expected_size)
        else:
            size, digest = self._write_remote(path, chunks, expected_size)
        return StoredObject(url=self.url_for(key), size=size, sha256=digest)

    def _write_local(
        self, path: str, chunks: Iterable[bytes], expected_size: int | None
    ) -> tuple[int, str]:
        def write(f: BinaryIO) -> tuple[int, str]:
            size, digest = _copy_hashing(chunks, f.write)
            _check_size(path, size, expected_size)
            return size, digest

        return _publish_local(path, write, os.replace)

    def _write_remote(
        self, path: str, chunks: Iterable[bytes], expected_size: int | None
    ) -> tuple[int, str]:
        # s3fs commits whatever was buffered when a file is closed, even on error, so the data
        # goes to a temporary key and reaches the final key by a server-side copy when complete.
        tmp = f"{path}.part-{uuid.uuid4().hex}"
        f = self.fs.open(tmp, "wb", block_size=REMOTE_BLOCK_SIZE)
        try:
            try:
                size, digest = _copy_hashing(chunks, f.write)
                _check_size(path, size, expected_size)
            except BaseException:
                _abandon(f)
                raise
            f.close()
            self.fs.copy(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(tmp)
        return size, digest

    def remove_temp_files(self, key: str) -> int:
        """Delete temporary files a killed writer left for `key`; returns how many.

        Only call this while holding the item's claim: a live writer's temp file would go too.
        """
        path = self._path(key)
        directory, name = path.rsplit("/", 1)
        pattern = f"{directory}/.{name}.part-*" if self.is_local else f"{path}.part-*"
        removed = 0
        for leftover in self.fs.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(leftover)
                removed += 1
        return removed

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursive, sorted, relative to the root; no temporary files)."""
        base = self._path(prefix.strip("/")) if prefix.strip("/") else self.root
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        keys = []
        for p in found:
            stripped = self.fs._strip_protocol(p)
            if stripped.startswith(self.root + "/") and not _TEMP_NAME.search(stripped):
                keys.append(stripped[len(self.root) + 1 :])
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def presign(self, key: str, expires_s: int) -> str:
        """A time-limited https URL for reading `key` (object stores only)."""
        if self.is_local:
            raise PresignUnsupported(
                f"the output {self.url} is a local directory and cannot hand out URLs; "
                "use an s3:// output to give the provider access to staged files"
            )
        try:
            return str(self.fs.sign(self._path(key), expiration=expires_s))
        except NotImplementedError as exc:
            raise PresignUnsupported(f"the output {self.url} cannot presign URLs") from exc


def _publish_local(
    path: str, write: Callable[[BinaryIO], T], publish: Callable[[str, str], None]
) -> T:
    """Write a complete temp file beside `path` (fsynced, mode 0644), then `publish(tmp, path)`
    (`os.replace` to overwrite, `os.link` to create only if absent). The temp file never
    outlives the call, whatever fails."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.part-")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        publish(tmp, path)
        return result
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _copy_hashing(chunks: Iterable[bytes], write: Any) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        if not chunk:
            continue
        h.update(chunk)
        size += len(chunk)
        write(chunk)
    return size, h.hexdigest()


def _check_size(path: str, size: int, expected: int | None) -> None:
    if expected is not None and size != expected:
        raise IncompleteWriteError(
            f"write to {path} got {size} bytes but {expected} were expected; nothing was stored"
        )


def _abandon(f: Any) -> None:
    """Drop a half-written remote file without committing it (aborts an s3 multipart upload)."""
    discard = getattr(f, "discard", None)
    with contextlib.suppress(Exception):
        if callable(discard):
            discard()
            f.closed = True  # else close() at garbage collection would commit a partial object
        else:
            f.close()


# --- staging input images -----------------------------------------------------------------------


def stage_image(source: str, store: OutputStore, *, settings: Settings) -> str:
    """A URL the provider can fetch for `source`.

    http(s) URLs are returned unchanged; an s3:// (or other signable fsspec) URL becomes a
    presigned URL; a local file is uploaded to `inputs/{sha256}.{ext}` in the store (once) and
    that object is presigned. A local store cannot presign: that raises `StagingError`.
    """
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return source
    if scheme not in ("", "file"):
        return _presign_remote(source, store, settings=settings)
    path = fsspec.core.url_to_fs(source)[1] if scheme == "file" else source
    if store.is_local:
        raise StagingError(
            f"cannot give the provider the local image {source}: with a local output there is "
            "nowhere to upload it. Use an s3:// output (local images are uploaded and presigned), "
            "or serve the images over http(s) and put those URLs in the manifest"
        )
    if not os.path.isfile(path):
        raise StagingError(f"local image not found: {source}")
    digest = _file_sha256(path)
    key = f"inputs/{digest}.{_extension(path)}"
    if not store.exists(key):
        store.write_stream_atomic(key, _file_chunks(path), expected_size=os.path.getsize(path))
    try:
        return store.presign(key, settings.presign_expiry_s)
    except PresignUnsupported as exc:
        raise StagingError(f"cannot give the provider the local image {source}: {exc}") from exc


def _presign_remote(source: str, store: OutputStore, *, settings: Settings) -> str:
    protocol = urlsplit(source).scheme.lower()
    store_protocols = (
        store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    )
    if protocol in store_protocols:
        fs = store.fs  # same credentials and endpoint as the output
    else:
        try:
            fs = fsspec.filesystem(protocol)
        except (ValueError, ImportError) as exc:
            raise StagingError(f"unsupported image URL scheme {protocol}:// in {source}") from exc
    path = fs._strip_protocol(source)
    try:
        if not fs.exists(path):
            raise StagingError(f"input image not found: {source}")
        return str(fs.sign(path, expiration=settings.presign_expiry_s))
    except NotImplementedError as exc:
        raise StagingError(
            f"cannot make a URL the provider can fetch for {source}: {protocol}:// cannot "
            "presign; use http(s) or s3:// image URLs"
        ) from exc


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    for chunk in _file_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def _extension(path: str) -> str:
    with open(path, "rb") as f:
        fmt = sniff_image(f.read(64 * 1024)).format
    if fmt == "jpeg":
        return "jpg"
    if fmt in ("png", "webp", "gif"):
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() else "bin"
