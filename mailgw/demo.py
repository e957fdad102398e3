"""``twistd -n mailgw --demo``: the gateway in front of a built-in demo mail server.

The demo upstream is a real SMTP server (``twisted.mail.smtp``) on loopback that refuses
unauthenticated senders.  The gateway holds its credentials, so an application that
speaks plain SMTP without any login gets its mail delivered: the product in one line.
"""

from __future__ import annotations

import secrets
import sys

from twisted.application import internet, service
from twisted.cred import checkers, portal
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from zope.interface import implementer

from .config import parse_config
from .service import make_service

log = Logger()

DEMO_USER = "demo@mailgw.test"
DEMO_SMTP_LISTEN = "tcp:2525:interface=127.0.0.1"
DEMO_HTTP = ("127.0.0.1", 9494)


class Mailbox:
    """The demo server's messages, in memory."""

    def __init__(self):
        self.messages: list[bytes] = []

    def add(self, message: bytes) -> None:
        self.messages.append(message)


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, mailbox: Mailbox, recipient: str):
        self.mailbox = mailbox
        self.recipient = recipient
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self):
        message = b"\r\n".join(self.lines) + b"\r\n"
        self.mailbox.add(message)
        log.info("demo mail server: stored a message for {rcpt} ({size} bytes)", rcpt=self.recipient, size=len(message))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: _Message(self.mailbox, str(user.dest))


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, _Delivery(self.mailbox), lambda: None
        raise NotImplementedError("only mail delivery is offered")


class DemoSMTPFactory(smtp.SMTPFactory):
    """An ESMTP server that only accepts authenticated senders (AUTH PLAIN/LOGIN)."""

    protocol = smtp.ESMTP

    def __init__(self, mailbox: Mailbox, user: str, password: str):
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(user.encode(), password.encode())
        super().__init__(portal.Portal(_Realm(mailbox), [checker]))
        self.domain = b"demo.mailgw.test"

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
        return protocol


class DemoService(service.MultiService):
    """Starts the demo upstream first, then a gateway configured in front of it."""

    def __init__(self, reactor, smtp_listen: str = DEMO_SMTP_LISTEN, http: tuple[str, int] | None = DEMO_HTTP, out=None):
        super().__init__()
        self.reactor = reactor
        self.smtp_listen = smtp_listen
        self.http = http
        self.out = out or sys.stdout
        self.mailbox = Mailbox()
        self.password = secrets.token_urlsafe(16)  # known only to the demo server and the gateway
        self.upstream_port = None
        self.gateway_service = None

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        upstream = endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.upstream_port = yield upstream.listen(DemoSMTPFactory(self.mailbox, DEMO_USER, self.password))
        port = self.upstream_port.getHost().port
        config = {
            "destinations": [{
                "Name": "demo-smtp", "Type": "MAIL", "ProxyType": "Internet",
                "Authentication": "BasicAuthentication",
                "mail.transport.protocol": "smtp", "mail.smtp.host": "127.0.0.1", "mail.smtp.port": str(port),
                "mail.smtp.starttls.enable": "false",
                "mail.user": DEMO_USER, "mail.password": self.password,
            }],
            "listeners": [{"destination": "demo-smtp", "listen": self.smtp_listen}],
        }
        if self.http:
            config["http"] = {"listen": f"tcp:{self.http[1]}:interface={self.http[0]}"}
        self.gateway_service = make_service(parse_config(config, "demo"), self.reactor)
        self.gateway_service.setServiceParent(self)
        address = (yield self.gateway_service.listening_ports())[0].getHost()
        self.out.write(
            "\nmailgw demo is running.\n"
            f"  SMTP for applications: {address.host}:{address.port} (no login needed; the gateway holds the credentials)\n"
            f"  demo mail server:      127.0.0.1:{port} (refuses senders that do not log in)\n"
            + (f"  health and metrics:    http://{self.http[0]}:{self.http[1]}/metrics\n" if self.http else "")
            + "Try it:\n"
            f"  python3 -c \"import smtplib; print(smtplib.SMTP('{address.host}', {address.port}).sendmail("
            f"'app@example.org', ['you@example.org'], 'Subject: hello\\r\\n\\r\\nsent through mailgw\\r\\n'))\"\n"
            f"  swaks --server {address.host}:{address.port} --to you@example.org\n\n"
        )
        self.out.flush()

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self.upstream_port is not None:
            yield self.upstream_port.stopListening()
