"""Where data products live: a local directory or S3, behind one small interface.

::

    store = storage_from_config(config.storage)        # file://… or s3://bucket/prefix
    info = store.put("42-sn2023ixf/lco/1234/frame.fits", response_stream, size=n, md5=m)
    with store.open(info.key) as f:                     # a binary stream, never a path
        header = f.read(2880)

Keys are ``/``-separated relative paths. Facility data uses
``target/facility/request/filename`` (:func:`product_key`), skymaps
``notices/source/event_id/name``; every component is sanitised and ``..``
is refused, so a facility's file name can never escape the store.

``put`` reads the stream in chunks (never the whole file in memory), hashes
it (MD5) while writing, and makes the object visible under its key only when
the whole stream arrived: the local backend writes ``.name.part-<random>``
beside the target and renames it at the end; the S3 backend uploads through
boto3's transfer manager, which completes a multipart upload (or sends the
single PUT) only after the last byte was read, and aborts it otherwise. When
the caller knows the expected size or MD5 (a facility's archive gives both),
a stream that ends early or differs is refused before completion
(:class:`IncompleteStream`), so an interrupted download is never recorded
as complete.

``put_many(store, [(key, bytes), ...])`` stores a batch of small objects
(an ingest batch's cutouts) at once: the local backend writes every file,
then makes the whole batch durable with one filesystem sync where it can
(Linux ``syncfs``) instead of an fsync per file; the S3 backend sends the
PUTs concurrently. When it returns, every object is complete and durable.

S3 credentials come from boto3's usual chain (environment, shared config
file, instance/pod role), never from tomd's config, and are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import io
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from tomd.errors import InputError, NotFoundError, RetryableError, TomdError, redact

if TYPE_CHECKING:  # pragma: no cover
    from tomd.config import Storage as StorageConfig

CHUNK = 1024 * 1024  # bytes per read while copying a stream


class StorageError(RetryableError):
    """The store could not be reached or refused an operation (network, permissions)."""


class IncompleteStream(RetryableError):
    """A stream ended early or its content differs from what was announced; nothing was stored."""


@dataclass(frozen=True)
class Stored:
    """What ``put`` stored: the key, its size in bytes and the MD5 (hex) of its content."""

    key: str
    size: int
    md5: str


@runtime_checkable
class Store(Protocol):
    """The interface every storage backend offers."""

    def put(self, key: str, stream: IO[bytes], *, size: int | None = None, md5: str | None = None) -> Stored:
        """Store the stream under ``key`` (replacing any object there); complete only at its end."""

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object (a context manager). NotFoundError if absent."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Size in bytes. NotFoundError if absent."""

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys stored under ``prefix`` (a key prefix, e.g. ``"notices/lvk/"``), sorted."""

    def describe(self, key: str) -> str:
        """Where the object is, for people: a path or an s3:// URL (no credentials)."""

    def check(self) -> None:
        """Raise StorageError unless the store is reachable and writable (daemon start, readiness)."""


# ------------------------------------------------------------------ keys --

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]+")


def safe_component(text: object) -> str:
    """One path component from arbitrary text: safe characters only, never ``.``/``..``/empty.

    ``"SN 2023ixf"`` → ``"SN_2023ixf"``, ``"../../etc"`` → ``"etc"``.
    """
    s = _UNSAFE.sub("_", str(text)).strip("._")
    s = re.sub(r"\.{2,}", ".", s)
    return s[:200] or "_"


def product_key(target: str, facility: str, request: str, filename: str) -> str:
    """The key of a facility's product: ``target/facility/request/filename``, each part sanitised."""
    return "/".join(safe_component(p) for p in (target, facility, request, filename))


