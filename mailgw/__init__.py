"""mailgw: a mail gateway that logs in to SMTP, IMAP and POP3 servers for applications."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mailgw")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
