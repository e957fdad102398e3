"""Helpers shared by the whole test tree (tests/ is on sys.path: ``from support import ...``)."""
