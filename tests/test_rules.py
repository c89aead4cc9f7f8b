"""Rules: parametrized tables over the pure ``decide()``, the message facts it sees, validation
errors that name file, line, rule and key, and SIGHUP reload in a real policy worker."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import TypeAdapter

from services.common import spool
from services.common.config import ConfigError, load_config
from services.common.model import Decision, Envelope, TlsMode, new_message_id
from services.common.redisserver import EmbeddedRedis, free_port
from services.common.rules import Rules
from services.policy.decide import TLS_REQUIRED_NO, Ruleset, decide
from services.policy.facts import facts_from_message
from services.policy.tasks import PolicyService
from tests.rulesets import partner_rules
from tests.world import wait_until

T = TypeVar("T")
RULES = TypeAdapter(Rules)
ENFORCED, VERIFIED = TlsMode.ENFORCED, TlsMode.VERIFIED


def ruleset(
    rules: list[dict[str, Any]], default: str = "opportunistic", scan: int = 1 << 20
) -> Ruleset:
    return Ruleset(TlsMode.parse(default), RULES.validate_python(rules), scan)


def run(
    rules: Ruleset | list[dict[str, Any]],
    to: tuple[str, ...] = ("a@dest.example",),
    sender: str = "s@origin.example",
    raw: bytes = b"",
    requiretls: bool = False,
) -> list[Decision]:
    rs = rules if isinstance(rules, Ruleset) else ruleset(rules)
    options = ("BODY=8BITMIME", "REQUIRETLS") if requiretls else ("BODY=8BITMIME",)
    envelope = Envelope(new_message_id(), sender, to, options, size=len(raw))
    return decide(facts_from_message(envelope, raw, rs), rs)


def rule(
    when: dict[str, Any], name: str = "r", tls: str | None = "enforced", **kw: Any
) -> dict[str, Any]:
    return {"name": name, "when": when, **({"tls": tls} if tls else {}), **kw}


def mime(
    subject: str = "hello",
    text: str | None = "plain text",
    html: str | None = None,
    headers: dict[str, str] | None = None,
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    cte: str | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "s@origin.example", "a@dest.example", subject
    for name, value in (headers or {}).items():
        msg[name] = value
    if text is not None:
        msg.set_content(text, cte=cte)
    if html is not None:
        msg.add_alternative(html, subtype="html") if text is not None else msg.set_content(
            html, subtype="html"
        )
    for filename, content_type, data in attachments:
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


# --------------------------------------------------------------------------- each condition

XLSX = ("q3.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", b"PK")
PDF = ("terms.pdf", "application/pdf", b"%PDF-1.4")

CONDITIONS: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("domain exact", {"recipient_domain": "dest.example"}, {}, True),
    ("domain other", {"recipient_domain": "bank.example"}, {}, False),
    ("domain case", {"recipient_domain": ["BANK.example"]}, {"to": ("x@Bank.Example",)}, True),
    ("subdomain glob", {"recipient_domain": "*.bank.example"}, {"to": ("x@a.bank.example",)}, True),
    ("glob not bare", {"recipient_domain": "*.bank.example"}, {"to": ("x@bank.example",)}, False),
    ("recipient", {"recipient": "boss@*"}, {"to": ("Boss@dest.example",)}, True),
    ("recipient no", {"recipient": ["boss@*", "cfo@*"]}, {}, False),
    ("sender", {"sender": "*@origin.example"}, {}, True),
    ("sender no", {"sender": "*@elsewhere.example"}, {}, False),
    ("sender_domain", {"sender_domain": ["origin.example"]}, {}, True),
    ("sender_domain no", {"sender_domain": "*.origin.example"}, {}, False),
    ("subject", {"subject": r"(?i)\bconfidential\b"}, {"raw": mime("Confidential: Q3")}, True),
    ("subject no", {"subject": r"(?i)\bconfidential\b"}, {"raw": mime("confidentiality")}, False),
    (
        "subject rfc2047",
        {"subject": "Geheim"},
        {"raw": b"Subject: =?utf-8?q?Geheim?=\r\n\r\nx"},
        True,
    ),
    (
        "header",
        {"header": {"name": "x-classification", "matches": "(?i)^secret$"}},
        {"raw": mime(headers={"X-Classification": "Secret"})},
        True,
    ),
    (
        "header no",
        {"header": {"name": "X-Classification", "matches": "(?i)^secret$"}},
        {"raw": mime(headers={"X-Classification": "public"})},
        False,
    ),
    (
        "header absent",
        {"header": {"name": "X-Classification", "matches": ".*"}},
        {"raw": mime()},
        False,
    ),
    ("body", {"body": "(?i)account number"}, {"raw": mime(text="your Account Number is")}, True),
    ("body no", {"body": "(?i)account number"}, {"raw": mime(text="nothing here")}, False),
    (
        "attachment name",
        {"attachment": {"filename": "*.xlsx"}},
        {"raw": mime(attachments=(XLSX,))},
        True,
    ),
    (
        "attachment name no",
        {"attachment": {"filename": "*.xlsx"}},
        {"raw": mime(attachments=(PDF,))},
        False,
    ),
    (
        "attachment type",
        {"attachment": {"content_type": "application/pdf"}},
        {"raw": mime(attachments=(XLSX, PDF))},
        True,
    ),
    (
        "attachment both",
        {"attachment": {"filename": "*.pdf", "content_type": "application/pdf"}},
        {"raw": mime(attachments=(PDF,))},
        True,
    ),
    (
        "attachment both no",
        {"attachment": {"filename": "*.xlsx", "content_type": "application/pdf"}},
        {"raw": mime(attachments=(XLSX, PDF))},
        False,
    ),
    ("size_over", {"size_over": 100}, {"raw": b"Subject: x\r\n\r\n" + b"y" * 200}, True),
    ("size_over no", {"size_over": 100}, {"raw": b"Subject: x\r\n\r\ny"}, False),
    ("requiretls true", {"requiretls": True}, {"requiretls": True}, True),
    ("requiretls true no", {"requiretls": True}, {}, False),
    ("requiretls false", {"requiretls": False}, {}, True),
    (
        "two keys both",
        {"sender_domain": "origin.example", "recipient_domain": "dest.example"},
        {},
        True,
    ),
    (
        "two keys one",
        {"sender_domain": "origin.example", "recipient_domain": "x.example"},
        {},
        False,
    ),
]


@pytest.mark.parametrize(
    ("when", "message", "matches"), [c[1:] for c in CONDITIONS], ids=[c[0] for c in CONDITIONS]
)
def test_each_condition(when: dict[str, Any], message: dict[str, Any], matches: bool) -> None:
    (decision,) = run([rule(when)], **message)
    assert ("r" in decision.circumstances) is matches
    assert decision.tls == (
        VERIFIED if message.get("requiretls") else ENFORCED if matches else TlsMode.OPPORTUNISTIC
    )


# --------------------------------------------------------------------------- nesting, unless

SECRET = mime("quarterly", headers={"X-Classification": "secret"})
NESTING: list[tuple[str, dict[str, Any], bool]] = [
    ("any one holds", {"any": [{"subject": "nope"}, {"sender": "*@origin.example"}]}, True),
    ("any none", {"any": [{"subject": "nope"}, {"sender": "x@y"}]}, False),
    (
        "all hold",
        {
            "all": [
                {"subject": "quarterly"},
                {"header": {"name": "X-Classification", "matches": "secret"}},
            ]
        },
        True,
    ),
    ("all one fails", {"all": [{"subject": "quarterly"}, {"sender": "x@y"}]}, False),
    ("not", {"not": {"subject": "nope"}}, True),
    ("not fails", {"not": {"subject": "quarterly"}}, False),
    (
        "any of all and not",
        {"any": [{"all": [{"subject": "nope"}]}, {"not": {"sender": "x@y"}}]},
        True,
    ),
    (
        "all of any / not",
        {"all": [{"any": [{"subject": "q"}]}, {"not": {"any": [{"subject": "quarterly"}]}}]},
        False,
    ),
    ("keys and any", {"recipient_domain": "dest.example", "any": [{"body": "plain"}]}, True),
]


@pytest.mark.parametrize(("when", "matches"), [n[1:] for n in NESTING], ids=[n[0] for n in NESTING])
def test_any_all_not_nesting(when: dict[str, Any], matches: bool) -> None:
    (decision,) = run([rule(when)], raw=SECRET)
    assert ("r" in decision.circumstances) is matches


@pytest.mark.parametrize(
    ("sender", "matches"), [("news@newsletter.example.com", False), ("ceo@origin.example", True)]
)
def test_unless_is_an_exception(sender: str, matches: bool) -> None:
    confidential = rule(
        {"subject": "(?i)confidential"}, unless={"sender_domain": ["newsletter.example.com"]}
    )
    (decision,) = run([confidential], sender=sender, raw=mime("Confidential"))
    assert ("r" in decision.circumstances) is matches


def test_reasons_name_the_rule_and_condition() -> None:
    rules = [
        rule({"recipient_domain": ["bank.example", "*.bank.example"]}, "bank-partners", "verified"),
        rule({"any": [{"subject": "nope"}, {"body": "(?i)account number"}]}, "confidential"),
    ]
    (decision,) = run(rules, to=("x@a.bank.example",), raw=mime(text="account number 1"))
    assert decision.circumstances == ("bank-partners", "confidential")
    assert decision.reasons == (
        "bank-partners: recipient_domain *.bank.example matched a.bank.example",
        "confidential: body matched /(?i)account number/",
    )


# --------------------------------------------------------------------------- modes

EVERYONE = {"recipient_domain": "*"}


@pytest.mark.parametrize("order", list(itertools.permutations(["none", "enforced", "verified"])))
def test_strictest_mode_wins_regardless_of_order(order: tuple[str, ...]) -> None:
    rules = [rule(EVERYONE, f"r-{mode}", mode) for mode in order]
    (decision,) = run(rules)
    assert decision.tls == VERIFIED
    assert decision.circumstances == tuple(f"r-{mode}" for mode in order)


MODES: list[tuple[str, str, list[dict[str, Any]], TlsMode, tuple[str, ...]]] = [
    ("rule lowers to none", "opportunistic", [rule(EVERYONE, tls="none")], TlsMode.NONE, ("r",)),
    ("none below enforced default", "enforced", [rule(EVERYONE, tls="none")], TlsMode.NONE, ("r",)),
    ("match without mode → default", "enforced", [rule(EVERYONE, tls=None)], ENFORCED, ("r",)),
    ("no match → default", "enforced", [rule({"sender": "x@y"})], ENFORCED, ("default",)),
    ("no rules → default", "verified", [], VERIFIED, ("default",)),
    (
        "modeless + none",
        "enforced",
        [rule(EVERYONE, "a", None), rule(EVERYONE, "b", "none")],
        TlsMode.NONE,
        ("a", "b"),
    ),
]


@pytest.mark.parametrize(
    ("default", "rules", "tls", "circumstances"), [m[1:] for m in MODES], ids=[m[0] for m in MODES]
)
def test_default_tls_only_without_a_mode_setting_match(
    default: str, rules: list[dict[str, Any]], tls: TlsMode, circumstances: tuple[str, ...]
) -> None:
    (decision,) = run(ruleset(rules, default=default))
    assert (decision.tls, decision.circumstances) == (tls, circumstances)


def test_default_decision_says_why() -> None:
    (decision,) = run([])
    assert decision.reasons == ("default: no rule matched; delivery.default_tls is opportunistic",)


@pytest.mark.parametrize("tls", ["none", "opportunistic", "enforced"])
def test_requiretls_floor_is_not_lowered_by_rules(tls: str) -> None:
    (decision,) = run([rule(EVERYONE, "lower", tls)], requiretls=True)
    assert decision.tls == VERIFIED
    assert decision.circumstances == ("requiretls", "lower")
    assert decision.reasons[0].startswith("requiretls: MAIL FROM carried REQUIRETLS")


def test_requiretls_floor_alone() -> None:
    (decision,) = run([], requiretls=True)
    assert (decision.tls, decision.circumstances) == (VERIFIED, ("requiretls",))


def test_per_domain_decisions_for_a_two_domain_message() -> None:
    rules = [
        rule({"recipient_domain": "bank.example"}, "bank"),
        rule({"recipient": "cfo@*"}, "cfo", "verified"),
    ]
    decisions = run(rules, to=("a@bank.example", "b@other.example", "cfo@bank.example"))
    assert [(d.domain, d.tls, d.circumstances) for d in decisions] == [
        ("bank.example", VERIFIED, ("bank", "cfo")),
        ("other.example", TlsMode.OPPORTUNISTIC, ("default",)),
    ]
    assert decisions[0].reasons[1] == "cfo: recipient cfo@* matched cfo@bank.example"


def test_route_comes_from_the_first_matching_rule_with_a_route() -> None:
    rules = [
        rule(EVERYONE, "no-route"),
        rule({"sender": "x@y"}, "not-matching", route="127.0.0.1:2600"),
        rule(EVERYONE, "first", route={"address": "[::1]:2700", "tls_name": "mx.bank.example"}),
        rule(EVERYONE, "second", route="127.0.0.1:2800"),
    ]
    (decision,) = run(rules)
    assert (str(decision.route), decision.route_tls_name) == ("[::1]:2700", "mx.bank.example")
    (plain,) = run([rule(EVERYONE)])
    assert (plain.route, plain.route_tls_name) == (None, None)


# --------------------------------------------------------------------------- content facts

BODY = [{"name": "b", "when": {"body": "(?i)account number"}, "tls": "enforced"}]


@pytest.mark.parametrize(
    ("raw", "matches"),
    [
        (mime(text=None, html="<p>Your account <b>number</b></p>"), True),
        (mime(text="hi", html="<p>account&nbsp;number</p>"), True),
        (mime(text=None, html="<p>account</p><script>number</script>"), False),
        (mime(text="my account number", cte="base64"), True),
        (mime(text="my account number " + "é" * 80, cte="quoted-printable"), True),
        (mime(text="no", attachments=(("n.txt", "text/plain", b"account number"),)), True),
    ],
    ids=["html tags stripped", "html entity", "script dropped", "base64", "qp", "text attachment"],
)
def test_body_is_decoded_text(raw: bytes, matches: bool) -> None:
    (decision,) = run(BODY, raw=raw)
    assert ("b" in decision.circumstances) is matches


def test_html_tags_are_not_text() -> None:
    rules = [rule({"body": "<b>"}, "tag")]
    (decision,) = run(rules, raw=mime(text=None, html="<p><b>bold</b></p>"))
    assert decision.circumstances == ("default",)


@pytest.mark.parametrize(("scan", "matches"), [(1000, False), (4000, True)])
def test_body_beyond_body_scan_bytes_is_not_seen(scan: int, matches: bool) -> None:
    raw = mime(text="x" * 2000 + " account number")
    (decision,) = run(ruleset(BODY, scan=scan), raw=raw)
    assert ("b" in decision.circumstances) is matches


MALFORMED = [
    b"",
    b"\x00\xff\xfe garbage without headers",
    b"Subject: no body separator",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
    b"account number, but never closed",
    b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\naccount number\r\n",
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
    b"Subject: =?bogus?x?broken?=\r\nFrom: <<<@@@>>>\r\nTo: ,,,;;\r\n"
    b"Content-Disposition: attachment; filename*=bogus''%ZZ\r\n\r\nx",
    b"Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/alternative\r\n\r\n",
    b"Content-Type: text/html\r\n\r\n<p><<<</div></script><!--",
    *(random.Random(seed).randbytes(400) for seed in range(20)),
]
CONTENT = [
    rule({"subject": "x"}, "s"),
    rule({"header": {"name": "From", "matches": "x"}}, "h"),
    rule({"body": "account number"}, "b"),
    rule({"attachment": {"filename": "*"}}, "a"),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_mime_does_not_raise(raw: bytes) -> None:
    (decision,) = run(CONTENT, raw=raw)
    assert decision.domain == "dest.example"


def test_tls_required_no_is_recorded_and_weakens_nothing() -> None:
    raw = b"TLS-Required: No\r\nSubject: s\r\n\r\nbody\r\n"
    (decision,) = run([rule({"subject": "s"})], raw=raw, requiretls=True)
    assert decision.tls == VERIFIED
    assert decision.reasons[-1] == TLS_REQUIRED_NO
    (enforced,) = run([rule({"subject": "s"})], raw=raw)
    assert (enforced.tls, enforced.reasons[-1]) == (ENFORCED, TLS_REQUIRED_NO)


@pytest.mark.parametrize(
    ("when", "content", "body", "attachments"),
    [
        ({"recipient_domain": "x", "size_over": 1, "requiretls": True}, False, False, False),
        ({"subject": "x"}, True, False, False),
        ({"not": {"header": {"name": "A", "matches": "x"}}}, True, False, False),
        ({"any": [{"sender": "x"}, {"body": "x"}]}, True, True, False),
        ({"all": [{"attachment": {"filename": "x"}}]}, True, False, True),
    ],
)
def test_needs_content(when: dict[str, Any], content: bool, body: bool, attachments: bool) -> None:
    rs = ruleset([rule({"sender": "a"}, "first"), rule(when, unless={"sender": "b"})])
    assert (rs.needs_content, rs.needs_body, rs.needs_attachments) == (content, body, attachments)


def test_facts_skip_content_when_no_rule_needs_it() -> None:
    rs = ruleset([rule({"sender": "x"})])
    envelope = Envelope("ID", "s@o", ("a@d",))
    facts = facts_from_message(envelope, mime("Secret", headers={"X-A": "1"}), rs)
    assert (facts.headers, facts.subject, facts.text, facts.attachments) == ((), "", "", ())


# --------------------------------------------------------------------------- validation

GOOD = partner_rules("127.0.0.1:2700")
BAD: list[tuple[str, str, str, str]] = [
    (
        "bad regex",
        '"(?i)\\\\bconfidential\\\\b"',
        '"(?i"',
        ":11: rules[confidential].when.any.0.subject: bad regex '(?i'",
    ),
    (
        "unknown key nested",
        "- body:",
        "- bodie:",
        ":13: rules[confidential].when.any.2.bodie: unknown key",
    ),
    (
        "unknown key in rule",
        "    unless:",
        "    unles:",
        ":15: rules[confidential].unles: unknown key",
    ),
    (
        "unknown header key",
        "matches: ",
        "match: ",
        ":12: rules[confidential].when.any.1.header.match: unknown key",
    ),
    (
        "unknown mode",
        "tls: verified",
        "tls: strong",
        ":7: rules[bank-partners].tls: unknown TLS mode 'strong'",
    ),
    (
        "duplicate name",
        "name: confidential",
        "name: bank-partners",
        ":8: rules[bank-partners].name: duplicate rule name 'bank-partners'",
    ),
    (
        "missing name",
        "  - name: bank-partners\n",
        "  - route: h:25\n",
        ":4: rules[0].name: required, missing",
    ),
    (
        "missing when",
        "    when:\n      recipient",
        "    unless:\n      recipient",
        ":4: rules[bank-partners].when: required, missing",
    ),
    (
        "wrong type",
        'recipient_domain: [bank.example, "*.bank.example"]',
        "recipient_domain: 7",
        ":6: rules[bank-partners].when.recipient_domain: expected a glob or a list of globs",
    ),
    (
        "wrong type int",
        'recipient_domain: [bank.example, "*.bank.example"]',
        "size_over: lots",
        ':6: rules[bank-partners].when.size_over: expected an integer, got a string "lots"',
    ),
    (
        "any not a list",
        "      any:\n",
        "      any: 3\n      all:\n",
        ":10: rules[confidential].when.any: expected a list",
    ),
    (
        "empty when",
        '    when:\n      recipient_domain: [bank.example, "*.bank.example"]',
        "    when: {}",
        ":5: rules[bank-partners].when: a condition needs at least one key",
    ),
    (
        "bad route",
        "route: 127.0.0.1:2700",
        "route: nowhere",
        ":18: rules[confidential].route: expected host:port, got 'nowhere'",
    ),
    (
        "bad route mapping",
        "route: 127.0.0.1:2700",
        "route: {adress: 'h:25'}",
        ":18: rules[confidential].route: a route is 'host:port'",
    ),
    (
        "reserved name",
        "name: bank-partners",
        "name: requiretls",
        ":4: rules[requiretls].name: rule name 'requiretls' is reserved",
    ),
    (
        "reserved name dane",  # the circumstance DANE records at delivery time
        "name: bank-partners",
        "name: DANE",
        ":4: rules[DANE].name: rule name 'DANE' is reserved",
    ),
    ("rules not a list", "rules:\n", "rules: {a: 1}\nx:\n", ":3: rules: expected a list of rules"),
]


def test_good_rules_load(tmp_path: Path) -> None:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    rs = Ruleset.from_config(config)
    assert [r.name for r in rs.rules] == ["bank-partners", "confidential"]
    assert rs.rules[1].route is not None and str(rs.rules[1].route.address) == "127.0.0.1:2700"
    assert (rs.default_tls, rs.body_scan_bytes, rs.needs_content) == (
        TlsMode.OPPORTUNISTIC,
        config.policy.body_scan_bytes,
        True,
    )


@pytest.mark.parametrize(("old", "new", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_rules_name_file_line_rule_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in GOOD
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))
    assert f"{path}{expected}" in str(err.value), str(err.value)


# --------------------------------------------------------------------------- the worker


class PolicyWorker:
    """A real ``tlsrelay policy`` process (two pool processes) on an embedded Redis."""

    def __init__(self, root: Path, redis: EmbeddedRedis) -> None:
        self.root, self.redis = root, redis
        self.config = root / "tlsrelay.yaml"
        self.log_path = root / "policy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()

    def write_rules(self, rules_yaml: str) -> None:
        self.config.write_text(
            f"hostname: relay.test\nredis_url: {self.redis.url}\ndata_dir: {self.root / 'var'}\n"
            f"policy:\n  concurrency: 2\nmetrics:\n  policy: 127.0.0.1:{self.metrics_port}\n"
            f"rules:\n{rules_yaml}"
        )

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            argv = [sys.executable, "-m", "services.cli", "policy", "--config"]
            self.proc = subprocess.Popen([*argv, str(self.config)], stdout=log, stderr=log)
        self.wait_log("ready.")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str) -> str:
        """Wait for ``text`` in the worker's output (failing at once if the worker exits)."""
        proc = self.proc
        assert proc is not None
        wait_until(lambda: text in self.log() or proc.poll() is not None, 30.0, text)
        assert proc.poll() is None, f"worker exited:\n{self.log()[-3000:]}"
        return self.log()

    def hangup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def classify(self, count: int) -> list[dict[str, Any]]:
        """Put ``count`` messages in at once (as ingest does), so both pool processes get some;
        return the decision of each from its ``classified`` trace event."""
        ids = [new_message_id() for _ in range(count)]
        asyncio.run(self._accept(ids))
        client = spool.connect(self.redis.url)
        try:
            return [
                wait_until(functools.partial(self._decision, client, i), 30.0, f"{i} classified")
                for i in ids
            ]
        finally:
            client.close()

    @staticmethod
    def _decision(client: Any, message_id: str) -> dict[str, Any] | None:
        events = [e for e in spool.read_trace(client, message_id) if e["event"] == "classified"]
        return events[0]["decisions"][0] if events else None

    async def _accept(self, ids: list[str]) -> None:
        client = spool.connect_async(self.redis.url)
        try:
            for message_id in ids:
                envelope = Envelope(message_id, "s@origin.example", ("a@dest.example",), size=40)
                await spool.accept(client, envelope, b"Subject: hello\r\n\r\nbody\r\n")
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[PolicyWorker]:
    with EmbeddedRedis(tmp_path / "redis") as redis:
        w = PolicyWorker(tmp_path, redis)
        try:
            yield w
        finally:
            w.stop()


