"""The policy decision: one pure function from message facts and a ruleset to per-domain decisions.

``decide(facts, ruleset)`` has no I/O and returns one :class:`~services.common.model.Decision` per
destination domain, in the order the domains first appear among the recipients. Per domain:

1. Platform floors (:func:`platform_floors`) are computed first: REQUIRETLS on the message →
   at least ``verified`` (circumstance ``requiretls``). No rule can lower a floor.
2. EVERY rule is evaluated; recipient conditions (``recipient_domain``, ``recipient``) see only
   this domain's recipients. A rule matches when ``when`` holds and ``unless`` does not.
3. The mode is the strictest ``tls`` among matching rules; ``default_tls`` only when none of them
   sets one (so a rule may lower a domain to ``none``); then raised to the strictest floor.
4. ``circumstances``: floors, then matching rules in file order (``("default",)`` when neither);
   ``reasons``: one line per circumstance naming the condition that held, then one per rule
   whose ``when`` held but whose ``unless`` stopped it (``NAME: when matched, unless`` and
   why); ``route`` from the
   first matching rule that has one. A ``TLS-Required: No`` header (RFC 8689 §5) is recorded in
   the reasons and changes nothing.

The ruleset is parsed and validated once, with the configuration (``services.common.rules``);
evaluating it never fails.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, reduce
from typing import TYPE_CHECKING, Any

from services.common.model import Decision, TlsMode, domain_of
from services.common.rules import (
    CONTENT_KEYS,
    AttachmentCondition,
    Condition,
    HeaderCondition,
    Rule,
    summarize,
)
from services.common.tenants import PLATFORM_PROFILE
from services.common.values import Route
from services.policy.facts import MessageFacts

if TYPE_CHECKING:
    from services.common.config import Config

__all__ = ["Floor", "MessageFacts", "Ruleset", "decide", "platform_floors"]

TLS_REQUIRED_NO = (
    "TLS-Required: No header present (recorded; it does not weaken rules or platform policy)"
)


@dataclass(frozen=True)
class PlatformHop:
    """Where mail for a tenant's domain goes from this region (see services.common.tenants)."""

    tenant: str
    region: str
    hop: str  # "mailbox" or "region:<name>"
    route: Route  # the tenant's mailbox, or the region's relay endpoint


@dataclass(frozen=True)
class Ruleset:
    """The parsed rules and the settings they are evaluated with; built once per (re)load."""

    default_tls: TlsMode = TlsMode.OPPORTUNISTIC
    rules: tuple[Rule, ...] = field(default=())
    body_scan_bytes: int = 1_048_576  # as PolicyConfig.body_scan_bytes
    platform: dict[str, PlatformHop] = field(default_factory=dict)  # tenant domain → its hop

    @classmethod
    def from_config(cls, config: Config) -> Ruleset:
        from services.common.tenants import Directory

        directory = Directory(config)
        platform = {}
        for name, tenant in directory.tenants.items():
            endpoint = directory.endpoint(name)
            hop = PlatformHop(name, str(tenant.region), endpoint.hop, endpoint.route)
            platform.update(dict.fromkeys(tenant.domains, hop))
        default = config.delivery.default_tls
        return cls(default, config.rules, config.policy.body_scan_bytes, platform)

    @cached_property
    def keys(self) -> frozenset[str]:
        """Every condition key some rule uses."""
        return frozenset().union(*(rule.keys() for rule in self.rules))

    @property
    def needs_content(self) -> bool:
        """Some rule looks at the message itself (subject, header, body, attachment)."""
        return bool(self.keys & CONTENT_KEYS)

    @property
    def needs_body(self) -> bool:
        return "body" in self.keys

    @property
    def needs_attachments(self) -> bool:
        return "attachment" in self.keys


@dataclass(frozen=True)
class Floor:
    """A platform requirement no rule can lower."""

    circumstance: str
    tls: TlsMode
    reason: str