def check_key(key: str) -> str:
    """Refuse keys that are absolute, empty, contain ``..``/``.`` parts or backslashes."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InputError(f"invalid storage key {key!r}: expected a relative path like a/b/c.fits")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"invalid storage key {key!r}: empty, '.' or '..' component")
    return key


# -------------------------------------------------------- hashing stream --


class _Counting(io.RawIOBase):
    """Wraps a source stream: full-size reads, MD5 and byte count, verification at EOF.

    ``read(n)`` returns n bytes unless the source is exhausted; before it
    hands over the last bytes it checks the expected size and MD5 and raises
    IncompleteStream instead, so no backend can complete a short object.
    """

    def __init__(self, src: IO[bytes], key: str, size: int | None, md5: str | None):
        self.src, self.key, self.expected_size, self.expected_md5 = src, key, size, md5
        self.hash = hashlib.md5(usedforsecurity=False)
        self.count = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.eof:
            return b""
        want = CHUNK if n is None or n < 0 else n
        parts, got = [], 0
        while got < want:
            chunk = self.src.read(want - got)
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.hash.update(data)
        self.count += len(data)
        if self.expected_size is not None and self.count > self.expected_size:
            raise IncompleteStream(f"{self.key}: stream longer than the {self.expected_size} bytes announced")
        if self.eof:
            self._verify()
        return data

    def readinto(self, b) -> int:  # io.RawIOBase API
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _verify(self) -> None:
        if self.expected_size is not None and self.count != self.expected_size:
            raise IncompleteStream(
                f"{self.key}: stream ended after {self.count} of {self.expected_size} bytes; not stored")
        if self.expected_md5 is not None and self.hash.hexdigest() != self.expected_md5.lower():
            raise IncompleteStream(
                f"{self.key}: MD5 {self.hash.hexdigest()} differs from the expected {self.expected_md5}; not stored")

    @property
    def md5(self) -> str:
        return self.hash.hexdigest()


# ----------------------------------------------------------------- local --

# Batches of at least this many files are synced with one syncfs() call; a
# smaller one is fsynced file by file (a filesystem-wide sync also waits for
# other processes' dirty data, a fair price for a batch, not for one file).
_SYNCFS_MIN = 8


def _load_syncfs():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _fsync_dir(d: Path) -> None:
    """Make the directory's entries (renames, new files) durable."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise StorageError(f"{d}: {exc.strerror or exc}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"{d}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)



