"""Real third-party servers for the integration tests.

Every server here listens on 127.0.0.1 on a free high port, keeps its files under a
directory the caller gives (normally one from pytest's ``tmp_path_factory``), starts in
about a second and is stopped by killing its whole process group. Each class is a
context manager (``with Dovecot(...) as d:``) and exposes its ports and paths as plain
attributes; ``start_seconds`` records how long the start took.

Runtime directories and logs. Dovecot's mail processes (uid 65534) and Postfix's daemons
(user ``postfix``) must traverse every directory above their spool, sockets and mail;
pytest's ``/tmp/pytest-of-root`` is mode 0700, so those servers keep their runtime tree
in a world-traversable ``/tmp/mailgw-<name>-*`` directory (``runtime_dir``, removed on
stop, reachable through a symlink in the work directory) and their logs in the work
directory itself (written by root processes), where they survive for post-mortems.

This module imports pytest, trustme and aiosmtpd lazily so that merely importing it
never fails; see ``require_or_skip`` and ``import_or_skip`` for the skip/fail rule.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

HOST = "127.0.0.1"
MiB = 1024 * 1024

#: Users of the session ``dovecot`` fixture. Bob's password exercises quoting: a double
#: quote, a backslash and a space.
DEFAULT_USERS = {"alice": "secret", "bob": 'p"a\\ss word'}

#: The message the session ``dovecot`` fixture puts in every user's INBOX.
SEED_MESSAGE = (
    b"From: Seeder <seeder@example.com>\r\n"
    b"To: Mailbox Owner <owner@example.com>\r\n"
    b"Subject: seeded message\r\n"
    b"Message-ID: <seed-1@mailgw.test>\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"\r\n"
    b"Hello from the seeded INBOX.\r\n"
)

POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
DOVECOT_DH = "/usr/share/dovecot/dh.pem"


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


# --------------------------------------------------------------------------------------
# Skip-or-fail policy: one rule for the whole tree (re-exported for the tests that use it
# through this module).

from support.skips import REQUIRE_ENV, import_or_skip, require_or_skip  # noqa: E402,F401


# --------------------------------------------------------------------------------------
# Ports and readiness


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _client_context(tls_ca) -> ssl.SSLContext:
    if isinstance(tls_ca, ssl.SSLContext):
        return tls_ca
    return ssl.create_default_context(cafile=str(tls_ca))


def wait_for_banner(host, port, expect_prefix, tls_ca=None, timeout=10, server_hostname=None):
    """Wait until the server at host:port sends a greeting line starting with ``expect_prefix``.

    A port that accepts is not enough: Dovecot drops early connections while its auth
    process starts. ``tls_ca`` (a CA file path or an ``SSLContext``) makes the check use
    implicit TLS. Returns the greeting line; raises ``TimeoutError`` with the last error.
    """
    if isinstance(expect_prefix, str):
        expect_prefix = expect_prefix.encode()
    deadline = time.monotonic() + timeout
    last_error: object = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {expect_prefix!r} greeting from {host}:{port}: {last_error!r}")
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 2.0)) as raw:
                sock = raw
                if tls_ca is not None:
                    sock = _client_context(tls_ca).wrap_socket(
                        raw, server_hostname=server_hostname or host
                    )
                with sock:
                    buf = b""
                    while b"\n" not in buf:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    if buf.startswith(expect_prefix) and b"\n" in buf:
                        return buf.split(b"\n", 1)[0] + b"\n"
                    last_error = buf or "connection closed before a greeting"
        except (OSError, ssl.SSLError) as exc:
            last_error = exc
        time.sleep(0.05)


def wait_for_port(host, port, timeout=10) -> None:
    """Wait until host:port accepts TCP connections (for servers that send no greeting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} does not accept: {exc!r}") from exc
            time.sleep(0.02)


# --------------------------------------------------------------------------------------
# Process and directory plumbing

