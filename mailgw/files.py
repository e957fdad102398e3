"""Reading the files a configuration names (gateway.yaml, secret files, PEM files) with
a bound: ``/dev/zero``, a runaway file or a FIFO is refused instead of read until
memory runs out or a writer comes."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnreadableFile(ValueError):
    """A file cannot be read, or is too large; the message names it and says why."""


def read_capped(path: Path | str, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (``what`` names it in messages), reading at most
    ``limit + 1`` of them."""
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):  # opening one would wait for a writer
            raise UnreadableFile(f"{path}: cannot read {what}: it is a FIFO, not a file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read {what}: {e.strerror}") from None
    if len(data) > limit:
        raise UnreadableFile(f"{path}: {what} is larger than {_size(limit)}")
    return data


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit // 1024} KiB"
