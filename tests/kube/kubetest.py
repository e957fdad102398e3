"""Helpers of the Kubernetes tests (a module of its own: several directories of the test
tree have a conftest.py, so ``from conftest import ...`` is ambiguous)."""

from support.reactor import wait_for  # noqa: F401  (the kube tests import it from here)
