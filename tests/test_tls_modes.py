"""Special handling end to end: every TLS mode against every kind of destination, through the
real services and real aiosmtpd peers. Rules in the config choose the mode per destination
domain; assertions are on what each peer saw (TLS or clear, any MAIL command in clear).

Each (mode, behaviour) row has its own sink, so "the peer saw nothing in clear" is per row.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from services.common.redisserver import free_port
from tests.certs import default_ca
from tests.peers import Sink
from tests.world import World, make_world, message, wait_until

MODES = ("none", "opportunistic", "enforced", "verified")
BEHAVIOURS = ("good", "selfsigned", "wrongname", "plain", "broken", "tls10")

DELIVERED_TLS, DELIVERED_CLEAR, DEFERRED = "delivered over TLS", "delivered in clear", "deferred"

# (mode, behaviour) -> (fate, TLS outcome recorded for the attempt)
TABLE: dict[tuple[str, str], tuple[str, str]] = {
    **{("none", b): (DELIVERED_CLEAR, "disabled") for b in BEHAVIOURS},
    ("opportunistic", "good"): (DELIVERED_TLS, "tls"),
    ("opportunistic", "selfsigned"): (DELIVERED_TLS, "tls"),
    ("opportunistic", "wrongname"): (DELIVERED_TLS, "tls"),
    ("opportunistic", "plain"): (DELIVERED_CLEAR, "not_offered"),
    ("opportunistic", "broken"): (DELIVERED_CLEAR, "handshake_failed"),
    ("opportunistic", "tls10"): (DELIVERED_TLS, "tls"),  # weak TLS beats clear (Postfix may)
    ("enforced", "good"): (DELIVERED_TLS, "tls"),
    ("enforced", "selfsigned"): (DELIVERED_TLS, "tls"),
    ("enforced", "wrongname"): (DELIVERED_TLS, "tls"),
    ("enforced", "plain"): (DEFERRED, "not_offered"),
    ("enforced", "broken"): (DEFERRED, "handshake_failed"),
    ("enforced", "tls10"): (DELIVERED_TLS, "tls"),  # as Postfix encrypt
    ("verified", "good"): (DELIVERED_TLS, "tls_verified"),
    ("verified", "selfsigned"): (DEFERRED, "verify_failed"),
    ("verified", "wrongname"): (DEFERRED, "verify_failed"),
    ("verified", "plain"): (DEFERRED, "not_offered"),
    ("verified", "broken"): (DEFERRED, "handshake_failed"),
    ("verified", "tls10"): (DEFERRED, "handshake_failed"),  # modern defaults: TLS 1.2 at least
}


def domain(mode: str, behaviour: str) -> str:
    return f"{behaviour}.{mode}.test"


def row_sink(mode: str, behaviour: str) -> Sink:
    names = [domain(mode, behaviour)]  # an IP route is verified against the destination domain
    if behaviour in ("good", "wrongname", "selfsigned"):
        return Sink(
            "starttls",
            cert="selfsigned" if behaviour == "selfsigned" else "ca",
            cert_names=["wrong.invalid"] if behaviour == "wrongname" else names,
        )
    if behaviour == "tls10":  # a legacy server: TLS 1.0 at most, any cipher (SECLEVEL 0)
        return Sink("starttls", cert_names=names, max_tls_version=ssl.TLSVersion.TLSv1)
    assert behaviour in ("plain", "broken"), behaviour
    return Sink("plain" if behaviour == "plain" else "broken")


# Second world part: enforced delivery over two MX hosts, the first without STARTTLS.
MX_PORT = free_port("127.0.0.4")


def extra_sinks() -> dict[str, Sink]:
    sinks = {f"{m}/{b}": row_sink(m, b) for m in MODES for b in BEHAVIOURS}
    sinks["mx-a"] = Sink("plain", host="127.0.0.4", port=MX_PORT)
    sinks["mx-b"] = Sink("starttls", host="127.0.0.5", port=MX_PORT, cert_names=["mxb.next.test"])
    sinks["rt-ok"] = Sink("starttls", cert_names=["rt-ok.test"], extensions=("REQUIRETLS",))
    sinks["rt-no"] = Sink("starttls", cert_names=["rt-no.test"])
    return sinks


def settings(world: World) -> dict[str, Any]:
    ca = world.root / "ca.pem"
    default_ca().cert_pem.write_to_path(str(ca))
    routes = {domain(m, b): world.sinks[f"{m}/{b}"].address_text for (m, b) in TABLE}
    # the same broken peer as the opportunistic row, reached with enforced TLS
    routes["remembered.enforced.test"] = world.sinks["opportunistic/broken"].address_text
    routes["rt-ok.test"] = world.sinks["rt-ok"].address_text
    routes["rt-no.test"] = world.sinks["rt-no"].address_text
    rules: list[dict[str, Any]] = [
        {"name": f"mode-{m}", "when": {"recipient_domain": [f"*.{m}.test"]}, "tls": m}
        for m in MODES
    ]
    rules.append({"name": "next-mx", "when": {"recipient_domain": "next.test"}, "tls": "enforced"})
    rules.append({"name": "split", "when": {"recipient_domain": "plain.test"}, "tls": "enforced"})
    return {
        "delivery": {
            "routes": routes,
            "ca_file": str(ca),
            "mx_port": MX_PORT,
            "retry_schedule": ["1h"],  # deferred rows stay deferred while we look
        },
        "rules": rules,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("modes"), extra_sinks(), settings) as w:
        w.dns.add("next.test", "MX", "10 mxa.next.test.")
        w.dns.add("next.test", "MX", "20 mxb.next.test.")
        w.dns.add("mxa.next.test", "A", "127.0.0.4")
        w.dns.add("mxb.next.test", "A", "127.0.0.5")
        yield w


@pytest.mark.parametrize(("mode", "behaviour"), list(TABLE))
def test_mode_against_destination(world: World, mode: str, behaviour: str) -> None:
    sink = world.sinks[f"{mode}/{behaviour}"]
    subject = f"{mode} to {behaviour}"
    message_id = world.send([f"user@{domain(mode, behaviour)}"], message(subject))
    trace = world.wait_settled(message_id)
    fate, expected_outcome = TABLE[(mode, behaviour)]
    attempts = [e for e in trace if e["event"] == "attempt"]
    assert [a["tls_outcome"] for a in attempts] == [expected_outcome]
    assert attempts[0]["tls_mode"] == mode
    (classified,) = [e for e in trace if e["event"] == "classified"]
    assert classified["decisions"][0]["circumstances"] == [f"mode-{mode}"]

    if fate == DEFERRED:
        (deferred,) = [e for e in trace if e["event"] == "deferred"]
        reply = deferred["recipients"][f"user@{domain(mode, behaviour)}"]
        assert reply.startswith("451 4.7.10 TLS required but not available"), reply
        assert sink.messages == [] and sink.rejected == []
    else:
        (got,) = sink.wait_messages(1)
        assert subject.encode() in got.data
        assert (got.tls is not None) == (fate == DELIVERED_TLS)
        if behaviour == "tls10" and fate == DELIVERED_TLS:
            assert got.tls == attempts[0]["tls_version"] == "TLSv1"
    if mode in ("enforced", "verified"):
        assert sink.cleartext_transactions == 0, "required-TLS mail reached the peer in clear"
    if mode == "none":
        assert sink.starttls_attempts == 0


def test_remembered_broken_host_never_gets_enforced_mail_in_clear(world: World) -> None:
    sink = world.sinks["opportunistic/broken"]
    opportunistic = world.send(["x@broken.opportunistic.test"], message("remember me"))
    world.wait_completed(opportunistic)  # the host is now remembered as "TLS broken"
    before = (sink.starttls_attempts, sink.cleartext_transactions)
    enforced = world.send(["y@remembered.enforced.test"], message("enforced to remembered"))
    trace = world.wait_settled(enforced)
    attempts = [e["tls_outcome"] for e in trace if e["event"] == "attempt"]
    assert attempts == ["handshake_failed"], "enforced mail must try TLS despite the memory"
    assert (sink.starttls_attempts, sink.cleartext_transactions) == (before[0] + 1, before[1])
    assert not any(b"enforced to remembered" in m.data for m in sink.messages)


def test_enforced_skips_first_mx_without_starttls(world: World) -> None:
    message_id = world.send(["user@next.test"], message("enforced next mx"))
    got = world.sinks["mx-b"].wait_messages(1)[0]
    assert got.tls is not None
    assert world.sinks["mx-a"].cleartext_transactions == 0
    assert world.sinks["mx-a"].messages == []
    trace = world.wait_completed(message_id)
    attempts = [(e["host"], e["tls_outcome"]) for e in trace if e["event"] == "attempt"]
    assert attempts == [("mxa.next.test", "not_offered"), ("mxb.next.test", "tls")]


def test_one_message_two_domains_each_its_own_handling(world: World) -> None:
    """plain.test is enforced by the rule 'split'; d2.test (same peer kind) stays opportunistic."""
    message_id = world.send(["a@plain.test", "b@d2.test"], message("split handling"))
    trace = wait_until(
        lambda: (
            (t := world.trace(message_id))
            and {e["domain"] for e in t if e["event"] in ("delivered", "deferred")}
            >= {"d2.test", "plain.test"}
            and t
        ),
        30,
        "both domains settled",
    )
    (classified,) = [e for e in trace if e["event"] == "classified"]
    modes = {d["domain"]: (d["tls"], d["circumstances"]) for d in classified["decisions"]}
    assert modes == {
        "plain.test": ("enforced", ["split"]),
        "d2.test": ("opportunistic", ["default"]),
    }
    fates = {e["domain"]: e["event"] for e in trace if e["event"] in ("delivered", "deferred")}
    assert fates == {"plain.test": "deferred", "d2.test": "delivered"}
    plain = world.sinks["plain"]
    received = [m.rcpt_tos for m in plain.messages if b"split handling" in m.data]
    assert received == [["b@d2.test"]], "only the opportunistic domain went out in clear"


# --------------------------------------------------------------------------- REQUIRETLS


def tls_client(world: World) -> smtplib.SMTP:
    client = world.smtp()
    client.starttls(context=ssl._create_unverified_context())
    client.ehlo("client.test")
    return client


def test_requiretls_refused_in_clear(world: World) -> None:
    with world.smtp() as client:
        assert "requiretls" not in client.esmtp_features
        code, text = client.docmd("MAIL FROM:<sender@origin.test> REQUIRETLS")
    assert (code, text[:6]) == (530, b"5.7.10")


def test_requiretls_relayed_only_to_a_requiretls_next_hop(world: World) -> None:
    with tls_client(world) as client:
        assert "requiretls" in client.esmtp_features
        code, _ = client.docmd("MAIL FROM:<sender@origin.test> REQUIRETLS")
        assert code == 250
        assert client.rcpt("ok@rt-ok.test")[0] == 250
        assert client.rcpt("no@rt-no.test")[0] == 250
        code, text = client.data(message("requiretls"))
        assert code == 250
    message_id = text.decode().rsplit(" ", 1)[1]
    got = world.sinks["rt-ok"].wait_messages(1)[0]
    assert got.tls is not None and "REQUIRETLS" in got.mail_options
    trace = world.wait_completed(message_id)
    (classified,) = [e for e in trace if e["event"] == "classified"]
    assert {d["tls"] for d in classified["decisions"]} == {"verified"}
    (bounced,) = [e for e in trace if e["event"] == "bounced"]
    assert bounced["recipients"]["no@rt-no.test"].startswith("550 5.7.30")
    assert world.sinks["rt-no"].mail_commands == [], "not relayed to a hop without REQUIRETLS"
