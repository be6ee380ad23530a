"""The output store: videos, run records and staged inputs under one fsspec root.

`OutputStore` wraps a local directory or an object-store prefix (s3://bucket/prefix). Writes are
atomic: a reader never sees a partial object under its final key, whatever fails mid-write, and a
write given a `verify` check (a video must decode) publishes only bytes that passed it.

Names come from two disjoint spaces:

- final keys: `videos/{id}.mp4` for an item's first video, `videos/{id}~{variant}.mp4` for a
  video of changed inputs under the same id (`~` is outside the id alphabet), run records,
  ledger entries, ...; no key may start with `tmp/`;
- temporaries: locally `{root}/tmp/{token}~{random}.part`, where `token` is the key percent-encoded
  into one path component (so it holds neither `/` nor `~`); on object stores a spool file in a
  local directory, uploaded to the final key only once complete and verified. A temporary's name
  therefore tells exactly which key it belongs to, and `remove_temp_files(key)` removes that
  key's temporaries and nothing else.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import mimetypes
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote, urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hailuo_batch.images import sniff_image
from hailuo_batch.video import VideoInfo, verify_mp4

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1024 * 1024
REMOTE_BLOCK_SIZE = 8 * 1024 * 1024
"""Multipart part size on object stores: an upload holds at most two of these in memory."""

VIDEO_DIR = "videos"
VIDEO_SUFFIX = ".mp4"
VARIANT_SEP = "~"
TEMP_DIR = "tmp"
"""Top-level folder of local temporaries; no key may live under it."""
TEMP_SUFFIX = ".part"

ITEM_ID_CHARS = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""Every id a video key accepts (the manifest is stricter: no leading '.', no '..')."""
VARIANT_CHARS = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_MAX = 236  # token + "~" + 8 random + ".part" stays within a 255-byte file name
_LEGACY_LOCAL_TEMP = re.compile(r"(^|/)\.[^/]+\.part-[a-z0-9_]{8}$")
_LEGACY_REMOTE_TEMP = re.compile(r"\.part-[0-9a-f]{32}$")


class IncompleteWriteError(OSError):
    """A streamed write did not produce the expected number of bytes; nothing was stored."""


class PresignUnsupported(RuntimeError):
    """The store cannot hand out URLs that someone else can fetch (e.g. a local directory)."""


class StagingError(RuntimeError):
    """An input image cannot be turned into a URL the provider can fetch."""


@dataclass(frozen=True)
class StoredObject:
    """What a completed write stored; `info` is what the write's `verify` check returned."""

    url: str
    size: int
    sha256: str
    info: VideoInfo | None = None


Verify = Callable[[str], VideoInfo | None]
"""Checks a complete local copy of the bytes (its path) before they are published; raises to
refuse them."""


# --- names --------------------------------------------------------------------------------------


def video_key(item_id: str, variant: str | None = None) -> str:
    """Key of an item's video: `videos/{id}.mp4`, or `videos/{id}~{variant}.mp4` for a video of
    other inputs under the same id (`variant`, e.g. a prefix of the inputs' hash, is 1-64 of
    letters, digits, `_` and `-`).

    Distinct (id, variant) pairs give distinct keys: ids cannot contain `~`, variants cannot
    contain `.`. Raises ValueError for an id outside `[A-Za-z0-9._-]{1,128}` or a bad variant.
    """
    if not ITEM_ID_CHARS.fullmatch(item_id):
        raise ValueError(f"invalid item id {item_id!r} for a video key")
    if variant is None:
        return f"{VIDEO_DIR}/{item_id}{VIDEO_SUFFIX}"
    if not VARIANT_CHARS.fullmatch(variant):
        raise ValueError(f"invalid video variant {variant!r}: 1-64 of [A-Za-z0-9_-]")
    return f"{VIDEO_DIR}/{item_id}{VARIANT_SEP}{variant}{VIDEO_SUFFIX}"


def run_key(run_id: str, name: str) -> str:
    """Key of a file belonging to one run (state, report, ...)."""
    return f"runs/{run_id}/{name}"


def temp_token(key: str) -> str:
    """`key` as one file-name component without `/` or `~`: distinct keys, distinct tokens.

    Percent-encoding (with `~` encoded too) is injective; a key too long for a file name is
    replaced by `+` and its sha256 (`+` never appears in an encoding). Video keys always fit.
    """
    token = quote(key, safe="").replace("~", "%7E")
    if len(token) > _TOKEN_MAX:
        return "+" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return token