def platform_floors(facts: MessageFacts, domain: str, ruleset: Ruleset) -> list[Floor]:
    """The platform policy floors for one destination domain, strongest reasons first.

    ``intra-platform``: the domain belongs to a tenant of the platform — verified TLS with the
    platform CA, whatever a rule says. The seam for later floors (``mta-sts``) is here too.
    """
    floors = []
    hop = ruleset.platform.get(domain)
    if hop is not None:
        where = "its mailbox" if hop.hop == "mailbox" else f"region {hop.region}'s relay"
        reason = (
            f"intra-platform: {domain} belongs to tenant {hop.tenant} (region {hop.region}); "
            f"verified, mutually authenticated TLS to {where}"
        )
        floors.append(Floor("intra-platform", TlsMode.VERIFIED, reason))
    if facts.requiretls:
        floors.append(
            Floor(
                "requiretls",
                TlsMode.VERIFIED,
                "requiretls: MAIL FROM carried REQUIRETLS (RFC 8689 §4): at least verified",
            )
        )
    return floors


def decide(facts: MessageFacts, ruleset: Ruleset) -> list[Decision]:
    """One decision per destination domain of ``facts.envelope``."""
    memo: dict[tuple[int, str], str | None] = {}
    return [
        _decide_domain(_Target(facts, domain, recipients, memo), ruleset)
        for domain, recipients in facts.envelope.recipients_by_domain().items()
    ]


def _decide_domain(target: _Target, ruleset: Ruleset) -> Decision:
    floors = platform_floors(target.facts, target.domain, ruleset)
    evaluated = [(rule, *_evaluate(rule, target)) for rule in ruleset.rules]
    matched = [(rule, why) for rule, why, stopped in evaluated if why and stopped is None]
    modes = [rule.tls for rule, _ in matched if rule.tls is not None]
    tls = reduce(TlsMode.at_least, modes) if modes else ruleset.default_tls
    tls = reduce(TlsMode.at_least, (f.tls for f in floors), tls)
    names = tuple(f.circumstance for f in floors) + tuple(rule.name for rule, _ in matched)
    reasons = [f.reason for f in floors] + [f"{rule.name}: {why}" for rule, why in matched]
    reasons += [
        f"{rule.name}: when matched, unless {stopped}"
        for rule, why, stopped in evaluated
        if why and stopped is not None
    ]
    if not names:
        nothing = "no rule matched; " if len(reasons) == 0 else ""
        reasons.append(f"default: {nothing}delivery.default_tls is {tls.label}")
    facts = target.facts
    if facts.envelope.tls_required_no or any(
        v.strip().lower() == "no" for v in facts.header_values("TLS-Required")
    ):
        reasons.append(TLS_REQUIRED_NO)
    decision = Decision(
        domain=target.domain,
        tls=tls,
        circumstances=names or ("default",),
        reasons=tuple(reasons),
    )
    return _routed(decision, matched, ruleset.platform.get(target.domain))


def _routed(
    decision: Decision, matched: list[tuple[Rule, str]], hop: PlatformHop | None
) -> Decision:
    """The route: a tenant's platform hop (no rule can redirect it), else the first rule's."""
    if hop is not None:
        return decision.routed(hop.route, tls_profile=PLATFORM_PROFILE)
    route = next((rule.route for rule, _ in matched if rule.route), None)
    return decision if route is None else decision.routed(route)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Target:
    """What one evaluation looks at: the message, and one destination domain's recipients.
    ``memo`` caches content conditions (the same for every domain) within one ``decide`` call."""

    facts: MessageFacts
    domain: str
    recipients: tuple[str, ...]
    memo: dict[tuple[int, str], str | None]


def _evaluate(rule: Rule, target: _Target) -> tuple[str | None, str | None]:
    """Why ``when`` holds (the conditions that held, joined; None when it does not), and why
    ``unless`` stopped the rule (None when it did not: the rule matches)."""
    why = _holds(rule.when, target)
    if why is None or rule.unless is None:
        return why, None
    return why, _holds(rule.unless, target)


