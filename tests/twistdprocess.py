"""``twistd -n mailgw`` as a real process, the way an operator runs it: for tests about
the process itself (start-up lines, signals, listen backlog).

The process runs with the tests' interpreter and environment (run the tests with
``PYTHONPATH=$PWD`` from a worktree and its code is the code under test).  Standard output (twistd's log, with ``-n``) and
standard error go to files in the test's directory, read with :meth:`Twistd.log` and
:meth:`Twistd.stderr`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The twistd command, run by the same interpreter as the tests.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


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
