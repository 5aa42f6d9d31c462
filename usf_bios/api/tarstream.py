"""Stream a folder as an uncompressed tar, file by file, chunk by chunk (nothing held whole in memory)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

BLOCK = 512
CHUNK = 1 << 20


def tar_stream(folder: Path, arcroot: str, replace: dict[str, bytes] | None = None) -> Iterator[bytes]:
    """``replace``: the content to send instead of a file's (by its path relative to ``folder``), which stays as it
    is on disk."""
    replace = replace or {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".lock"):
        name = path.relative_to(folder).as_posix()
        info = tarfile.TarInfo(f"{arcroot}/{name}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        if name in replace:
            info.size = len(replace[name])
            yield info.tobuf(format=tarfile.PAX_FORMAT) + replace[name]
            if info.size % BLOCK:
                yield b"\0" * (BLOCK - info.size % BLOCK)
            continue
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as handle:
            sent = 0
            while chunk := handle.read(CHUNK):
                sent += len(chunk)
                yield chunk
        if sent % BLOCK:
            yield b"\0" * (BLOCK - sent % BLOCK)
    yield b"\0" * (BLOCK * 2)
