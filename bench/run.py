"""mailgw's benchmark: every route in one run, alternated, as ratios against a direct connection.

    python3 bench/run.py [--quick] [--runs N] [--size-mb MB] [--sessions N] [--idle N]
                         [--only imap,smtp,memory,transfer] [--pool-size N] [--pool-max-idle S]

Needs root and the servers the integration tests use (Dovecot, aiosmtpd; see .ci/run)
plus nginx with its mail module (``libnginx-mod-mail``).  It starts, each in a private
temporary directory and on loopback: Dovecot (``tests/realservers.py``) with one large
message, an aiosmtpd sink, nginx's mail proxy with the small ``auth_http`` server nginx
asks where to connect (run here, in a thread), and the gateway (``twistd mailgw``) twice:
once as configured, once with ``MAILGW_SPLICE=0`` (the Twisted relay, for comparison).
Sections:

imap
    IMAP ``FETCH 1 (BODY.PEEK[])`` of the large message with imaplib (the FETCH alone,
    after LOGIN and SELECT), and the session time: connect -> LOGIN -> SELECT -> LOGOUT.
    Routes: direct Dovecot; a client doing TLS itself (IMAPS to Dovecot); nginx's mail
    proxy (plain); the floor, a bare forwarder (``bench/forwarder.py``: blocking
    ``splice(2)`` in two threads per connection, no protocol, no event loop), which shows
    what the second TCP hop alone costs; mailgw plain with the splice relay (also as a
    ratio against the floor) and with the Twisted relay; mailgw
    with TLS upstream (imap4s); mailgw imap4s with a warm pool (``mailgw.pool.size``,
    SPEC 9.7; skipped with a note when the gateway has no ``mailgw_pool_connections``
    metric).  The client logs in on every route (mailgw answers LOGIN locally).  Each
    run measures every route once, in an order rotated run by run.
smtp
    Set-up rate: 8 client threads connect -> greeting -> EHLO -> QUIT in a loop, direct
    to aiosmtpd and through mailgw (which logs in upstream for each session); sessions
    per second, alternated run by run.
memory
    ``--idle`` SMTP sessions held open through mailgw, greeted and then released (after
    MAIL FROM, relayed): the gateway's resident memory and descriptors per session.
transfer
    POP3 RETR and SMTP DATA of the large message, direct and through mailgw plain.

Figures are for comparing versions and routes on one machine; ratios measured in one
run with the routes alternated are what to quote.  The test suite never runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import imaplib
import json
import os
import platform
import poplib
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import realservers  # noqa: E402

USER, PASSWORD = "bench", "bench-password"
#: Route names the IMAP section compares with each other.
FLOOR = "floor: bare splice forwarder, plain"
SPLICE = "mailgw imap4, splice relay"
HOST = "127.0.0.1"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


# ------------------------------------------------------------------------------------
# Processes


def start_process(argv, *, cwd=None, env=None, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Gateway:
    """``twistd -n mailgw`` from this checkout, in its own process."""

    def __init__(self, work: Path, name: str, config: dict, env_extra: dict | None = None):
        self.dir = work / name
        self.dir.mkdir()
        (self.dir / "gateway.yaml").write_text(json.dumps(config, indent=1))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.update(env_extra or {})
        self.proc = start_process(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logfile=gateway.log", "mailgw", "--config", "gateway.yaml"],
            cwd=self.dir, env=env, log=self.dir / "stdout.log")
        self.http = config.get("http", {}).get("listen")

    def metrics(self) -> str:
        port = int(self.http.split(":")[1])
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        stop_process(self.proc)


def destination(name: str, protocol: str, port: int, **extra) -> dict:
    d = {"Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
         "mail.transport.protocol": protocol, f"mail.{protocol}.host": HOST, f"mail.{protocol}.port": str(port),
         "mail.user": USER, "mail.password": PASSWORD}
    if protocol in ("imap4", "pop3", "smtp"):
        d[f"mail.{protocol}.starttls.enable"] = "false"  # plain legs: the figures measure the gateway
    d.update(extra)
    return d


def gateway_config(destinations: list[dict], ports: dict[str, int], http_port: int | None = None) -> dict:
    config = {
        "destinations": destinations,
        "listeners": [{"destination": d["Name"], "listen": f"tcp:{ports[d['Name']]}:interface={HOST}"}
                      for d in destinations],
        "limits": {"maxSessionsPerDestination": 1_000_000, "maxSessionsPerClient": 1_000_000},
    }
    if http_port:
        config["http"] = {"listen": f"tcp:{http_port}:interface={HOST}"}
    return config


class AuthHTTP(http.server.BaseHTTPRequestHandler):
    """nginx mail's ``auth_http``: every login goes to Dovecot's IMAP port (Dovecot checks it)."""

    upstream_port = 0

    def do_GET(self):
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", HOST)
        self.send_header("Auth-Port", str(self.upstream_port))
        self.end_headers()

    def log_message(self, *args):
        pass


class Nginx:
    """nginx's mail proxy for IMAP, configured here; ``port`` is where it listens."""

    def __init__(self, work: Path, imap_upstream_port: int):
        self.dir = work / "nginx"
        self.dir.mkdir()
        handler = type("Handler", (AuthHTTP,), {"upstream_port": imap_upstream_port})
        self.auth = http.server.ThreadingHTTPServer((HOST, 0), handler)
        threading.Thread(target=self.auth.serve_forever, daemon=True).start()
        self.port = realservers.free_port()
        # One worker, like the one gateway process; nginx's default proxy buffer.
        (self.dir / "nginx.conf").write_text(f"""
load_module {NGINX_MAIL_MODULE};
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 8192; }}
mail {{
    server_name localhost;
    auth_http {HOST}:{self.auth.server_address[1]}/auth;
    imap_auth login plain;
    server {{
        listen {HOST}:{self.port};
        protocol imap;
    }}
}}
""")
        self.proc = start_process(["nginx", "-e", str(self.dir / "error.log"), "-p", str(self.dir),
                                   "-c", str(self.dir / "nginx.conf")], log=self.dir / "stdout.log")

    def stop(self) -> None:
        stop_process(self.proc)
        self.auth.shutdown()


