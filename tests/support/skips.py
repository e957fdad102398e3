"""The one skip rule: a test that needs a missing server, tool or module skips with the
reason when a developer runs it by hand, and fails in CI (``MAILGW_REQUIRE_SERVERS=1``),
so that no test can silently vanish there."""

from __future__ import annotations

import importlib
import os
import shutil
from typing import Iterable

import pytest

#: Set to ``1`` by .ci/run.
REQUIRE_ENV = "MAILGW_REQUIRE_SERVERS"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def missing(reason: str) -> None:
    """Skip the calling test for ``reason``, or fail it when skipping is forbidden."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: tests may not skip)", pytrace=False)
    pytest.skip(reason)


def require_or_skip(tool_names: str | Iterable[str]) -> None:
    """Skip (or fail, in CI) unless every tool is installed.

    ``tool_names`` is a program name looked up on ``PATH`` (plus the sbin directories),
    an absolute path, or an iterable of those.
    """
    names = [tool_names] if isinstance(tool_names, str) else list(tool_names)
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    for name in names:
        found = os.access(name, os.X_OK) if os.path.isabs(name) else shutil.which(name, path=search) is not None
        if not found:
            missing(f"{name} not installed: the test needs it (.ci/run installs it)")


def import_or_skip(module_name: str):
    """Import a Python module, or skip/fail like :func:`require_or_skip` when it is absent."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing(f"{module_name} not installed: the test needs it ({exc})")
