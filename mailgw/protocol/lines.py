"""A bounded line reader shared by every protocol machine."""

from __future__ import annotations

from .actions import ProtocolError


class LineTooLong(ProtocolError):
    """A line exceeded the reader's limit before its terminator arrived."""


class LineReader:
    """Accumulates bytes and hands back complete lines.

    Lines end with LF (a preceding CR is stripped, so bare-LF clients work).  The buffer
    never holds more than ``max_line`` bytes without a line ending: a longer line raises
    :class:`LineTooLong`, which is how a hostile peer is kept from growing memory.
    Literal and raw-byte reads (``read_exactly``) share the same buffer so nothing is
    lost or reordered between line mode and byte mode.
    """

    def __init__(self, max_line: int = 8192):
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def __len__(self) -> int:
        return len(self._buffer)

    def read_line(self) -> bytes | None:
        """The next complete line without its CRLF/LF, or ``None`` if there is none yet."""
        end = self._buffer.find(b"\n", 0, self.max_line + 2)
        if end < 0:
            if len(self._buffer) > self.max_line + 1:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise LineTooLong(f"line longer than {self.max_line} bytes")
        return line

    def next(self) -> bytes | None:
        """:meth:`read_line`, under the name every response reader of the upstream
        machines answers to (a POP3 response is a line)."""
        return self.read_line()

    def read_exactly(self, count: int) -> bytes | None:
        """``count`` raw bytes (an IMAP literal), or ``None`` until that many arrived."""
        if len(self._buffer) < count:
            return None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def take_rest(self) -> bytes:
        """Everything buffered and not yet read (handed on at release)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data