class LocalStore:
    """Objects as files under a root directory (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        if self.root not in p.parents:  # symlinks pointing out of the store
            raise InputError(f"invalid storage key {key!r}: outside the store")
        return p

    def put(self, key: str, stream: IO[bytes], *, size: int | None = None, md5: str | None = None) -> Stored:
        path = self._path(key)
        src = _Counting(stream, key, size, md5)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{path.parent}: cannot create directory: {exc.strerror}") from exc
        tmp = path.with_name(f".{path.name}.part-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as out:
                while True:
                    chunk = src.read(CHUNK)  # the source's own errors propagate as they are
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise StorageError(f"{path}: {exc.strerror or exc}") from exc
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise StorageError(f"{path}: {exc.strerror or exc}") from exc
            try:
                os.replace(tmp, path)  # atomic: the key shows the old object or the whole new one
            except OSError as exc:
                raise StorageError(f"{path}: {exc.strerror or exc}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Stored(key, src.count, src.md5)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Stored]:
        """Store many small objects held in memory; each is complete and durable when this returns.

        For a batch, an fsync per file is most of the cost (journal commits,
        and the CPU of the calls), so the batch is written first and synced
        as a whole: every temp file written, ONE sync of the filesystem
        (their data), every rename, ONE more sync (the directory entries).
        The ordering is put's: a key shows the old object or the whole new
        one, also after a crash. Each directory is resolved (symlink check)
        and created once per call, not once per file. Where ``syncfs`` is
        missing (not Linux) or the batch is small, each file is fsynced and
        each directory once after its renames.
        """
        if not items:
            return []
        for key, _ in items:  # refuse a bad key before anything is written
            check_key(key)
        dirs: dict[str, Path] = {}
        planned: list[tuple[Path, Path, Stored]] = []
        token = secrets.token_hex(4)
        for n, (key, data) in enumerate(items):
            parent, _, name = key.rpartition("/")
            d = dirs.get(parent)
            if d is None:
                d = dirs[parent] = self._directory(key, parent)
            planned.append((d / f".{name}.part-{token}-{n}", d / name,
                            Stored(key, len(data), hashlib.md5(data, usedforsecurity=False).hexdigest())))
        whole = len(items) >= _SYNCFS_MIN and _syncfs is not None
        renamed = 0
        try:
            for (tmp, path, _), (_, data) in zip(planned, items):
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        if not whole:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    raise StorageError(f"{path}: {exc.strerror or exc}") from exc
            if whole:
                self._sync()  # the data of every temp file, before any of them is visible
            for tmp, path, _ in planned:
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise StorageError(f"{path}: {exc.strerror or exc}") from exc
                renamed += 1
            if whole:
                self._sync()  # the renames
            else:
                for d in dirs.values():
                    _fsync_dir(d)
        except BaseException:
            for tmp, _, _ in planned[renamed:]:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        return [st for _, _, st in planned]

    def _directory(self, key: str, parent: str) -> Path:
        """The directory of ``parent`` (created), refused if a symlink leads out of the store.

        Walked from the root, one ``mkdir`` per component (and an ``lstat``
        where it exists): a path of plain directories cannot leave the store,
        and a new target's folder costs three system calls instead of a
        ``resolve()`` of the whole path. A symlink on the way is followed and
        checked as ``put`` does.
        """
        if not parent:
            return self.root
        d = str(self.root)
        for part in parent.split("/"):
            d = f"{d}/{part}"
            try:
                os.mkdir(d)
                continue  # made here: a plain directory
            except FileExistsError:
                pass
            except OSError:
                return self._resolved_directory(key, parent)  # no root yet, or a real error: reported there
            try:
                if stat.S_ISDIR(os.lstat(d).st_mode):
                    continue
            except OSError:
                pass
            return self._resolved_directory(key, parent)  # a symlink (or not a directory)
        return Path(d)

    def _resolved_directory(self, key: str, parent: str) -> Path:
        d = self.root / parent
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{d}: cannot create directory: {exc.strerror}") from exc
        d = d.resolve()
        if d != self.root and self.root not in d.parents:
            raise InputError(f"invalid storage key {key!r}: outside the store")
        return d

    def _sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StorageError(f"{self.root}: sync failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"no stored object {key!r} in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"no stored object {key!r} in {self.root}") from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return iter(())
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and ".part-" not in p.name:
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return iter(sorted(out))

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.root}: cannot create the storage directory: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: the storage directory is not writable")


# -------------------------------------------------------------------- s3 --


class S3Store:
    """Objects in an S3 (or S3-compatible) bucket under a prefix, through boto3.

    ``endpoint_url`` points at S3-compatible stores (MinIO, Ceph, moto);
    ``multipart_threshold`` (bytes) is where uploads switch to multipart.
    Credentials: boto3's default chain only.
    """

    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None,
                 endpoint_url: str | None = None, multipart_threshold: int = 64 * 1024 * 1024,
                 client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        if client is None:
            cfg = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"})
            client = boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint_url, config=cfg)
        self.client = client
        # Parts of the threshold's size (S3 wants >= 5 MiB, <= 10,000 parts).
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold,
                                       max_concurrency=4)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, key: str, exc: Exception) -> TomdError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFoundError(f"no stored object {key!r} in s3://{self.bucket}/{self.prefix}")
            if code in ("NoSuchBucket",):
                return StorageError(f"s3://{self.bucket}: no such bucket")
            msg = exc.response.get("Error", {}).get("Message", "") or code
            return StorageError(f"s3://{self.bucket}/{self._key(key)}: {code}: {redact(msg)}")
        return StorageError(f"s3://{self.bucket}/{self._key(key)}: {redact(str(exc)) or type(exc).__name__}")

    def put(self, key: str, stream: IO[bytes], *, size: int | None = None, md5: str | None = None) -> Stored:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        src = _Counting(stream, key, size, md5)
        try:
            # The transfer manager reads the stream part by part; a failure
            # while reading (IncompleteStream included) aborts the multipart
            # upload, so no object appears under the key.
            self.client.upload_fileobj(src, self.bucket, self._key(key), Config=self.transfer)
        except IncompleteStream:
            raise
        except (S3UploadFailedError, ClientError, BotoCoreError) as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, IncompleteStream):
                raise cause from None
            raise self._error(key, exc) from exc
        except Exception as exc:
            # A failing source stream surfaces here (possibly wrapped).
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, IncompleteStream):
                raise cause from None
            raise
        if not src.eof:  # the transfer manager stopped early: never record that as complete
            self.delete(key)
            raise IncompleteStream(f"{key}: upload stopped before the end of the stream")
        return Stored(key, src.count, src.md5)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Stored]:
        """Store many small objects held in memory: concurrent single PUTs, each with its MD5.

        A batch of cutouts is a few hundred PUTs of kilobytes each, bound by
        round trips, not bandwidth: up to 8 go at once (boto3 clients are
        thread-safe). S3 checks each body against its Content-MD5, so a PUT
        that answers 200 stored exactly these bytes. Objects larger than the
        multipart threshold go through ``put``. The first failure is raised
        once the others finished; what was stored stays (a retry overwrites it).
        """
        for key, _ in items:  # refuse a bad key before anything is sent
            check_key(key)
        if not items:
            return []
        if len(items) == 1:
            return [self._put_small(*items[0])]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(items)), thread_name_prefix="tomd-s3-put") as pool:
            futures = [pool.submit(self._put_small, key, data) for key, data in items]
        return [f.result() for f in futures]

    def _put_small(self, key: str, data: bytes) -> Stored:
        from botocore.exceptions import BotoCoreError, ClientError

        if len(data) >= self.transfer.multipart_threshold:
            return self.put(key, io.BytesIO(data), size=len(data))
        digest = hashlib.md5(data, usedforsecurity=False)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ContentMD5=base64.b64encode(digest.digest()).decode())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc) from exc
        return Stored(key, len(data), digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc) from exc
        return _BodyReader(body)

    def _head(self, key: str) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except NotFoundError:
            return False

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def etag(self, key: str) -> str:
        """The object's ETag (the MD5 for single-part uploads, ``…-N`` for N parts)."""
        return self._head(key)["ETag"].strip('"')

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            err = self._error(key, exc)
            if not isinstance(err, NotFoundError):
                raise err from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=base + prefix):
                out.extend(o["Key"][len(base):] for o in page.get("Contents", ()))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(prefix or ".", exc) from exc
        return iter(sorted(out))

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"s3://{self.bucket}: no such bucket") from exc
            raise self._error(".", exc) from exc


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a standard readable binary stream."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.body.read(len(b))
        b[:len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        return self.body.read(None if n is None or n < 0 else n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()
        super().close()


# --------------------------------------------------------------- helpers --


def put_bytes(store: Store, key: str, data: bytes) -> Stored:
    """Store bytes already in memory (skymaps from a notice)."""
    return store.put(key, io.BytesIO(data), size=len(data))


def put_many(store: Store, items: Sequence[tuple[str, bytes]]) -> list[Stored]:
    """Store a batch of objects held in memory (an ingest batch's cutouts); all durable on return.

    Uses the backend's own ``put_many`` (one sync for a local batch,
    concurrent PUTs on S3); a store without one gets one ``put`` per item.
    """
    many = getattr(store, "put_many", None)
    if many is not None:
        return many(items)
    return [put_bytes(store, key, data) for key, data in items]


def put_file(store: Store, key: str, path: str | os.PathLike[str]) -> Stored:
    """Store a local file, streamed."""
    with open(path, "rb") as f:
        return store.put(key, f, size=os.fstat(f.fileno()).st_size)


@contextlib.contextmanager
def seekable(store: Store, key: str, *, spool_mb: int = 32) -> Iterator[BinaryIO]:
    """A seekable stream of the object, for readers that seek (astropy.io.fits).

    Local files are opened as they are; S3 objects are copied into a
    temporary file (in memory up to ``spool_mb``). Processors use this, or
    ``store.open``, and never assume a local path.
    """
    with store.open(key) as f:
        if f.seekable():
            yield f
            return
        with tempfile.SpooledTemporaryFile(max_size=spool_mb * 1024 * 1024) as tmp:
            shutil.copyfileobj(f, tmp, CHUNK)
            tmp.seek(0)
            yield tmp


def storage_from_config(cfg: StorageConfig) -> Store:
    """The store the ``[storage]`` section describes."""
    if cfg.local_dir is not None:
        return LocalStore(cfg.local_dir)
    if cfg.s3_bucket:
        return S3Store(cfg.s3_bucket, cfg.s3_prefix, region=cfg.s3_region, endpoint_url=cfg.s3_endpoint_url,
                       multipart_threshold=cfg.multipart_threshold_mb * 1024 * 1024)
    raise InputError(f"unsupported storage url {cfg.url!r}: expected file://DIR or s3://BUCKET/PREFIX",
                     field="storage.url")
