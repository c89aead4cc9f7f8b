"""The TLS decision table, exhaustively: no combination sends required-TLS mail in clear."""

from __future__ import annotations

import itertools

import pytest

from services.common.model import TlsMode
from services.deliver.tls import Action, Outcome, Situation, after_starttls, sends_in_clear
from services.deliver.tls import wants_starttls as before

NO, OP, EN, VE = TlsMode.NONE, TlsMode.OPPORTUNISTIC, TlsMode.ENFORCED, TlsMode.VERIFIED
DA = TlsMode.DANE
S = Situation

BEFORE = [
    (NO, False, Action.SEND_CLEAR, Outcome.DISABLED),
    (NO, True, Action.SEND_CLEAR, Outcome.DISABLED),
    (OP, False, Action.TRY_TLS, None),
    (OP, True, Action.SEND_CLEAR, Outcome.REMEMBERED_BROKEN),
    (EN, False, Action.TRY_TLS, None),
    (EN, True, Action.TRY_TLS, None),  # the broken-host memory never makes required TLS clear
    (VE, False, Action.TRY_TLS, None),
    (VE, True, Action.TRY_TLS, None),
    (DA, False, Action.TRY_TLS, None),
    (DA, True, Action.TRY_TLS, None),  # the "TLS broken" memory never applies where DANE does
]


@pytest.mark.parametrize(("mode", "broken", "action", "outcome"), BEFORE)
def test_before_ehlo(mode: TlsMode, broken: bool, action: Action, outcome: Outcome | None) -> None:
    assert before(mode, broken) == (action, outcome)


AFTER = [
    (OP, S.HANDSHAKE_OK, Action.SEND_TLS, Outcome.TLS),
    (OP, S.NOT_OFFERED, Action.SEND_CLEAR, Outcome.NOT_OFFERED),
    (OP, S.HANDSHAKE_FAILED, Action.RECONNECT_CLEAR, Outcome.HANDSHAKE_FAILED),
    (OP, S.VERIFY_FAILED, Action.NEXT_HOST, Outcome.VERIFY_FAILED),
    (EN, S.HANDSHAKE_OK, Action.SEND_TLS, Outcome.TLS),
    (EN, S.NOT_OFFERED, Action.NEXT_HOST, Outcome.NOT_OFFERED),
    (EN, S.HANDSHAKE_FAILED, Action.NEXT_HOST, Outcome.HANDSHAKE_FAILED),
    (EN, S.VERIFY_FAILED, Action.NEXT_HOST, Outcome.VERIFY_FAILED),
    (VE, S.HANDSHAKE_OK, Action.SEND_TLS, Outcome.TLS_VERIFIED),
    (VE, S.NOT_OFFERED, Action.NEXT_HOST, Outcome.NOT_OFFERED),
    (VE, S.HANDSHAKE_FAILED, Action.NEXT_HOST, Outcome.HANDSHAKE_FAILED),
    (VE, S.VERIFY_FAILED, Action.NEXT_HOST, Outcome.VERIFY_FAILED),
    (DA, S.HANDSHAKE_OK, Action.SEND_TLS, Outcome.DANE_VERIFIED),
    (DA, S.NOT_OFFERED, Action.NEXT_HOST, Outcome.NOT_OFFERED),
    (DA, S.HANDSHAKE_FAILED, Action.NEXT_HOST, Outcome.HANDSHAKE_FAILED),
    (DA, S.DANE_FAILED, Action.NEXT_HOST, Outcome.DANE_FAILED),
    (OP, S.DANE_FAILED, Action.NEXT_HOST, Outcome.DANE_FAILED),  # asked out of turn: safe
]


@pytest.mark.parametrize(("mode", "situation", "action", "outcome"), AFTER)
def test_after_starttls(
    mode: TlsMode, situation: Situation, action: Action, outcome: Outcome
) -> None:
    assert after_starttls(mode, situation) == (action, outcome)


@pytest.mark.parametrize(
    ("mode", "situation", "broken"),
    list(itertools.product([EN, VE, DA], list(Situation), [False, True])),
)
def test_required_tls_never_clear(mode: TlsMode, situation: Situation, broken: bool) -> None:
    assert not sends_in_clear(before(mode, broken)[0])
    assert not sends_in_clear(after_starttls(mode, situation)[0])


def test_modes_are_ordered() -> None:
    assert NO < OP < EN < VE
    assert max(OP, EN) is EN
    assert TlsMode.parse("Verified") is VE
    with pytest.raises(ValueError, match="unknown TLS mode 'strict'"):
        TlsMode.parse("strict")


def test_dane_is_a_delivery_time_mode_only() -> None:
    """DANE is given to one MX host by the deliver worker; no rule or decision names it."""
    assert VE < DA and VE.at_least(DA) is DA and DA.at_least(VE) is DA
    with pytest.raises(
        ValueError, match=r"expected one of none, opportunistic, enforced, verified$"
    ):
        TlsMode.parse("dane")
    assert DA.requires_encryption and DA.must_match_tlsa and DA.authenticates
    assert not (DA.must_verify_chain or DA.must_match_name or DA.accepts_legacy_tls)
    assert [m for m in TlsMode if m.must_match_tlsa] == [DA]
