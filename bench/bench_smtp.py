"""SMTP through mailgw against a direct connection to the same upstream, in one run.

    python3 bench/bench_smtp.py [--size-mb 50] [--runs 5] [--sessions 200]

Starts an aiosmtpd sink (AUTH required) and ``twistd -n mailgw`` as separate processes,
then reports:

* throughput: a large message sent with smtplib, direct (with AUTH) vs through the
  gateway (no AUTH: the gateway logs in), median of ``--runs``, and the ratio;
* set-up latency: TCP connect until the first usable reply (the 220 greeting, after
  which the client may send MAIL), median and p99 over ``--sessions`` sessions. For the
  direct baseline the client also has to log in before it can send, so the baseline
  includes EHLO+AUTH; the gateway's figure includes its own upstream login.

Figures are for comparing versions on the same machine, never asserted by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
USER, PASSWORD = "bench", "bench-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(3) == b"220":
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


def start(argv, **kwargs):
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def send(port: int, message: bytes, login: bool) -> float:
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        if login:
            client.login(USER, PASSWORD)
        client.sendmail("a@example.org", ["b@example.org"], message)
    return time.perf_counter() - t0


def first_usable_reply(port: int, login: bool) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        f.readline()
        if login:  # the direct client must authenticate before MAIL
            s.sendall(b"EHLO bench\r\n")
            while f.readline()[3:4] == b"-":
                pass
            import base64

            s.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")
            f.readline()
        elapsed = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
        f.readline()
    return elapsed


def p99(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()

    sink_port, gw_port = free_port(), free_port()
    work = tempfile.mkdtemp(prefix="mailgw-bench-")
    config = {
        "destinations": [{
            "Name": "bench", "Type": "MAIL", "Authentication": "BasicAuthentication",
            "mail.transport.protocol": "smtp", "mail.smtp.host": "127.0.0.1", "mail.smtp.port": str(sink_port),
            "mail.smtp.starttls.enable": "false", "mail.user": USER, "mail.password": PASSWORD,
        }],
        "listeners": [{"destination": "bench", "listen": f"tcp:{gw_port}:interface=127.0.0.1"}],
    }
    with open(os.path.join(work, "gateway.yaml"), "w") as f:
        json.dump(config, f)
    sink = start([sys.executable, os.path.join(HERE, "smtp_sink.py"), str(sink_port), USER, PASSWORD])
    gateway = start([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                     "-n", "--pidfile=", "--logfile=/dev/null", "mailgw", "--config", "gateway.yaml"], cwd=work)
    try:
        wait_port(sink_port)
        wait_port(gw_port)
        line = b"x" * 998 + b"\r\n"
        message = b"Subject: bench\r\n\r\n" + line * (args.size_mb * 1024 * 1024 // len(line))
        direct = [send(sink_port, message, login=True) for _ in range(args.runs)]
        through = [send(gw_port, message, login=False) for _ in range(args.runs)]
        d, g = statistics.median(direct), statistics.median(through)
        mb = len(message) / 1e6
        print(f"throughput, {mb:.0f} MB message, median of {args.runs}:")
        print(f"  direct   {d:7.3f} s  {mb / d:7.1f} MB/s")
        print(f"  mailgw   {g:7.3f} s  {mb / g:7.1f} MB/s")
        print(f"  ratio    {g / d:7.2f}x the direct time")

        direct_lat = [first_usable_reply(sink_port, login=True) for _ in range(args.sessions)]
        gw_lat = [first_usable_reply(gw_port, login=False) for _ in range(args.sessions)]
        print(f"connect to first usable reply, {args.sessions} sessions (ms):")
        print(f"  direct (greeting+EHLO+AUTH)  median {statistics.median(direct_lat)*1e3:6.2f}  p99 {p99(direct_lat)*1e3:6.2f}")
        print(f"  mailgw (greeting)            median {statistics.median(gw_lat)*1e3:6.2f}  p99 {p99(gw_lat)*1e3:6.2f}")
        print(f"  added (median)               {(statistics.median(gw_lat) - statistics.median(direct_lat))*1e3:6.2f}")
    finally:
        for proc in (gateway, sink):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
