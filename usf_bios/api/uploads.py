"""Streamed multipart/form-data uploads: the file part goes straight to disk under a size cap.

Starlette's ``UploadFile``/``Form`` parameters spool the whole body before a route runs; this reads
``request.stream()`` through python-multipart's streaming parser instead, so a body larger than the
cap is cut off (HTTP 413) as soon as it crosses it, and only small text fields are held in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import Request, status
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from usf_bios.control.datasets import ReceivedUpload

MULTIPART_OVERHEAD = 64 * 1024   # boundaries, part headers and small text fields around the file
MAX_FIELD_BYTES = 4096           # one text field (name, format, …)
MAX_PARTS = 16


class UploadRejected(Exception):
    """The upload cannot be accepted; carries the HTTP status and a message for the client."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def too_large(max_bytes: int) -> UploadRejected:
    return UploadRejected(413,
                          f"the upload is larger than the limit of {max_bytes / 2**20:g} MiB (USF_MAX_UPLOAD_MB)")


def multipart_boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadRejected(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                             "send the file as multipart/form-data (a 'file' part, optional 'name' and 'format' fields)")
    return options[b"boundary"]


def check_content_length(header: str | None, max_bytes: int) -> None:
    """Refuse before reading a byte when the declared body is over the cap plus multipart overhead."""
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        raise UploadRejected(status.HTTP_400_BAD_REQUEST, f"invalid Content-Length {header!r}") from None
    if declared > max_bytes + MULTIPART_OVERHEAD:
        raise too_large(max_bytes)


class _Receiver:
    """python-multipart callbacks: the file part to ``path``, text fields to memory (bounded)."""

    def __init__(self, path: Path, max_bytes: int, file_field: str, check_filename: Callable[[str], None] | None):
        self.path, self.max_bytes, self.file_field, self.check_filename = path, max_bytes, file_field, check_filename
        self.file = None
        self.filename: str | None = None
        self.size = 0
        self.fields: dict[str, bytearray] = {}
        self.parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._target: bytearray | None = None   # the text field being read; None while in the file part

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadRejected(status.HTTP_400_BAD_REQUEST, f"too many form parts (at most {MAX_PARTS})")
        self._headers, self._target = {}, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._target = self.fields.setdefault(name, bytearray())
            return
        if name != self.file_field:
            raise UploadRejected(status.HTTP_400_BAD_REQUEST,
                                 f"unexpected file part {name!r}; send the file in the {self.file_field!r} part")
        if self.file is not None or self.filename is not None:
            raise UploadRejected(status.HTTP_400_BAD_REQUEST, f"more than one {self.file_field!r} part")
        self.filename = options[b"filename"].decode("utf-8", "replace")
        if self.check_filename is not None:
            self.check_filename(self.filename)
        self.file = self.path.open("xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target is not None:
            self._target += data[start:end]
            if len(self._target) > MAX_FIELD_BYTES:
                raise UploadRejected(status.HTTP_400_BAD_REQUEST, f"a form field is over {MAX_FIELD_BYTES} bytes")
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self.file.write(data[start:end])

    def on_part_end(self) -> None:
        if self._target is None and self.file is not None:
            self.file.close()

    def on_end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


async def receive_multipart(request: Request, folder: Path, max_bytes: int, file_field: str = "file",
                            check_filename: Callable[[str], None] | None = None) -> ReceivedUpload:
    """Stream a multipart body: the ``file_field`` part into ``folder/<uuid>.part``, other parts as text.

    ``check_filename`` sees the client's filename as soon as the part's headers arrive and may raise (an
    ``UploadRejected`` or a domain error) before any file byte is read. On any failure (cap, bad framing, client gone) the
    partial file is deleted and the exception propagates.
    """
    check_content_length(request.headers.get("content-length"), max_bytes)
    parser_boundary = multipart_boundary(request.headers.get("content-type"))
    folder.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(folder / f"{uuid.uuid4().hex}.part", max_bytes, file_field, check_filename)
    parser = MultipartParser(parser_boundary, receiver.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + MULTIPART_OVERHEAD:
                raise too_large(max_bytes)
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
        if not receiver.ended:
            raise UploadRejected(status.HTTP_400_BAD_REQUEST, "the multipart body ended before its closing boundary")
        if receiver.filename is None:
            raise UploadRejected(422, f"no {file_field!r} part with a file in the form")
    except FormParserError as exc:
        receiver.discard()
        raise UploadRejected(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {exc}") from None
    except BaseException:
        receiver.discard()
        raise
    if receiver.file is not None:
        receiver.file.close()
    fields = {k: v.decode("utf-8", "replace") for k, v in receiver.fields.items()}
    return ReceivedUpload(receiver.path, receiver.filename, receiver.size, fields)
