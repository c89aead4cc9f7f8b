"""TLS reporting (RFC 8460): classification table, counts staged into the caller's Redis
transaction, reports built from a real Redis and validated against the §4.4 schema
(``tests/schemas/rfc8460-report.schema.json``), rua parsing, and queueing by ``build``."""

from __future__ import annotations

import asyncio
import copy
import email
import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from services.common import queueing, spool
from services.common.model import Envelope, TlsMode
from services.common.values import HostPort
from services.deliver import dane, tlsrpt
from services.deliver.attempt import Attempt, Peer
from services.deliver.mtasts import Policy, parse_policy
from services.deliver.mx import make_resolver
from services.deliver.tls import Outcome
from services.deliver.tlsrpt import StsRound
from tests.dnsserver import LocalDns

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "rfc8460-report.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
DAY = "2026-03-01"
NOON = datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()
POLICY = parse_policy(
    "version: STSv1\nmode: enforce\nmx: mx1.a.test\nmx: *.b.test\nmax_age: 86400\n", "id7", NOON
)


def attempt(
    outcome: Outcome | None,
    host: str = "mx1.a.test",
    verify_code: int | None = None,
    reused: bool = False,
) -> Attempt:
    peer = Peer(host, "192.0.2.25", 25, host)
    return Attempt(peer, TlsMode.VERIFIED, outcome, verify_code=verify_code, reused=reused,
                   local_address="198.51.100.7")  # fmt: skip


# --------------------------------------------------------------------------- classification

CLASSIFY = [
    (attempt(Outcome.TLS_VERIFIED), ("success", "")),
    (attempt(Outcome.TLS), ("success", "")),
    (attempt(Outcome.NOT_OFFERED), ("starttls-not-supported", "")),
    (attempt(Outcome.VERIFY_FAILED, verify_code=62), ("certificate-host-mismatch", "")),
    (attempt(Outcome.VERIFY_FAILED, verify_code=10), ("certificate-expired", "")),
    (attempt(Outcome.VERIFY_FAILED, verify_code=20), ("certificate-not-trusted", "")),
    (attempt(Outcome.HANDSHAKE_FAILED), ("validation-failure", "handshake_failed")),
    (attempt(Outcome.REMEMBERED_BROKEN), ("validation-failure", "remembered_broken")),
    (attempt(Outcome.TLS, host="other.test"), ("validation-failure", "mx-not-in-policy")),
    (attempt(Outcome.TLS, host="x.b.test"), ("success", "")),
    (attempt(None), None),  # no connection: no TLS session
    (attempt(Outcome.DISABLED), None),  # mode none: no TLS session
    (attempt(Outcome.TLS, reused=True), None),  # a reused session is not a new one
]


@pytest.mark.parametrize(("tried", "expected"), CLASSIFY)
def test_classify(tried: Attempt, expected: tuple[str, str] | None) -> None:
    assert tlsrpt.classify(tried, StsRound("a.test", POLICY)) == expected


def test_no_policy_means_no_mx_check() -> None:
    assert tlsrpt.classify(attempt(Outcome.TLS, "any.test"), StsRound("a.test")) == ("success", "")


# --------------------------------------------------------------------------- staging


def stage(store: redis.Redis, round_: StsRound, attempts: list[Attempt], now: float = NOON) -> int:
    with store.pipeline(transaction=True) as pipe:
        failures = tlsrpt.stage(pipe, round_, attempts, now)
        pipe.execute()
    return failures


def test_stage_buffers_into_the_callers_transaction(store: redis.Redis) -> None:
    with store.pipeline(transaction=True) as pipe:
        assert tlsrpt.stage(pipe, StsRound("a.test", POLICY), [attempt(Outcome.NOT_OFFERED)], NOON)
        assert store.exists(tlsrpt.day_key(DAY)) == 0, "stage must not talk to Redis itself"
        pipe.execute()
    assert store.ttl(tlsrpt.day_key(DAY)) > 7 * 86400
    counted = tlsrpt.read_day(store, DAY)["a.test"]["sts:id7"]
    assert counted.failures == [{
        "result-type": "starttls-not-supported", "sending-mta-ip": "198.51.100.7",
        "receiving-mx-hostname": "mx1.a.test", "receiving-ip": "192.0.2.25",
        "failed-session-count": 1,
    }]  # fmt: skip


def test_nothing_to_count_stages_nothing(store: redis.Redis) -> None:
    assert stage(store, StsRound("a.test"), [attempt(None), attempt(Outcome.DISABLED)]) == 0
    assert store.exists(tlsrpt.day_key(DAY)) == 0


