"""A test-only SOCKS5 server that speaks only the connectivity proxy's method 0x80.

No packaged proxy knows method 0x80, so the integration tests bring their own.  It runs
in its own threads (independent of any Twisted reactor), listens on 127.0.0.1, checks
the client's bytes exactly, records what it received and can be told how to answer::

    with SAPSocksServer(expected_jwt="token") as proxy:
        proxy.configure(reply=0x02)          # refuse CONNECT with "not allowed"
        proxy.configure(stall="connect")     # read the CONNECT request, never answer
        proxy.configure(close="auth")        # close after reading the auth request
        proxy.sessions[-1].jwt, .location_id, .target_host, .target_port, .error

On success it really tunnels to the requested port on 127.0.0.1; only the names
``localhost`` and ``127.0.0.1`` are resolved (anything else gets 0x04 host unreachable,
a closed port gets 0x05).  With ``coalesce`` > 0 it waits that long for the target's
first bytes and sends them in the same ``send`` as the CONNECT reply, so the client
deterministically receives bytes right after the reply.

Stages for ``stall``/``close``: ``"greeting"`` (after the method offer), ``"auth"``
(after the 0x80 authentication request), ``"connect"`` (after the CONNECT request).
"""

from __future__ import annotations

import base64
import binascii
import select
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["SAPSocksServer", "Session"]

ALLOWED_HOSTS = ("localhost", "127.0.0.1")
STAGES = ("greeting", "auth", "connect")


@dataclass
class Session:
    """What one client connection sent (``error`` names a protocol violation)."""

    methods: bytes = b""
    jwt: str | None = None
    jwt_valid: bool | None = None
    location_id: str | None = None
    atyp: int | None = None
    target_host: str | None = None
    target_port: int | None = None
    reply: int | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)


class _ClientGone(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _ClientGone()
        data += chunk
    return data


def _hold(sock: socket.socket) -> None:
    """Stall: read and discard until the client (or ``stop``) closes the socket."""
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        owner._track(sock)
        session = Session()
        owner.sessions.append(session)
        try:
            self._serve(owner, sock, session)
        except (_ClientGone, OSError):
            pass
        finally:
            session.done.set()
            owner._untrack(sock)

    def _serve(self, owner: SAPSocksServer, sock: socket.socket, session: Session) -> None:
        settings = owner._settings()
        sock.settimeout(None)

        # Greeting: VER NMETHODS METHODS
        ver, nmethods = _recv_exact(sock, 2)
        session.methods = _recv_exact(sock, nmethods)
        if ver != 0x05:
            session.error = f"greeting version 0x{ver:02x}"
            return
        if self._stop_here("greeting", settings, sock):
            return
        if 0x80 not in session.methods:
            session.error = "client did not offer method 0x80"
            sock.sendall(b"\x05\xff")
            return
        sock.sendall(b"\x05\x80")

        # 0x80 authentication: 01, JWT length (4, big endian), JWT, len, base64 location
        (ver,) = _recv_exact(sock, 1)
        if ver != 0x01:
            session.error = f"auth version 0x{ver:02x}"
            return
        (jwt_len,) = struct.unpack(">I", _recv_exact(sock, 4))
        if jwt_len > 64 * 1024:
            session.error = f"JWT length {jwt_len} too large"
            return
        session.jwt = _recv_exact(sock, jwt_len).decode("utf-8", "replace")
        (loc_len,) = _recv_exact(sock, 1)
        loc_b64 = _recv_exact(sock, loc_len)
        if loc_len:
            try:
                session.location_id = base64.b64decode(loc_b64, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                session.error = "location id is not valid base64"
                sock.sendall(b"\x01\x01")
                return
        if self._stop_here("auth", settings, sock):
            return
        session.jwt_valid = session.jwt == settings["expected_jwt"]
        if not session.jwt_valid:
            sock.sendall(b"\x01\x01")
            return
        sock.sendall(b"\x01\x00")

        # CONNECT: 05 01 00 ATYP ADDR PORT
        ver, cmd, rsv, atyp = _recv_exact(sock, 4)
        session.atyp = atyp
        if ver != 0x05 or rsv != 0x00:
            session.error = f"CONNECT header {bytes([ver, cmd, rsv]).hex()}"
            return
        if atyp == 0x03:
            (n,) = _recv_exact(sock, 1)
            session.target_host = _recv_exact(sock, n).decode("ascii", "replace")
        elif atyp == 0x01:
            session.target_host = socket.inet_ntoa(_recv_exact(sock, 4))
        elif atyp == 0x04:
            session.target_host = socket.inet_ntop(socket.AF_INET6, _recv_exact(sock, 16))
        else:
            session.error = f"unknown ATYP 0x{atyp:02x}"
            return
        (session.target_port,) = struct.unpack(">H", _recv_exact(sock, 2))
        if self._stop_here("connect", settings, sock):
            return
        if cmd != 0x01:
            self._reply(sock, session, 0x07)
            return
        if atyp != 0x03:
            self._reply(sock, session, 0x08)
            return
        if settings["reply"] != 0x00:
            self._reply(sock, session, settings["reply"])
            return
        if session.target_host not in ALLOWED_HOSTS:
            self._reply(sock, session, 0x04)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", session.target_port), timeout=2)
        except OSError:
            self._reply(sock, session, 0x05)
            return
        owner._track(upstream)
        try:
            first = b""
            if settings["coalesce"]:
                upstream.settimeout(settings["coalesce"])
                try:
                    first = upstream.recv(65536)
                except socket.timeout:
                    first = b""
            upstream.settimeout(None)
            bound = upstream.getsockname()
            session.reply = 0x00
            sock.sendall(
                b"\x05\x00\x00\x01" + socket.inet_aton(bound[0]) + struct.pack(">H", bound[1])
                + first
            )
            _pipe(sock, upstream)
        finally:
            owner._untrack(upstream)
            upstream.close()

    @staticmethod
    def _reply(sock: socket.socket, session: Session, code: int) -> None:
        session.reply = code
        sock.sendall(bytes([0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0]))

    @staticmethod
    def _stop_here(stage: str, settings: dict, sock: socket.socket) -> bool:
        if settings["close"] == stage:
            return True
        if settings["stall"] == stage:
            _hold(sock)
            return True
        return False


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Relay both ways until either side closes."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select([a, b], [], [], 5.0)
        for s in readable:
            data = s.recv(65536)
            if not data:
                return
            peers[s].sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: SAPSocksServer


class SAPSocksServer:
    """The method-0x80 SOCKS5 server; a context manager (see the module docstring)."""

    def __init__(self, expected_jwt: str, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        self._config = dict(expected_jwt=expected_jwt, reply=0x00, stall=None, close=None,
                            coalesce=0.0)
        self.sessions: list[Session] = []
        self._sockets: set[socket.socket] = set()
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    def configure(self, *, expected_jwt: str | None = None, reply: int = 0x00,
                  stall: str | None = None, close: str | None = None,
                  coalesce: float = 0.0) -> None:
        """Set how the next connections are answered (unset options get defaults)."""
        for stage in (stall, close):
            if stage is not None and stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
        with self._lock:
            if expected_jwt is not None:
                self._config["expected_jwt"] = expected_jwt
            self._config.update(reply=reply, stall=stall, close=close, coalesce=coalesce)

    def _settings(self) -> dict:
        with self._lock:
            return dict(self._config)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def start(self) -> SAPSocksServer:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs=dict(poll_interval=0.05),
                                        name="socks80", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close every open connection (stalled ones included)."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> SAPSocksServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
