"""Fixtures of the container tests: the image, built once per session with
``scripts/build-image`` (which makes the local Debian base the first time), and
``run_container`` to run it (``podmantest.Container``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterable

import pytest

from support.skips import require_or_skip

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "kube"))  # fakeapi

from podmantest import IMAGE, ROOT, Container  # noqa: E402


@pytest.fixture(scope="session")
def image() -> str:
    """The image built from this tree (podman's layer cache makes a rebuild quick)."""
    require_or_skip(["podman", "runc", "debootstrap"])
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), "--tag", IMAGE],
        cwd=ROOT, capture_output=True, text=True, timeout=1100,  # within the tests' own timeout
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return IMAGE


@pytest.fixture
def run_container(image):
    """``run_container(command, **options)`` starts a :class:`Container` of the image;
    each is removed after the test."""
    started: list[Container] = []

    def run(command: Iterable[str], **options) -> Container:
        container = Container(image, command, **options)
        started.append(container)
        return container.start()

    yield run
    for container in reversed(started):  # containers joined to another's namespace first
        container.remove()


@pytest.fixture
def mounted(tmp_path) -> Path:
    """A directory to mount into containers: readable by the image's non-root user
    (pytest's own temporary directories are mode 0700)."""
    path = tmp_path / "mounted"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path
