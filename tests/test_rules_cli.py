"""`tlsrelay rules check` and `tlsrelay rules explain`, run as the operator runs them."""

from __future__ import annotations

import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.rulesets import partner_rules

GATEWAY = '{address: "127.0.0.1:2700", tls_name: gateway.example}'
PLAIN_PARTNER = """\
  - name: plain-partner
    when: {recipient_domain: legacy.example}
    tls: none
"""
CONFIG = partner_rules(GATEWAY) + PLAIN_PARTNER


def rules(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", "rules", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def eml(tmp_path: Path) -> Path:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ceo@origin.example", "x@bank.example", "Q3 numbers"
    msg["TLS-Required"] = "No"
    msg.set_content("Hello,\n\nyour account number is below.\n")
    msg.add_attachment(b"PK", maintype="application", subtype="octet-stream", filename="q3.xlsx")
    path = tmp_path / "message.eml"
    path.write_bytes(msg.as_bytes())
    return path


def test_check_lists_the_rules(config: Path) -> None:
    done = rules("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{config}: OK, 3 rules",
        "default_tls opportunistic, body_scan_bytes 1048576",
        "1. bank-partners",
        "     tls: verified",
        "     when: recipient_domain in [bank.example, *.bank.example]",
        "2. confidential",
        "     tls: enforced",
        "     route: 127.0.0.1:2700 (tls_name gateway.example)",
        r"     when: any(subject ~ /(?i)\bconfidential\b/; "
        r"header X-Classification ~ /(?i)^(secret|confidential)$/; "
        r"body ~ /(?i)account number/; attachment filename [*.xlsx])",
        "     unless: sender_domain in [newsletter.example.com]",
        "3. plain-partner",
        "     tls: none",
        "     when: recipient_domain in [legacy.example]",
    ]


def test_check_a_bad_file_exits_1_naming_line_rule_and_key(config: Path) -> None:
    config.write_text(CONFIG.replace("tls: none", "tls: nope"))
    done = rules("check", "--config", str(config))
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"{config}:21: rules[plain-partner].tls: unknown TLS mode 'nope'" in done.stderr


def test_check_reads_tlsrelay_config_from_the_environment(config: Path) -> None:
    argv = [sys.executable, "-m", "services.cli", "rules", "check"]
    env = {"PATH": "/usr/bin:/bin", "TLSRELAY_CONFIG": str(config)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "OK, 3 rules" in done.stdout


def test_explain_a_message(config: Path, eml: Path) -> None:
    done = rules(
        "explain", "--config", str(config), "--from", "ceo@origin.example",
        "--to", "x@a.bank.example", "--to", "y@legacy.example", "--to", "z@other.example",
        str(eml),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    required = "  - TLS-Required: No header present (recorded; it does not weaken rules or platform policy)"  # noqa: E501
    confidential = "  - confidential: body matched /(?i)account number/"
    assert done.stdout.splitlines() == [
        "a.bank.example: tls verified",
        "  route: 127.0.0.1:2700 (tls_name gateway.example)",
        "  circumstances: bank-partners, confidential",
        "  - bank-partners: recipient_domain *.bank.example matched a.bank.example",
        confidential,
        required,
        "legacy.example: tls enforced",
        "  route: 127.0.0.1:2700 (tls_name gateway.example)",
        "  circumstances: confidential, plain-partner",
        confidential,
        "  - plain-partner: recipient_domain legacy.example matched legacy.example",
        required,
        "other.example: tls enforced",
        "  route: 127.0.0.1:2700 (tls_name gateway.example)",
        "  circumstances: confidential",
        confidential,
        required,
    ]


MX_LINE = (
    "  MX delivery: DANE and MTA-STS are decided at delivery time and may raise this mode "
    "(dane off (delivery.dnssec is none), mta_sts on); never for a domain in delivery.routes"
)


def test_explain_without_a_message_and_with_requiretls(config: Path) -> None:
    done = rules(
        "explain", "--config", str(config), "--from", "news@newsletter.example.com",
        "--to", "y@legacy.example", "--to", "z@other.example", "--requiretls",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "legacy.example: tls verified",
        "  circumstances: requiretls, plain-partner",
        "  - requiretls: MAIL FROM carried REQUIRETLS (RFC 8689 §4): at least verified",
        "  - plain-partner: recipient_domain legacy.example matched legacy.example",
        MX_LINE,
        "other.example: tls verified",
        "  circumstances: requiretls",
        "  - requiretls: MAIL FROM carried REQUIRETLS (RFC 8689 §4): at least verified",
        MX_LINE,
    ]


def test_explain_default(config: Path) -> None:
    done = rules("explain", "--config", str(config), "--from", "a@b.example", "--to", "c@d.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "d.example: tls opportunistic",
        "  circumstances: default",
        "  - default: no rule matched; delivery.default_tls is opportunistic",
        MX_LINE,
    ]


def test_explain_unreadable_message_exits_1(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.eml"
    done = rules("explain", "--config", str(config), "--from", "a@b", "--to", "c@d", str(missing))
    assert done.returncode == 1
    assert f"cannot read {missing}" in done.stderr


def test_explain_says_when_dane_is_on(tmp_path: Path) -> None:
    path = tmp_path / "dane.yaml"
    path.write_text("delivery:\n  dnssec: trust_resolver\n  mta_sts: off\n")
    done = rules("explain", "--config", str(path), "--from", "a@b.example", "--to", "c@d.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "  MX delivery: DANE and MTA-STS are decided at delivery time and may raise this mode "
        "(dane on, mta_sts off); never for a domain in delivery.routes"
    )
