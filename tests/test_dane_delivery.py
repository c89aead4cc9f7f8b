"""DANE end to end: the real services, a real DNS server that answers with or without the AD bit
(``delivery.dnssec: trust_resolver``), TLSA records, real SMTP sinks as MX hosts on one port at
several loopback addresses. What must never happen: mail in clear, or to an unauthenticated
peer, at a host DANE applies to."""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import spool
from services.common.redisserver import free_port
from services.deliver import posture, tlsrpt
from tests.certs import default_ca
from tests.peers import Sink, served_key_digest
from tests.world import World, make_world, message, wait_until

MX_PORT = free_port("127.0.0.40")
# name: (kind, address, certificate: "ca" (test CA, names the MX host) | "selfsigned")
SINKS = {
    "ee": ("starttls", "127.0.0.41", "selfsigned"),
    "mismatch": ("starttls", "127.0.0.42", "selfsigned"),
    "insecuremx": ("starttls", "127.0.0.43", "selfsigned"),
    "servfail": ("starttls", "127.0.0.44", "selfsigned"),
    "unusable": ("starttls", "127.0.0.45", "selfsigned"),
    "plain": ("plain", "127.0.0.46", ""),
    "ta": ("starttls", "127.0.0.47", "ca"),
    "rt": ("starttls", "127.0.0.48", "selfsigned"),
    "rtinsecure": ("starttls", "127.0.0.49", "ca"),
    "broken": ("broken", "127.0.0.51", ""),
    "fallback": ("starttls", "127.0.0.52", "selfsigned"),
    "unused": ("starttls", "127.0.0.53", "selfsigned"),
    "tachain": ("starttls", "127.0.0.54", "child"),  # issued by a child CA it sends in its chain
}
MATCH = "match"  # TLSA placeholder: 3 1 1 of the sink's own key
TA = "ta"  # TLSA placeholder: 2 0 0 with the test CA's certificate
TA_DIGEST = "ta-digest"  # TLSA placeholder: 2 0 1 of the child CA the sink sends in its chain
CHILD_CA = default_ca().create_child_ca()
NOMATCH = "3 1 1 " + "00" * 32
# domain: (sink, MX RRset secure, TLSA records)
DOMAINS = {
    "ee.test": ("ee", True, [MATCH]),
    "mismatch.test": ("mismatch", True, [NOMATCH]),
    "insecuremx.test": ("insecuremx", False, [NOMATCH]),
    "servfail.test": ("servfail", True, None),  # None: the TLSA lookup fails (SERVFAIL)
    "unusable.test": ("unusable", True, ["1 1 1 " + "00" * 32, "3 4 1 " + "00" * 32]),
    "nostarttls.test": ("plain", True, [NOMATCH.replace("00", "11")]),
    "ta.test": ("ta", True, [TA]),
    "rt.test": ("rt", True, [MATCH]),
    "rtinsecure.test": ("rtinsecure", False, []),
    "brokentls.test": ("broken", True, [NOMATCH]),
    "fallback.test": ("fallback", True, [MATCH]),  # second MX; the first: see two_mx_hosts
    "tachain.test": ("tachain", True, [TA_DIGEST]),
}


def host(domain: str) -> str:
    return f"mx.{domain}"


def sink(name: str) -> Sink:
    kind, address, cert = SINKS[name]
    domain = next((d for d, spec in DOMAINS.items() if spec[0] == name), "unused.test")
    if kind == "plain":
        return Sink("plain", host=address, port=MX_PORT)
    if kind == "broken":
        return Sink("broken", host=address, port=MX_PORT)
    return Sink(
        "starttls",
        host=address,
        port=MX_PORT,
        cert="selfsigned" if cert == "selfsigned" else "ca",
        ca=CHILD_CA if cert == "child" else None,
        cert_names=[host(domain)],
        extensions=("REQUIRETLS",) if name.startswith("rt") else (),
    )


