"""The policy decision: one pure function from message facts and a ruleset to per-domain decisions.

``decide(facts, ruleset)`` has no I/O and returns one :class:`~services.common.model.Decision` per
destination domain, in the order the domains first appear among the recipients. Every domain gets
``default_tls`` (opportunistic unless configured) and the circumstance ``default`` until rules
(issue 3: ``services/policy/rules.py``) add circumstances and raise or lower the mode. The ruleset
is parsed once at start-up; evaluating it never fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.model import Decision, Envelope, TlsMode


@dataclass(frozen=True)
class MessageFacts:
    """What the rules may look at. Built by the policy task from the stored message."""

    envelope: Envelope
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Ruleset:
    """The parsed rules; empty in this version (the seam for the rules engine)."""

    default_tls: TlsMode = TlsMode.OPPORTUNISTIC
    rules: tuple[object, ...] = field(default=())


def decide(facts: MessageFacts, ruleset: Ruleset) -> list[Decision]:
    """One decision per destination domain of ``facts.envelope``."""
    return [
        Decision(domain=domain, tls=ruleset.default_tls, circumstances=("default",))
        for domain in facts.envelope.recipients_by_domain()
    ]
