"""Running the image with podman the way the container tests run every container:
runc, a read-only root file system, the image's non-root user, no capabilities, no new
privileges, explicit resource limits.  (A module of its own, not conftest.py: several
directories of the test tree have a conftest.py, so ``from conftest import`` is
ambiguous.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

ROOT = Path(__file__).resolve().parent.parent.parent
IMAGE = os.environ.get("MAILGW_TEST_IMAGE", "localhost/mailgw:latest")
#: The image's user (Containerfile: USER 65532:65532).
UID = 65532
#: podman's default OCI runtime (crun) cannot run in this sandbox; runc can.
RUNC = ["--runtime", shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "runc"]
#: The sandbox cannot raise resource limits inside a container, and podman's defaults
#: would: explicit, modest ones.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=1024:1024"]
PLUGIN_CACHE_WARNING = "Unable to write to plugin cache"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class Container:
    """One detached ``podman run`` of the image; removed (by name) on :meth:`remove`."""

    def __init__(self, image: str, command: Iterable[str], *, network: str = "host",
                 volumes: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None):
        self.image = image
        self.command = list(command)
        self.network = network
        self.volumes = dict(volumes or {})
        self.env = dict(env or {})
        self.name = f"mailgw-test-{uuid.uuid4().hex[:12]}"

    def start(self) -> "Container":
        args = ["run", "--detach", "--name", self.name, *RUNC, *ULIMITS,
                "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--network", self.network]
        for source, target in self.volumes.items():
            args += ["--volume", f"{source}:{target}:ro"]
        for key, value in self.env.items():
            args += ["--env", f"{key}={value}"]
        podman(*args, self.image, *self.command)
        return self

    def inspect(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def running(self) -> bool:
        """Running, or stopping (podman's state between SIGTERM and the exit: the drain)."""
        return self.inspect()["State"]["Status"] in ("running", "stopping")

    def exit_code(self) -> int:
        return self.inspect()["State"]["ExitCode"]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str) -> str:
        return podman("exec", self.name, *command).stdout

    def exec_status(self, *command: str) -> int:
        """Run ``command`` in the container; its exit code."""
        return podman("exec", self.name, *command, check=False).returncode

    def wait_until(self, predicate: Callable[[], object], what: str, timeout: float = 60) -> object:
        """Poll ``predicate``; fail early with the container's log when it has exited."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not self.running():
                raise AssertionError(f"the container exited ({self.exit_code()}) before {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.1)

    def wait(self, timeout: float = 120) -> int:
        """Wait for the container to exit; its exit code."""
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def stop(self, grace: int) -> subprocess.Popen:
        """``podman stop --time grace``: SIGTERM, then SIGKILL once ``grace`` seconds have
        passed (exit code 137).  Returns the running ``podman stop``."""
        return subprocess.Popen(["podman", "stop", "--time", str(grace), self.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", "--time", "0", self.name)
