"""Reading what a sans-IO machine returns, for the machines' unit tests: the bytes it
sends each way, the failure a call ended in, a machine fed one byte at a time.

    from support.wire import failure, sent, started

    m = started(POP3Upstream, credentials=Password("alice", "pw"))
    assert sent(m.receive(b"+OK hi\\r\\n")) == b"CAPA\\r\\n"
"""

from __future__ import annotations

import base64
from typing import Any

from mailgw.protocol.actions import SendToApp, SendUpstream, StartTLS, UpstreamFailed


def sent(actions: list) -> bytes:
    """What the actions send upstream; fails when any action is something else."""
    assert all(isinstance(a, SendUpstream) for a in actions), actions
    return b"".join(a.data for a in actions)


def to_app(actions: list) -> bytes:
    """What the actions send to the application (other actions are passed over)."""
    return b"".join(a.data for a in actions if isinstance(a, SendToApp))


def failure(actions: list) -> UpstreamFailed:
    """The failure a call ended in (what came before it is moot: the session closes)."""
    assert isinstance(actions[-1], UpstreamFailed), actions
    assert not any(isinstance(a, UpstreamFailed) for a in actions[:-1]), actions
    return actions[-1]


def feed_bytewise(machine: Any, data: bytes) -> list:
    """``data`` given to ``machine.receive`` one byte at a time; all the actions."""
    actions = []
    for i in range(len(data)):
        actions += machine.receive(data[i : i + 1])
    return actions


def started(upstream_class: type, **kw: Any) -> Any:
    """An upstream machine whose connection is up: ``start()`` called, as the glue does,
    and for implicit TLS (``implicit_tls=True``; plain by default) the handshake done."""
    kw.setdefault("implicit_tls", False)
    machine = upstream_class(**kw)
    assert machine.start() == ([StartTLS()] if kw["implicit_tls"] else [])
    if kw["implicit_tls"]:
        assert machine.tls_established() == []
    return machine


def xoauth2(user: str, secret: str) -> bytes:
    """An XOAUTH2 initial response as an application sends it (base64)."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {secret}\x01\x01".encode())


def oauthbearer(user: str, secret: str) -> bytes:
    """An OAUTHBEARER initial response as an application sends it (base64)."""
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {secret}\x01\x01".encode())