def publish(world: World, domain: str) -> None:
    name, mx_secure, records = DOMAINS[domain]
    target, tlsa = world.sinks[name], f"_{MX_PORT}._tcp.{host(domain)}"
    world.dns.add(domain, "MX", f"10 {host(domain)}.")
    world.dns.add(host(domain), "A", target.host)
    if mx_secure:
        world.dns.secure(domain)
    world.dns.secure(host(domain))
    world.dns.secure(tlsa)
    if records is None:
        world.dns.servfail(tlsa)
    for record in records or ():
        if record == MATCH:
            record = f"3 1 1 {served_key_digest(target)}"
        elif record == TA:
            ca = ssl.PEM_cert_to_DER_cert(default_ca().cert_pem.bytes().decode())
            record = f"2 0 0 {ca.hex()}"
        elif record == TA_DIGEST:
            child = ssl.PEM_cert_to_DER_cert(CHILD_CA.cert_pem.bytes().decode())
            record = f"2 0 1 {hashlib.sha256(child).hexdigest()}"
        world.dns.add(tlsa, "TLSA", record)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {name: sink(name) for name in SINKS}

    def settings(world: World) -> dict[str, Any]:
        return {
            "delivery": {
                "dnssec": "trust_resolver",
                "mta_sts": False,
                "mx_port": MX_PORT,
                "retry_schedule": ["1h"],  # deferred mail stays deferred while we look
            }
        }

    with make_world(tmp_path_factory.mktemp("dane"), sinks, settings) as w:
        for domain in DOMAINS:
            publish(w, domain)
        two_mx_hosts(w)
        yield w


def two_mx_hosts(world: World) -> None:
    """fallback.test: its first MX host's TLSA lookup fails (SERVFAIL), the second matches."""
    first = "mx0.fallback.test"
    world.dns.add("fallback.test", "MX", f"5 {first}.")
    world.dns.add(first, "A", world.sinks["unused"].host)
    world.dns.secure(first)
    world.dns.servfail(f"_{MX_PORT}._tcp.{first}")


def only(trace: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in trace if e["event"] == kind]
    assert len(found) == 1, (kind, trace)
    return found[0]


def attempts(trace: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["host"], e["tls_mode"], e["tls_outcome"]) for e in trace if e["event"] == "attempt"]


