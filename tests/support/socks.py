"""What a SOCKS5 client makes of each failure reply of a proxy: one table for the
machine's, the endpoint's and the real proxies' tests."""

from __future__ import annotations

from mailgw.protocol import socks5


def reply_codes(target: str) -> list[tuple[int, type, str]]:
    """``(code, error, text)``: a proxy asked to connect to ``target`` (``host:port``)
    that replies ``code`` makes the client raise ``error``, whose message contains
    ``text`` (case aside)."""
    return [
        (0x01, socks5.GeneralFailure, "general failure"),
        (0x02, socks5.ConnectionNotAllowed, f"no access mapping for {target}"),
        (0x03, socks5.NetworkUnreachable, "connector unreachable or unknown location"),
        (0x04, socks5.HostUnreachable, "host unreachable"),
        (0x05, socks5.ConnectionRefused, "refused"),
        (0x06, socks5.TTLExpired, "TTL expired"),
        (0x07, socks5.CommandNotSupported, "command not supported"),
        (0x08, socks5.AddressTypeNotSupported, "address type not supported"),
        (0x09, socks5.UnknownReplyCode, "unknown reply code 0x09"),
        (0xFF, socks5.UnknownReplyCode, "unknown reply code 0xff"),
    ]