def is_temp_of(name: str, key: str) -> bool:
    """Whether the file name `name` (no folder) is a temporary of `key`."""
    if not name.endswith(TEMP_SUFFIX) or VARIANT_SEP not in name:
        return False
    return name.rsplit(VARIANT_SEP, 1)[0] == temp_token(key)


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}: use relative 'a/b/c' keys without '..'")
    if parts[0] == TEMP_DIR:
        raise ValueError(f"invalid store key {key!r}: {TEMP_DIR}/ holds temporary files only")
    return key


def is_temporary(relative: str) -> bool:
    """Whether a path relative to the root is a temporary (ours, or an older version's)."""
    return (
        relative.split("/", 1)[0] == TEMP_DIR
        or bool(_LEGACY_LOCAL_TEMP.search(relative))
        or bool(_LEGACY_REMOTE_TEMP.search(relative))
    )


def _default_spool_dir() -> str:
    uid = getattr(os, "getuid", lambda: 0)()
    return os.path.join(tempfile.gettempdir(), f"hailuo-batch-spool-{uid}")


class OutputStore:
    """A local directory or an fsspec URL prefix holding the outputs.

    `spool_dir` (object stores only) is the local folder where a streamed write is assembled and
    checked before it is uploaded; by default a per-user folder in the system temp directory.
    """

    def __init__(
        self, url: str, storage_options: dict | None = None, *, spool_dir: str | None = None
    ) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            root = os.path.abspath(root)
            os.makedirs(root, exist_ok=True)
        self.root: str = root.rstrip("/")
        self.url = self.root if self.is_local else fs.unstrip_protocol(self.root)
        self.spool_dir = spool_dir or _default_spool_dir()

    def __repr__(self) -> str:
        return f"OutputStore({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    @property
    def _temp_dir(self) -> str:
        return f"{self.root}/{TEMP_DIR}"

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

    def sha256(self, key: str) -> str:
        """The object's sha256, read a block at a time (a video is never held whole in
        memory); FileNotFoundError if it does not exist."""
        with self.fs.open(self._path(key), "rb", block_size=CHUNK) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

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
                if _precondition_failed(exc):
                    return False
                raise
            return True
        try:
            self._publish_local(key, lambda f: f.write(data), os.link)
        except FileExistsError:
            return False
        return True

    def write_text_atomic(self, key: str, text: str) -> StoredObject:
        return self.write_bytes_atomic(key, text.encode("utf-8"))

    def write_stream_atomic(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        expected_size: int | None,
        verify: Verify | None = None,
        exclusive: bool = False,
    ) -> StoredObject:
        """Stream `chunks` to `key`, hashing as it goes; all or nothing.

        The bytes are assembled in a temporary file first. Raises `IncompleteWriteError` if
        `expected_size` is given and differs from the bytes received; then `verify(path)` (if
        given) checks the complete temporary file and may raise to refuse it; its return value
        becomes the result's `info`. Only then do the bytes appear under `key`. With
        `exclusive`, an existing object under `key` is never replaced: FileExistsError.

        On any error nothing new is left under `key` (an existing object stays as it was) and
        the temporary data is removed.
        """
        if self.is_local:

            def write(f: BinaryIO) -> tuple[int, str]:
                return _copy_hashing(chunks, f.write)

            (size, digest), info = self._publish_local(
                key, write, os.link if exclusive else os.replace, expected_size, verify
            )
        else:
            size, digest, info = self._write_remote(key, chunks, expected_size, verify, exclusive)
        return StoredObject(url=self.url_for(key), size=size, sha256=digest, info=info)

    def _publish_local(
        self,
        key: str,
        write: Callable[[BinaryIO], T],
        publish: Callable[[str, str], None],
        expected_size: int | None = None,
        verify: Verify | None = None,
    ) -> tuple[T, VideoInfo | None]:
        """Write a complete temp file in `{root}/tmp` (fsynced, mode 0644), check its size and
        `verify` it, then `publish(tmp, path)` (`os.replace` to overwrite, `os.link` to create
        only if absent). The temp file never outlives the call, whatever fails."""
        path = self._path(key)
        os.makedirs(self._temp_dir, exist_ok=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self._temp_dir, prefix=temp_token(key) + VARIANT_SEP, suffix=TEMP_SUFFIX
        )
        try:
            with os.fdopen(fd, "wb") as f:
                result = write(f)
                f.flush()
                os.fsync(f.fileno())
            _check_size(path, os.path.getsize(tmp), expected_size)
            info = verify(tmp) if verify is not None else None
            os.chmod(tmp, 0o644)
            publish(tmp, path)
            return result, info
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _write_remote(
        self,
        key: str,
        chunks: Iterable[bytes],
        expected_size: int | None,
        verify: Verify | None,
        exclusive: bool,
    ) -> tuple[int, str, VideoInfo | None]:
        # The bytes are spooled to a local file, checked there, and only then uploaded to the
        # final key: one PUT, or a multipart upload that S3 shows only once completed (s3fs
        # aborts it on error). Memory stays within two multipart blocks.
        path = self._path(key)
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        fd, spool = tempfile.mkstemp(
            dir=self.spool_dir, prefix=self._spool_prefix(key), suffix=TEMP_SUFFIX
        )
        try:
            with os.fdopen(fd, "wb") as f:
                size, digest = _copy_hashing(chunks, f.write)
            _check_size(path, size, expected_size)
            info = verify(spool) if verify is not None else None
            extra: dict[str, Any] = {}
            content_type = mimetypes.guess_type(key)[0]
            if content_type and hasattr(self.fs, "call_s3"):  # s3fs: browsers play videos inline
                extra["ContentType"] = content_type
            try:
                self.fs.put_file(
                    spool,
                    path,
                    chunksize=REMOTE_BLOCK_SIZE,
                    mode="create" if exclusive else "overwrite",
                    **extra,
                )
            except OSError as exc:
                if exclusive and _precondition_failed(exc):
                    raise FileExistsError(f"{self.url_for(key)} already exists") from exc
                raise
            self._check_uploaded(key, path, size)
            return size, digest, info
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool)

    def _check_uploaded(self, key: str, path: str, size: int) -> None:
        """One HEAD after the upload: a store (or a proxy before it) that answered the PUT but
        keeps nothing, or other bytes, must not leave a run reporting a stored video."""
        self.fs.invalidate_cache(path)
        try:
            held = self.fs.info(path).get("size")
        except FileNotFoundError:
            held = None
        if held != size:
            got = "nothing" if held is None else f"{held:,} bytes"
            if held is not None:  # not the verified bytes: never left under a final name
                with contextlib.suppress(Exception):
                    self.fs.rm_file(path)
            raise OSError(
                f"{self.url_for(key)}: the store accepted the upload of {size:,} bytes but holds "
                f"{got}"
            )

    def _spool_prefix(self, key: str) -> str:
        """Spool files of `key` in this store: a digest of the key's full URL, then `~`."""
        return hashlib.sha256(self.url_for(key).encode("utf-8")).hexdigest() + VARIANT_SEP

    def remove_temp_files(self, key: str) -> int:
        """Delete the temporaries a killed writer left for exactly `key`; returns how many.

        Locally: `{root}/tmp` files of this key (and an older version's `.{name}.part-*` beside
        it). Object stores: this key's spool files, its unfinished multipart uploads (S3) and an
        older version's `{key}.part-{uuid}` objects. Nothing of another key is touched.
        Only call this while holding the item's claim: a live writer's temp file would go too.
        """
        path = self._path(key)
        directory, name = path.rsplit("/", 1)
        removed = 0
        if self.is_local:
            candidates = _listdir(self._temp_dir)
            own = [f"{self._temp_dir}/{n}" for n in candidates if is_temp_of(n, key)]
            legacy = re.compile(re.escape(f".{name}.part-") + r"[a-z0-9_]{8}")
            pattern = os.path.join(glob.escape(directory), glob.escape(f".{name}.part-") + "*")
            own += [p for p in glob.glob(pattern) if legacy.fullmatch(os.path.basename(p))]
            for p in own:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    removed += 1
            return removed
        prefix = self._spool_prefix(key)
        for n in _listdir(self.spool_dir):
            if n.startswith(prefix) and n.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.spool_dir, n))
                    removed += 1
        try:
            removed += self._abort_uploads(path)
        except OSError as exc:  # e.g. no s3:ListBucketMultipartUploads: parts cost, never show
            logger.warning("cannot list unfinished uploads of %s: %s", self.url_for(key), exc)
        legacy = re.compile(re.escape(path) + r"\.part-[0-9a-f]{32}")
        self.fs.invalidate_cache(directory)
        try:
            found = self.fs.find(directory, prefix=f"{name}.part-")
        except (FileNotFoundError, TypeError):  # TypeError: a filesystem without `prefix`
            found = []
        for leftover in found:
            if legacy.fullmatch(self.fs._strip_protocol(leftover)):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(leftover)
                    removed += 1
        return removed

    def _abort_uploads(self, path: str) -> int:
        """Abort S3 multipart uploads of exactly `path` (a killed upload's invisible parts)."""
        call_s3 = getattr(self.fs, "call_s3", None)
        split_path = getattr(self.fs, "split_path", None)
        if call_s3 is None or split_path is None:
            return 0
        bucket, key, _ = split_path(path)
        answer = call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        aborted = 0
        for upload in answer.get("Uploads", []):
            if upload.get("Key") == key:
                with contextlib.suppress(FileNotFoundError):
                    call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                    )
                    aborted += 1
        return aborted

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        """Keys under `prefix` (sorted, relative to the root; no temporary files), listed afresh
        (other processes write here too). `recursive=False`: only objects directly under it."""
        base = self._path(prefix.strip("/")) if prefix.strip("/") else self.root
        self.fs.invalidate_cache(base)
        try:
            if recursive:
                found = list(self.fs.find(base))
            else:
                entries = self.fs.ls(base, detail=True)
                found = [e["name"] for e in entries if e.get("type") == "file"]
        except FileNotFoundError:
            return []
        keys = []
        for p in found:
            stripped = self.fs._strip_protocol(p)
            if stripped.startswith(self.root + "/"):
                relative = stripped[len(self.root) + 1 :]
                if not is_temporary(relative):
                    keys.append(relative)
        return sorted(keys)

    def move(self, src: str, dst: str) -> None:
        """Move `src` to `dst` (a rename locally, copy then delete on object stores);
        FileNotFoundError when `src` is not there (another process moved it first)."""
        target = self._path(dst)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self.fs.mv(self._path(src), target)

    def prune(self, prefix: str) -> None:
        """Remove the local folder `prefix` if it is empty (object stores have no folders)."""
        if self.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self._path(prefix))

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def delete_if_unchanged(self, key: str, expected: bytes) -> bool:
        """Remove `key` only while it holds `expected`; False when it holds something else (or
        nothing): what another writer put there in between is never removed.

        On S3 the DELETE carries `If-Match` with the ETag of the object whose bytes were just
        compared. Locally the file is first renamed aside (atomic); what was moved is removed
        if it was `expected`, else linked back (unless yet another file took the name)."""
        path = self._path(key)
        if not self.is_local:
            try:
                etag = self.fs.info(path, refresh=True)["ETag"]
                if bytes(self.fs.cat_file(path)) != expected:
                    return False
                bucket, name, _ = self.fs.split_path(path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=etag)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                # a store that refuses a conditional DELETE: a plain one, after looking again
                logger.warning("conditional delete of %s refused (%s): deleting plainly", key, exc)
                if bytes(self.fs.cat_file(path)) != expected:
                    return False
                self.fs.rm_file(path)
            finally:
                self.fs.invalidate_cache(path)
            return True
        aside = f"{path}.aside-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                if f.read(len(expected) + 1) == expected:
                    return True
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # another writer's: back in place
            return False
        finally:
            os.unlink(aside)

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