V1 = "  - name: v1\n    when: {subject: '^hello'}\n    tls: enforced\n"
V2 = "  - name: v2\n    when: {recipient_domain: dest.example}\n    tls: verified\n"
V2 += "  - name: v2-extra\n    when: {sender: nobody@nowhere}\n"
BROKEN = "  - name: v3\n    when: {subject: '(?i'}\n    tls: none\n"


def test_sighup_reloads_rules_and_keeps_them_when_the_file_is_bad(worker: PolicyWorker) -> None:
    worker.write_rules(V1)
    worker.start()
    (first,) = worker.classify(1)
    assert (first["tls"], first["circumstances"]) == ("enforced", ["v1"])

    worker.write_rules(V2)
    worker.hangup()
    worker.wait_log("rules reloaded: 2 rules")
    for decision in worker.classify(8):  # each pool process reloads before its next task
        assert (decision["tls"], decision["circumstances"]) == ("verified", ["v2"])

    worker.write_rules(BROKEN)
    worker.hangup()
    log = worker.wait_log("rules reload failed, keeping the old rules:")
    assert f"{worker.config}:10: rules[v3].when.subject: bad regex '(?i'" in log
    for decision in worker.classify(8):
        assert (decision["tls"], decision["circumstances"]) == ("verified", ["v2"])
    assert worker.log().count("rules reloaded: ") == 1
    assert "rules reload failed in this worker process" not in worker.log()


