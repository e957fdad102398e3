"""A private thread pool for blocking library calls, owned by the service tree.

Blocking libraries (requests-oauthlib, the ``kubernetes`` client, smtplib in the send
API) never run on the reactor thread.  Each user gets a :class:`BlockingPool` of its own,
so one plane cannot make another wait: the reactor's own pool also resolves host names
and is joined at shutdown, and in Kubernetes mode the session lookups, the leader
election and the reconciles each have their own.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class PoolStopped(Exception):
    """The pool is not running (starting up or shut down): the call was not made."""


class BlockingPool(Service):
    """Runs blocking callables in ``max_threads`` threads named ``name``; results come
    back as Deferreds in the reactor thread.

    A twisted ``Service``: it starts and stops with its parent.  A call made while the
    pool is not running fails at once with :class:`PoolStopped` instead of queueing
    forever.  Stopping joins the workers in a helper thread (a call in progress may take
    up to its own timeout), so the reactor never waits for it.
    """

    def __init__(self, reactor: Any, name: str, max_threads: int = 4):
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.reactor = reactor
        self.name = name
        self.max_threads = max_threads
        self._pool: ThreadPool | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def startService(self) -> None:
        super().startService()
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.max_threads, name=self.name)
            self._pool.start()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def join() -> None:
            try:
                pool.stop()
            finally:
                self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name=f"{self.name}-stop", daemon=True).start()
        return done

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        pool = self._pool
        if pool is None:
            return fail(PoolStopped(f"the {self.name} worker pool is not running (starting up or shut down)"))
        return threads.deferToThreadPool(self.reactor, pool, fn, *args, **kwargs)
