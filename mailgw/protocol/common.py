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


def has_keyword(lines: tuple[str, ...], keyword: str) -> bool:
    """True when a capability line (SMTP EHLO extension, POP3 CAPA line) starts with
    ``keyword`` (case-insensitive)."""
    return any(line.split(" ", 1)[0].upper() == keyword for line in lines)


def keyword_arguments(lines: tuple[str, ...], keyword: str) -> set[str]:
    """The upper-cased words after ``keyword`` on capability lines that start with it:
    the mechanisms of SMTP's ``AUTH`` extension or POP3's ``SASL`` CAPA line."""
    found: set[str] = set()
    for line in lines:
        words = line.upper().split()
        if words and words[0] == keyword:
            found.update(words[1:])
    return found


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
