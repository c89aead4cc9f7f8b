"""The one place that maps (TLS requirement, what the server offered, what the handshake did) to
what the delivery does next. Pure; the session code asks, and obeys.

The table (mode × situation → action, outcome):

=================  ==============  ================  ================  ==================  ==================
situation          none            opportunistic     enforced          verified            dane
=================  ==============  ================  ================  ==================  ==================
before STARTTLS    clear/disabled  see below         see below         see below           see below
remembered broken  clear/disabled  clear/remembered  try TLS anyway    try TLS anyway      try TLS anyway
not offered        clear/disabled  clear/not_off.    next host         next host           next host
handshake failed   —               reconnect clear   next host         next host           next host
verify failed      —               —                 —                 next host           —
dane failed        —               —                 —                 —                   next host (dane_f.)
handshake ok       —               send TLS          send TLS          send TLS (verified) send TLS (dane_v.)
=================  ==============  ================  ================  ==================  ==================

``dane`` (RFC 7672) is the requirement of one MX host whose DNSSEC-validated TLSA records are
usable: the handshake does not check the certificate, the session then compares it with the
records (:func:`services.deliver.dane.check`) and asks again with ``handshake ok`` (it matched:
``dane_verified``) or ``dane failed`` (it did not: ``dane_failed``, next host). Opportunistic
mode never verifies the certificate, so "verify failed" cannot happen there; the function still
answers safely (``NEXT_HOST``) for any combination it is asked about. Nothing here ever answers
a clear-text action for ``enforced``, ``verified`` or ``dane``; the "TLS broken" memory never
applies to them.
"""  # noqa: E501

from __future__ import annotations

import enum

from services.common.model import TlsMode


class Situation(enum.Enum):
    """What the session has learnt about TLS at the moment it asks."""

    REMEMBERED_BROKEN = "remembered_broken"  # before connecting: a recent handshake here failed
    NOT_OFFERED = "not_offered"  # EHLO did not list STARTTLS
    HANDSHAKE_FAILED = "handshake_failed"  # STARTTLS refused, or the TLS handshake broke
    VERIFY_FAILED = "verify_failed"  # handshake broke on certificate verification
    DANE_FAILED = "dane_failed"  # handshake ok, the certificate matched no usable TLSA record
    HANDSHAKE_OK = "handshake_ok"


class Outcome(enum.Enum):
    """The TLS outcome recorded per attempt (also a metric label: few values)."""

    TLS = "tls"
    TLS_VERIFIED = "tls_verified"
    NOT_OFFERED = "not_offered"
    HANDSHAKE_FAILED = "handshake_failed"
    REMEMBERED_BROKEN = "remembered_broken"
    VERIFY_FAILED = "verify_failed"
    DANE_VERIFIED = "dane_verified"  # the certificate matched a usable TLSA record (RFC 7672)
    DANE_FAILED = "dane_failed"  # it matched none: next host, never clear
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
        return Action.SEND_TLS, _ok(mode)
    outcome = Outcome(situation.value)
    if required or not mode.tries_tls or situation in _AUTH_FAILURES:
        return Action.NEXT_HOST, outcome
    if situation is Situation.NOT_OFFERED:
        return Action.SEND_CLEAR, outcome
    if situation is Situation.HANDSHAKE_FAILED:
        return Action.RECONNECT_CLEAR, outcome
    return Action.NEXT_HOST, outcome  # REMEMBERED_BROKEN is not a post-EHLO situation


_AUTH_FAILURES = (Situation.VERIFY_FAILED, Situation.DANE_FAILED)


def _ok(mode: TlsMode) -> Outcome:
    if mode.must_match_tlsa:
        return Outcome.DANE_VERIFIED
    return Outcome.TLS_VERIFIED if mode.must_verify_chain else Outcome.TLS


def sends_in_clear(action: Action) -> bool:
    return action in (Action.SEND_CLEAR, Action.RECONNECT_CLEAR)
