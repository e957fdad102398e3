"""Helpers shared by the protocol machines."""

from __future__ import annotations

import re

_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")


def printable(data: bytes, limit: int = 200) -> str:
    """Peer-supplied text made safe to put in a log line or a reply to the application:
    printable ASCII only, at most ``limit`` characters."""
    text = _UNPRINTABLE.sub(b"?", data[:limit]).decode("ascii")
    return text + ("..." if len(data) > limit else "")


def first_word(line: bytes) -> tuple[bytes, bytes]:
    """Split a command line into its upper-cased verb and the rest."""
    verb, _, rest = line.partition(b" ")
    return verb.upper(), rest.strip()


class UpstreamBuffer:
    """Bytes the upstream sends once it is ready but before release (kept, bounded).

    They are handed to the application at release so nothing is lost or reordered.
    """

    def __init__(self, limit: int = 65536):
        self.limit = limit
        self._data = bytearray()

    def add(self, data: bytes) -> bool:
        """Keep ``data``; ``False`` when the limit would be exceeded."""
        if len(self._data) + len(data) > self.limit:
            return False
        self._data += data
        return True

    def take(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        return data

    def __len__(self) -> int:
        return len(self._data)
