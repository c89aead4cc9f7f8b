"""The rules file the rule tests share: two partner rules, written as an operator writes them.

:func:`partner_rules` returns the YAML text of a config with ``delivery.default_tls:
opportunistic`` and two rules: ``bank-partners`` (recipient domains → ``verified``) and
``confidential`` (subject, header, body or attachment, unless a newsletter sender →
``enforced``, sent over the given route). ``tests/test_rules.py`` loads it and breaks it line by
line (its expected errors name these line numbers: keep the text as it is);
``tests/test_rules_cli.py`` adds a third rule and runs ``tlsrelay rules`` on it.
"""

from __future__ import annotations

__all__ = ["partner_rules"]

_PARTNER_RULES = """\
delivery:
  default_tls: opportunistic
rules:
  - name: bank-partners
    when:
      recipient_domain: [bank.example, "*.bank.example"]
    tls: verified
  - name: confidential
    when:
      any:
        - subject: "(?i)\\\\bconfidential\\\\b"
        - header: {name: X-Classification, matches: "(?i)^(secret|confidential)$"}
        - body: "(?i)account number"
        - attachment: {filename: "*.xlsx"}
    unless:
      sender_domain: [newsletter.example.com]
    tls: enforced
"""


def partner_rules(route: str) -> str:
    """The shared rules file, the ``confidential`` rule routed to ``route`` (a YAML value)."""
    return f"{_PARTNER_RULES}    route: {route}\n"
