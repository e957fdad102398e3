"""A real ``twistd -n mailgw`` process, for tests about the process itself: memory,
signals, start-up lines, sockets (the in-process harness is tests/gatewayharness.py).

- :class:`GatewayProcess`: ``--config`` mode, waits until the http listener answers.
- :class:`Twistd`: any arguments (``--kubernetes``, ``--demo``), standard output (the
  log, with ``-n``) and standard error kept apart in files, :meth:`Twistd.wait_for_log`.
- :func:`run_twistd`: a run to completion (a start-up that fails).

The process runs with the tests' interpreter and environment (run the tests with
``PYTHONPATH=$PWD`` from a worktree and its code is the code under test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: The twistd command, run by the same interpreter as the tests.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """``twistd -n mailgw --config gateway.yaml`` in ``directory``; a context manager
    that starts it, waits until its http listener answers and kills it at the end.

    ``config`` is written as gateway.yaml; an ``http`` listener on a free port is added
    when the configuration has none (``self.http``).
    """

    def __init__(self, directory: Path, config: dict, args: tuple[str, ...] = ()):
        self.directory = Path(directory)
        self.config = dict(config)
        if "http" not in self.config:
            self.config["http"] = {"listen": f"tcp:{free_port()}:interface=127.0.0.1"}
        self.http = "http://127.0.0.1:" + self.config["http"]["listen"].split(":")[1]
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> "GatewayProcess":
        (self.directory / "gateway.yaml").write_text(json.dumps(self.config))
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "mailgw", "--config", "gateway.yaml", *self.args],
            cwd=self.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 30
        while not self._healthy():
            if self.proc.poll() is not None:
                self.output = self.proc.communicate()[0]
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                raise RuntimeError("twistd did not become healthy within 30s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.output = self.proc.communicate()[0]

    def _healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.http + "/healthz", timeout=2).status == 200
        except (OSError, urllib.error.URLError):
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """The process's resident memory (VmRSS), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def metrics(self) -> str:
        return urllib.request.urlopen(self.http + "/metrics", timeout=10).read().decode()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        self.output = self.proc.communicate()[0]
        return code


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def run_twistd(args: list[str], cwd: Path, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``twistd -n --pidfile= <args>`` to completion (a start-up that fails)."""
    return subprocess.run(
        TWISTD + ["-n", "--pidfile=", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=env or environment(),
    )


def write_config(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=1))
    return path


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def wait_until(predicate, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Twistd:
    """A running ``twistd -n mailgw ...``; a context manager that kills it if still alive."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.cwd = Path(cwd)
        self._out = open(self.cwd / "twistd.out", "w+b")
        self._err = open(self.cwd / "twistd.err", "w+b")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", *args], cwd=cwd, stdout=self._out, stderr=self._err, env=env or environment(),
        )

    def log(self) -> str:
        return (self.cwd / "twistd.out").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.cwd / "twistd.err").read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> str:
        def seen():
            assert self.alive() or self.log().count(text) >= count, f"twistd exited:\n{self.log()}\n{self.stderr()}"
            return self.log().count(text) >= count

        wait_until(seen, f"{text!r} in the log", timeout)
        return self.log()

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()

    def __enter__(self) -> "Twistd":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
