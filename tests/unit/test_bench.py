"""The bench script's entry point loads and documents itself (the bench never runs in tests)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def test_bench_help():
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--runs", "--size-mb", "--sessions", "--pool-size"):
        assert option in result.stdout


def test_floor_forwarder_relays_both_ways():
    """The bench's floor route (``bench/forwarder.py``) is a working relay, or its figure means nothing."""
    import os
    import socket
    import threading

    upstream = socket.create_server(("127.0.0.1", 0))
    payload = os.urandom(3 << 20)

    def serve():
        conn, _ = upstream.accept()
        with conn:
            conn.sendall(b"hello\r\n")
            got = b""
            while len(got) < len(payload) and (chunk := conn.recv(1 << 16)):
                got += chunk
            conn.sendall(got[::-1])

    threading.Thread(target=serve, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    forwarder = subprocess.Popen([sys.executable, str(BENCH.parent / "forwarder.py"), str(port),
                                  str(upstream.getsockname()[1])])
    try:
        for attempt in range(100):
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                if attempt == 99:
                    raise
                threading.Event().wait(0.05)
        with client, client.makefile("rb") as reader:
            assert reader.readline() == b"hello\r\n"
            client.sendall(payload)
            assert reader.read(len(payload)) == payload[::-1]
            client.shutdown(socket.SHUT_WR)
            assert reader.read() == b""  # the upstream's close reaches the client
    finally:
        forwarder.kill()
        forwarder.wait()
        upstream.close()