# ------------------------------------------------------------------------------------
# Clients


class Route:
    """An IMAP route: how a client reaches the mailbox."""

    def __init__(self, name: str, port: int, tls_context=None, tls: bool = False, pid: int | None = None):
        self.name, self.port, self.tls_context = name, port, tls_context
        self.tls = tls  # TLS somewhere on the way (compared with the client doing TLS itself)
        self.pid = pid  # the relaying process (gateway, floor): its CPU time per FETCH is reported
        self.fetch: list[float] = []
        self.fetch_cpu: list[float] = []
        self.session: list[float] = []

    def connect(self) -> imaplib.IMAP4:
        if self.tls_context is not None:
            return imaplib.IMAP4_SSL(HOST, self.port, ssl_context=self.tls_context)
        return imaplib.IMAP4(HOST, self.port)

    def measure_fetch(self, size: int | None = None) -> int:
        """Time one FETCH of the large message; return its size (checked against ``size``)."""
        client = self.connect()
        client.login(USER, PASSWORD)
        client.select("INBOX")
        cpu0 = cpu_seconds(self.pid) if self.pid else 0.0
        t0 = time.perf_counter()
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        elapsed = time.perf_counter() - t0
        if self.pid:
            self.fetch_cpu.append(cpu_seconds(self.pid) - cpu0)
        client.logout()
        got = len(data[0][1]) if typ == "OK" and data and isinstance(data[0], tuple) else -1
        if got < 0 or (size is not None and got != size):
            raise RuntimeError(f"{self.name}: FETCH returned {typ}, {got} bytes instead of {size}")
        self.fetch.append(elapsed)
        return got

    def measure_session(self) -> None:
        t0 = time.perf_counter()
        client = self.connect()
        client.login(USER, PASSWORD)
        client.select("INBOX")
        client.logout()
        self.session.append(time.perf_counter() - t0)


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def median(values):
    return statistics.median(values) if values else float("nan")


