"""``twistd -n mailgw --demo``: the gateway in front of a built-in demo mail server.

The demo upstream is a small real mail server on loopback, built from Twisted's own
servers: SMTP (``twisted.mail.smtp``), IMAP (``twisted.mail.imap4``) and POP3
(``twisted.mail.pop3``), all refusing clients that do not log in.  They share one
in-memory INBOX, seeded with a welcome message; whatever is delivered over SMTP is
appended to it.  The gateway holds the demo account's random password, so an
application that speaks plain SMTP, IMAP or POP3 without any login (or with any login
at all) gets its mail sent and read: the product in one screen.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io
import secrets
import sys
from dataclasses import dataclass, field

from twisted.application import service
from twisted.cred import checkers, portal
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import imap4, pop3, smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from zope.interface import implementer

from .config import parse_config
from .listening import Listener, listen_now
from .service import make_service

log = Logger()

DEMO_USER = "demo@mailgw.test"
DEMO_SMTP_LISTEN = "tcp:2525:interface=127.0.0.1"
DEMO_IMAP_LISTEN = "tcp:1143:interface=127.0.0.1"
DEMO_POP3_LISTEN = "tcp:1110:interface=127.0.0.1"
DEMO_HTTP = ("127.0.0.1", 9494)

WELCOME = (
    "From: mailgw demo <demo@mailgw.test>\r\n"
    "To: demo@mailgw.test\r\n"
    "Subject: Welcome to the mailgw demo\r\n"
    "Message-ID: <welcome@demo.mailgw.test>\r\n"
    "Date: {date}\r\n"
    "\r\n"
    "Hello!\r\n"
    "\r\n"
    "You are reading this through mailgw.  Your client did not log in (or logged in\r\n"
    "with any name and password at all): the gateway answered that itself, then\r\n"
    "logged in to the demo mail server with a password that only the two of them know.\r\n"
    "\r\n"
    "Mail you send to the gateway's SMTP port is delivered the same way and lands in\r\n"
    "this mailbox too, so you can read it back here over IMAP or POP3.\r\n"
)


# -- the mailbox -------------------------------------------------------------------------


@dataclass(eq=False)
class StoredMessage:
    uid: int
    data: bytes
    date: str  # when it arrived, RFC 2822
    flags: set[str] = field(default_factory=set)


class Mailbox:
    """The demo account's one INBOX, in memory: SMTP appends, IMAP and POP3 read."""

    uid_validity = 1

    def __init__(self):
        self.messages: list[StoredMessage] = []
        self.next_uid = 1
        self.watchers: list = []  # called with no arguments after each new message

    def add(self, data: bytes) -> StoredMessage:
        message = StoredMessage(self.next_uid, data, email.utils.formatdate(localtime=True))
        self.next_uid += 1
        self.messages.append(message)
        for watcher in list(self.watchers):
            watcher()
        return message

    def remove(self, gone) -> None:
        self.messages = [m for m in self.messages if m not in gone]


# -- SMTP: delivery into the mailbox ------------------------------------------------------


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


# -- IMAP: the mailbox as an INBOX ---------------------------------------------------------


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@implementer(imap4.IMessage, imap4.IMessageFile)
class _IMAPMessage:
    def __init__(self, stored: StoredMessage):
        self.stored = stored
        self.headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(stored.data)

    def getUID(self):
        return self.stored.uid

    def getFlags(self):
        return sorted(self.stored.flags)

    def getInternalDate(self):
        return self.stored.date

    def getHeaders(self, negate, *names):
        names = {_text(n).lower() for n in names}
        return {k.lower(): v for k, v in self.headers.items() if (k.lower() in names) != negate}

    def getBodyFile(self):
        return io.BytesIO(self.stored.data.partition(b"\r\n\r\n")[2])

    def getSize(self):
        return len(self.stored.data)

    def isMultipart(self):
        return False  # a demo: MIME parts are not split out

    def getSubPart(self, part):
        raise TypeError("not a multipart message")

    def open(self):  # IMessageFile: BODY[] and RFC822 are the stored bytes, exactly
        return io.BytesIO(self.stored.data)