def a_day_of_traffic(store: redis.Redis) -> None:
    """a.test (enforce): successes and failures; c.test: no policy; d.test: fetch failed."""
    enforce = StsRound("a.test", POLICY)
    for _ in range(3):
        stage(store, enforce, [attempt(Outcome.TLS_VERIFIED)])
    stage(store, enforce, [attempt(Outcome.NOT_OFFERED), attempt(Outcome.TLS_VERIFIED, "x.b.test")])
    stage(store, enforce, [attempt(Outcome.VERIFY_FAILED, verify_code=10)])
    stage(store, StsRound("a.test", POLICY, skipped=["rogue.a.test"]), [])
    stage(store, StsRound("c.test"), [attempt(Outcome.TLS), attempt(Outcome.NOT_OFFERED)])
    fetch_failed = StsRound(
        "d.test", error="https://... answered 500", error_type="sts-policy-fetch-error"
    )
    stage(store, fetch_failed, [attempt(Outcome.TLS)])


def test_report_for_a_day_validates_against_the_rfc_8460_schema(store: redis.Redis) -> None:
    a_day_of_traffic(store)
    days = tlsrpt.read_day(store, DAY)
    assert sorted(days) == ["a.test", "c.test", "d.test"]
    reports = {d: tlsrpt.report("relay.test", d, p, DAY) for d, p in days.items()}
    for doc in reports.values():
        VALIDATOR.validate(doc)
    a = reports["a.test"]
    assert a["date-range"] == {"start-datetime": "2026-03-01T00:00:00Z",
                               "end-datetime": "2026-03-01T23:59:59Z"}  # fmt: skip
    (policy,) = a["policies"]
    assert policy["policy"] == {
        "policy-type": "sts", "policy-domain": "a.test", "mx-host": ["mx1.a.test", "*.b.test"],
        "policy-string": ["version: STSv1", "mode: enforce", "mx: mx1.a.test", "mx: *.b.test",
                          "max_age: 86400"],
    }  # fmt: skip
    assert policy["summary"] == {"total-successful-session-count": 4,
                                 "total-failure-session-count": 3}  # fmt: skip
    types = {f["result-type"]: f["failed-session-count"] for f in policy["failure-details"]}
    assert types == {"starttls-not-supported": 1, "certificate-expired": 1,
                     "validation-failure": 1}  # fmt: skip
    (none,) = reports["c.test"]["policies"]
    assert none["policy"] == {"policy-type": "no-policy-found", "policy-domain": "c.test"}
    assert none["summary"]["total-successful-session-count"] == 1
    (fetch,) = reports["d.test"]["policies"]
    assert fetch["policy"]["policy-type"] == "sts"
    assert fetch["failure-details"][0]["result-type"] == "sts-policy-fetch-error"


def test_the_schema_rejects_what_the_rfc_does_not_allow(store: redis.Redis) -> None:
    a_day_of_traffic(store)
    good = tlsrpt.report("relay.test", "a.test", tlsrpt.read_day(store, DAY)["a.test"], DAY)
    broken: list[dict[str, Any]] = [copy.deepcopy(good) for _ in range(4)]
    broken[0]["policies"][0]["failure-details"][0]["result-type"] = "tls-broken"
    broken[1]["date-range"]["start-datetime"] = "2026-03-01 00:00"
    del broken[2]["policies"][0]["summary"]["total-failure-session-count"]
    broken[3]["policies"][0]["failure-details"][0]["sending-mta-ip"] = "not-an-ip"
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(doc)


def test_file_name_follows_rfc_8460_section_5_3() -> None:
    start = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp())
    assert tlsrpt.file_name("relay.test", "a.test", DAY) == (
        f"relay.test!a.test!{start}!{start + 86399}.json.gz"
    )


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:tls@a.test"], ["tls@a.test"]),
        (["v=TLSRPTv1;rua=mailto:x@a.test,https://r.a.test/v1"], ["x@a.test"]),
        (["v=TLSRPTv1; rua=https://r.a.test/v1"], []),  # https submission: not done
        (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:y@a.test"], ["y@a.test"]),
        (["v=TLSRPTv1; rua=mailto:a@a.test", "v=TLSRPTv1; rua=mailto:b@a.test"], []),
        (["v=TLSRPTv2; rua=mailto:a@a.test"], []),
        ([], []),
    ],
)
def test_parse_tlsrpt_txt(records: list[str], expected: list[str]) -> None:
    assert tlsrpt.parse_tlsrpt_txt(records) == expected


# --------------------------------------------------------------------------- build


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    with LocalDns() as server:
        yield server


