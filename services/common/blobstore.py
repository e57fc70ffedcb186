"""Blob store for uploads, exports, dataset snapshots, adapters and model weights.

One interface, two backends chosen by URL (see ``blob_store_from_url``):

- ``file:///abs/path``: a local folder, the embedded default of ``distillery up``;
- ``s3://ACCESS:SECRET@host:port/bucket`` (``s3+https://`` for TLS): MinIO or any S3 endpoint,
  through the ``minio`` SDK.

Keys are ``/``-separated relative names (``datasets/ds_1/snapshot.jsonl``). Both backends apply
the same key rules so that code behaves the same on either. The ``minio`` SDK and file I/O are
blocking, so every call runs in a worker thread. Large files are streamed, never held in memory.
"""

from __future__ import annotations

import abc
import asyncio
import io
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from minio import Minio
from minio.error import MinioException, S3Error

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_CHUNK_SIZE = 1 << 20
_TMP_SUFFIX = ".distillery-tmp"
_S3_URL_FORM = "s3://ACCESS:SECRET@host:port/bucket"

T = TypeVar("T")


class BlobStoreError(Exception):
    """A blob store operation failed. Messages never contain credentials."""


class BlobNotFound(BlobStoreError, KeyError):
    """The key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"blob not found: {self.key}"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative name, else raise ValueError."""
    segments = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(s in ("", ".", "..") for s in segments):
        raise ValueError(
            f"invalid blob key {key!r}: use a relative name of non-empty segments, without '.' or '..'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it cannot point outside the store, else raise ValueError."""
    if prefix.startswith("/") or "\x00" in prefix or ".." in prefix.split("/"):
        raise ValueError(f"invalid blob prefix {prefix!r}: must be relative, without '..'")
    return prefix


class BlobStore(abc.ABC):
    """Async blob storage. Missing keys raise ``BlobNotFound``; ``delete`` is idempotent."""

    @abc.abstractmethod
    async def ensure_ready(self) -> None:
        """Create the bucket or folder if needed. Safe to call any number of times."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store ``data`` under ``key`` and return the blob's URI."""

    @abc.abstractmethod
    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Stream the local file ``path`` to ``key`` and return the blob's URI."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """Return the whole blob; use ``iter_chunks`` or ``download_file`` for large ones."""

    @abc.abstractmethod
    async def download_file(self, key: str, path: Path) -> None:
        """Stream the blob to ``path``, which appears only once complete."""

    @abc.abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Yield the blob in chunks of at most ``chunk_size`` bytes."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the blob; a missing key is not an error."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys starting with ``prefix``."""

    @abc.abstractmethod
    async def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        """Return a URL that downloads the blob without credentials, or None if unsupported."""


class FileBlobStore(BlobStore):
    """Blobs as files under ``root``. Content types are not stored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"FileBlobStore(root={str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    async def ensure_ready(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        path = self.path_for(key)
        await asyncio.to_thread(_write_atomic, path, lambda out: out.write(data))
        return path.as_uri()

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        target = self.path_for(key)
        await asyncio.to_thread(_copy_file_atomic, Path(path), target)
        return target.as_uri()

    async def get_bytes(self, key: str) -> bytes:
        path = self.path_for(key)
        return await asyncio.to_thread(lambda: self._read_all(key, path))

    async def download_file(self, key: str, path: Path) -> None:
        source = self.path_for(key)
        await asyncio.to_thread(self._download, key, source, Path(path))

    async def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        path = self.path_for(key)
        handle = await asyncio.to_thread(_open_blob, key, path)
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_for(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, self.path_for(key))

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, validate_prefix(prefix))

    async def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        validate_key(key)
        return None

    @staticmethod
    def _read_all(key: str, path: Path) -> bytes:
        with _open_blob(key, path) as handle:
            return handle.read()

    @staticmethod
    def _download(key: str, source: Path, target: Path) -> None:
        with _open_blob(key, source) as handle:
            _write_atomic(target, lambda out: shutil.copyfileobj(handle, out, DEFAULT_CHUNK_SIZE))

    def _delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        # Prune directories left empty so the tree does not grow without bound.
        for parent in path.parents:
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def _list(self, prefix: str) -> list[str]:
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix) and not name.endswith(_TMP_SUFFIX):
                    keys.append(key)
        return sorted(keys)