def store_video_verified(
    store: OutputStore,
    key: str,
    chunks: Iterable[bytes],
    expected_size: int | None,
    *,
    exclusive: bool = False,
) -> StoredObject:
    """Store a downloaded video under `key` only if it is a complete MP4 that decodes.

    The result's `info` holds its duration, size and codec. Raises `NotAVideoError` (a
    ValueError) for bytes that are not a video, `IncompleteWriteError` for a length other than
    `expected_size`; either way nothing new is under `key`.
    """
    return store.write_stream_atomic(
        key, chunks, expected_size=expected_size, verify=verify_mp4, exclusive=exclusive
    )


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a failed write was refused because the object exists (`If-None-Match: *`)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None)  # s3fs keeps botocore's error as cause
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")
    return "PreconditionFailed" in str(exc)


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


def special_file(url: str) -> str | None:
    """What a local path (or file:// URL) is when it is no regular file or folder ("a pipe,
    socket or device": reading it could block forever or never end), else None."""
    path = url.removeprefix("file://") if url.startswith("file://") or "://" not in url else None
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # a missing file is reported when it is opened
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a pipe, socket or device"


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extension(path: str) -> str:
    with open(path, "rb") as f:
        fmt = sniff_image(f.read(64 * 1024)).format
    if fmt == "jpeg":
        return "jpg"
    if fmt in ("png", "webp", "gif"):
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() else "bin"
