"""Storage backends: the same suite runs on a local directory and on S3.

S3 is moto in server mode on loopback, reached through boto3 exactly as a
real bucket would be (HTTP, signatures, multipart uploads).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid

import pytest

from tomd.errors import InputError, NotFoundError, RetryableError
from tomd.storage import (
    IncompleteStream,
    LocalStore,
    S3Store,
    Store,
    StorageError,
    check_key,
    product_key,
    put_bytes,
    put_many,
    safe_component,
    seekable,
    storage_from_config,
)

MiB = 1024 * 1024
FAKE_SECRET = "tomdTestSecretKey/DoNotLog1234567890abcd"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free loopback port; fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "tomdtestaccesskey")
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"tomd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    # The lowest threshold S3 accepts (parts >= 5 MiB) so tests can go multipart cheaply.
    return S3Store(new_bucket(endpoint), "tomd/data", region="us-east-1", endpoint_url=endpoint,
                   multipart_threshold=5 * MiB)


class ChunkSource(io.RawIOBase):
    """A network-like source: short reads of odd sizes; optional failure after some bytes.

    Refuses read(-1) and huge reads, so a backend that would slurp the
    whole stream into memory fails the test.
    """

    def __init__(self, data: bytes, chunk: int = 65_521, fail_after: int | None = None):
        self.data, self.pos, self.chunk, self.fail_after = data, 0, chunk, fail_after
        self.max_request = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise AssertionError("read() of the whole stream: the backend would hold the file in memory")
        self.max_request = max(self.max_request, n)
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection reset by peer (simulated)")
        out = self.data[self.pos:self.pos + min(n, self.chunk)]
        self.pos += len(out)
        return out

    def readinto(self, b) -> int:
        d = self.read(len(b))
        b[:len(d)] = d
        return len(d)


def read_all(store: Store, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def no_leftovers(store: Store) -> None:
    """Nothing half-written is visible: no temp files, no open multipart uploads."""
    if isinstance(store, LocalStore):
        leftovers = [p for p in store.root.rglob("*") if p.is_file() and ".part-" in p.name] \
            if store.root.exists() else []
        assert leftovers == []
    else:
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert uploads == []


# ------------------------------------------------------------------ basics --


def test_put_open_exists_size_delete(store: Store) -> None:
    data = os.urandom(300_000)
    key = "42-SN_2023ixf/lco/1234/frame.fits"
    assert not store.exists(key)
    info = store.put(key, ChunkSource(data))
    assert (info.key, info.size, info.md5) == (key, len(data), hashlib.md5(data).hexdigest())
    assert store.exists(key)
    assert store.size(key) == len(data)
    assert read_all(store, key) == data
    assert list(store.keys()) == [key]
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # absent is fine
    no_leftovers(store)


def test_put_replaces_the_object(store: Store) -> None:
    put_bytes(store, "a/b.txt", b"first version")
    put_bytes(store, "a/b.txt", b"second")
    assert read_all(store, "a/b.txt") == b"second"
    assert store.size("a/b.txt") == 6


def test_empty_object(store: Store) -> None:
    info = put_bytes(store, "empty/file.dat", b"")
    assert (info.size, info.md5) == (0, hashlib.md5(b"").hexdigest())
    assert store.exists("empty/file.dat") and read_all(store, "empty/file.dat") == b""


def test_missing_object_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.open("no/such/file")
    with pytest.raises(NotFoundError):
        store.size("no/such/file")
    assert not store.exists("no/such/file")


def test_keys_by_prefix(store: Store) -> None:
    for k in ("notices/lvk/S1/a.fits", "notices/lvk/S2/b.fits", "notices/gcn/1/c.fits", "1-x/lco/9/d.fits"):
        put_bytes(store, k, k.encode())
    assert list(store.keys("notices/lvk/")) == ["notices/lvk/S1/a.fits", "notices/lvk/S2/b.fits"]
    assert len(list(store.keys())) == 4


def test_streams_in_bounded_reads(store: Store) -> None:
    data = os.urandom(3 * MiB + 17)
    src = ChunkSource(data, chunk=10_007)  # short reads, like a socket
    info = store.put("big/stream.bin", src)
    assert info.md5 == hashlib.md5(data).hexdigest()
    assert read_all(store, "big/stream.bin") == data
    assert src.max_request <= 8 * MiB  # never asked for the whole stream at once


def test_seekable_reader_for_processors(store: Store) -> None:
    data = bytes(range(256)) * 100
    put_bytes(store, "x/y.bin", data)
    with seekable(store, "x/y.bin") as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(0)
        assert f.read() == data


# ----------------------------------------------------- incomplete streams --


def test_interrupted_stream_stores_nothing(store: Store) -> None:
    data = os.urandom(2 * MiB)
    with pytest.raises(ConnectionResetError):
        store.put("t/f/r/interrupted.fits", ChunkSource(data, fail_after=MiB))
    assert not store.exists("t/f/r/interrupted.fits")
    assert list(store.keys()) == []
    no_leftovers(store)


def test_interrupted_stream_keeps_the_previous_version(store: Store) -> None:
    put_bytes(store, "t/f/r/frame.fits", b"complete old version")
    with pytest.raises(ConnectionResetError):
        store.put("t/f/r/frame.fits", ChunkSource(os.urandom(MiB), fail_after=300_000))
    assert read_all(store, "t/f/r/frame.fits") == b"complete old version"
    no_leftovers(store)


def test_short_stream_with_announced_size_is_refused(store: Store) -> None:
    data = os.urandom(1_000_000)
    # The connection closes cleanly after 600 kB: no exception from the source.
    with pytest.raises(IncompleteStream, match="600000 of 1000000 bytes"):
        store.put("short/file.fits", ChunkSource(data[:600_000]), size=len(data))
    assert not store.exists("short/file.fits")
    assert isinstance(IncompleteStream("x"), RetryableError)  # the download may be retried
    no_leftovers(store)


def test_longer_stream_than_announced_is_refused(store: Store) -> None:
    with pytest.raises(IncompleteStream, match="longer"):
        store.put("long/file.fits", io.BytesIO(b"x" * 2000), size=1000)
    assert not store.exists("long/file.fits")


def test_md5_checked(store: Store) -> None:
    data = os.urandom(100_000)
    good = hashlib.md5(data).hexdigest()
    assert store.put("ok/file", io.BytesIO(data), md5=good.upper()).md5 == good
    corrupted = bytearray(data)
    corrupted[5000] ^= 0xFF
    with pytest.raises(IncompleteStream, match="MD5"):
        store.put("bad/file", io.BytesIO(bytes(corrupted)), size=len(data), md5=good)
    assert not store.exists("bad/file")
    no_leftovers(store)


def test_large_file_multipart(store: Store) -> None:
    """12 MiB with a 5 MiB threshold: three parts on S3; identical bytes on both backends."""
    data = os.urandom(12 * MiB)
    md5 = hashlib.md5(data).hexdigest()
    info = store.put("big/mosaic.fits", ChunkSource(data, chunk=MiB), size=len(data), md5=md5)
    assert (info.size, info.md5) == (len(data), md5)
    assert store.size("big/mosaic.fits") == len(data)
    assert hashlib.md5(read_all(store, "big/mosaic.fits")).hexdigest() == md5
    if isinstance(store, S3Store):
        assert store.etag("big/mosaic.fits").endswith("-3")  # a multipart object of 3 parts
    no_leftovers(store)


def test_multipart_interrupted_after_some_parts(store: Store) -> None:
    data = os.urandom(12 * MiB)
    with pytest.raises(ConnectionResetError):
        store.put("big/cut.fits", ChunkSource(data, chunk=MiB, fail_after=11 * MiB))
    assert not store.exists("big/cut.fits")
    no_leftovers(store)  # the multipart upload was aborted


def test_small_file_is_a_single_put_on_s3(s3_endpoint) -> None:
    store = S3Store(new_bucket(s3_endpoint), "", endpoint_url=s3_endpoint, multipart_threshold=5 * MiB)
    data = os.urandom(4 * MiB)
    store.put("one.bin", io.BytesIO(data))
    assert store.etag("one.bin") == hashlib.md5(data).hexdigest()  # plain PUT: the ETag is the MD5


# ---------------------------------------------------------------- batches --


@pytest.mark.parametrize("count", [2, 30])  # below and above the one-sync threshold (local)
def test_put_many_stores_a_batch(store: Store, count: int) -> None:
    put_bytes(store, "t1/cutouts/1.fits", b"old")  # replaced by the batch
    items = [(f"t{i % 4}/cutouts/{i}.fits", os.urandom(100 + i)) for i in range(count)]
    stored = put_many(store, items)
    assert [s.key for s in stored] == [k for k, _ in items]
    for (key, data), st in zip(items, stored):
        assert (st.size, st.md5) == (len(data), hashlib.md5(data).hexdigest())
        assert read_all(store, key) == data
    assert sorted(store.keys()) == sorted(k for k, _ in items)
    no_leftovers(store)


def test_put_many_refuses_a_bad_key_before_writing(store: Store) -> None:
    with pytest.raises(InputError):
        put_many(store, [("a/ok.fits", b"x"), ("a/../../evil", b"y")])
    assert list(store.keys()) == []
    assert put_many(store, []) == []


def test_put_many_failure_leaves_no_temp_files(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "store" / "a" / "taken").mkdir(parents=True)  # a directory where a file should go
    items = [(f"a/{i}.fits", b"x" * i) for i in range(10)] + [("a/taken", b"z")]
    with pytest.raises(StorageError, match="taken"):
        put_many(store, items)
    no_leftovers(store)


def test_put_many_refuses_symlink_escape(tmp_path) -> None:
    root = tmp_path / "store"
    (root / "t").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "t" / "link").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        LocalStore(root).put_many([("t/ok", b"x"), ("t/link/evil", b"x")])
    assert list(outside.iterdir()) == [] and not (root / "t" / "ok").exists()


def test_put_many_on_s3_sends_md5_checked_puts_and_multipart_for_large(s3_endpoint) -> None:
    store = S3Store(new_bucket(s3_endpoint), "p", endpoint_url=s3_endpoint, multipart_threshold=5 * MiB)
    big = os.urandom(6 * MiB)
    items = [(f"c/{i}.fits", os.urandom(1000)) for i in range(12)] + [("c/big.fits", big)]
    stored = put_many(store, items)
    assert stored[-1] == put_many(store, [("c/big.fits", big)])[0]
    for key, data in items[:-1]:
        assert store.etag(key) == hashlib.md5(data).hexdigest()
    assert store.etag("c/big.fits").endswith("-2")  # two parts
    assert read_all(store, "c/big.fits") == big
    no_leftovers(store)


# -------------------------------------------------------------------- keys --


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/path", "a//b", "a/./b", "a/../b", "", "a\\b", "a/b/"])
def test_bad_keys_refused(store: Store, key: str) -> None:
    with pytest.raises(InputError):
        store.put(key, io.BytesIO(b"x"))
    with pytest.raises(InputError):
        check_key(key)


def test_product_key_layout_is_sanitised() -> None:
    assert product_key("SN 2023ixf", "lco", "1234", "frame.fits") == "SN_2023ixf/lco/1234/frame.fits"
    assert product_key("../../etc", "lco", "..", "../passwd") == "etc/lco/_/passwd"
    assert product_key("a/b", "x y", "r:1", "f\x00.fits") == "a_b/x_y/r_1/f_.fits"
    assert safe_component("...") == "_" and safe_component("a..b") == "a.b"
    for part in product_key("..", "..", "..", "..").split("/"):
        assert part not in ("", ".", "..")


def test_local_store_refuses_symlink_escape(tmp_path) -> None:
    root = tmp_path / "store"
    (root / "t").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "t" / "link").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        LocalStore(root).put("t/link/evil", io.BytesIO(b"x"))
    assert list(outside.iterdir()) == []


# ------------------------------------------------------- config and errors --


def test_storage_from_config(tmp_path, s3_endpoint) -> None:
    from tomd.config import Storage

    local = storage_from_config(Storage(url=f"file://{tmp_path}/data"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "data").resolve()
    bucket = new_bucket(s3_endpoint)
    s3 = storage_from_config(Storage(url=f"s3://{bucket}/tomd/prod", s3_endpoint_url=s3_endpoint,
                                     s3_region="us-east-1", multipart_threshold_mb=5))
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == (bucket, "tomd/prod")
    assert s3.transfer.multipart_threshold == 5 * MiB
    put_bytes(s3, "x/y.txt", b"hello")
    # The prefix is where the object really is.
    import boto3

    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key="tomd/prod/x/y.txt")["Body"]
    assert body.read() == b"hello"
    assert s3.describe("x/y.txt") == f"s3://{bucket}/tomd/prod/x/y.txt"


def test_missing_bucket_is_a_storage_error_without_credentials(s3_endpoint, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    store = S3Store("tomd-no-such-bucket", "p", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError) as exc:
        put_bytes(store, "a/b", b"x")
    assert "tomd-no-such-bucket" in str(exc.value)
    with pytest.raises(StorageError, match="no such bucket"):
        store.check()
    shown = str(exc.value) + repr(store)
    assert FAKE_SECRET not in shown and "tomdtestaccesskey" not in shown
    # botocore's own DEBUG lines name the access key id, never the secret.
    assert FAKE_SECRET not in caplog.text


def test_check(store: Store, tmp_path) -> None:
    store.check()
    if isinstance(store, LocalStore):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(StorageError):
            LocalStore(blocker / "sub").check()


def test_unreachable_endpoint_is_retryable() -> None:
    import socket

    from botocore.client import Config

    import boto3

    # A port nobody listens on: bound and never listening while the test runs (refused at once),
    # so no other process can start listening on it meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="k", aws_secret_access_key="s",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1))
        store = S3Store("tomd-bucket", endpoint_url=f"http://127.0.0.1:{port}", client=client)
        with pytest.raises(StorageError) as exc:
            store.size("x")
    assert isinstance(exc.value, RetryableError)


def test_put_many_follows_a_symlink_that_stays_in_the_store(tmp_path) -> None:
    root = tmp_path / "store"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real")
    LocalStore(root).put_many([(f"alias/x/{i}", b"%d" % i) for i in range(10)])
    assert (root / "real" / "x" / "7").read_bytes() == b"7"