def _holds(condition: Condition, target: _Target) -> str | None:
    """All keys of the mapping hold → their reasons joined with "; "; else None."""
    reasons = []
    for key, value in condition.parts():
        why = _LEAVES[key](value, target)
        if why is None:
            return None
        reasons.append(why)
    return "; ".join(reasons)


def _any(conditions: tuple[Condition, ...], target: _Target) -> str | None:
    return next((w for c in conditions if (w := _holds(c, target)) is not None), None)


def _all(conditions: tuple[Condition, ...], target: _Target) -> str | None:
    reasons = [_holds(c, target) for c in conditions]
    return None if any(r is None for r in reasons) else "; ".join(r for r in reasons if r)


def _not(condition: Condition, target: _Target) -> str | None:
    return None if _holds(condition, target) is not None else f"not({summarize(condition)})"


def _glob(globs: tuple[str, ...], values: tuple[str, ...]) -> tuple[str, str] | None:
    """The first (glob, value) pair that matches, case-insensitively."""
    for value in values:
        for pattern in globs:
            if fnmatch.fnmatchcase(value.lower(), pattern):
                return pattern, value
    return None


def _globbed(key: str, values: Callable[[_Target], tuple[str, ...]]) -> _Leaf:
    def leaf(globs: tuple[str, ...], target: _Target) -> str | None:
        hit = _glob(globs, values(target))
        return f"{key} {hit[0]} matched {hit[1] or '<>'}" if hit else None

    return leaf


def _memoized(key: str, test: _Leaf) -> _Leaf:
    """Content conditions do not depend on the domain: evaluate each once per message."""

    def leaf(value: Any, target: _Target) -> str | None:
        slot = (id(value), key)
        if slot not in target.memo:
            target.memo[slot] = test(value, target)
        return target.memo[slot]

    return leaf


def _regex(key: str, pattern: re.Pattern[str], text: str) -> str | None:
    return f"{key} matched /{pattern.pattern}/" if pattern.search(text) else None


def _header(cond: HeaderCondition, target: _Target) -> str | None:
    values = target.facts.header_values(cond.name)
    if any(cond.matches.search(v) for v in values):
        return f"header {cond.name} matched /{cond.matches.pattern}/"
    return None


def _attachment(cond: AttachmentCondition, target: _Target) -> str | None:
    """One attachment that matches every glob given (filename and/or content_type)."""
    for part in target.facts.attachments:
        checks = (("filename", cond.filename, part.filename),
                  ("content_type", cond.content_type, part.content_type))  # fmt: skip
        hits = [(key, _glob(globs, (value,))) for key, globs, value in checks if globs]
        if all(hit for _, hit in hits):
            held = " and ".join(f"{key} {hit[0]}" for key, hit in hits if hit)
            return f"attachment {part.filename or '(unnamed)'} ({part.content_type}) matched {held}"
    return None


def _size_over(limit: int, target: _Target) -> str | None:
    size = target.facts.size
    return f"size_over {limit}: message is {size} bytes" if size > limit else None


def _requiretls(wanted: bool, target: _Target) -> str | None:
    if target.facts.requiretls != wanted:
        return None
    return f"requiretls {str(wanted).lower()}: MAIL FROM {'carried' if wanted else 'lacked'} it"


_Leaf = Callable[[Any, _Target], str | None]

_LEAVES: dict[str, _Leaf] = {
    "recipient_domain": _globbed("recipient_domain", lambda t: (t.domain,)),
    "recipient": _globbed("recipient", lambda t: t.recipients),
    "sender": _globbed("sender", lambda t: (t.facts.envelope.sender,)),
    "sender_domain": _globbed("sender_domain", lambda t: (domain_of(t.facts.envelope.sender),)),
    "requiretls": _requiretls,
    "size_over": _size_over,
    "subject": _memoized("subject", lambda p, t: _regex("subject", p, t.facts.subject)),
    "header": _memoized("header", _header),
    "attachment": _memoized("attachment", _attachment),
    "body": _memoized("body", lambda p, t: _regex("body", p, t.facts.text)),
    "any": _any,
    "all": _all,
    "not": _not,
}
