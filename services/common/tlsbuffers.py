"""asyncio's TLS read buffer, bounded per process (issue #20: many TLS sessions open in one
process).

asyncio's ``SSLProtocol`` — the transport of ``loop.start_tls`` (the deliver worker's STARTTLS,
through aiosmtplib) and of aiosmtpd's STARTTLS (ingest builds it itself) — allocates and
zero-fills a receive buffer of ``SSLProtocol.max_size`` (256 KiB) per connection for its whole
life, and reads decrypted data in chunks of that size. A smaller size reads the same bytes, a
larger record in several reads (as any partial read). asyncio has no per-connection setting:
:func:`bound_read_buffers` sets the class attribute, for every TLS transport the process opens
from then on (sessions opened before keep theirs).
"""

from __future__ import annotations

from asyncio import sslproto


def bound_read_buffers(size: int) -> None:
    """At most ``size`` bytes per read and per TLS session's buffer in this process; never raises
    a smaller size already set (idempotent)."""
    if sslproto.SSLProtocol.max_size > size:
        sslproto.SSLProtocol.max_size = size