_LIVE_GROUPS: set[int] = set()
_STOPPED_GROUPS: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Safety net for an interrupted session whose fixture teardown never ran.
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    # Killed servers' orphaned children linger as zombies until init reaps them, which
    # here takes up to ~2 s; waiting once at exit (not in every stop()) leaves no
    # process behind for "pgrep dovecot" and the like.
    deadline = time.monotonic() + 5
    for pgid in [*_LIVE_GROUPS, *_STOPPED_GROUPS]:
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def _world_traversable(path: Path) -> bool:
    return all(os.stat(d).st_mode & 0o001 for d in [path, *path.parents])


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _Server:
    """Context-manager plumbing shared by all servers."""

    start_seconds: float | None = None

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class _ProcessServer(_Server):
    """A server run as a child process in its own session, stopped by process group."""

    proc: subprocess.Popen | None = None
    _runtime_owned: Path | None = None

    def _make_dirs(self, workdir, name: str, *, traversable: bool) -> None:
        """Set ``self.workdir`` (logs, kept) and ``self.runtime_dir`` (removed on stop)."""
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = _unique(workdir / name)
        self.workdir.mkdir()
        if not traversable:
            self.runtime_dir = self.workdir
            return
        if _world_traversable(self.workdir.resolve()):
            self.runtime_dir = self.workdir / "run"
            self.runtime_dir.mkdir()
        else:
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"mailgw-{name}-"))
            self._runtime_owned = self.runtime_dir
            (self.workdir / "run").symlink_to(self.runtime_dir)
        os.chmod(self.runtime_dir, 0o755)

    def _spawn(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        _LIVE_GROUPS.add(self.proc.pid)

    def _check_alive(self, what: str, log_path: Path) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerStartError(
                f"{what} exited with {self.proc.returncode}:\n{_log_tail(log_path)}"
            )

    def _wait_banner(self, port, prefix, tls, log_path: Path, timeout: float = 10) -> None:
        """``wait_for_banner`` that gives up at once if the server process died."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(type(self).__name__, log_path)
            try:
                wait_for_banner(self.host, port, prefix, tls_ca=tls, timeout=0.5,
                                server_hostname="localhost")
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def _kill_group(self, term_grace: float = 0.3, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``term_grace``, wait for it to go.

        Test servers keep no state worth a graceful shutdown, and Dovecot's master can
        take a second to exit after SIGTERM; hence the short grace.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(term_grace)
        except subprocess.TimeoutExpired:
            pass
        # Children can outlive the leader (or ignore SIGTERM): finish the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.02)
        _LIVE_GROUPS.discard(pgid)
        _STOPPED_GROUPS.add(pgid)

    def _remove_runtime(self) -> None:
        if self._runtime_owned is not None:
            shutil.rmtree(self._runtime_owned, ignore_errors=True)
            self._runtime_owned = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; they are gone from the group once reaped.
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# --------------------------------------------------------------------------------------
# Certificates


class Certs:
    """Test PKI made with trustme; every attribute ending in ``_pem``/``_cert``/``_key`` is a path.

    - ``ca_pem``: the trusted CA.
    - ``server_cert``, ``server_key``, ``server_pem`` (key + cert): leaf for ``localhost``,
      ``127.0.0.1`` and ``127.0.0.2`` (see ``Dovecot(require_tls=True)``) signed by the
      trusted CA.
    - ``client_cert``, ``client_key``, ``client_pem``: client leaf (``client.mailgw.test``)
      from the same CA, for mutual TLS.
    - ``untrusted_ca_pem``, ``untrusted_cert``, ``untrusted_key``, ``untrusted_pem``: a
      ``localhost``/``127.0.0.1`` leaf from a CA nobody trusts.
    - ``wrong_name_cert``, ``wrong_name_key``, ``wrong_name_pem``: a leaf from the trusted
      CA for ``wrong.example`` only (host-name mismatch).
    - ``ca`` / ``untrusted_ca``: the trustme CA objects, to issue more leaves.
    """

    def __init__(self, workdir):
        trustme = import_or_skip("trustme")
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.untrusted_ca = trustme.CA()
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.untrusted_ca_pem = self._write("untrusted-ca.pem", self.untrusted_ca.cert_pem.bytes())
        self.server_cert, self.server_key, self.server_pem = self._leaf(
            self.ca, "server", "localhost", "127.0.0.1", "127.0.0.2"
        )
        self.client_cert, self.client_key, self.client_pem = self._leaf(
            self.ca, "client", "client.mailgw.test"
        )
        self.untrusted_cert, self.untrusted_key, self.untrusted_pem = self._leaf(
            self.untrusted_ca, "untrusted", "localhost", "127.0.0.1"
        )
        self.wrong_name_cert, self.wrong_name_key, self.wrong_name_pem = self._leaf(
            self.ca, "wrong-name", "wrong.example"
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        # Readable by every server's unprivileged processes (test keys, not secrets).
        os.chmod(path, 0o644)
        return path

    def _leaf(self, ca, stem: str, *identities: str) -> tuple[Path, Path, Path]:
        leaf = ca.issue_cert(*identities)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key = leaf.private_key_pem.bytes()
        return (
            self._write(f"{stem}.crt", chain),
            self._write(f"{stem}.key", key),
            self._write(f"{stem}.pem", key + chain),
        )

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """An ``SSLContext`` for stdlib clients trusting ``ca_pem`` (optionally presenting
        the client certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """A server-side ``SSLContext`` with the trusted localhost leaf."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx


# --------------------------------------------------------------------------------------
# Dovecot


class Dovecot(_ProcessServer):
    """Dovecot 2.3 (IMAP, IMAPS, POP3, POP3S and, given ``relay``, submission) in the foreground.

    Attributes: ``host``, ``imap_port`` (STARTTLS offered), ``imaps_port``, ``pop3_port``
    (STLS offered), ``pop3s_port``, ``submission_port`` (STARTTLS) and
    ``submissions_port`` (implicit TLS; both ``None`` without ``relay``), ``auth_socket``
    (Dovecot SASL socket for Postfix, mode 0666), ``config``, ``log``, ``workdir``,
    ``runtime_dir``, ``users``.

    ``relay=(host, port)`` is the SMTP server submission relays to; it must already run.
    ``oauth2_introspection_url`` adds an OAuth2 passdb (XOAUTH2/OAUTHBEARER; the endpoint
    gets ``token=...`` POSTed and must answer ``{"active": true, "username": ...}``).
    ``require_tls=True`` sets ``disable_plaintext_auth = yes`` (no login before TLS).
    Dovecot counts a connection whose remote and local addresses are equal as secure,
    so that variant listens on ``127.0.0.2`` (``host``) by default: a client connecting
    from 127.0.0.1 is then really refused plaintext logins.
    """

    TOOLS = ("dovecot", "doveadm")

    def __init__(
        self,
        workdir,
        certs: Certs,
        users: dict[str, str] | None = None,
        oauth2_introspection_url: str | None = None,
        relay: tuple[str, int] | None = None,
        require_tls: bool = False,
        host: str | None = None,
    ):
        self.host = host or ("127.0.0.2" if require_tls else HOST)
        self.certs = certs
        self.users = dict(DEFAULT_USERS if users is None else users)
        for name, password in self.users.items():
            if any(c in name + password for c in ":\r\n\0"):
                raise ValueError(f"passwd-file cannot hold user {name!r}'s name or password")
        self.oauth2_introspection_url = oauth2_introspection_url
        self.relay = relay
        self.require_tls = require_tls
        self._make_dirs(workdir, "dovecot", traversable=True)
        self.config = self.runtime_dir / "dovecot.conf"
        self.log = self.workdir / "dovecot.log"
        self.base_dir = self.runtime_dir / "base"
        self.mail_dir = self.runtime_dir / "mail"
        self.auth_socket = self.base_dir / "auth-postfix"
        self.imap_port = free_port(self.host)
        self.imaps_port = free_port(self.host)
        self.pop3_port = free_port(self.host)
        self.pop3s_port = free_port(self.host)
        self.submission_port = free_port(self.host) if relay else None
        self.submissions_port = free_port(self.host) if relay else None

    def _login_service(self, protocol: str, port: int, tls_port: int) -> str:
        """The login service of ``protocol``: a plain listener and an implicit-TLS one
        (``<protocol>s``)."""
        return (
            f"service {protocol}-login {{\n"
            f"  inet_listener {protocol} {{\n    address = {self.host}\n    port = {port}\n  }}\n"
            f"  inet_listener {protocol}s {{\n    address = {self.host}\n    port = {tls_port}\n    ssl = yes\n  }}\n"
            "}\n"
        )

    def _write_config(self) -> None:
        rt = self.runtime_dir
        users_file = rt / "users"
        users_file.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items()))
        os.chmod(users_file, 0o644)
        for sub in ("state", "mail"):
            (rt / sub).mkdir(exist_ok=True)
        os.chown(rt / "mail", 65534, 65534)
        protocols = "imap pop3" + (" submission" if self.relay else "")
        mechanisms = "plain login"
        oauth_passdb = ""
        if self.oauth2_introspection_url:
            mechanisms += " xoauth2 oauthbearer"
            ext = rt / "oauth2.conf.ext"
            ext.write_text(
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
            )
            os.chmod(ext, 0o644)
            # The mechanisms filters stop a password being accepted as a token and back.
            oauth_passdb = (
                "passdb {\n  driver = oauth2\n"
                f"  args = {ext}\n  mechanisms = xoauth2 oauthbearer\n}}\n"
            )
        submission = ""
        if self.relay:
            relay_host, relay_port = self.relay
            submission = f"""
hostname = localhost
submission_relay_host = {relay_host}
submission_relay_port = {relay_port}
submission_relay_trusted = yes
submission_relay_ssl = no
submission_max_mail_size = 0
{self._login_service("submission", self.submission_port, self.submissions_port)}"""
        dh = f"ssl_dh = <{DOVECOT_DH}\n" if os.path.exists(DOVECOT_DH) else ""
        self.config.write_text(
            f"""# Generated by tests/realservers.py
base_dir = {self.base_dir}
state_dir = {rt / 'state'}
log_path = {self.log}
instance_name = mailgw-test-{self.imap_port}
listen = {self.host}
protocols = {protocols}
ssl = yes
ssl_cert = <{self.certs.server_cert}
ssl_key = <{self.certs.server_key}
{dh}disable_plaintext_auth = {'yes' if self.require_tls else 'no'}
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
auth_verbose = yes
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
namespace inbox {{
  inbox = yes
}}
# Even with auth_failure_delay = 0 the auth process flushes failures on a 500 ms timer;
# only the "nodelay" field skips it. This first passdb authenticates nobody and just
# sets that field for the passdbs after it.
passdb {{
  driver = static
  args = noauthenticate nodelay=yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users_file}
  mechanisms = plain login none
}}
{oauth_passdb}userdb {{
  driver = static
  args = uid=65534 gid=65534 home={self.mail_dir}/%n
}}
{self._login_service("imap", self.imap_port, self.imaps_port)}{self._login_service("pop3", self.pop3_port, self.pop3s_port)}service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
# No auth penalty: every test connects from 127.0.0.1, and anvil would otherwise delay
# each login after a failed one by up to 15 s.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{submission}"""
        )

    def start(self):
        t0 = time.monotonic()
        self._write_config()
        self._spawn(["dovecot", "-F", "-c", str(self.config)], self.workdir / "dovecot.stdout")
        ctx = self.certs.client_context()
        checks = [
            (self.imap_port, b"* OK", None),
            (self.imaps_port, b"* OK", ctx),
            (self.pop3_port, b"+OK", None),
            (self.pop3s_port, b"+OK", ctx),
        ]
        if self.relay:
            checks += [(self.submission_port, b"220", None), (self.submissions_port, b"220", ctx)]
        try:
            for port, prefix, tls in checks:
                self._wait_banner(port, prefix, tls, self.workdir / "dovecot.stdout")
            deadline = time.monotonic() + 5
            while not self.auth_socket.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.auth_socket} never appeared")
                time.sleep(0.02)
        except Exception as exc:
            self.stop()
            raise ServerStartError(
                f"dovecot did not start: {exc}\n{_log_tail(self.log)}\n"
                f"{_log_tail(self.workdir / 'dovecot.stdout')}"
            ) from exc
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        self._kill_group()
        self._remove_runtime()

    def doveadm(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``doveadm -c CONFIG ARGS``; raises ``CalledProcessError`` with its output."""
        return subprocess.run(
            ["doveadm", "-c", str(self.config), *args],
            input=input,
            capture_output=True,
            check=True,
            timeout=30,
        )

    def seed(self, user: str, message_bytes: bytes, mailbox: str = "INBOX") -> None:
        """Deliver ``message_bytes`` into ``user``'s ``mailbox`` (created when missing)."""
        if mailbox.upper() != "INBOX":
            with contextlib.suppress(subprocess.CalledProcessError):
                self.doveadm("mailbox", "create", "-u", user, mailbox)
        try:
            self.doveadm("save", "-u", user, "-m", mailbox, input=message_bytes)
        except subprocess.CalledProcessError as exc:
            stderr = exc.stderr.decode(errors="replace")
            raise RuntimeError(f"doveadm save failed: {stderr}") from exc

    def messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """The raw stored messages of ``user``'s ``mailbox`` in delivery order (LF line ends
        as Dovecot stores them)."""
        root = self.mail_dir / user / "Maildir"
        if mailbox.upper() != "INBOX":
            root = root / f".{mailbox}"
        files = sorted(
            (p for sub in ("new", "cur") if (root / sub).is_dir() for p in (root / sub).iterdir()),
            key=lambda p: p.name,  # maildir names start with the delivery time
        )
        return [p.read_bytes() for p in files]


def oauth_dovecot(workdir, certs: "Certs", relay: tuple[str, int], introspection_url: str) -> "Dovecot":
    """A Dovecot (not started) whose user alice has a random password and logs in with
    XOAUTH2 or OAUTHBEARER with any access token ``introspection_url`` vouches for."""
    require_or_skip(Dovecot.TOOLS)
    return Dovecot(workdir, certs, users={"alice": "pw-" + uuid.uuid4().hex}, relay=relay,
                   oauth2_introspection_url=introspection_url)


# --------------------------------------------------------------------------------------
# aiosmtpd sink


class Message(NamedTuple):
    """One message an ``SMTPSink`` received."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class AuthAttempt(NamedTuple):
    mechanism: str
    login: str
    success: bool


def _controller_class(line_length_limit: int, backlog: int | None = None):
    """An aiosmtpd Controller whose SMTP accepts lines up to ``line_length_limit`` bytes.

    aiosmtpd enforces RFC 5321's 1000 bytes (a class attribute read in ``__init__``);
    Postfix and Dovecot accept longer lines, and so must a sink standing in for them.
    ``backlog``: the listen queue (asyncio's default is 100), for bursts of connections.
    """
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class _SMTP(SMTP):
        def __init__(self, *args, **kwargs):
            with warnings.catch_warnings():
                # "Requiring AUTH while not requiring TLS": deliberate in a test sink.
                warnings.simplefilter("ignore")
                super().__init__(*args, **kwargs)

    _SMTP.line_length_limit = line_length_limit

    class _Controller(Controller):
        def factory(self):
            return _SMTP(self.handler, **self.SMTP_kwargs)

        if backlog is not None:
            def _create_server(self):
                return self.loop.create_server(
                    self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context, backlog=backlog,
                )

    return _Controller


class SMTPSink(_Server):
    """An in-process aiosmtpd server that records every message it receives.

    Attributes: ``host``, ``port``, ``messages`` (a snapshot list of ``Message``),
    ``auth_attempts`` (list of ``AuthAttempt``).

    ``auth={"user": "pass"}`` accepts AUTH PLAIN/LOGIN (also on plain connections) and,
    unless ``auth_required=False``, requires it before MAIL. ``tls_certs`` (a ``Certs``)
    offers STARTTLS; ``require_starttls`` demands it; ``implicit_tls`` makes it SMTPS.
    Limits are generous (64 MiB messages, 1 MiB lines) so the sink never rejects what a
    real relay would pass on.
    """

    def __init__(
        self,
        auth: dict[str, str] | None = None,
        tls_certs: Certs | None = None,
        require_starttls: bool = False,
        implicit_tls: bool = False,
        auth_required: bool | None = None,
        data_size_limit: int = 64 * MiB,
        line_length_limit: int = 1 * MiB,
        port: int | None = None,
        backlog: int | None = None,
    ):
        if (require_starttls or implicit_tls) and tls_certs is None:
            raise ValueError("TLS options need tls_certs")
        self.host = HOST
        self.port = port or free_port()
        self.auth = dict(auth) if auth else None
        self.tls_certs = tls_certs
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        self.auth_required = bool(auth) if auth_required is None else auth_required
        self.data_size_limit = data_size_limit
        self.line_length_limit = line_length_limit
        self.backlog = backlog
        self._lock = threading.Condition()
        self._messages: list[Message] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._controller = None

    # aiosmtpd handler hook
    async def handle_DATA(self, server, session, envelope):
        msg = Message(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        with self._lock:
            self._messages.append(msg)
            self._lock.notify_all()
        return "250 OK"

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult, LoginPassword

        login = password = None
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "surrogateescape")
            password = auth_data.password.decode("utf-8", "surrogateescape")
        ok = login is not None and self.auth is not None and self.auth.get(login) == password
        with self._lock:
            self._auth_attempts.append(AuthAttempt(mechanism, login or "", ok))
        if ok:
            return AuthResult(success=True)
        # handled=False lets aiosmtpd send its 535; handled=True would leave the client hanging.
        return AuthResult(success=False, handled=False)

    def start(self):
        import_or_skip("aiosmtpd")

        t0 = time.monotonic()
        kwargs = dict(
            hostname=self.host,
            port=self.port,
            server_hostname="localhost",
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
        )
        if self.auth is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_require_tls=False,
                auth_required=self.auth_required,
            )
        if self.tls_certs is not None:
            ctx = self.tls_certs.server_context()
            if self.implicit_tls:
                kwargs["ssl_context"] = ctx
            else:
                kwargs["tls_context"] = ctx
                kwargs["require_starttls"] = self.require_starttls
        self._controller = _controller_class(self.line_length_limit, self.backlog)(self, **kwargs)
        self._controller.start()
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._lock:
            return list(self._auth_attempts)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._auth_attempts.clear()

    def wait_for_messages(self, n: int, timeout: float = 10) -> list[Message]:
        """Wait until at least ``n`` messages arrived; return them all."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(f"{len(self._messages)} of {n} messages after {timeout}s")
            return list(self._messages)

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 10) -> Message:
        """Wait for the first message matching ``predicate`` (use with a shared sink:
        match on a marker unique to the test)."""
        found: list[Message] = []

        def check() -> bool:
            found[:] = [m for m in self._messages if predicate(m)]
            return bool(found)

        with self._lock:
            if not self._lock.wait_for(check, timeout):
                raise TimeoutError(f"no matching message after {timeout}s")
            return found[0]


# --------------------------------------------------------------------------------------
# Postfix


_POSTFIX_QUEUE_DIRS = {
    **{
        name: ("postfix", "root", 0o700)
        for name in (
            "active bounce corrupt defer deferred flush hold incoming private saved trace"
        ).split()
    },
    "maildrop": ("postfix", "postdrop", 0o730),
    "public": ("postfix", "postdrop", 0o710),
    "pid": ("root", "root", 0o755),
}

_POSTFIX_INTERNAL_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(_ProcessServer):
    """A private Postfix instance that relays every message to ``relay`` (an SMTP sink).

    Listeners (attributes): ``submission_port`` (STARTTLS required, AUTH only after it,
    relay for SASL-authenticated clients only), ``smtps_port`` (implicit TLS, AUTH
    required for relay), ``plain_port`` (no TLS, no AUTH, relays for 127.0.0.0/8).
    SASL goes through ``dovecot_auth_socket`` (``Dovecot.auth_socket``; start Dovecot
    first, or smtpd is throttled for 60 s). Also ``host``, ``maillog``, ``config_dir``,
    ``queue_dir``, ``workdir``, ``runtime_dir``.
    """

    TOOLS = ("postfix", POSTFIX_MASTER)

    def __init__(
        self,
        workdir,
        certs: Certs,
        dovecot_auth_socket,
        relay: tuple[str, int],
        message_size_limit: int = 128 * MiB,
        relay_tls_level: str = "none",
    ):
        self.host = HOST
        self.certs = certs
        self.auth_socket = Path(dovecot_auth_socket) if dovecot_auth_socket else None
        self.relay = relay
        self.message_size_limit = message_size_limit
        self.relay_tls_level = relay_tls_level
        self._make_dirs(workdir, "postfix", traversable=True)
        self.config_dir = self.runtime_dir / "etc"
        self.queue_dir = self.runtime_dir / "spool"
        self.data_dir = self.runtime_dir / "data"
        self.maillog = self.workdir / "maillog"
        self.submission_port = free_port()
        self.smtps_port = free_port()
        self.plain_port = free_port()

    def _write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        # master takes its lock in data_directory as mail_owner.
        shutil.chown(self.data_dir, "postfix")
        # Made here rather than by "postfix check" (post-install), which takes ~2 s
        # spawning mkdir/chown/chmod per directory.
        for name, (owner, group, mode) in _POSTFIX_QUEUE_DIRS.items():
            d = self.queue_dir / name
            d.mkdir(exist_ok=True)
            shutil.chown(d, owner, group)
            os.chmod(d, mode)
        relay_host, relay_port = self.relay
        sasl = (
            f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {self.auth_socket}\n"
            if self.auth_socket
            else ""
        )
        sasl_on = "yes" if self.auth_socket else "no"
        (self.config_dir / "main.cf").write_text(
            f"""# Generated by tests/realservers.py
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-mailgw-test
maillog_file = {self.maillog}
maillog_file_prefixes = {self.workdir}
myhostname = postfix.mailgw.test
mydomain = mailgw.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{relay_host}]:{relay_port}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = {self.relay_tls_level}
smtp_dns_support_level = disabled
smtp_line_length_limit = 0
disable_mime_output_conversion = yes
local_header_rewrite_clients =
notify_classes =
message_size_limit = {self.message_size_limit}
mailbox_size_limit = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
smtpd_error_sleep_time = 0s
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_tls_cert_file = {self.certs.server_cert}
smtpd_tls_key_file = {self.certs.server_key}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
{sasl}smtpd_sasl_auth_enable = no
"""
        )
        (self.config_dir / "master.cf").write_text(
            f"""# Generated by tests/realservers.py; chroot is "n" everywhere.
{HOST}:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix-mailgw-test/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable={sasl_on}
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
{HOST}:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix-mailgw-test/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_sasl_auth_enable={sasl_on}
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
{HOST}:{self.plain_port} inet n - n - - smtpd
  -o syslog_name=postfix-mailgw-test/plain
  -o smtpd_tls_security_level=none
  -o smtpd_sasl_auth_enable=no
  -o smtpd_relay_restrictions=permit_mynetworks,reject
{_POSTFIX_INTERNAL_SERVICES}"""
        )
        # Postfix re-reads a main.cf younger than a few seconds until it "settles"
        # (~2 s of 300 ms sleeps): backdate the generated files.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def start(self):
        t0 = time.monotonic()
        self._write_config()
        stdout_log = self.workdir / "postfix.stdout"
        check = subprocess.run(
            ["postfix", "-c", str(self.config_dir), "check"],
            capture_output=True,
            timeout=60,
        )
        with open(stdout_log, "ab") as f:
            f.write(check.stdout + check.stderr)
        if check.returncode != 0:
            output = (check.stdout + check.stderr).decode(errors="replace")
            raise ServerStartError(f"postfix check failed:\n{output}")
        self._spawn([POSTFIX_MASTER, "-c", str(self.config_dir), "-s"], stdout_log)
        ctx = self.certs.client_context()
        try:
            for port, tls in (
                (self.plain_port, None),
                (self.submission_port, None),
                (self.smtps_port, ctx),
            ):
                self._wait_banner(port, b"220", tls, stdout_log)
        except Exception as exc:
            self.stop()
            raise ServerStartError(
                f"postfix did not start: {exc}\n{_log_tail(self.maillog)}\n{_log_tail(stdout_log)}"
            ) from exc
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        self._kill_group()
        self._remove_runtime()


# --------------------------------------------------------------------------------------
# SOCKS5 proxies


class Microsocks(_ProcessServer):
    """``microsocks`` SOCKS5 proxy; with ``user``/``password`` it demands RFC 1929 auth.

    Attributes: ``host``, ``port``, ``user``, ``password``.
    """

    TOOLS = ("microsocks",)

    def __init__(self, port: int | None = None, user: str | None = None,
                 password: str | None = None, log_path=None):
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self.host = HOST
        self.port = port or free_port()
        self.user = user
        self.password = password
        self.log_path = Path(log_path) if log_path else Path(os.devnull)

    def start(self):
        t0 = time.monotonic()
        argv = ["microsocks", "-i", self.host, "-p", str(self.port)]
        if self.user is not None:
            argv += ["-u", self.user, "-P", self.password]
        self._spawn(argv, self.log_path)
        try:
            wait_for_port(self.host, self.port, timeout=5)
        except Exception:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        self._kill_group()


class Dante(_ProcessServer):
    """Dante ``danted`` SOCKS5 proxy without authentication; a CONNECT to one of
    ``blocked_ports`` on 127.0.0.1 is refused by its ruleset (reply 0x02). Attributes:
    ``host``, ``port``, ``config``, ``log``, ``workdir``."""

    TOOLS = ("danted",)

    def __init__(self, workdir, port: int | None = None, blocked_ports: tuple[int, ...] = ()):
        self.host = HOST
        self.port = port or free_port()
        self.blocked_ports = tuple(blocked_ports)
        self._make_dirs(workdir, "dante", traversable=False)
        self.config = self.workdir / "danted.conf"
        self.log = self.workdir / "danted.log"
        self.pidfile = self.workdir / "danted.pid"

    def start(self):
        t0 = time.monotonic()
        blocks = "".join(
            f"socks block {{\n  from: 127.0.0.0/8 to: 127.0.0.1/32 port = {port}\n}}\n" for port in self.blocked_ports
        )
        self.config.write_text(
            f"""# Generated by tests/realservers.py
logoutput: {self.log}
internal: {self.host} port = {self.port}
external: {self.host}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
}}
{blocks}socks pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
}}
"""
        )
        stdout_log = self.workdir / "danted.stdout"
        self._spawn(
            ["danted", "-f", str(self.config), "-p", str(self.pidfile), "-N", "1"], stdout_log
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                self._check_alive("danted", stdout_log)
                try:
                    wait_for_port(self.host, self.port, timeout=0.2)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        except Exception as exc:
            self.stop()
            raise ServerStartError(f"danted did not start: {exc}\n{_log_tail(self.log)}") from exc
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        self._kill_group()


# --------------------------------------------------------------------------------------
# Misbehaving peers


class SilentServer(_Server):
    """Accepts TCP connections and never sends a byte (for greeting/handshake timeouts).

    Attributes: ``host``, ``port``, ``accepted`` (number of connections accepted).
    """

    def __init__(self, port: int | None = None):
        self.host = HOST
        self.port = port
        self.accepted = 0
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self):
        t0 = time.monotonic()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port or 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="SilentServer", daemon=True)
        self._thread.start()
        self.start_seconds = time.monotonic() - t0
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            self.accepted += 1

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in [*self._conns, self._sock]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._conns.clear()


class ClosedPort:
    """A port with nothing listening: connecting is refused at once.

    The socket stays bound (but never listens) until ``close()``, so no other process
    can take the port meanwhile. Attributes: ``host``, ``port``.
    """

    def __init__(self):
        self.host = HOST
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((self.host, 0))
        self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
