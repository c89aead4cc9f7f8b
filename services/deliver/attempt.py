"""What one delivery attempt is given and what it gives back: the records
:mod:`services.deliver.session` and :mod:`services.deliver.transaction` share.

:class:`Peer` (where to connect), :class:`TlsSettings` (the TLS requirement and its material),
:class:`Timeouts` and :class:`Hooks` go in; an :class:`Attempt` comes out — per-recipient
replies when a transaction ran, or a session-level ``error`` with ``next_host=True``. Plain
values only: nothing here does I/O or raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.model import Reply, TlsMode
from services.deliver.shaping import Throttle
from services.deliver.tls import Outcome


@dataclass(frozen=True)
class Peer:
    """Where to connect and what name to expect on its certificate."""

    host: str  # MX host name (or route host): shown in traces
    address: str  # IP address actually connected to
    port: int
    tls_name: str  # name checked against the certificate in verified mode


@dataclass(frozen=True)
class TlsSettings:
    """The requirement for this delivery and the material to meet it."""

    mode: TlsMode
    ca_file: str | None = None  # verified mode: CA bundle (None → system CAs)
    remembered_broken: bool = False
    client_cert: tuple[str, str] | None = None  # (cert, key) PEM files presented to the server
    # MTA-STS testing mode: after an unverified handshake, note in ``Attempt.verify_code`` what
    # verification would have said (services.deliver.mtasts.leaf_problem); never changes a fate.
    check_leaf: bool = False
    # DANE (mode dane): the host's TLSA records (presentation format) and the names a DANE-TA
    # leaf may be issued to (the MX host, the destination domain; RFC 7672 §3.2.3).
    tlsa: tuple[str, ...] = ()
    tlsa_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    """Our EHLO name and how long to wait for each phase (RFC 5321 §4.5.3.2 gives the defaults:
    greeting 5 min, MAIL/RCPT 5 min, DATA end 10 min; TCP connect is ours, as Postfix's 30 s)."""

    local_hostname: str
    connect: float = 30.0
    command: float = 300.0
    greeting: float = 300.0
    data: float = 600.0
    pipelining: bool = True  # use PIPELINING where offered (delivery.pipelining)
    chunking: bool = True  # and CHUNKING with it where offered (delivery.chunking)


async def _nothing(peer: Peer) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What the session tells its caller while it runs (both default to doing nothing)."""

    on_handshake_failed: Callable[[Peer], None] = lambda peer: None
    # Called just before the message is sent: from here until the reply is recorded, a crash
    # leaves the relay unsure whether the peer has it (RFC 1047).
    # Awaited: DATA goes out once it returns (the in-flight mark is written by then).
    before_data: Callable[[Peer], Awaitable[None]] = _nothing
    # The same, without an await: one command at a time (no PIPELINING), nothing may yield to
    # the loop between the last RCPT reply and DATA — aiosmtplib drops a reply that arrives with
    # no command outstanding, so a peer out of step (a doubled RCPT reply) would pass for one in
    # step. The deliverer writes the mark there on the loop (none when the premark was right).
    before_data_now: Callable[[Peer], None] = lambda peer: None
    # One command at a time (no PIPELINING): awaited just before MAIL, where the session is
    # between transactions (no reply outstanding: waiting there is as safe as the time a
    # session spends parked). With redis_min_replicas the deliverer writes the in-flight mark
    # here and waits for the replicas to acknowledge it, since it may not wait before DATA;
    # raising here ends the attempt before anything is sent.
    before_mail: Callable[[Peer], Awaitable[None]] = _nothing


@dataclass
class Attempt:
    """What happened in one attempt (one address); becomes one trace event."""

    peer: Peer
    mode: TlsMode
    outcome: Outcome | None = None
    tls_version: str | None = None
    cipher: str | None = None
    error: Reply | None = None  # session-level failure (nothing was accepted)
    next_host: bool = False  # the caller should try the next address/host
    replies: dict[str, Reply] = field(default_factory=dict)  # per recipient, final for this try
    data_sent: bool = False  # the transaction got to DATA (the message went over the wire)
    # The transaction ended with a 250 to the final dot: the server is between transactions. Any
    # other ending (a refused DATA, refused recipients, a refused sender) may leave it open
    # (Postfix keeps it after a 4xx/5xx to DATA), so the session needs RSET before reuse.
    clean: bool = False
    # The peer answered out of step (a 2xx where 354 belonged, a non-reply): what it says next
    # cannot be trusted to answer our next command, so the session is closed, never reused.
    desync: bool = False
    greeted: bool = False  # a new session got the server's greeting (delivery.mx_session_limit)
    reused: bool = False  # rode a pooled session (no connect, EHLO or handshake of its own)
    # Rode a successor session (services/deliver/pool.py) on its first transaction: reused,
    # but its TLS session is new — opened ahead of time, never an attempt of its own — so it is
    # this attempt's for TLSRPT (verify_code, local_address and dane are the session's).
    opened_ahead: bool = False
    verify_code: int | None = None  # OpenSSL X509_V_ERR_* of a failed certificate check
    local_address: str | None = None  # our side of the connection (TLSRPT sending-mta-ip)
    dane: str | None = None  # DANE: which TLSA record matched, or why none did
    # The destination's own reply lines at the greeting, MAIL and RCPT that were not a success
    # (never a reply of ours): what traffic shaping's back-off looks at.
    server_replies: list[str] = field(default_factory=list)
    # No session could be had: a shaping limit (services.deliver.shaping.Throttle); nothing
    # was tried, and the round waits (not an attempt).
    throttled: Throttle | None = None
    # An unverified TLS session: what verification would have said of the server's leaf
    # (services.deliver.leafcheck; for `tlsrelay posture`'s what-if); a reused session's too.
    leaf_verdict: str | None = None
    greeting: str = ""  # the server's 220 line (shown by `tlsrelay check`)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.peer.host,
            "address": self.peer.address,
            "port": self.peer.port,
            "tls_mode": self.mode.label,
            "tls_outcome": self.outcome.value if self.outcome else None,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "error": str(self.error) if self.error else None,
            "replies": {r: str(reply) for r, reply in self.replies.items()},
            "reused": self.reused,
            **({"dane": self.dane} if self.dane is not None else {}),
        }
