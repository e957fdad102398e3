"""The zero-copy relay: ``splice(2)`` through one pipe per direction, for plain socket legs.

After release the gateway only moves bytes.  Where both legs are plain stream sockets
(no TLS, no protocol wrapper) on Linux, :class:`SpliceRelay` moves them socket -> pipe ->
socket inside the kernel, so the payload never enters Python.  Everything else keeps
:class:`mailgw.relay.Relay`; :func:`mailgw.relay.make_relay` chooses.

How the file descriptors are taken over from Twisted, with public APIs only:

1. ``stopReading()`` on both transports: from now on the kernel keeps what arrives.
2. Bytes Twisted already holds in a transport's write buffer (the session's pending
   upstream bytes, the application's leftover) must reach the peer first, in order, so
   each direction starts splicing only once its destination's buffer is empty.
   Twisted says when a write buffer is empty through the producer API: a registered
   *pull* producer gets ``resumeProducing()`` from ``doWrite`` once everything buffered
   has been written.  ``registerProducer`` also calls it once at once, whatever the
   buffer holds, so that first call is ignored, and ``startWriting()`` makes sure a
   ``doWrite`` happens even when the buffer is already empty (it then writes nothing
   and reports empty).  The alternatives were private attributes (``dataBuffer``,
   ``_tempDataBuffer``) or guessing.
3. The relay registers its own reader/writer objects (``IReadDescriptor`` and
   ``IWriteDescriptor``) with the reactor on ``dup()``-ed descriptors.  Not on the
   transports' own numbers: the reactor keeps one selectable per descriptor number, and
   a ``transport.write`` during splicing (the drain's goodbye) would call
   ``startWriting`` and silently replace our object with the transport.  A duplicate
   is a separate registration, so the transport keeps working on its own number.
4. At the end the duplicates and pipes are closed and the sockets are handed back to
   Twisted with ``loseConnection``: Twisted writes whatever it was given meanwhile (the
   goodbye), closes, and the session sees ``connectionLost`` on both legs as before.

Close semantics are those of the Twisted relay: one leg's end of file or error, the
idle timer, or :meth:`SpliceRelay.close` stop reading on both legs; what was already
read sits in the pipes and is delivered within ``CLOSE_GRACE`` seconds (to a leg that
sent end of file too, if it still takes it: the Twisted relay drops those); then both
legs close.  A goodbye the session writes to the application
transport right before ``close()`` (in the same reactor turn) goes out after the pipe's
bytes: ``close()`` holds Twisted's writing (``stopWriting``) until the pipes are empty.

Backpressure: the pipe is the only buffer.  A leg is read only while its pipe has room;
the writer side restarts the reading once the pipe is empty again, so a reader that
stops reading stops the sender once the kernel's socket buffers and the pipe are full.

Costs: six more descriptors per released session (two pipes, two duplicates).  When
they cannot be had (``EMFILE``), the factory falls back to the Twisted relay.
"""

from __future__ import annotations

import fcntl
import os
import socket

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IPullProducer,
    IReactorFDSet,
    IReadDescriptor,
    ISSLTransport,
    IWriteDescriptor,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from .relaycore import CLOSE_GRACE, Closer, RelayCore

log = Logger()

#: Bytes a direction's pipe grows to once it fills (a bulk transfer).  Pipes start at the
#: kernel's default (64 KiB, sixteen page slots): the kernel allocates a slot array of
#: the pipe's size up front and counts sizes against the per-user pipe quota
#: (``pipe-user-pages-soft``), so idle sessions keep small pipes.  1 MiB is the default
#: ``pipe-max-size``; on loopback it cost a third less CPU per megabyte than 64 KiB,
#: and 4 MiB no less than 1 MiB.
PIPE_SIZE = 1 << 20

