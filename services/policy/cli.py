"""``tlsrelay rules``: check the rules of a config file, and explain what they decide.

- ``tlsrelay rules check --config FILE``: validate the file (all of it, as every service does) and
  print each rule: name, TLS mode, route and its conditions in one line each. Exit 0; a bad file
  prints ``file:line: rules[name].key: problem`` and exits 1.
- ``tlsrelay rules explain --config FILE --from ADDR --to ADDR [--to ADDR ...] [--requiretls]
  [MESSAGE.eml]``: run ``decide`` on that envelope (and message; without one, content conditions
  see an empty message) and print, per destination domain, the TLS mode, the route, the
  circumstances and the reasons (a rule stopped by its ``unless`` says so); for a domain
  delivered to its MX hosts, that DANE and MTA-STS are decided at delivery time (they depend on
  DNS and the destination's policy, not on the message) and whether each is on. Exit 0; a bad
  config or an unreadable message exits 1; an ADDR that is not ``local@domain`` is a usage
  error (exit 2).

``--config`` may be replaced by ``$TLSRELAY_CONFIG``. No I/O beyond reading the two files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.common.cliargs import parse_anywhere
from services.common.config import Config, ConfigError, load_config
from services.common.model import Decision, Envelope
from services.common.protocol import REQUIRETLS
from services.common.rules import Rule, summarize
from services.common.values import is_hostname
from services.policy.decide import Ruleset, decide
from services.policy.facts import facts_from_message

EXIT_OK, EXIT_BAD = 0, 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_anywhere(parser, parser.get_default("actions"), argv, dest="action")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"tlsrelay rules: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_BAD
    return int(args.handler(config, args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsrelay rules", description="check the rules of a config file; explain decisions"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate the config file and list its rules")
    check.set_defaults(handler=check_rules)
    explain = sub.add_parser("explain", help="show what the rules decide for a message")
    explain.set_defaults(handler=explain_rules)
    explain.add_argument("--from", dest="sender", required=True, metavar="ADDR", type=_sender,
                         help="MAIL FROM ('' for the null reverse-path)")  # fmt: skip
    explain.add_argument("--to", dest="recipients", action="append", required=True, metavar="ADDR",
                         type=_address, help="RCPT TO (repeat for several)")  # fmt: skip
    explain.add_argument("--requiretls", action="store_true", help="as MAIL FROM ... REQUIRETLS")
    explain.add_argument("message", nargs="?", type=Path, help="the message (.eml), optional")
    for cmd in (check, explain):
        cmd.add_argument("--config", help="YAML configuration file (default: $TLSRELAY_CONFIG)")
    parser.set_defaults(actions=sub.choices)
    return parser


def _address(text: str) -> str:
    """An address as ``local@domain`` (a usage error otherwise: exit 2)."""
    local, at, domain = text.rpartition("@")
    if not (local and at and is_hostname(domain)) or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(
            f"expected an address such as user@example.com, got {text!r}"
        )
    return text


def _sender(text: str) -> str:
    return "" if text in ("", "<>") else _address(text)


# --------------------------------------------------------------------------- check


def check_rules(config: Config, args: argparse.Namespace) -> int:
    source = config.source or "(defaults)"
    count = len(config.rules)
    print(f"{source}: OK, {count} rule{'' if count == 1 else 's'}")
    print(
        f"default_tls {config.delivery.default_tls.label}, "
        f"body_scan_bytes {config.policy.body_scan_bytes}"
    )
    for index, rule in enumerate(config.rules, 1):
        print("\n".join(describe_rule(index, rule)))
    return EXIT_OK


def describe_rule(index: int, rule: Rule) -> list[str]:
    """The lines ``rules check`` prints for one rule."""
    tls = rule.tls.label if rule.tls is not None else "(not set)"
    lines = [f"{index}. {rule.name}", f"     tls: {tls}"]
    if rule.route is not None:
        lines.append(f"     route: {rule.route}")
    lines.append(f"     when: {summarize(rule.when)}")
    if rule.unless is not None:
        lines.append(f"     unless: {summarize(rule.unless)}")
    return lines


# --------------------------------------------------------------------------- explain


def explain_rules(config: Config, args: argparse.Namespace) -> int:
    try:
        raw = args.message.read_bytes() if args.message else b""
    except OSError as exc:
        print(
            f"tlsrelay rules explain: cannot read {args.message}: {exc.strerror}", file=sys.stderr
        )
        return EXIT_BAD
    envelope = Envelope(
        id="EXPLAIN",
        sender=args.sender,
        recipients=tuple(args.recipients),
        mail_options=(REQUIRETLS,) if args.requiretls else (),
        size=len(raw),
    )
    ruleset = Ruleset.from_config(config)
    for decision in decide(facts_from_message(envelope, raw, ruleset), ruleset):
        print("\n".join(describe_decision(decision, config)))
    return EXIT_OK


def plain_decision(config: Config, domain: str) -> Decision:
    """What the rules decide for ``domain`` for a message without content from ``<>`` to
    ``postmaster@DOMAIN`` (``tlsrelay check``: the mode a plain message gets there)."""
    envelope = Envelope(id="CHECK", sender="", recipients=(f"postmaster@{domain}",))
    ruleset = Ruleset.from_config(config)
    (decision,) = decide(facts_from_message(envelope, b"", ruleset), ruleset)
    return decision


def describe_decision(decision: Decision, config: Config | None = None) -> list[str]:
    """The lines ``rules explain`` prints for one destination domain."""
    lines = [f"{decision.domain}: tls {decision.tls.label}"]
    if decision.override_route is not None:
        lines.append(f"  route: {decision.override_route}")
    lines.append(f"  circumstances: {', '.join(decision.circumstances)}")
    lines.extend(f"  - {reason}" for reason in decision.reasons)
    if decision.override_route is None and config is not None:
        lines.append(f"  {destination_policies(config)}")
    return lines


def destination_policies(config: Config) -> str:
    """What ``rules explain`` says of MX destinations: DANE and MTA-STS are not the rules'."""
    delivery = config.delivery
    sts = "on" if delivery.mta_sts else "off"
    if delivery.dane_active:
        dane = "on"
    elif delivery.dane:
        dane = "off (delivery.dnssec is none)"
    else:
        dane = "off"
    return (
        "MX delivery: DANE and MTA-STS are decided at delivery time and may raise this mode "
        f"(dane {dane}, mta_sts {sts}); never for a domain in delivery.routes"
    )
