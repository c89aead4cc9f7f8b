"""The soak's accounting (bench/soak.py ``behaviour_row``) on made-up runs: no relay, no Redis —
what is counted as a failure given the sinks' messages, the DSNs and the traces.

A message that arrived and was bounced is ``overlap`` (a failure) unless the bounce said the
destination may have it (``dsn.MAY_HAVE_ARRIVED``, after a delivery interrupted while sending
DATA): ``bounced_interrupted``. That excuse holds only when the relay never recorded the
delivery: its one recipient recorded delivered (a ``delivered`` event) and then bounced is a
relay failure whatever the DSN says.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from bench.soak import BEHAVIOURS, behaviour_row
from tests.sinksmtp import Message

CLEAR = BEHAVIOURS[1]  # delivered, in clear, to the "plain" sink
IDENT, QID = "run-1", "0A1B2C"


def arrived(ident: str) -> Message:
    return Message(
        mail_from="s@o.test", rcpt_tos=["r@d1.bench.test"],
        data=f"X-Bench-Id: {ident}\r\n\r\nbody\r\n".encode(), tls=None, cipher=None,
        peer=("127.0.0.1", 1), mail_options=[], rcpt_options=[], smtp_utf8=False, helo="relay",
        connection=1, reply="250 ok",
    )  # fmt: skip


def row(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The clear behaviour's row for one message that arrived once and whose DSN says it may
    have arrived; ``events``: its trace."""
    assert CLEAR.sink == "plain" and CLEAR.fate == "delivered"
    run = SimpleNamespace(
        sinks={"plain": SimpleNamespace(messages=[arrived(IDENT)], rejected=[])},
        traces={QID: events}, in_spool=set(), stuck=set(),
    )  # fmt: skip
    return behaviour_row(
        run,  # type: ignore[arg-type]
        CLEAR, [IDENT], {IDENT: QID}, {IDENT: [False]}, Counter(), Counter(), {IDENT},
    )  # fmt: skip


ATTEMPT: dict[str, Any] = {
    "event": "attempt",
    "tls_outcome": "none",
    "replies": {"r@d1.bench.test": "250 ok"},
}


def test_an_interrupted_delivery_then_bounced_is_not_overlap() -> None:
    events: list[dict[str, Any]] = [{"event": "interrupted"}, {"event": "bounced"}]
    counts = row(events)
    assert (counts["overlap"], counts["bounced_interrupted"]) == (0, 1), counts


def test_a_recorded_delivery_then_bounced_is_overlap_whatever_the_dsn_says() -> None:
    """The relay recorded the 250 (``delivered``) and bounced the same single recipient after
    an interruption: the DSN's note does not excuse it."""
    events = [{"event": "interrupted"}, ATTEMPT, {"event": "delivered"}, {"event": "bounced"}]
    counts = row(events)
    assert (counts["overlap"], counts["bounced_interrupted"]) == (1, 0), counts
