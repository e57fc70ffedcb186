"""Receiving an upload: the request body streamed to a temporary file, never held in memory.

Takes ``multipart/form-data`` with the JSONL in the field ``file`` (what ``curl -F
file=@data.jsonl`` and browser forms send) or the raw JSONL as the body (``Content-Type:
application/jsonl``, ``application/x-ndjson``, ...). The size limit is enforced while streaming,
and a declared Content-Length over it is refused before a byte is read. On any failure the
temporary file is removed: nothing of a refused upload remains.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.common.errors import APIError, bad_request
from services.common.http import DRAIN_LIMIT, drain_body

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = "file"
RAW_CONTENT_TYPES = (
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
    "application/x-ndjson",
    "application/octet-stream",
    "text/plain",
)
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_SLACK = 64 * 1024
_WRITE_BUFFER = 1 << 20


@dataclass
class SpooledFile:
    path: Path
    filename: str | None
    size: int
    sha256: str
    lines: int


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} GiB"


def upload_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The uploaded file is larger than the upload limit of {limit} bytes ({_human(limit)}); "
        "split it into smaller files.",
        param=FILE_FIELD,
        code="file_too_large",
    )


class _FileSink:
    """Counts, hashes and writes the file's bytes, through a buffer flushed in a worker thread."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.size = 0
        self.newlines = 0
        self.last_byte = b""
        self.digest = hashlib.sha256()
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:]
        self.digest.update(data)
        self.buffer += data

    async def flush(self, *, force: bool = False) -> None:
        if self.buffer and (force or len(self.buffer) >= _WRITE_BUFFER):
            data = bytes(self.buffer)
            self.buffer.clear()
            await asyncio.to_thread(self.handle.write, data)

    @property
    def lines(self) -> int:
        return self.newlines + (1 if self.size and self.last_byte != b"\n" else 0)


class _MultipartFile:
    """python-multipart callbacks: the ``file`` part goes to the sink, every other part is dropped."""

    def __init__(self, sink: _FileSink) -> None:
        self.sink = sink
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.in_file = False
        self.file_parts = 0
        self.filename: str | None = None
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if options.get(b"name") == FILE_FIELD.encode():
            self.file_parts += 1
            self.in_file = self.file_parts == 1
            if self.in_file and options.get(b"filename"):
                self.filename = options[b"filename"].decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.sink.feed(data[start:end])

    def on_part_end(self) -> None:
        self.in_file = False

    def on_end(self) -> None:
        self.ended = True


async def spool_upload(request: Request, *, limit: int, directory: Path) -> SpooledFile:
    """Stream the uploaded JSONL to a temporary file under ``directory``; 4xx for a bad upload."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    multipart = content_type == b"multipart/form-data"
    if not multipart and content_type.decode("latin-1") not in RAW_CONTENT_TYPES:
        raise APIError(
            415,
            "Send the JSONL file as multipart/form-data in the field 'file', "
            "or as the raw body with Content-Type: application/jsonl.",
            param=FILE_FIELD,
            code="unsupported_media_type",
        )
    if multipart and not options.get(b"boundary"):
        raise bad_request("The multipart/form-data Content-Type has no boundary.", param=FILE_FIELD)
    # The file may use the whole limit; the multipart envelope around it gets a little more.
    allowance = limit + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > allowance:
        if int(declared) <= allowance + DRAIN_LIMIT:
            await drain_body(request.receive)  # so the client, still sending, can read the 413
        raise upload_too_large(limit)

    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".jsonl", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            sink = _FileSink(handle)
            form = _MultipartFile(sink) if multipart else None
            parser = MultipartParser(options[b"boundary"], form.callbacks()) if form else None
            received = 0
            exceeded = False
            async for chunk in request.stream():
                received += len(chunk)
                if exceeded:  # drain a little so the client can read the 413, then stop
                    if received > allowance + DRAIN_LIMIT:
                        break
                    continue
                if parser is not None:
                    try:
                        parser.write(chunk)
                    except FormParserError as exc:
                        raise bad_request(f"Malformed multipart body: {exc}", param=FILE_FIELD) from None
                else:
                    sink.feed(chunk)
                if sink.size > limit or received > allowance:
                    exceeded = True
                    sink.buffer.clear()
                    continue
                await sink.flush()
            if exceeded:
                raise upload_too_large(limit)
            await sink.flush(force=True)
        if form is not None:
            if not form.ended:
                raise bad_request("The multipart body ended before its closing boundary.", param=FILE_FIELD)
            if form.file_parts == 0:
                raise bad_request(
                    "No file: send the JSONL as the multipart/form-data field 'file'.", param=FILE_FIELD
                )
            if form.file_parts > 1:
                raise bad_request("Send one file per upload (one 'file' field).", param=FILE_FIELD)
        if sink.size == 0:
            raise bad_request("The uploaded file is empty.", param=FILE_FIELD)
        return SpooledFile(
            path=path,
            filename=form.filename if form else None,
            size=sink.size,
            sha256=sink.digest.hexdigest(),
            lines=sink.lines,
        )
    except BaseException:
        await asyncio.to_thread(path.unlink, True)
        raise