def _open_blob(key: str, path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BlobNotFound(key) from None


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary sibling, then rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_file_atomic(source: Path, target: Path) -> None:
    with open(source, "rb") as handle:
        _write_atomic(target, lambda out: shutil.copyfileobj(handle, out, DEFAULT_CHUNK_SIZE))


class MinioBlobStore(BlobStore):
    """Blobs as objects in one S3 bucket, through the ``minio`` SDK."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        # The secret lives only inside the SDK client, never on this object.
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure)

    def __repr__(self) -> str:
        return f"MinioBlobStore(endpoint={self.endpoint!r}, bucket={self.bucket!r}, secure={self.secure})"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def ensure_ready(self) -> None:
        await self._run("create bucket", None, self._ensure_bucket)

    async def put_bytes(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        validate_key(key)
        await self._run(
            "put",
            key,
            lambda: self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )
        return self.uri(key)

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        validate_key(key)
        # fput_object uploads in multipart parts, holding only a few parts in memory at once.
        await self._run(
            "put",
            key,
            lambda: self._client.fput_object(self.bucket, key, str(path), content_type=content_type),
        )
        return self.uri(key)

    async def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        return await self._run("get", key, lambda: self._read_all(key))

    async def download_file(self, key: str, path: Path) -> None:
        validate_key(key)
        await self._run("get", key, lambda: self._download(key, Path(path)))

    async def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        validate_key(key)
        response = await self._run("get", key, lambda: self._client.get_object(self.bucket, key))
        try:
            while chunk := await asyncio.to_thread(response.read, chunk_size):
                yield chunk
        finally:
            response.close()
            response.release_conn()

    async def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            await self._run("stat", key, lambda: self._client.stat_object(self.bucket, key))
        except BlobNotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._run("delete", key, lambda: self._client.remove_object(self.bucket, key))

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        return await self._run("list", None, lambda: self._list(prefix))

    async def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        validate_key(key)
        return await self._run(
            "presign", key, lambda: self._client.presigned_get_object(self.bucket, key, expires=expires)
        )

    def _ensure_bucket(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as exc:
            # Another process created it between our check and our create.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def _read_all(self, key: str) -> bytes:
        response = self._client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def _download(self, key: str, path: Path) -> None:
        response = self._client.get_object(self.bucket, key)
        try:
            _write_atomic(path, lambda out: shutil.copyfileobj(response, out, DEFAULT_CHUNK_SIZE))
        finally:
            response.close()
            response.release_conn()

    def _list(self, prefix: str) -> list[str]:
        objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
        return sorted(obj.object_name for obj in objects if obj.object_name)

    async def _run(self, action: str, key: str | None, call: Callable[[], T]) -> T:
        with self._translate_errors(action, key):
            return await asyncio.to_thread(call)

    @contextmanager
    def _translate_errors(self, action: str, key: str | None) -> Iterator[None]:
        """Map SDK errors to ours: ``BlobNotFound`` for a missing key, ``BlobStoreError`` otherwise."""
        where = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        try:
            yield
        except S3Error as exc:
            if key is not None and exc.code in ("NoSuchKey", "NotFound"):
                raise BlobNotFound(key) from exc
            raise BlobStoreError(
                f"{action} {where} on {self.endpoint} failed: {exc.code}: {exc.message}"
            ) from exc
        except MinioException as exc:
            raise BlobStoreError(f"{action} {where} on {self.endpoint} failed: {exc}") from exc


def blob_store_from_url(url: str) -> BlobStore:
    """Build the store a ``file://``, ``s3://`` or ``s3+https://`` URL names."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _file_store(parts)
    if scheme in ("s3", "s3+https"):
        return _minio_store(parts, secure=scheme == "s3+https")
    raise ValueError(
        f"unsupported blob store URL scheme {scheme!r}: use file:///abs/path, {_S3_URL_FORM} or s3+https://..."
    )


def _file_store(parts: SplitResult) -> FileBlobStore:
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise ValueError("file blob URL must hold an absolute path: file:///abs/path")
    return FileBlobStore(Path(path))


def _minio_store(parts: SplitResult, secure: bool) -> MinioBlobStore:
    # Messages here describe the expected form and never echo the URL: it carries the secret.
    credentials, _, endpoint = parts.netloc.rpartition("@")
    access_key, has_secret, secret_key = credentials.partition(":")
    if not access_key or not has_secret or not secret_key:
        raise ValueError(f"s3 blob URL needs credentials: {_S3_URL_FORM}")
    if not parts.hostname:
        raise ValueError(f"s3 blob URL needs a host: {_S3_URL_FORM}")
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        raise ValueError(f"s3 blob URL has an invalid port: {_S3_URL_FORM}") from None
    bucket = parts.path.strip("/")
    if not bucket or "/" in bucket:
        raise ValueError(f"s3 blob URL must name exactly one bucket: {_S3_URL_FORM}")
    return MinioBlobStore(endpoint, unquote(access_key), unquote(secret_key), bucket, secure=secure)