@implementer(imap4.IMailbox)
class _IMAPInbox:
    """The shared :class:`Mailbox` seen through IMAP (sequence numbers, UIDs, flags)."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.listeners: list = []  # IMAP sessions that selected the INBOX
        mailbox.watchers.append(self._arrived)

    def _arrived(self):
        for listener in list(self.listeners):
            listener.newMessages(len(self.mailbox.messages), None)

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        self.listeners.remove(listener)

    def getFlags(self):
        return [r"\Seen", r"\Answered", r"\Flagged", r"\Deleted", r"\Draft"]

    def getHierarchicalDelimiter(self):
        return "/"

    def getUIDValidity(self):
        return self.mailbox.uid_validity

    def getUIDNext(self):
        return self.mailbox.next_uid

    def getUID(self, message):
        return self.mailbox.messages[message - 1].uid

    def getMessageCount(self):
        return len(self.mailbox.messages)

    def getRecentCount(self):
        return 0

    def getUnseenCount(self):
        return sum(r"\Seen" not in m.flags for m in self.mailbox.messages)

    def isWriteable(self):
        return True

    def destroy(self):
        raise imap4.MailboxException("the demo INBOX cannot be deleted")

    def requestStatus(self, names):
        return imap4.statusRequestHelper(self, names)

    def addMessage(self, message, flags=(), date=None):
        stored = self.mailbox.add(message.read())
        stored.flags.update(_text(f) for f in flags)
        return defer.succeed(stored.uid)

    def expunge(self):
        numbered = list(enumerate(self.mailbox.messages, 1))
        gone = [(seq, m) for seq, m in numbered if r"\Deleted" in m.flags]
        self.mailbox.remove([m for _, m in gone])
        return [seq for seq, _ in reversed(gone)]  # highest first: no renumbering between them

    def _matching(self, messages, uid):
        """(sequence number, stored message) for each message in the set ``messages``."""
        numbered = list(enumerate(self.mailbox.messages, 1))
        if uid:
            messages.last = self.mailbox.next_uid - 1
            return [(seq, m) for seq, m in numbered if m.uid in messages]
        messages.last = len(numbered)
        return [(seq, m) for seq, m in numbered if seq in messages]

    def fetch(self, messages, uid):
        return [(seq, _IMAPMessage(m)) for seq, m in self._matching(messages, uid)]

    def store(self, messages, flags, mode, uid):
        flags = {_text(f) for f in flags}
        result = {}
        for seq, m in self._matching(messages, uid):
            if mode > 0:
                m.flags |= flags
            elif mode < 0:
                m.flags -= flags
            else:
                m.flags = set(flags)
            result[seq] = sorted(m.flags)
        return result


class _IMAPAccount(imap4.MemoryAccount):
    def __init__(self, inbox: _IMAPInbox):
        super().__init__(DEMO_USER)
        self.addMailbox("INBOX", inbox)


class DemoIMAPFactory(protocol.ServerFactory):
    """Plain IMAP4rev1; logins by LOGIN or AUTHENTICATE PLAIN (no TLS, so no LOGINDISABLED)."""

    def __init__(self, portal_: portal.Portal):
        self.portal = portal_

    def buildProtocol(self, addr):
        server = imap4.IMAP4Server(chal={b"PLAIN": PLAINCredentials})
        server.portal = self.portal
        server.factory = self
        return server


# -- POP3: the mailbox as a maildrop -------------------------------------------------------


@implementer(pop3.IMailbox)
class _POP3Maildrop:
    """One POP3 session's view: the messages present at login; DELE takes effect at QUIT."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.messages = list(mailbox.messages)
        self.deleted: set[int] = set()

    def _get(self, i: int) -> StoredMessage:
        if i in self.deleted or not 0 <= i < len(self.messages):
            raise ValueError(f"no message {i + 1}")
        return self.messages[i]

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self.deleted else len(m.data) for n, m in enumerate(self.messages)]
        return len(self._get(i).data)

    def getMessage(self, i):
        return io.BytesIO(self._get(i).data)

    def getUidl(self, i):
        return b"%d.%d" % (self.mailbox.uid_validity, self._get(i).uid)

    def deleteMessage(self, i):
        self._get(i)
        self.deleted.add(i)

    def undeleteMessages(self):
        self.deleted.clear()

    def sync(self):
        self.mailbox.remove([self.messages[i] for i in self.deleted])


class DemoPOP3Factory(protocol.ServerFactory):
    """Plain POP3; logins by USER/PASS (Twisted's AUTH is not SASL PLAIN, so CAPA has no SASL)."""

    protocol = pop3.POP3

    def __init__(self, portal_: portal.Portal):
        self.portal = portal_

    def buildProtocol(self, addr):
        server = super().buildProtocol(addr)
        server.portal = self.portal
        return server


# -- the demo account -----------------------------------------------------------------------


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.inbox = _IMAPInbox(mailbox)

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, _Delivery(self.mailbox), lambda: None
        if imap4.IAccount in interfaces:
            return imap4.IAccount, _IMAPAccount(self.inbox), lambda: None
        if pop3.IMailbox in interfaces:
            return pop3.IMailbox, _POP3Maildrop(self.mailbox), lambda: None
        raise NotImplementedError("only SMTP delivery, IMAP and POP3 are offered")


def demo_portal(mailbox: Mailbox, user: str, password: str) -> portal.Portal:
    checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(user.encode(), password.encode())
    return portal.Portal(_Realm(mailbox), [checker])


class DemoSMTPFactory(smtp.SMTPFactory):
    """An ESMTP server that only accepts authenticated senders (AUTH PLAIN/LOGIN)."""

    protocol = smtp.ESMTP

    def __init__(self, portal_: portal.Portal):
        super().__init__(portal_)
        self.domain = b"demo.mailgw.test"

    def buildProtocol(self, addr):
        server = super().buildProtocol(addr)
        server.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
        return server


# -- the demo --------------------------------------------------------------------------------


