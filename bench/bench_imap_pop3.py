"""IMAP and POP3 through mailgw against direct Dovecot, in one run.

    python3 bench/bench_imap_pop3.py [--size-mb 50] [--runs 5] [--sessions 200]

Needs Dovecot (as installed by .ci/run) and root. Starts a private Dovecot (via
tests/realservers.py) with one large message, and ``twistd -n mailgw`` as a separate
process, then reports:

* throughput: ``FETCH 1 BODY.PEEK[]`` of the large message, direct (after LOGIN) vs
  through the gateway (no login), median of ``--runs``, and the ratio; also POP3 RETR;
* set-up latency: TCP connect until the first usable reply, median and p99. Direct, a
  client must log in first (greeting + LOGIN / USER+PASS); through the gateway the
  greeting is usable at once (the gateway has logged in upstream before it greets).

Plain connections on both legs (STARTTLS off), so the figures measure the gateway, not
TLS. Never asserted by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import realservers  # noqa: E402

USER, PASSWORD = "bench", "bench-password"


def recv_until(sock, f, terminator: bytes) -> int:
    total = 0
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed")
        total += len(line)
        if line.startswith(terminator):
            return total


def imap_fetch(port: int, login: bool) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb", buffering=1 << 20)
        f.readline()
        if login:
            s.sendall(f"a0 LOGIN {USER} {PASSWORD}\r\n".encode())
            recv_until(s, f, b"a0 ")
        s.sendall(b"a1 SELECT INBOX\r\n")
        recv_until(s, f, b"a1 ")
        s.sendall(b"a2 FETCH 1 BODY.PEEK[]\r\n")
        header = f.readline()
        size = int(header[header.rindex(b"{") + 1: header.rindex(b"}")])
        remaining = size
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            remaining -= len(chunk)
        recv_until(s, f, b"a2 ")
        elapsed = time.perf_counter() - t0
        s.sendall(b"a3 LOGOUT\r\n")
    return elapsed


def pop3_retr(port: int, login: bool) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb", buffering=1 << 20)
        f.readline()
        if login:
            s.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
            f.readline(), f.readline()
        s.sendall(b"RETR 1\r\n")
        f.readline()
        recv_until(s, f, b".\r\n")
        elapsed = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
    return elapsed


def first_usable(port: int, protocol: str, login: bool) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        f.readline()
        if login and protocol == "imap":
            s.sendall(f"a0 LOGIN {USER} {PASSWORD}\r\n".encode())
            recv_until(s, f, b"a0 ")
        elif login:
            s.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
            f.readline(), f.readline()
        return time.perf_counter() - t0


def p99(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="mailgw-bench-")
    certs = realservers.Certs(os.path.join(work, "certs"))
    line = b"x" * 998 + b"\r\n"
    message = b"Subject: bench\r\n\r\n" + line * (args.size_mb * 1024 * 1024 // len(line))
    with realservers.Dovecot(os.path.join(work, "dovecot"), certs, users={USER: PASSWORD}) as dovecot:
        dovecot.seed(USER, message)
        imap_gw, pop3_gw = realservers.free_port(), realservers.free_port()

        def dest(name, protocol, port):
            return {"Name": name, "Type": "MAIL", "Authentication": "BasicAuthentication",
                    "mail.transport.protocol": protocol, f"mail.{protocol}.host": "127.0.0.1",
                    f"mail.{protocol}.port": str(port), f"mail.{protocol}.starttls.enable": "false",
                    "mail.user": USER, "mail.password": PASSWORD}

        config = {
            "destinations": [dest("imap", "imap4", dovecot.imap_port), dest("pop3", "pop3", dovecot.pop3_port)],
            "listeners": [{"destination": "imap", "listen": f"tcp:{imap_gw}:interface=127.0.0.1"},
                          {"destination": "pop3", "listen": f"tcp:{pop3_gw}:interface=127.0.0.1"}],
        }
        with open(os.path.join(work, "gateway.yaml"), "w") as f:
            json.dump(config, f)
        gateway = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile=/dev/null", "mailgw", "--config", "gateway.yaml"],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            realservers.wait_for_banner("127.0.0.1", imap_gw, "* OK", timeout=20)
            realservers.wait_for_banner("127.0.0.1", pop3_gw, "+OK", timeout=20)
            mb = len(message) / 1e6
            for label, run, direct_port, gw_port in [
                ("IMAP FETCH", imap_fetch, dovecot.imap_port, imap_gw),
                ("POP3 RETR ", pop3_retr, dovecot.pop3_port, pop3_gw),
            ]:
                direct = statistics.median(run(direct_port, True) for _ in range(args.runs))
                through = statistics.median(run(gw_port, False) for _ in range(args.runs))
                print(f"{label} {mb:.0f} MB, median of {args.runs}: direct {direct:.3f} s ({mb / direct:.0f} MB/s), "
                      f"mailgw {through:.3f} s ({mb / through:.0f} MB/s), ratio {through / direct:.2f}x")
            for protocol, direct_port, gw_port in [("imap", dovecot.imap_port, imap_gw), ("pop3", dovecot.pop3_port, pop3_gw)]:
                direct = [first_usable(direct_port, protocol, True) for _ in range(args.sessions)]
                through = [first_usable(gw_port, protocol, False) for _ in range(args.sessions)]
                print(f"{protocol} connect to first usable reply, {args.sessions} sessions (ms): "
                      f"direct (greeting+login) median {statistics.median(direct)*1e3:.2f} p99 {p99(direct)*1e3:.2f}; "
                      f"mailgw median {statistics.median(through)*1e3:.2f} p99 {p99(through)*1e3:.2f}")
        finally:
            gateway.terminate()
            gateway.wait(10)


if __name__ == "__main__":
    main()
