"""The send API: mail from applications that would rather not speak SMTP (SPEC section 8).

- :class:`EmailConnection` and :class:`SendConfig`: the Python API (blocking
  :meth:`~EmailConnection.send`, Deferred :meth:`~EmailConnection.send_deferred`).
- :func:`build_message`: the pure message builder behind it.
- :mod:`mailgw.send.http`: the same over HTTP, ``POST /v1/send/<destination>[/<rcpt>]``.
"""

from .connection import (
    EmailConnection,
    SendConfig,
    SendError,
    SendTimeout,
    send_built,
    send_built_deferred,
    send_message,
    send_message_deferred,
)
from .message import (
    DEFAULT_CONTENT_TYPE,
    Attachment,
    BuiltMessage,
    MessageError,
    MultipartBody,
    Part,
    SendRequest,
    build_message,
)

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Attachment",
    "BuiltMessage",
    "EmailConnection",
    "MessageError",
    "MultipartBody",
    "Part",
    "SendConfig",
    "SendError",
    "SendRequest",
    "SendTimeout",
    "build_message",
    "send_built",
    "send_built_deferred",
    "send_message",
    "send_message_deferred",
]
