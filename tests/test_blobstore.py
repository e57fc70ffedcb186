"""Blob store contract, run against a local folder and a real S3 endpoint (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.common.blobstore import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    FileBlobStore,
    MinioBlobStore,
    blob_store_from_url,
)
from tests.s3_server import SECRET_KEY

MB = 1 << 20


def _with_bucket(url: str, bucket: str) -> str:
    return f"{url.rsplit('/', 1)[0]}/{bucket}"


@pytest_asyncio.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A ready, empty store; on S3 each test gets its own bucket."""
    if request.param == "file":
        blobs: BlobStore = FileBlobStore(tmp_path / "blobs")
    else:
        url = request.getfixturevalue("s3_url")
        blobs = blob_store_from_url(_with_bucket(url, f"t-{uuid.uuid4().hex[:12]}"))
    await blobs.ensure_ready()
    yield blobs


def _write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(size // MB):
            chunk = os.urandom(MB)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.asyncio
async def test_bytes_round_trip(store: BlobStore) -> None:
    uri = await store.put_bytes("exports/a.jsonl", b'{"a": 1}\n', content_type="application/jsonl")
    assert await store.get_bytes("exports/a.jsonl") == b'{"a": 1}\n'
    if isinstance(store, MinioBlobStore):
        assert uri == f"s3://{store.bucket}/exports/a.jsonl"
    else:
        assert uri.startswith("file:///") and uri.endswith("/blobs/exports/a.jsonl")

    await store.put_bytes("exports/a.jsonl", b"")
    assert await store.get_bytes("exports/a.jsonl") == b""


@pytest.mark.asyncio
async def test_large_file_streams_both_ways(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    expected = _write_random_file(source, 20 * MB)
    await store.put_file("models/m1/weights.bin", source)

    target = tmp_path / "out" / "nested" / "weights.bin"
    await store.download_file("models/m1/weights.bin", target)

    assert _sha256(target) == expected
    assert os.listdir(target.parent) == ["weights.bin"]  # no temporary file left behind


@pytest.mark.asyncio
async def test_iter_chunks_reassembles(store: BlobStore) -> None:
    data = os.urandom(3 * MB + 12345)
    await store.put_bytes("snapshots/s.bin", data)

    chunks = [chunk async for chunk in store.iter_chunks("snapshots/s.bin", chunk_size=MB)]

    assert b"".join(chunks) == data
    assert len(chunks) >= 4
    assert all(len(chunk) <= MB for chunk in chunks)


@pytest.mark.asyncio
async def test_exists_delete_and_list_by_prefix(store: BlobStore) -> None:
    for key in ("a/1", "a/2", "a/sub/3", "ab", "b/1"):
        await store.put_bytes(key, key.encode())

    assert await store.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert await store.list("a") == ["a/1", "a/2", "a/sub/3", "ab"]
    assert await store.list("") == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert await store.list("zzz/") == []

    assert await store.exists("a/1")
    await store.delete("a/1")
    assert not await store.exists("a/1")
    await store.delete("a/1")  # deleting a missing key is not an error
    assert await store.list("a/") == ["a/2", "a/sub/3"]


@pytest.mark.asyncio
async def test_missing_key_raises_blob_not_found(store: BlobStore, tmp_path: Path) -> None:
    assert not await store.exists("nope/missing")
    with pytest.raises(BlobNotFound):
        await store.get_bytes("nope/missing")
    with pytest.raises(KeyError):
        await store.get_bytes("nope/missing")
    with pytest.raises(BlobNotFound):
        await store.download_file("nope/missing", tmp_path / "missing.bin")
    with pytest.raises(BlobNotFound):
        async for _ in store.iter_chunks("nope/missing"):
            pass
    assert not (tmp_path / "missing.bin").exists()


@pytest.mark.asyncio
async def test_ensure_ready_is_idempotent(store: BlobStore) -> None:
    await store.put_bytes("kept", b"x")
    await store.ensure_ready()
    await store.ensure_ready()
    assert await store.get_bytes("kept") == b"x"


@pytest.mark.asyncio
@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a/../../b", "", "a//b", "dir/", "./a"])
async def test_rejects_unsafe_keys(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.get_bytes(key)
    with pytest.raises(ValueError):
        await store.list("../")


@pytest.mark.asyncio
async def test_file_store_cannot_escape_root(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "root")
    await blobs.ensure_ready()
    with pytest.raises(ValueError):
        await blobs.put_bytes("../escape", b"x")
    assert not (tmp_path / "escape").exists()
    assert await blobs.presigned_get_url("k", timedelta(minutes=5)) is None


@pytest.mark.asyncio
async def test_s3_presigned_url_downloads(s3_url: str) -> None:
    blobs = blob_store_from_url(_with_bucket(s3_url, f"t-{uuid.uuid4().hex[:12]}"))
    await blobs.ensure_ready()
    await blobs.put_bytes("exports/shared.jsonl", b"shared\n")

    url = await blobs.presigned_get_url("exports/shared.jsonl", timedelta(minutes=5))

    assert url is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"shared\n"


@pytest.mark.asyncio
async def test_s3_wrong_secret_does_not_leak_it(s3_url: str) -> None:
    wrong_secret = "WRONG-secret-do-not-print"
    url = s3_url.replace("@", f"{wrong_secret}@", 1)  # appends to the real secret
    blobs = blob_store_from_url(url)

    with pytest.raises(BlobStoreError) as caught:
        await blobs.put_bytes("k", b"x")

    for text in (str(caught.value), repr(caught.value), str(caught.value.__cause__), repr(blobs)):
        assert wrong_secret not in text
        assert SECRET_KEY not in text


def test_from_url_builds_each_backend(tmp_path: Path) -> None:
    file_store = blob_store_from_url(f"file://{tmp_path}/blobs")
    assert isinstance(file_store, FileBlobStore)
    assert file_store.root == tmp_path / "blobs"

    plain = blob_store_from_url("s3://AK%2Fx:se%2Fcret@minio:9000/bucket")
    assert isinstance(plain, MinioBlobStore)
    assert (plain.endpoint, plain.bucket, plain.secure) == ("minio:9000", "bucket", False)
    assert "cret" not in repr(plain)

    tls = blob_store_from_url("s3+https://ak:sk@s3.example.com/bucket")
    assert isinstance(tls, MinioBlobStore) and tls.secure


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "x",
        "file://relative/path",
        "s3://minio:9000/bucket",
        "s3://ak:topsecret@minio:9000/",
        "s3://ak:topsecret@minio:9000/bucket/extra",
        "s3://ak:topsecret@minio:port/bucket",
    ],
)
def test_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        blob_store_from_url(url)
    assert "topsecret" not in str(caught.value)