def _destination(name: str, protocol_: str, port: int, password: str) -> dict:
    return {
        "Name": name, "Type": "MAIL", "ProxyType": "Internet", "Authentication": "BasicAuthentication",
        "mail.transport.protocol": protocol_,
        f"mail.{protocol_}.host": "127.0.0.1", f"mail.{protocol_}.port": str(port),
        f"mail.{protocol_}.starttls.enable": "false",
        "mail.user": DEMO_USER, "mail.password": password,
    }


class DemoService(service.MultiService):
    """Starts the demo mail server first, then a gateway configured in front of it."""

    def __init__(self, reactor, smtp_listen: str = DEMO_SMTP_LISTEN, http: tuple[str, int] | None = DEMO_HTTP,
                 out=None, imap_listen: str = DEMO_IMAP_LISTEN, pop3_listen: str = DEMO_POP3_LISTEN):
        super().__init__()
        self.reactor = reactor
        #: where the gateway listens for each demo destination
        self.listen = {"demo-smtp": smtp_listen, "demo-imap": imap_listen, "demo-pop3": pop3_listen}
        self.http = http
        self.out = out or sys.stdout
        self.mailbox = Mailbox()
        self.mailbox.add(WELCOME.format(date=email.utils.formatdate(localtime=True)).encode())
        self.password = secrets.token_urlsafe(16)  # known only to the demo server and the gateway
        self.upstream_ports: list = []
        self.gateway_service = None

    def privilegedStartService(self):
        # Everything binds here, before the reactor runs: a port in use (another demo
        # still running) stops start-up with one line (mailgw.process).
        self._build()
        super().privilegedStartService()

    def startService(self):
        self._build()  # when nobody called privilegedStartService (in-process tests)
        super().startService()
        self._print_welcome()

    def _build(self):
        """Listen with the demo mail server on loopback and build the gateway in front of it."""
        if self.gateway_service is not None:
            return
        accounts = demo_portal(self.mailbox, DEMO_USER, self.password)
        servers = [("demo-smtp", "smtp", DemoSMTPFactory(accounts)), ("demo-imap", "imap4", DemoIMAPFactory(accounts)),
                   ("demo-pop3", "pop3", DemoPOP3Factory(accounts))]
        config: dict = {"destinations": [], "listeners": []}
        for destination, protocol, factory in servers:
            port = listen_now(self.reactor, Listener(f"demo {protocol} server", "tcp:0:interface=127.0.0.1", factory))
            self.upstream_ports.append(port)
            config["destinations"].append(_destination(destination, protocol, port.getHost().port, self.password))
            config["listeners"].append({"destination": destination, "listen": self.listen[destination]})
        if self.http:
            config["http"] = {"listen": f"tcp:{self.http[1]}:interface={self.http[0]}"}
        self.gateway_service = make_service(parse_config(config, "demo"), self.reactor)
        self.gateway_service.setServiceParent(self)

    def _print_welcome(self):
        smtp_at, imap_at, pop3_at = [item.address for item in self.gateway_service.listeners.listeners]
        upstream = dict(zip(("smtp", "imap4", "pop3"), (p.getHost().port for p in self.upstream_ports)))
        self.out.write(
            "\nmailgw demo is running.  Applications need no login: the gateway holds the credentials.\n"
            f"  SMTP for applications: {smtp_at.host}:{smtp_at.port}\n"
            f"  IMAP for applications: {imap_at.host}:{imap_at.port}   (any login, or none, is accepted)\n"
            f"  POP3 for applications: {pop3_at.host}:{pop3_at.port}   (any login, or none, is accepted)\n"
            f"  demo mail server:      SMTP 127.0.0.1:{upstream['smtp']}, IMAP 127.0.0.1:{upstream['imap4']}, "
            f"POP3 127.0.0.1:{upstream['pop3']} (refuses clients that do not log in)\n"
            + (f"  health and metrics:    http://{self.http[0]}:{self.http[1]}/metrics\n" if self.http else "")
            + "Send a message:\n"
            f"  python3 -c \"import smtplib; print(smtplib.SMTP('{smtp_at.host}', {smtp_at.port}).sendmail("
            f"'app@example.org', ['you@example.org'], 'Subject: hello\\r\\n\\r\\nsent through mailgw\\r\\n'))\"\n"
            f"  swaks --server {smtp_at.host}:{smtp_at.port} --to you@example.org\n"
            "Read the mailbox (message 1 is a welcome; what you send is appended):\n"
            f"  curl 'imap://{imap_at.host}:{imap_at.port}/INBOX;UID=1' --user any:thing\n"
            f"  curl pop3://{pop3_at.host}:{pop3_at.port}/1 --user any:thing\n"
            f"  python3 -c \"import poplib; p = poplib.POP3('{pop3_at.host}', {pop3_at.port}); n = p.stat()[0]; "
            f"print(n, 'messages; the last one:'); print(b'\\n'.join(p.retr(n)[1]).decode()); p.quit()\"\n\n"
        )
        self.out.flush()

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        for port in self.upstream_ports:
            yield port.stopListening()
        self.upstream_ports = []