def dane_metric(world: World, result: str) -> float:
    with urllib.request.urlopen(world.metrics_url("deliver"), timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tlsrelay_dane_total" and sample.labels == {"result": result}:
                return float(sample.value)
    return 0.0


def tlsrpt_counts(world: World, domain: str) -> dict[str, int]:
    with contextlib.closing(world.client()) as client:
        raw = client.hgetall(tlsrpt.day_key(tlsrpt.utc_day(time.time())))
    counts: dict[str, int] = {}
    for name, value in raw.items():
        kind, field_domain, _pkey, *detail = json.loads(name)
        if field_domain == domain and kind != "policy":
            label = kind if kind == "ok" else detail[0]
            counts[label] = counts.get(label, 0) + int(value)
    return counts


def posture_counts(world: World, domain: str) -> dict[str, int]:
    """What ``tlsrelay posture`` counts for ``domain`` (today and yesterday: a run across
    midnight UTC still adds up)."""
    with contextlib.closing(world.client()) as client:
        rows = posture.read(client, posture.window(2, datetime.now(UTC).date()))
    return rows[domain].counts if domain in rows else {}


def never_in_clear(target: Sink) -> None:
    assert target.messages == [] and target.cleartext_transactions == 0
    assert target.mail_commands == []


def test_matching_dane_ee_record_delivers_over_tls(world: World) -> None:
    """A self-signed certificate: no CA vouches for it, the DNSSEC-signed TLSA record does. The
    "TLS broken" memory of the address is set and changes nothing (it never applies to DANE)."""
    target = world.sinks["ee"]
    with contextlib.closing(world.client()) as client:
        client.set(spool.tls_broken_key(target.host, MX_PORT), "mx.ee.test", ex=600)
    message_id = world.send(["user@ee.test"], message("dane ee"))
    (got,) = target.wait_messages(1)
    assert got.tls is not None and b"dane ee" in got.data
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.ee.test", "dane", "dane_verified")]
    event = only(trace, "dane")
    assert event["applies"] is True
    assert event["hosts"][0]["status"] == "usable" and event["hosts"][0]["tlsa"][0][:6] == "3 1 1 "
    assert "DANE-EE" in event["checks"][0]["result"]
    wait_until(lambda: dane_metric(world, "ok") >= 1, what="the ok metric")
    wait_until(lambda: tlsrpt_counts(world, "ee.test") == {"ok": 1}, what="a TLSRPT success")
    # posture: authenticated TLS (it meets `verified`: no what-if), recorded with the round
    counts = posture_counts(world, "ee.test")
    assert counts.pop(f"version:{got.tls}") == 1, counts
    assert counts == {"deliveries": 1, "tls_verified": 1}


def test_mismatching_record_defers_and_never_sends(world: World) -> None:
    target = world.sinks["mismatch"]
    message_id = world.send(["user@mismatch.test"], message("dane mismatch"))
    trace = world.wait_settled(message_id)
    reply = only(trace, "deferred")["recipients"]["user@mismatch.test"]
    assert reply.startswith("451 4.7.10"), reply
    assert attempts(trace) == [("mx.mismatch.test", "dane", "dane_failed")]
    assert "no usable TLSA record matched" in only(trace, "dane")["checks"][0]["result"]
    never_in_clear(target)
    assert posture_counts(world, "mismatch.test") == {}  # dane_failed: never a delivery
    wait_until(lambda: dane_metric(world, "failed") >= 1, what="the failed metric")
    wait_until(
        lambda: tlsrpt_counts(world, "mismatch.test") == {"tlsa-invalid": 1},
        what="the TLSRPT failure",
    )


def test_tlsa_behind_an_insecure_mx_answer_does_not_apply(world: World) -> None:
    """RFC 7672 §2.2.1: an MX RRset that is not validated: no DANE, whatever its hosts publish."""
    message_id = world.send(["user@insecuremx.test"], message("dane insecure mx"))
    (got,) = world.sinks["insecuremx"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.insecuremx.test", "opportunistic", "tls")]
    event = only(trace, "dane")
    assert event["applies"] is False and "not DNSSEC-validated" in event["why"]


def test_tlsa_lookup_failure_defers_without_connecting(world: World) -> None:
    target = world.sinks["servfail"]
    message_id = world.send(["user@servfail.test"], message("dane servfail"))
    trace = world.wait_settled(message_id)
    reply = only(trace, "deferred")["recipients"]["user@servfail.test"]
    assert reply.startswith("451 4.4.3 TLSA lookup failed for mx.servfail.test"), reply
    assert attempts(trace) == []
    assert only(trace, "dane")["hosts"][0]["status"] == "lookup_error"
    assert target.connections == 0
    wait_until(lambda: dane_metric(world, "lookup_error") >= 1, what="the lookup_error metric")
    wait_until(
        lambda: tlsrpt_counts(world, "servfail.test") == {"dnssec-invalid": 1},
        what="the TLSRPT failure",
    )


def test_only_unusable_records_require_tls_without_checking_the_certificate(world: World) -> None:
    message_id = world.send(["user@unusable.test"], message("dane unusable"))
    (got,) = world.sinks["unusable"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.unusable.test", "enforced", "tls")]
    assert only(trace, "dane")["hosts"][0]["status"] == "unusable"
    wait_until(lambda: dane_metric(world, "no_usable_tlsa") >= 1, what="no_usable_tlsa")


def test_a_peer_without_starttls_behind_tlsa_is_deferred(world: World) -> None:
    target = world.sinks["plain"]
    message_id = world.send(["user@nostarttls.test"], message("dane plain"))
    trace = world.wait_settled(message_id)
    reply = only(trace, "deferred")["recipients"]["user@nostarttls.test"]
    assert reply.startswith("451 4.7.10 TLS required but not available"), reply
    assert attempts(trace) == [("mx.nostarttls.test", "dane", "not_offered")]
    never_in_clear(target)


def test_dane_ta_with_the_anchor_in_the_record(world: World) -> None:
    """``2 0 0``: the record holds the trust anchor; the chain and the MX host name are checked."""
    message_id = world.send(["user@ta.test"], message("dane ta"))
    (got,) = world.sinks["ta"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.ta.test", "dane", "dane_verified")]
    assert "DANE-TA" in only(trace, "dane")["checks"][0]["result"]


def requiretls_send(world: World, rcpt: str, subject: str) -> str:
    with world.smtp() as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("client.test")
        code, _ = client.docmd("MAIL FROM:<sender@origin.test> REQUIRETLS")
        assert code == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(message(subject))
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def test_requiretls_goes_to_a_dnssec_validated_mx(world: World) -> None:
    """RFC 8689 §4.2.1: validated MX records (here with DANE) allow a REQUIRETLS message."""
    message_id = requiretls_send(world, "user@rt.test", "dane requiretls")
    (got,) = world.sinks["rt"].wait_messages(1)
    assert got.tls is not None and "REQUIRETLS" in got.mail_options
    assert attempts(world.wait_completed(message_id)) == [("mx.rt.test", "dane", "dane_verified")]


def test_requiretls_to_an_insecure_mx_without_mta_sts_bounces_5_7_30(world: World) -> None:
    """The MX host has a certificate from a trusted CA and offers REQUIRETLS, but nothing
    authenticates the MX record that named it: 5.7.30, nothing sent."""
    message_id = requiretls_send(world, "user@rtinsecure.test", "dane requiretls insecure")
    trace = world.wait_completed(message_id)
    reply = only(trace, "bounced")["recipients"]["user@rtinsecure.test"]
    assert reply.startswith("550 5.7.30 REQUIRETLS: no MX host of rtinsecure.test"), reply
    assert world.sinks["rtinsecure"].connections == 0


@pytest.fixture(scope="module")
def world_without_dnssec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """``delivery.dnssec: none`` (the default): the same answers, AD bit and all."""
    address = "127.0.0.50"
    sinks = {"adignored": Sink("starttls", host=address, port=MX_PORT, cert="selfsigned")}

    def settings(world: World) -> dict[str, Any]:
        return {"delivery": {"mta_sts": False, "mx_port": MX_PORT, "retry_schedule": ["1h"]}}

    with make_world(tmp_path_factory.mktemp("nodnssec"), sinks, settings) as w:
        w.dns.add("adignored.test", "MX", "10 mx.adignored.test.")
        w.dns.add("mx.adignored.test", "A", address)
        w.dns.add(f"_{MX_PORT}._tcp.mx.adignored.test", "TLSA", NOMATCH)
        for name in ("adignored.test", "mx.adignored.test", f"_{MX_PORT}._tcp.mx.adignored.test"):
            w.dns.secure(name)
        w.dns.add("rtsecure.test", "MX", "10 mx.adignored.test.")
        w.dns.secure("rtsecure.test")
        yield w


def test_without_dnssec_the_ad_bit_is_ignored(world_without_dnssec: World) -> None:
    """A mismatching TLSA record behind "secure" answers: not believed, so no DANE, and the
    queries never asked for DNSSEC (no DO)."""
    world = world_without_dnssec
    message_id = world.send(["user@adignored.test"], message("dane ad ignored"))
    (got,) = world.sinks["adignored"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.adignored.test", "opportunistic", "tls")]
    assert not [e for e in trace if e["event"] == "dane"]
    assert world.dns.do_queries == 0


def test_without_dnssec_requiretls_bounces_without_mta_sts(world_without_dnssec: World) -> None:
    """The README's upgrade note: with dnssec: none a REQUIRETLS message to a domain without
    MTA-STS bounces 5.7.30, even where the MX answer carries AD."""
    world = world_without_dnssec
    message_id = requiretls_send(world, "user@rtsecure.test", "requiretls without dnssec")
    trace = world.wait_completed(message_id)
    reply = only(trace, "bounced")["recipients"]["user@rtsecure.test"]
    assert reply.startswith("550 5.7.30"), reply


def test_a_broken_handshake_behind_tlsa_is_never_retried_in_clear(world: World) -> None:
    target = world.sinks["broken"]
    message_id = world.send(["user@brokentls.test"], message("dane broken"))
    trace = world.wait_settled(message_id)
    assert only(trace, "deferred")["recipients"]["user@brokentls.test"].startswith("451 4.7.10")
    assert attempts(trace) == [("mx.brokentls.test", "dane", "handshake_failed")]
    never_in_clear(target)
    assert target.connections == 1  # no reconnect in clear
    with contextlib.closing(world.client()) as client:  # and not remembered as "TLS broken"
        assert not client.exists(spool.tls_broken_key(target.host, MX_PORT))


def test_a_host_whose_tlsa_lookup_fails_is_skipped_for_the_next(world: World) -> None:
    message_id = world.send(["user@fallback.test"], message("dane fallback"))
    (got,) = world.sinks["fallback"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.fallback.test", "dane", "dane_verified")]
    statuses = {h["host"]: h["status"] for h in only(trace, "dane")["hosts"]}
    assert statuses == {"mx0.fallback.test": "lookup_error", "mx.fallback.test": "usable"}
    assert world.sinks["unused"].connections == 0


def test_dane_ta_with_the_anchor_in_the_servers_chain(world: World) -> None:
    """``2 0 1``: only a digest of the anchor; it is found in the chain the server sent (read
    through the one private CPython API, services/deliver/dane.py), and the path checked."""
    message_id = world.send(["user@tachain.test"], message("dane ta chain"))
    (got,) = world.sinks["tachain"].wait_messages(1)
    assert got.tls is not None
    trace = world.wait_completed(message_id)
    assert attempts(trace) == [("mx.tachain.test", "dane", "dane_verified")]
    result = only(trace, "dane")["checks"][0]["result"]
    assert "DANE-TA" in result and "mx.tachain.test" in result, result
