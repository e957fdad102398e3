"""The bench's floor for a plain relay: a bare TCP forwarder, no protocol and no event loop.

    python3 bench/forwarder.py LISTEN_PORT UPSTREAM_PORT

Every accepted connection gets a connection to 127.0.0.1:UPSTREAM_PORT and two threads,
one per direction, each moving bytes with blocking ``splice(2)`` through its own 1 MiB
pipe.  This is the least a relay process can do per byte on Linux, so a route through
it shows what the second TCP hop alone costs on this machine; the gateway's splice relay
is measured against it in the same run (``bench/run.py``, section imap).
"""

import fcntl
import os
import socket
import sys
import threading
import time

PIPE_SIZE = 1 << 20


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Move ``src``'s bytes to ``dst`` until end of file (passed on as a half-close) or
    an error (which ends both directions, so the other thread does not wait for ever)."""
    pipe: tuple[int, ...] = ()
    try:
        pipe = r, w = os.pipe()
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the per-user pipe quota: the default size will do
        while n := os.splice(src.fileno(), w, PIPE_SIZE, flags=os.SPLICE_F_MOVE):
            while n:
                n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
        ends = ((dst, socket.SHUT_WR),)
    except OSError:
        ends = ((dst, socket.SHUT_RDWR), (src, socket.SHUT_RDWR))
    for fd in pipe:
        os.close(fd)
    for sock, how in ends:
        try:
            sock.shutdown(how)
        except OSError:
            pass  # already closed by the peer


def forward(app: socket.socket, upstream_port: int) -> None:
    with app:
        try:
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
        except OSError:
            return
        with upstream:
            back = threading.Thread(target=pump, args=(upstream, app))
            back.start()
            pump(app, upstream)
            back.join()


def serve(listen_port: int, upstream_port: int) -> None:
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=128)
    while True:
        try:
            app, _ = listener.accept()
        except OSError:  # out of descriptors, say: the bench sees the refusals
            time.sleep(0.1)
            continue
        threading.Thread(target=forward, args=(app, upstream_port), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
