"""A real ``twistd -n mailgw`` process, for tests about the process itself: memory,
signals, start-up lines, sockets (the in-process harness is tests/gatewayharness.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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
