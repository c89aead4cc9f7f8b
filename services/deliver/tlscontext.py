"""The client TLS contexts of outbound STARTTLS, per TLS mode (RFC 3207, RFC 7435, RFC 8996).

:func:`tls_context` gives the context for a delivery's TLS settings (``session.TlsSettings``):

- ``verified`` (and intra-platform mail, always at least verified): Python's modern defaults —
  TLS 1.2 or later, OpenSSL security level 2, chain and name checked against ``ca_file`` (or
  the system CAs), the platform's client certificate when given.
- ``opportunistic`` and ``enforced`` (the modes that ask :attr:`TlsMode.accepts_legacy_tls`):
  no certificate check, TLS 1.0 or later and ``DEFAULT:@SECLEVEL=0`` ciphers — what Postfix
  does at ``may``/``encrypt``. Encryption that is weak beats none (RFC 7435 §1, opportunistic
  security): with the strict defaults a server that speaks only TLS 1.0/1.1 or only old ciphers
  fails the handshake and the mail goes in clear. ``DEFAULT`` never includes unencrypted or
  unauthenticated-key-exchange suites (eNULL, aNULL), so what rides TLS is encrypted.
- ``dane`` (an MX host with usable TLSA records, RFC 7672): modern defaults (TLS 1.2 or later,
  security level 2) but no certificate check in the handshake — the session compares the
  server's certificate with the TLSA records right after it (``services.deliver.dane.check``),
  before anything is sent.

Contexts are built once per (mode class, CA, client certificate) and reused: loading a CA bundle
costs milliseconds, a handshake with a ready context does not. Failure behaviour: a CA file or
client certificate that cannot be read raises (``OSError``/``ssl.SSLError``) from the call, which
the session treats as a failed handshake.

:func:`bound_read_buffers` bounds what each TLS session holds to read with (issue #20: a deliver
process keeps up to ``delivery.sessions_per_process`` sessions open). asyncio's ``SSLProtocol``
(the STARTTLS transport aiosmtplib gets from ``loop.start_tls``) allocates and zero-fills a
receive buffer of ``SSLProtocol.max_size`` — 256 KiB — per connection for its whole life, and
reads decrypted data in chunks of that size: 1 000 sessions held 250 MB. SMTP replies are a few
hundred bytes, a server's handshake flight a few kilobytes: :data:`READ_BUFFER` (4 KiB) reads
the same bytes, a larger record in several reads (as any partial read), for 4 KiB per session
(16 KiB, one full TLS record, cost 12 MB more per 1 000 sessions: bench/README.md, "Sessions in
flight"). That is the ``event_loop: asyncio`` case. uvloop's own TLS transport (the default loop,
services/common/eventloop.py) reserves 256 KiB per session with ``malloc``, not zero-filled:
only the pages its reads reach are resident (1 000 sessions: 146–148 MB per deliver process
against 142–144 with asyncio's and this bound; bench/README.md, "Session 11"; 138–141 against
137 since "Session 12"). Nothing public bounds it, nor uvloop's read of each record into a new
256 KiB bytes object. A fixed glibc mmap threshold (``M_MMAP_THRESHOLD``) keeps both out of the
heap, 5 MB less at 1 000 sessions, but makes every such read map and unmap its 256 KiB (about
11 µs, against 1.4 from the heap): not done.
"""

from __future__ import annotations

import functools
import ssl
import warnings
from typing import Final, Protocol

from services.common import tlsbuffers
from services.common.model import TlsMode

# RFC 8996 deprecates TLS 1.0/1.1; OpenSSL 3 accepts them only at security level 0.
LEGACY_MINIMUM: Final = ssl.TLSVersion.TLSv1
LEGACY_CIPHERS: Final = "DEFAULT:@SECLEVEL=0"
READ_BUFFER: Final = 4 * 1024  # bytes a TLS session reads at once (asyncio's default: 256 KiB)


class Settings(Protocol):
    """What a context depends on (``services.deliver.attempt.TlsSettings``)."""

    @property
    def mode(self) -> TlsMode: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def client_cert(self) -> tuple[str, str] | None: ...


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The (shared, cached) client context for ``settings``' mode and material."""
    mode = settings.mode
    return _context(
        mode.must_verify_chain, mode.accepts_legacy_tls, settings.ca_file, settings.client_cert
    )


@functools.lru_cache(maxsize=32)
def _context(
    verify: bool, legacy: bool, ca_file: str | None, client_cert: tuple[str, str] | None
) -> ssl.SSLContext:
    if verify:
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if legacy and not verify:
        _accept_legacy(context)
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    return context


def _accept_legacy(context: ssl.SSLContext) -> None:
    """TLS 1.0 and later with any ``DEFAULT`` cipher. Python warns on the TLS 1.0 constant
    (DeprecationWarning): here it is meant, so that one warning is silenced for that one line."""
    context.set_ciphers(LEGACY_CIPHERS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1", DeprecationWarning)
        context.minimum_version = LEGACY_MINIMUM


def bound_read_buffers() -> None:
    """Make every asyncio TLS transport of this process allocate and read :data:`READ_BUFFER`
    bytes at a time, not 256 KiB (see the module docstring). Process-wide (asyncio has no
    per-connection setting), idempotent; sessions opened before keep their buffer."""
    tlsbuffers.bound_read_buffers(READ_BUFFER)
