"""The ``twistd mailgw`` process around the gateway service: start-up failures as one
line, and SIGHUP (SPEC 9.5, 9.6).

- :class:`GatewayProcess` wraps the service twistd runs.  A start-up failure the
  operator can fix (a configuration error, a port in use, a bad endpoint string) prints
  one line ``mailgw: ...`` on standard error and ends the process with status 1, without
  a traceback -- whether it happens while the service is built or while it binds its
  ports.  On SIGHUP it calls ``on_hangup`` in the reactor thread.
- :class:`ConfigReloader` is the standalone gateway's ``on_hangup``: it re-reads the
  configuration file and applies it (:meth:`mailgw.service.GatewayService.reconfigure`),
  or keeps the running configuration and logs one line saying why not.
- :func:`ignore_hangup` is the Kubernetes mode's (and the demo's): SIGHUP never stops
  the gateway.
"""

from __future__ import annotations

import resource
import signal
import sys
from typing import Any, Callable, NoReturn, TextIO

from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.logger import Logger

from . import logs
from .config import ConfigError, load_config
from .listening import StartupError

log = Logger(namespace="mailgw.process")

#: Failures that are the operator's to fix: one line, no traceback.
OPERATOR_ERRORS = (ConfigError, StartupError)


def one_line(text: str) -> str:
    """``text`` on a single line (YAML problems and OS messages may span several)."""
    return " ".join(str(text).split())


def exit_with(line: str, stderr: TextIO | None = None) -> NoReturn:
    """Print ``line`` on the process's standard error and exit with status 1.

    twistd redirects ``sys.stderr`` into the log once logging starts; the line goes to
    the real standard error either way.
    """
    stream = stderr or sys.__stderr__ or sys.stderr
    stream.write(one_line(line) + "\n")
    stream.flush()
    raise SystemExit(1)


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open descriptors to the hard one.

    A session holds two sockets, and a spliced one six more descriptors (two pipes, two
    duplicates); a soft limit of 1024 (the usual default) would make accept() fail after
    a few hundred sessions while the hard limit allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:  # a container may forbid it: carry on
        log.info("could not raise the open-descriptor limit from {soft} to {target}: {e}", soft=soft, target=target, e=e)
    else:
        log.info("open-descriptor limit raised from {soft} to {target}", soft=soft, target=target)


class GatewayProcess(MultiService):
    """The service twistd runs: ``child`` (the gateway), with start-up failures reported
    in one line and SIGHUP handed to ``on_hangup`` in the reactor thread.

    ``daemon``: twistd runs without ``-n`` and reports start-up failures itself (through
    its status pipe, to the parent's standard error); the failure is then re-raised for
    twistd after it is logged.
    """

    #: the observer twistd's application should log to (JSON logs, mailgw.logs), or None
    log_observer = None

    def __init__(
        self,
        child: Any,
        reactor: Any,
        on_hangup: Callable[[], Any],
        *,
        daemon: bool = False,
        stderr: TextIO | None = None,
    ):
        super().__init__()
        self.child = child
        self.reactor = reactor
        self.on_hangup = on_hangup
        self.daemon = daemon
        self._stderr = stderr
        child.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None:
            # twistd's application: its AppLogger logs to this component (mailgw.logs)
            logs.offer_observer(parent, self.log_observer)

    def privilegedStartService(self) -> None:
        # Before anything listens: a SIGHUP from someone who saw a port open must not
        # find the default action (terminate) still in place.
        self._install_hangup_handler()
        raise_descriptor_limit()
        # twistd binds ports here, before it drops privileges and before the reactor
        # runs: a port in use is found while nothing else has started.
        self._guarded(super().privilegedStartService)

    def startService(self) -> None:
        self._install_hangup_handler()
        self._guarded(super().startService)

    def _guarded(self, start: Callable[[], None]) -> None:
        try:
            start()
        except OPERATOR_ERRORS as e:
            line = f"mailgw: {e}" if isinstance(e, StartupError) else f"mailgw: configuration error: {e}"
            if self.daemon:
                log.critical("{line}", line=one_line(line))
                raise
            exit_with(line, self._stderr)

    def _install_hangup_handler(self) -> None:
        if signal.getsignal(signal.SIGHUP) == self._on_signal:
            return
        try:
            signal.signal(signal.SIGHUP, self._on_signal)
        except ValueError:  # not the main thread (an in-process test): nothing to install
            log.debug("SIGHUP handler not installed: not in the main thread")

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: hand over to the reactor
        # thread and do everything there.
        self.reactor.callFromThread(self._hangup)

    def _hangup(self) -> None:
        # (Queued before the reactor ran, it runs once the service has started.)
        if not self.running:
            log.info("SIGHUP ignored: the gateway is shutting down")
            return
        # on_hangup says what came of it, in one line (reloaded, not reloaded, ignored).
        defer.maybeDeferred(self.on_hangup).addErrback(
            lambda failure: log.failure("SIGHUP handling failed", failure)
        )


class ConfigReloader:
    """Re-reads ``path`` and applies it to ``gateway_service`` (standalone SIGHUP),
    after reopening the audit file (logrotate moves it, then sends SIGHUP).

    A file that cannot be used -- unreadable, invalid, or naming a listener that cannot
    listen -- keeps the running configuration and logs exactly one line,
    ``mailgw: configuration not reloaded: <file>: <cause>``.  A SIGHUP that arrives while
    a reload is under way is applied after it (once, however many arrived).
    """

    def __init__(self, path: str, gateway_service: Any):
        self.path = str(path)
        self.gateway_service = gateway_service
        self._busy = False
        self._again = False

    def __call__(self) -> defer.Deferred:
        self.gateway_service.reopen_files()  # whether or not the file is good (logrotate)
        if self._busy:
            self._again = True
            return defer.succeed(None)
        self._busy = True
        d = defer.maybeDeferred(self._reload)
        d.addErrback(self._not_reloaded)
        d.addBoth(self._done)
        return d

    def _reload(self) -> defer.Deferred:
        # Reading the files (destinations, secrets, PEMs) and checking them is blocking
        # work: a thread does it, the reactor only applies the result.
        d = threads.deferToThread(load_config, self.path)
        return d.addCallback(self.gateway_service.reconfigure)

    def _not_reloaded(self, failure) -> None:
        if failure.check(*OPERATOR_ERRORS):
            cause = str(failure.value)
            if cause.startswith(self.path + ": "):
                cause = cause[len(self.path) + 2:]  # the file is named once, up front
            log.error("{line}", line=one_line(f"mailgw: configuration not reloaded: {self.path}: {cause}"))
        else:  # a bug of ours: the running configuration stays, the traceback is logged
            log.failure("mailgw: configuration not reloaded: {file}: internal error", failure, file=self.path)

    def _done(self, _: Any) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self()


def ignore_hangup(why: str) -> Callable[[], None]:
    """An ``on_hangup`` that only says, in one log line, why SIGHUP changes nothing."""

    def hangup() -> None:
        log.info("SIGHUP ignored: {why}", why=why)

    return hangup
