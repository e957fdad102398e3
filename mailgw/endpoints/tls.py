"""TLS client settings for a destination: trust, client certificate, host-name checks.

The handshake itself is started by the session (``transport.startTLS``) for implicit TLS
and STARTTLS alike, so one code path serves both and it works through a SOCKS tunnel
(the SOCKS layer hands the real TCP transport to the mail protocol).
"""

from __future__ import annotations

import os
import re
import time

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from ..destination import Destination
from ..errors import GatewayError
from ..files import UnreadableFile, read_capped
from ..protocol.refusal import Reason

log = Logger()

#: PEM files larger than this are refused (a CA bundle is a few hundred KiB; reading
#: stays bounded even when the path names /dev/zero).
MAX_PEM_BYTES = 4 * 1024 * 1024

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TLSConfigError(GatewayError, ValueError):
    """A destination's TrustStoreLocation or KeyStoreLocation cannot be used (a
    session that needs it is refused under ``tls``, with this message)."""

    def __init__(self, message: str):
        super().__init__(message, permanent=True, reason=Reason.TLS)


def _read(destination: Destination, key: str, path: str) -> bytes:
    try:
        return read_capped(path, MAX_PEM_BYTES, "PEM file")
    except UnreadableFile as e:  # "<path>: cannot read PEM file: ...", "... is larger than 4 MiB"
        raise TLSConfigError(f"destination {destination.name!r}, key {key!r}: {e}") from None


def _certificates(destination: Destination, key: str, pem: bytes) -> list[ssl.Certificate]:
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise TLSConfigError(f"destination {destination.name!r}, key {key!r}: no PEM certificate in the file")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception:
        raise TLSConfigError(f"destination {destination.name!r}, key {key!r}: unreadable PEM certificate") from None


def _client_certificate(destination: Destination) -> tuple[ssl.PrivateCertificate | None, list]:
    if not destination.key_store:
        return None, []
    pem = _read(destination, "KeyStoreLocation", destination.key_store)
    certs = _certificates(destination, "KeyStoreLocation", pem)
    try:
        leaf = ssl.PrivateCertificate.loadPEM(pem)  # the first certificate and the key
    except Exception:
        raise TLSConfigError(
            f"destination {destination.name!r}, key 'KeyStoreLocation': no usable private key in the file"
        ) from None
    # optionsForClientTLS sends only the leaf unless the chain is given explicitly.
    return leaf, [c.original for c in certs[1:]]


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TrustAll: no chain or host-name checks, but SNI is still sent."""

    def __init__(self, hostname: str, options: ssl.CertificateOptions):
        self._hostname = hostname
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


#: How often the PEM files of a set of TLS settings are looked at again: a rotated CA
#: bundle or client certificate is used within this time, and sessions cost no stat.
RECHECK_SECONDS = 60.0


class _Built:
    """The connection creator for one set of TLS settings, and the identity of its PEM
    files when it was made."""

    __slots__ = ("options", "files", "checked_at")

    def __init__(self, options: IOpenSSLClientConnectionCreator, files: tuple, checked_at: float):
        self.options, self.files, self.checked_at = options, files, checked_at


#: Connection creators by TLS settings; bounded, cleared when full.
_OPTIONS: dict[tuple, _Built] = {}
_OPTIONS_MAX = 512


def _identity(path: str | None) -> tuple | None:
    """What tells a changed file: replaced (a new inode, as a Kubernetes Secret's
    symlink swap gives), rewritten (size, modification time)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # building the options reports the problem
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def client_tls_options(destination: Destination, now: float | None = None) -> IOpenSSLClientConnectionCreator:
    """The connection creator for ``destination``'s upstream TLS (verification on by default).

    Built once per set of TLS settings and shared by the sessions: an OpenSSL context is
    costly to make and the PEM files would otherwise be read on the reactor thread for
    every session.  The files are looked at again (``os.stat``) at most every
    :data:`RECHECK_SECONDS` (``now``: the caller's clock, default ``time.monotonic()``);
    a changed one builds a new creator.  TrustAll is logged as a warning each time one
    is built, not for every session.
    """
    now = time.monotonic() if now is None else now
    key = (destination.host, destination.trust_all, destination.trust_store, destination.key_store)
    built = _OPTIONS.get(key)
    if built is not None and now - built.checked_at < RECHECK_SECONDS:
        return built.options
    files = (_identity(destination.trust_store), _identity(destination.key_store))
    if built is not None and built.files == files:
        built.checked_at = now
        return built.options
    if destination.trust_all:
        log.warn(
            "destination {destination}: TrustAll is set, the upstream certificate is NOT verified",
            destination=destination.name,
        )
    if len(_OPTIONS) >= _OPTIONS_MAX:
        _OPTIONS.clear()
    built = _OPTIONS[key] = _Built(_build_options(destination), files, now)
    return built.options


def _build_options(destination: Destination) -> IOpenSSLClientConnectionCreator:
    client_cert, chain = _client_certificate(destination)
    extra = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if chain:
        extra["extraCertChain"] = chain
    if destination.trust_all:
        options = ssl.CertificateOptions(
            verify=False,
            privateKey=client_cert.privateKey.original if client_cert else None,
            certificate=client_cert.original if client_cert else None,
            **extra,
        )
        return _UnverifiedClientTLS(destination.host, options)
    if destination.trust_store:
        pem = _read(destination, "TrustStoreLocation", destination.trust_store)
        trust_root = ssl.trustRootFromCertificates(_certificates(destination, "TrustStoreLocation", pem))
    else:
        trust_root = ssl.platformTrust()
    return ssl.optionsForClientTLS(
        destination.host,
        trustRoot=trust_root,
        clientCertificate=client_cert,
        extraCertificateOptions=extra,
    )


def check_tls_files(destination: Destination) -> None:
    """Raise :class:`TLSConfigError` now if the destination's PEM files are unusable."""
    _build_options(destination)
