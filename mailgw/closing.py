"""Closing a connection that might never finish closing.

A TLS ``loseConnection`` can wait forever for the peer's close_notify, and a plain one
for a peer that never reads what is still buffered: every leg the gateway closes gets a
deadline after which it is aborted.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

#: How long a closing leg may take (flushing, TLS close_notify) before it is aborted.
CLOSE_GRACE = 5.0


def close_with_grace(reactor: IReactorTime, transport, grace: float = CLOSE_GRACE) -> None:
    """``loseConnection`` and, if the transport is still open after ``grace``, abort it.

    TLS ``loseConnection`` can wait forever for the peer's close_notify.
    """
    transport.loseConnection()
    abort = getattr(transport, "abortConnection", None)
    if abort is None:
        return
    reactor.callLater(grace, _abort_if_open, transport)


def _abort_if_open(transport) -> None:
    # Both TCP and TLS transports set ``disconnected`` once connectionLost ran.
    if not getattr(transport, "disconnected", True):
        transport.abortConnection()