#: How many read -> write rounds one readable event may run before the reactor gets
#: the thread back (fairness between sessions, and for timers).
ROUNDS = 8

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: ``MAILGW_SPLICE=0`` in the environment keeps every session on the Twisted relay (a
#: diagnostic switch, and what the bench uses to compare the two).
ENABLED = os.environ.get("MAILGW_SPLICE", "1") != "0"

# States.
SPLICING, DRAINING, CLOSED = "splicing", "draining", "closed"


def splice_unusable(reactor, transport) -> str | None:
    """Why the splice relay cannot take ``transport`` over, or ``None`` when it can."""
    if not ENABLED:
        return "MAILGW_SPLICE=0"
    if not hasattr(os, "splice"):
        return "os.splice is not available"
    if not IReactorFDSet.providedBy(reactor):
        return "the reactor does not watch file descriptors"
    if ISSLTransport.providedBy(transport):
        return "the leg is TLS"
    if isinstance(transport, ProtocolWrapper):  # TLSMemoryBIOProtocol is one as well
        return "the leg is a wrapped transport"
    if not isinstance(transport, FileDescriptor):
        return "the leg is not a file descriptor"
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return "the leg is not a stream socket"
    if transport.disconnected or transport.disconnecting:
        return "the leg is closing"
    return None


class _Pipe:
    """One direction: ``src`` leg -> kernel pipe -> ``dst`` leg."""

    __slots__ = ("r", "w", "capacity", "grow_to", "buffered", "moved", "backlog", "src", "dst")

    def __init__(self, grow_to: int):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        self.grow_to = grow_to
        self.buffered = 0  # bytes in the pipe
        self.moved = 0  # bytes delivered to ``dst`` (the metrics' byte count)
        self.backlog = b""  # bytes given by from_app/from_upstream while splicing (rare)
        self.src: _Leg | None = None
        self.dst: _Leg | None = None

    def grow(self) -> bool:
        """Enlarge the pipe once, to ``grow_to``; whether it has more room now."""
        size, self.grow_to = self.grow_to, 0
        if size <= self.capacity:
            return False
        try:
            self.capacity = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            return False  # over pipe-max-size or the per-user pipe quota: keep it
        return True

    def close(self) -> None:
        for fd in (self.r, self.w):
            os.close(fd)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Leg:
    """One socket as the reactor sees it while spliced: a duplicate of the transport's fd.

    Reading moves bytes from the socket into ``out``; writing moves bytes from
    ``inbound`` into the socket.  One object does both because the reactor keeps one
    selectable per descriptor.
    """

    __slots__ = ("relay", "transport", "fd", "out", "inbound", "reading", "writing", "dead", "name")

    def __init__(self, relay: "SpliceRelay", transport, name: str):
        self.relay = relay
        self.transport = transport
        self.name = name
        self.fd = os.dup(transport.getHandle().fileno())
        self.out: _Pipe | None = None
        self.inbound: _Pipe | None = None
        self.reading = False
        self.writing = False
        self.dead = False  # no more bytes can be written to it

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "mailgw-splice"

    def doRead(self):
        relay = self.relay
        pipe = self.out
        dst = pipe.dst
        rounds = ROUNDS
        # The state check also covers events the reactor collected before a close.
        while rounds and relay.state is SPLICING:
            rounds -= 1
            # At most the room left: a slot can hold more than a page (socket buffers
            # are made of larger fragments), so the kernel would let the pipe hold
            # several times its size.
            room = pipe.capacity - pipe.buffered
            if room <= 0:  # a stale event after the pipe filled (length 0 reads as EOF)
                self.stop_reading()
                return None
            try:
                n = os.splice(self.fd, pipe.w, room, None, None, _FLAGS)
            except BlockingIOError:
                # Nothing to read, or the pipe is full: it counts page slots, not bytes,
                # so a pipe of small segments fills before ``capacity`` bytes.
                if pipe.buffered and not (pipe.grow_to and pipe.grow()):
                    self.stop_reading()
                return None
            except OSError as e:
                relay._ended(self, e)
                return None
            if not n:
                relay._ended(self, None)
                return None
            pipe.buffered += n
            relay.last_traffic = relay._clock()
            dst.doWrite()
            if pipe.buffered:
                # The other side is slower: keep reading only while the pipe has room.
                if pipe.buffered >= pipe.capacity and not (pipe.grow_to and pipe.grow()):
                    self.stop_reading()
                return None
        return None

    def doWrite(self):
        pipe = self.inbound
        while True:
            if pipe.buffered:
                try:
                    n = os.splice(pipe.r, self.fd, pipe.buffered, None, None, _FLAGS)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    self.relay._ended(self, e)
                    return None
                pipe.buffered -= n
                pipe.moved += n
                if pipe.buffered:
                    if not self.writing:
                        self.writing = True
                        self.relay.reactor.addWriter(self)
                    return None
            if not pipe.backlog:
                break
            # Injected bytes enter the pipe only once it is empty: they come after
            # everything the source already sent, and the source waits meanwhile.
            n = os.write(pipe.w, pipe.backlog)
            pipe.backlog = pipe.backlog[n:]
            pipe.buffered += n
        if self.writing:
            self.writing = False
            self.relay.reactor.removeWriter(self)
        relay = self.relay
        if relay.state is SPLICING:
            if not pipe.src.reading:
                pipe.src.start_reading()
        elif relay.state is DRAINING:
            relay._drained()
        return None

    def start_reading(self) -> None:
        self.reading = True
        self.relay.reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.reactor.removeReader(self)

    def connectionLost(self, reason) -> None:
        # The reactor saw a hang-up or an error on the descriptor (and has already
        # stopped watching it).
        self.reading = self.writing = False
        if self.relay.state is not CLOSED:
            self.relay._ended(self, reason.value)


@implementer(IPullProducer)
class _Flushed:
    """Tells the relay when a transport's write buffer is empty (see the module docstring)."""

    def __init__(self, leg: _Leg):
        self.leg = leg
        self.armed = False

    def resumeProducing(self) -> None:
        if not self.armed:
            self.armed = True  # registerProducer's own call: the buffer may hold anything
            return
        self.leg.transport.unregisterProducer()
        self.leg.relay._flushed(self.leg)

    def stopProducing(self) -> None:
        # The connection was lost while flushing; the session closes the relay too.
        self.leg.relay._flushing.pop(self.leg, None)
        self.leg.dead = True
        self.leg.relay.close()

    def cancel(self) -> None:
        self.leg.transport.unregisterProducer()


class SpliceRelay(RelayCore):
    """Relays two plain socket transports with ``splice(2)``; the interface of ``Relay``.

    ``from_app``/``from_upstream`` send bytes the session holds (e.g. the leftover at
    release) after everything already relayed in that direction; ``close()`` ends the
    relay (idempotent); ``closing`` tells whether it is ending; ``bytes_to_upstream``
    and ``bytes_to_app`` count the bytes delivered to each leg.  Raises ``OSError``
    when its pipes or descriptors cannot be had; use :func:`mailgw.relay.make_relay`.
    """

    # Slots: a released session keeps one of these for as long as it lasts.
    __slots__ = ("state", "_grace", "_legs", "_pipes", "_to_up", "_to_app", "_ended_first", "_flushing")

    def __init__(self, reactor, app_transport, upstream_transport, *, idle_timeout: float, sid: str,
                 closer: Closer | None = None, pipe_size: int = PIPE_SIZE):
        super().__init__(reactor, app_transport, upstream_transport, idle_timeout=idle_timeout, sid=sid, closer=closer)
        self.state = SPLICING
        self._grace = None
        self._legs: tuple[_Leg, ...] = ()
        self._pipes: tuple[_Pipe, ...] = ()
        try:
            app_leg = _Leg(self, app_transport, "app")
            self._legs += (app_leg,)
            up_leg = _Leg(self, upstream_transport, "upstream")
            self._legs += (up_leg,)
            self._to_up = _Pipe(pipe_size)
            self._pipes += (self._to_up,)
            self._to_app = _Pipe(pipe_size)
            self._pipes += (self._to_app,)
        except OSError:
            self._stop_idle_timer()
            self._release_fds()
            raise
        self._to_up.src, self._to_up.dst = app_leg, up_leg
        self._to_app.src, self._to_app.dst = up_leg, app_leg
        app_leg.out = up_leg.inbound = self._to_up
        up_leg.out = app_leg.inbound = self._to_app
        self._ended_first: _Leg | None = None
        for transport in (app_transport, upstream_transport):
            transport.stopReading()
        self._flushing: dict[_Leg, _Flushed] = {}
        for leg in self._legs:
            self._await_flush(leg)

    # -- the Relay interface ---------------------------------------------------------

    @property
    def bytes_to_upstream(self) -> int:
        """Bytes delivered to the upstream leg so far."""
        return self._to_up.moved

    @property
    def bytes_to_app(self) -> int:
        """Bytes delivered to the application leg so far."""
        return self._to_app.moved

    @property
    def buffered(self) -> int:
        """Bytes the relay holds (in its pipes and backlogs): bounded by the pipe sizes."""
        return sum(p.buffered + len(p.backlog) for p in self._pipes)

    def from_app(self, data: bytes) -> None:
        """Send ``data`` to the upstream after what was already relayed that way."""
        self._send(self._to_up, data)

    def from_upstream(self, data: bytes) -> None:
        """Send ``data`` to the application after what was already relayed that way."""
        self._send(self._to_app, data)

    def close(self) -> None:
        """Stop reading, deliver what was read (within ``CLOSE_GRACE``), close both legs."""
        if self.closing:
            return
        self.closing = True
        self._stop_idle_timer()
        # Legs still flushing keep their bytes in Twisted's buffer, which loseConnection
        # writes out; nothing was spliced towards them.
        for flushed in self._flushing.values():
            flushed.cancel()
        self._flushing.clear()
        self.state = DRAINING
        for leg in self._legs:
            if leg.transport.disconnected:
                leg.dead = True
            # Whatever the transport was handed while splicing (a goodbye) waits until
            # the pipe towards it is empty; loseConnection restarts it.
            leg.transport.stopWriting()
            leg.stop_reading()
        for pipe in self._pipes:
            if pipe.dst.dead:
                pipe.buffered = 0
                pipe.backlog = b""
            elif pipe.buffered or pipe.backlog:
                pipe.dst.doWrite()
        if self.state is DRAINING:
            if self._drained():
                return
            self._grace = self.reactor.callLater(CLOSE_GRACE, self._finish)

    # -- internals -------------------------------------------------------------------

    def _send(self, pipe: _Pipe, data: bytes) -> None:
        if not data or self.state is CLOSED or pipe.dst.dead:
            return
        if pipe.dst in self._flushing:
            # Nothing was spliced towards it yet: Twisted's buffer keeps the order.
            pipe.dst.transport.write(data)
            pipe.moved += len(data)
            return
        pipe.backlog += data
        if self.state is SPLICING:
            pipe.src.stop_reading()
        pipe.dst.doWrite()

    def _await_flush(self, leg: _Leg) -> None:
        if leg in self._flushing:
            return
        flushed = _Flushed(leg)
        self._flushing[leg] = flushed
        leg.transport.registerProducer(flushed, False)
        if leg in self._flushing:  # registerProducer stops it at once when already lost
            leg.transport.startWriting()

    def _flushed(self, leg: _Leg) -> None:
        """Twisted wrote everything it held for ``leg``: the pipe towards it may start."""
        self._flushing.pop(leg, None)
        if not self._flushing:
            self._flushing = {}  # a dict emptied by pop keeps its table: a session lasts long
        if self.state is SPLICING:
            # Bytes that arrived meanwhile wait in the kernel; epoll reports them.
            leg.inbound.src.start_reading()

    def _ended(self, leg: _Leg, error: BaseException | None) -> None:
        """``leg`` reached end of file (``error`` None) or failed."""
        if error is not None:
            leg.dead = True
            log.debug("session {sid}: {leg} leg: {error}", sid=self.sid, leg=leg.name, error=str(error))
        if self._ended_first is None:
            self._ended_first = leg
        if self.state is DRAINING:
            self._drained()  # a leg that fails while draining drops its pipe's bytes
        else:
            self.close()

    def _drained(self) -> bool:
        """While draining: finish once every live leg's pipe is empty."""
        for pipe in self._pipes:
            if (pipe.buffered or pipe.backlog) and not pipe.dst.dead:
                return False
        self._finish()
        return True

    def _release_fds(self) -> None:
        for leg in self._legs:
            if leg.fd >= 0:
                self.reactor.removeReader(leg)
                self.reactor.removeWriter(leg)
                os.close(leg.fd)
                leg.fd = -1
                leg.reading = leg.writing = False
        for pipe in self._pipes:
            pipe.close()
            pipe.buffered = 0
            pipe.backlog = b""

    def _finish(self) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        # Byte counts stay readable after the pipes are gone.
        self._release_fds()
        # The leg that ended first closes first, so the session sees the same order of
        # connectionLost calls as with the Twisted relay.
        legs = list(self._legs)
        if self._ended_first is legs[1]:
            legs.reverse()
        for leg in legs:
            self.closer.close(leg.transport)