def test_build_writes_every_report_and_queues_those_with_a_mailto_rua(
    store: redis.Redis, dns: LocalDns, tmp_path: Path
) -> None:
    a_day_of_traffic(store)
    dns.add("_smtp._tls.a.test", "TXT", "v=TLSRPTv1; rua=mailto:tls-reports@a.test")
    dns.servfail("_smtp._tls.d.test")
    resolver = make_resolver([HostPort("127.0.0.1", dns.port)], timeout=2.0)
    built = asyncio.run(tlsrpt.build(store, resolver, "relay.test", DAY, tmp_path))
    assert [(b.domain, b.mailed_to) for b in built] == [
        ("a.test", ("tls-reports@a.test",)), ("c.test", ()), ("d.test", ()),
    ]  # fmt: skip
    assert built[1].note == "no mailto rua" and "lookup failed" in built[2].note
    for report in built:
        VALIDATOR.validate(json.loads(gzip.decompress(report.path.read_bytes())))
    # The mail went into the spool like any accepted message, marked TLS-Required: No.
    (task,) = store.lrange(queueing.POLICY_LIST, 0, -1)
    queued = [k for k in store.scan_iter(spool.msg_key("*"))]
    assert len(queued) == 1 and task
    raw = store.hget(queued[0], "envelope")
    assert isinstance(raw, bytes)
    envelope = Envelope.from_json(json.loads(raw))
    assert envelope.tls_required_no and envelope.recipients == ("tls-reports@a.test",)
    body = store.hget(queued[0], "body")
    assert isinstance(body, bytes)
    parsed = email.message_from_bytes(body)
    assert parsed["TLS-Report-Domain"] == "a.test" and parsed["TLS-Required"] == "No"
    assert 'report-type="tlsrpt"' in parsed["Content-Type"]
    # Building again rewrites the files but sends nothing twice.
    again = asyncio.run(tlsrpt.build(store, resolver, "relay.test", DAY, tmp_path))
    assert again[0].note == "already mailed" and store.llen(queueing.POLICY_LIST) == 1


def test_policy_round_trips_through_json() -> None:
    assert Policy.from_json(POLICY.to_json()) == POLICY


# --------------------------------------------------------------------------- DANE


def dane_round() -> StsRound:
    """a.test under MTA-STS enforce, but DANE applies: mx1 has usable TLSA records, mx2's TLSA
    lookup failed, mx3 has none (MTA-STS stays its policy)."""
    hosts = [
        dane.HostStatus("mx1.a.test", 25, dane.USABLE, (dane.Tlsa.parse("3 1 1 abcd"),)),
        dane.HostStatus("mx2.a.test", 25, dane.LOOKUP_ERROR, error="SERVFAIL"),
        dane.HostStatus("mx3.a.test", 25, dane.INSECURE),
    ]
    return StsRound("a.test", POLICY, dane=dane.DaneRound(True, hosts=hosts))


def test_dane_outcomes_are_classified() -> None:
    found = dane_round()
    assert tlsrpt.classify(attempt(Outcome.DANE_VERIFIED), found) == ("success", "")
    assert tlsrpt.classify(attempt(Outcome.DANE_FAILED), found) == ("tlsa-invalid", "")
    # mx1 is outside the MTA-STS patterns, and DANE, not MTA-STS, is its policy (RFC 8461 §2)
    assert tlsrpt.classify(attempt(Outcome.NOT_OFFERED), found) == ("starttls-not-supported", "")


def test_dane_hosts_are_reported_under_their_tlsa_policy(store: redis.Redis) -> None:
    found = dane_round()
    found.requiretls_skipped = ["mx3.a.test"]
    attempts = [attempt(Outcome.DANE_VERIFIED), attempt(Outcome.DANE_FAILED),
                attempt(Outcome.TLS_VERIFIED, "x.b.test")]  # fmt: skip
    assert stage(store, found, attempts) == 3  # tlsa-invalid, dnssec-invalid, dane-required
    policies = tlsrpt.read_day(store, DAY)["a.test"]
    assert sorted(policies) == ["sts:id7", "tlsa:mx1.a.test", "tlsa:mx2.a.test"]
    doc = tlsrpt.report("relay.test", "a.test", policies, DAY)
    VALIDATOR.validate(doc)
    by_key = {p["policy"].get("mx-host", [""])[0]: p for p in doc["policies"]}
    mx1 = by_key["mx1.a.test"]
    assert mx1["policy"] == {
        "policy-type": "tlsa", "policy-domain": "a.test", "policy-string": ["3 1 1 abcd"],
        "mx-host": ["mx1.a.test"],
    }  # fmt: skip
    assert mx1["summary"] == {"total-successful-session-count": 1,
                              "total-failure-session-count": 1}  # fmt: skip
    assert mx1["failure-details"][0]["result-type"] == "tlsa-invalid"
    mx2 = by_key["mx2.a.test"]
    assert mx2["failure-details"][0]["result-type"] == "dnssec-invalid"
    assert "policy-string" not in mx2["policy"]
    sts = next(p for p in doc["policies"] if p["policy"]["policy-type"] == "sts")
    assert sts["summary"]["total-successful-session-count"] == 1
    assert [f["result-type"] for f in sts["failure-details"]] == ["dane-required"]
