"""The twistd process raises its soft limit on open descriptors to the hard one."""

import resource

from mailgw import process


def test_the_soft_limit_is_raised_to_the_hard_one(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    process.raise_descriptor_limit()
    assert calls == [(65536, 65536)]


def test_a_refused_raise_is_only_logged(monkeypatch):
    def refuse(which, limits):
        raise ValueError("not allowed here")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    process.raise_descriptor_limit()  # no exception: the gateway starts with what it has


def test_nothing_to_do_when_the_soft_limit_is_high_enough(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (65536, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: (_ for _ in ()).throw(AssertionError("called")))
    process.raise_descriptor_limit()