def smtp_setup_rate(port: int, seconds: float, clients: int = 8) -> float:
    """Sessions per second of ``clients`` threads doing connect -> greeting -> EHLO -> QUIT."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    errors: list[BaseException] = []

    def loop(i):
        try:
            while time.perf_counter() < stop:
                with socket.create_connection((HOST, port)) as s:
                    f = s.makefile("rb")
                    if not f.readline().startswith(b"220"):
                        raise RuntimeError("no 220 greeting")
                    s.sendall(b"EHLO bench\r\n")
                    while f.readline()[3:4] == b"-":
                        pass
                    s.sendall(b"QUIT\r\n")
                    f.readline()
                counts[i] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"set-up loop failed: {errors[0]!r}")
    return sum(counts) / elapsed


def pop3_retr(port: int, size: int) -> float:
    client = poplib.POP3(HOST, port)
    client.user(USER)
    client.pass_(PASSWORD)
    t0 = time.perf_counter()
    _, lines, octets = client.retr(1)
    elapsed = time.perf_counter() - t0
    client.quit()
    return elapsed


def smtp_send(port: int, message: bytes, login: bool) -> float:
    with smtplib.SMTP(HOST, port, timeout=300) as client:
        client.ehlo("bench")
        if login:
            client.login(USER, PASSWORD)
        t0 = time.perf_counter()
        client.sendmail("a@example.org", ["b@example.org"], message)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------
# Sections


def section_imap(args, routes: list[Route]) -> None:
    size = routes[0].measure_fetch()  # also the warm-up: caches, Dovecot's index
    print(f"\n== IMAP: FETCH of a {size / 1e6:.1f} MB message and session time; {args.runs} runs "
          f"(FETCH), {args.sessions} sessions per route, routes alternated")
    for route in routes:
        route.measure_fetch(size)
        route.fetch.clear()
        route.fetch_cpu.clear()
    for run in range(args.runs):
        for route in rotated(routes, run):
            route.measure_fetch(size)
    for i in range(args.sessions):
        for route in rotated(routes, i):
            route.measure_session()
    direct = routes[0]
    tls_client = next((r for r in routes if r.name.startswith("client doing TLS")), None)
    print(f"{'route':40} {'FETCH s':>8} {'x direct':>9} {'x TLS cl.':>9} {'CPU ms':>9} "
          f"{'session ms':>11} {'x direct':>9} {'x TLS cl.':>9}")
    for route in routes:
        f, s = median(route.fetch), median(route.session)
        tls_f = f"{f / median(tls_client.fetch):9.2f}" if route.tls and tls_client else f"{'':9}"
        tls_s = f"{s / median(tls_client.session):9.2f}" if route.tls and tls_client else f"{'':9}"
        cpu = f"{statistics.mean(route.fetch_cpu) * 1e3:9.0f}" if route.fetch_cpu else f"{'':9}"
        print(f"{route.name:40} {f:8.3f} {f / median(direct.fetch):9.2f} {tls_f} {cpu} {s * 1e3:11.2f} "
              f"{s / median(direct.session):9.2f} {tls_s}")
    print("(CPU ms: the relaying process's CPU time per FETCH, the gateway's or the floor's; mean; "
          "clock-tick resolution)")
    # Paired ratios (each against the direct FETCH of the same run) are steadier than the
    # ratio of medians when other work shares the machine.
    print("FETCH ratios against direct, run by run, and their median:")
    for route in routes[1:]:
        ratios = [r / d for r, d in zip(route.fetch, direct.fetch)]
        print(f"  {route.name:38} " + " ".join(f"{x:.2f}" for x in ratios) + f"   median {median(ratios):.2f}")
    floor = next((r for r in routes if r.name == FLOOR), None)
    splice = next((r for r in routes if r.name == SPLICE), None)
    if floor and splice:
        ratios = [r / f for r, f in zip(splice.fetch, floor.fetch)]
        print(f"FETCH of the {SPLICE!r} route against the floor, run by run:\n  {'':38} "
              + " ".join(f"{x:.2f}" for x in ratios) + f"   median {median(ratios):.2f}")


def section_smtp(args, direct_port: int, gateway_port: int) -> None:
    print(f"\n== SMTP set-up rate: 8 clients, connect -> greeting -> EHLO -> QUIT, {args.smtp_seconds:g} s "
          f"per measurement, {args.runs} runs alternated")
    direct, through = [], []
    for run in range(args.runs):
        order = [(direct, direct_port), (through, gateway_port)]
        for results, port in rotated(order, run):
            results.append(smtp_setup_rate(port, args.smtp_seconds))
    d, g = median(direct), median(through)
    print(f"  direct to aiosmtpd   {d:8.0f} sessions/s   runs: " + " ".join(f"{x:.0f}" for x in direct))
    print(f"  through mailgw       {g:8.0f} sessions/s   runs: " + " ".join(f"{x:.0f}" for x in through))
    print(f"  ratio                {g / d:8.2f}x direct")


def section_memory(args, work: Path, sink_port: int) -> None:
    n = args.idle
    print(f"\n== Idle memory: {n} SMTP sessions held open through mailgw (a gateway of its own)")
    port = realservers.free_port()
    gateway = Gateway(work, "gateway-memory", gateway_config([destination("smtp", "smtp", sink_port)], {"smtp": port}))
    try:
        realservers.wait_for_banner(HOST, port, "220", timeout=30)
        idle_sessions(n, gateway.proc.pid, port)
    finally:
        gateway.stop()


def idle_sessions(n: int, pid: int, port: int) -> None:

    def open_sessions(count):
        socks = []
        for _ in range(count):
            s = socket.create_connection((HOST, port))
            socks.append(s)
        for s in socks:
            greeting = s.makefile("rb").readline()
            if not greeting.startswith(b"220"):
                raise RuntimeError(f"no greeting: {greeting!r}")
        return socks

    for s in open_sessions(50):  # warm-up: first-use allocations are not per-session costs
        s.close()
    time.sleep(1)
    rss0, fds0 = rss_kib(pid), fd_count(pid)
    socks = open_sessions(n)
    time.sleep(0.5)
    rss1, fds1 = rss_kib(pid), fd_count(pid)
    for s in socks:
        s.sendall(b"MAIL FROM:<bench@example.org>\r\n")  # releases the session: relayed from now on
    for s in socks:
        if not s.recv(100).startswith(b"250"):
            raise RuntimeError("MAIL FROM was not accepted")
    time.sleep(0.5)
    rss2, fds2 = rss_kib(pid), fd_count(pid)
    print(f"  greeted (before release): {(rss1 - rss0) / n:6.1f} KiB RSS and {(fds1 - fds0) / n:.1f} descriptors per session "
          f"(+{(rss1 - rss0) / 1024:.1f} MiB for {n})")
    print(f"  released (relayed):       {(rss2 - rss0) / n:6.1f} KiB RSS and {(fds2 - fds0) / n:.1f} descriptors per session "
          f"(+{(rss2 - rss0) / 1024:.1f} MiB for {n}; pipes are kernel memory, not RSS)")
    for s in socks:
        s.close()


def section_transfer(args, dovecot, sink_port: int, ports: dict[str, int], message: bytes) -> None:
    print(f"\n== Other transfers of the {len(message) / 1e6:.1f} MB message, mailgw plain (splice), "
          f"{args.runs} runs alternated")
    results = {k: [] for k in ("pop3 direct", "pop3 mailgw", "smtp direct", "smtp mailgw")}
    size = len(message)
    for run in range(args.runs):
        steps = [("pop3 direct", lambda: pop3_retr(dovecot.pop3_port, size)),
                 ("pop3 mailgw", lambda: pop3_retr(ports["pop3"], size)),
                 ("smtp direct", lambda: smtp_send(sink_port, message, True)),
                 ("smtp mailgw", lambda: smtp_send(ports["smtp"], message, False))]
        for name, step in rotated(steps, run):
            results[name].append(step())
    for what in ("pop3", "smtp"):
        d, g = median(results[f"{what} direct"]), median(results[f"{what} mailgw"])
        label = "POP3 RETR" if what == "pop3" else "SMTP DATA"
        print(f"  {label}: direct {d:.3f} s, mailgw {g:.3f} s, ratio {g / d:.2f}x")


# ------------------------------------------------------------------------------------


def pool_supported(gateway: Gateway, timeout: float = 15) -> bool:
    """Whether the gateway keeps a pool (SPEC 9.7's metric), after waiting for it to fill."""
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline:
        samples = [line for line in gateway.metrics().splitlines() if line.startswith("mailgw_pool_connections")]
        seen = seen or bool(samples)
        if not seen:
            return False
        if any(float(line.rsplit(" ", 1)[1]) > 0 for line in samples):
            return True
        time.sleep(0.2)
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run: 8 MB, 3 runs, 20 sessions, 200 idle")
    parser.add_argument("--runs", type=int, help="measurements per route (default 7)")
    parser.add_argument("--size-mb", type=float, help="size of the large message in MB (default 54)")
    parser.add_argument("--sessions", type=int, help="IMAP sessions per route (default 100)")
    parser.add_argument("--idle", type=int, help="idle sessions for the memory section (default 1000)")
    parser.add_argument("--smtp-seconds", type=float, help="length of one set-up measurement (default 3)")
    parser.add_argument("--only", default="imap,smtp,memory,transfer", help="comma-separated sections")
    parser.add_argument("--pool-size", type=int, default=4, help="mailgw.pool.size of the pool route (0: no pool route)")
    parser.add_argument("--pool-max-idle", type=int, default=60, help="mailgw.pool.maxIdle of the pool route")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configurations, logs)")
    args = parser.parse_args(argv)
    quick = dict(runs=3, size_mb=8, sessions=20, idle=200, smtp_seconds=1)
    full = dict(runs=7, size_mb=54, sessions=100, idle=1000, smtp_seconds=3)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sections = set(args.only.split(","))

    # Idle sessions need descriptors: ours, the gateway's and the servers' (inherited).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"mailgw bench: {' '.join(sys.argv)}")
    print(f"  {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f} at start")

    work = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    certs = realservers.Certs(work / "certs")
    line = b"x" * 998 + b"\r\n"
    message = b"Subject: bench\r\n\r\n" + line * int(args.size_mb * 1e6 // len(line))
    stack = contextlib.ExitStack()
    if not args.keep:
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # runs last
    with stack:
        dovecot = stack.enter_context(realservers.Dovecot(work / "dovecot", certs, users={USER: PASSWORD}))
        dovecot.seed(USER, message)
        sink_port = realservers.free_port()
        sink = start_process([sys.executable, str(HERE / "smtp_sink.py"), str(sink_port), USER, PASSWORD],
                             log=work / "smtp_sink.log")
        stack.callback(stop_process, sink)

        names = ["imap", "imaps", "pool", "pop3", "smtp"]
        ports = {name: realservers.free_port() for name in names}
        pool_keys = {"mailgw.pool.size": str(args.pool_size), "mailgw.pool.maxIdle": str(args.pool_max_idle)}
        ca = {"TrustStoreLocation": str(certs.ca_pem)}
        destinations = [
            destination("imap", "imap4", dovecot.imap_port),
            destination("imaps", "imap4s", dovecot.imaps_port, **ca),
            destination("pop3", "pop3", dovecot.pop3_port),
            destination("smtp", "smtp", sink_port),
        ]
        if args.pool_size:
            destinations.append(destination("pool", "imap4s", dovecot.imaps_port, **ca, **pool_keys))
        gateway = Gateway(work, "gateway", gateway_config(destinations, ports, realservers.free_port()))
        stack.callback(gateway.stop)
        twisted_port = realservers.free_port()
        twisted_gw = Gateway(work, "gateway-twisted-relay",
                             gateway_config([destination("imap", "imap4", dovecot.imap_port)], {"imap": twisted_port}),
                             env_extra={"MAILGW_SPLICE": "0"})
        stack.callback(twisted_gw.stop)
        nginx = floor = None
        if "imap" in sections:
            floor_port = realservers.free_port()
            floor = start_process([sys.executable, str(HERE / "forwarder.py"), str(floor_port), str(dovecot.imap_port)],
                                  log=work / "forwarder.log")
            stack.callback(stop_process, floor)
            if os.path.exists(NGINX_MAIL_MODULE):
                nginx = Nginx(work, dovecot.imap_port)
                stack.callback(nginx.stop)
            else:
                print(f"note: no nginx mail route ({NGINX_MAIL_MODULE} missing: apt-get install libnginx-mod-mail)")

        realservers.wait_for_port(HOST, sink_port, timeout=20)
        for port in (ports["imap"], ports["imaps"], twisted_port):
            realservers.wait_for_banner(HOST, port, "* OK", timeout=30)
        if nginx:
            realservers.wait_for_banner(HOST, nginx.port, "* OK", timeout=20)
        if floor:
            realservers.wait_for_banner(HOST, floor_port, "* OK", timeout=20)

        if "imap" in sections:
            routes = [
                Route("direct Dovecot", dovecot.imap_port),
                Route("client doing TLS itself (IMAPS)", dovecot.imaps_port, certs.client_context(), tls=True),
            ]
            if nginx:
                routes.append(Route("nginx mail proxy, plain", nginx.port))
            routes += [
                Route(FLOOR, floor_port, pid=floor.pid),
                Route(SPLICE, ports["imap"], pid=gateway.proc.pid),
                Route("mailgw imap4, Twisted relay", twisted_port, pid=twisted_gw.proc.pid),
                Route("mailgw imap4s (TLS upstream)", ports["imaps"], tls=True, pid=gateway.proc.pid),
            ]
            if args.pool_size:
                if pool_supported(gateway):
                    routes.append(Route(f"mailgw imap4s, warm pool of {args.pool_size}", ports["pool"], tls=True,
                                        pid=gateway.proc.pid))
                else:
                    print("note: warm-pool route skipped: this gateway does not support mailgw.pool.* yet "
                          "(no mailgw_pool_connections metric)")
            section_imap(args, routes)
        if "smtp" in sections:
            section_smtp(args, sink_port, ports["smtp"])
        if "memory" in sections:
            section_memory(args, work, sink_port)
        if "transfer" in sections:
            section_transfer(args, dovecot, sink_port, ports, message)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end" + (f"; work directory {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