@pytest.mark.parametrize(("rules_yaml", "reads_body"), [(V2, False), (V1, True)])
def test_policy_task_reads_the_body_only_when_a_rule_needs_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules_yaml: str, reads_body: bool
) -> None:
    read: list[str] = []
    load = spool.load_bodies

    def spy(client: Any, ids: list[str]) -> Any:
        read.extend(ids)
        return load(client, ids)

    monkeypatch.setattr(spool, "load_bodies", spy)
    with EmbeddedRedis(tmp_path / "redis") as redis:
        helper = PolicyWorker(tmp_path, redis)
        helper.write_rules(rules_yaml)
        service = PolicyService(load_config(helper.config), redis.url)
        message_id = new_message_id()
        asyncio.run(helper._accept([message_id]))
        service.classify([message_id])
        decision = helper._decision(service.client, message_id)
        service.client.close()
    assert decision is not None and decision["tls"] == ("enforced" if reads_body else "verified")
    assert read == ([message_id] if reads_body else [])


def test_reload_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The main process publishes a generation only for a good file; a pool process that then
    cannot load the file keeps its rules."""
    helper = PolicyWorker(tmp_path, EmbeddedRedis(tmp_path / "redis"))
    helper.write_rules(V1)
    service = PolicyService(load_config(helper.config), "redis://127.0.0.1:1/0")
    helper.write_rules(BROKEN)
    assert service.reload() is False
    assert service.generation.value == 0 and service.ruleset.rules[0].name == "v1"
    assert "rules reload failed, keeping the old rules: " in caplog.text

    service.generation.value += 1  # as if the main process had published a reload
    service.refresh()
    assert service.ruleset.rules[0].name == "v1"
    assert "rules reload failed in this worker process, keeping its rules" in caplog.text

    helper.write_rules(V2)
    assert service.reload() is True
    assert service.generation.value == 2 and [r.name for r in service.ruleset.rules] == [
        "v2",
        "v2-extra",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"TLS-Required: No\r\nSubject: s\r\n\r\nbody\r\n", True),
        (b"Subject: s\r\ntls-required:no\r\n\r\nbody\r\n", True),
        (b"Subject: s\r\n\r\nTLS-Required: No\r\n", False),  # in the body, not a header
        (b"TLS-Required: Yes\r\n\r\n", False),
    ],
)
def test_tls_required_no_noted_from_header_section(raw: bytes, expected: bool) -> None:
    from services.common.model import has_tls_required_no

    assert has_tls_required_no(raw) is expected
