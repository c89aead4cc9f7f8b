"""The one place that maps (TLS requirement, what the server offered, what the handshake did) to
what the delivery does next. Pure; the session code asks, and obeys.

The table (mode × situation → action, outcome):

=================  ==============  ================  ================  ==================
situation          none            opportunistic     enforced          verified
=================  ==============  ================  ================  ==================
before STARTTLS    clear/disabled  see below         see below         see below
remembered broken  clear/disabled  clear/remembered  try TLS anyway    try TLS anyway
not offered        clear/disabled  clear/not_off.    next host         next host
handshake failed   —               reconnect clear   next host         next host
verify failed      —               —                 —                 next host
handshake ok       —               send TLS          send TLS          send TLS (verified)
=================  ==============  ================  ================  ==================

Opportunistic mode never verifies the certificate, so "verify failed" cannot happen there; the
function still answers safely (``NEXT_HOST``) for any combination it is asked about. Nothing here
ever answers a clear-text action for ``enforced`` or ``verified``.
"""

from __future__ import annotations

import enum

from services.common.model import TlsMode


class Situation(enum.Enum):
    """What the session has learnt about TLS at the moment it asks."""

    REMEMBERED_BROKEN = "remembered_broken"  # before connecting: a recent handshake here failed
    NOT_OFFERED = "not_offered"  # EHLO did not list STARTTLS
    HANDSHAKE_FAILED = "handshake_failed"  # STARTTLS refused, or the TLS handshake broke
    VERIFY_FAILED = "verify_failed"  # handshake broke on certificate verification
    HANDSHAKE_OK = "handshake_ok"


class Outcome(enum.Enum):
    """The TLS outcome recorded per attempt (also a metric label: few values)."""

    TLS = "tls"
    TLS_VERIFIED = "tls_verified"
    NOT_OFFERED = "not_offered"
    HANDSHAKE_FAILED = "handshake_failed"
    REMEMBERED_BROKEN = "remembered_broken"
    VERIFY_FAILED = "verify_failed"
    DISABLED = "disabled"


class Action(enum.Enum):
    SEND_TLS = "send_tls"  # carry on over the TLS session
    SEND_CLEAR = "send_clear"  # carry on in clear on this connection (no STARTTLS)
    RECONNECT_CLEAR = "reconnect_clear"  # drop this connection, send in clear on a new one
    TRY_TLS = "try_tls"  # go ahead and issue STARTTLS
    NEXT_HOST = "next_host"  # TLS required but not available here: try the next MX


def wants_starttls(mode: TlsMode, remembered_broken: bool) -> tuple[Action, Outcome | None]:
    """Before EHLO: should this session try STARTTLS at all?"""
    if not mode.tries_tls:
        return Action.SEND_CLEAR, Outcome.DISABLED
    if remembered_broken and not mode.requires_encryption:
        return Action.SEND_CLEAR, Outcome.REMEMBERED_BROKEN
    return Action.TRY_TLS, None


def after_starttls(mode: TlsMode, situation: Situation) -> tuple[Action, Outcome]:
    """After EHLO / the STARTTLS handshake: how to go on (never clear when TLS is required)."""
    required = mode.requires_encryption
    if situation is Situation.HANDSHAKE_OK:
        return Action.SEND_TLS, Outcome.TLS_VERIFIED if mode.must_verify_chain else Outcome.TLS
    outcome = Outcome(situation.value)
    if required or not mode.tries_tls or situation is Situation.VERIFY_FAILED:
        return Action.NEXT_HOST, outcome
    if situation is Situation.NOT_OFFERED:
        return Action.SEND_CLEAR, outcome
    if situation is Situation.HANDSHAKE_FAILED:
        return Action.RECONNECT_CLEAR, outcome
    return Action.NEXT_HOST, outcome  # REMEMBERED_BROKEN is not a post-EHLO situation


def sends_in_clear(action: Action) -> bool:
    return action in (Action.SEND_CLEAR, Action.RECONNECT_CLEAR)
