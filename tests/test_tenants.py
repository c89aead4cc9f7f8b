"""Tenants and regions: directory validation, the intra-platform floor in decide(), the
passwd and tenants commands. (The listeners: test_ingest_tenants.py; two regions end to end:
test_regions.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import Config, ConfigError, load_config
from services.common.model import Envelope, TlsMode
from services.common.passwords import hash_password, verify
from services.common.tenants import PLATFORM_PROFILE, Directory
from services.policy.decide import Ruleset, decide
from services.policy.facts import facts_from_message

HASH = hash_password("correct horse")


def write(tmp_path: Path, extra: dict[str, Any]) -> Path:
    for name in ("ca.pem", "region.pem", "region.key"):
        (tmp_path / name).write_text("placeholder\n")  # only existence is checked at load
    base: dict[str, Any] = {
        "region": "us-east",
        "regions": {
            "us-east": {"relay": "127.0.0.1:2526"},
            "ap-south": {"relay": "127.0.0.1:3526"},
        },
        "platform_tls": {"ca": "ca.pem", "cert": "region.pem", "key": "region.key"},
        "tenants": {
            "contoso": {
                "region": "us-east",
                "domains": ["contoso.example"],
                "mailbox": "127.0.0.1:2801",
                "users": {"alice": HASH},
                "networks": ["192.0.2.0/24"],
                "rate_limit": "600/m",
            },
            "fabrikam": {
                "region": "ap-south",
                "domains": ["fabrikam.example", "fabrikam.test"],
                "mailbox": "127.0.0.1:3801",
            },
        },
    }
    base.update(extra)
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, {}))


def test_directory_lookups(config: Config) -> None:
    directory = Directory(config)
    assert directory.tenant_of_domain("Contoso.Example.") == "contoso"
    assert directory.tenant_of_address("192.0.2.7") == "contoso"
    assert directory.tenant_of_address("198.51.100.1") is None
    assert directory.endpoint("contoso").hop == "mailbox"
    remote = directory.endpoint("fabrikam")
    assert (remote.hop, str(remote.route.address), remote.route.tls_name) == (
        "region:ap-south",
        "127.0.0.1:3526",
        "ap-south",
    )
    assert directory.authenticate("alice@contoso.example", "correct horse") == "contoso"
    assert directory.authenticate("alice@contoso.example", "wrong") is None
    assert directory.authenticate("alice@fabrikam.example", "correct horse") is None
    assert directory.authenticate("mallory@contoso.example", "correct horse") is None
    assert directory.owns_sender("contoso", "bob@contoso.example")
    assert not directory.owns_sender("contoso", "bob@fabrikam.example")
    assert config.tenants["contoso"].rate_limit is not None
    assert str(config.tenants["contoso"].rate_limit) == "600/1m"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {
                "tenants": {
                    "a": {"domains": ["x.example"], "mailbox": "127.0.0.1:1"},
                    "b": {"domains": ["X.example"], "mailbox": "127.0.0.1:2"},
                }
            },
            "tenants.b.domains: domain x.example already belongs to tenant a",
        ),
        (
            {"tenants": {"a": {"region": "eu", "domains": ["x.example"], "mailbox": "h:1"}}},
            "tenants.a.region: unknown region 'eu'",
        ),
        (
            {
                "tenants": {
                    "a": {"domains": ["x.example"], "mailbox": "h:1", "users": {"al": "plaintext"}}
                }
            },
            "tenants.a.users: Value error, user al: expected a hash from 'tlsrelay passwd'",
        ),
        (
            {"tenants": {"a": {"domains": ["x.example"], "mailbox": "h:1", "rate_limit": "lots"}}},
            "tenants.a.rate_limit: expected a rate such as 600/m",
        ),
        (
            {"tenants": {"a": {"domains": [], "mailbox": "h:1"}}},
            "tenants.a.domains: expected at least 1 item(s)",
        ),
        ({"platform_tls": None}, "tenants: tenants need platform_tls"),
    ],
)
def test_directory_validation(tmp_path: Path, extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, extra))
    assert expected.replace("Value error, ", "") in str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'tlsrelay.yaml'}:")


def decide_for(config: Config, *rcpts: str) -> dict[str, Any]:
    envelope = Envelope(id="X", sender="alice@contoso.example", recipients=rcpts)
    ruleset = Ruleset.from_config(config)
    return {d.domain: d for d in decide(facts_from_message(envelope, None, ruleset), ruleset)}


def test_intra_platform_is_verified_and_routed_whatever_a_rule_says(tmp_path: Path) -> None:
    weaken = {"name": "weaken", "when": {"recipient_domain": "fabrikam.example"}, "tls": "none",
              "route": "127.0.0.1:9999"}  # fmt: skip
    config = load_config(write(tmp_path, {"rules": [weaken]}))
    decisions = decide_for(config, "f@fabrikam.example", "c@contoso.example", "x@outside.example")
    fab = decisions["fabrikam.example"]
    assert (fab.tls, fab.circumstances) == (TlsMode.VERIFIED, ("intra-platform", "weaken"))
    assert (str(fab.route), fab.route_tls_name, fab.tls_profile) == (
        "127.0.0.1:3526",
        "ap-south",
        PLATFORM_PROFILE,
    )
    con = decisions["contoso.example"]
    assert (con.tls, str(con.route), con.tls_profile) == (
        TlsMode.VERIFIED,
        "127.0.0.1:2801",
        "platform",
    )
    out = decisions["outside.example"]
    assert (out.tls, out.tls_profile, out.circumstances) == (
        TlsMode.OPPORTUNISTIC,
        None,
        ("default",),
    )


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_passwd_prints_a_verifiable_hash() -> None:
    done = cli("passwd", stdin="s3cret!\n")
    assert done.returncode == 0, done.stderr
    stored = done.stdout.strip()
    assert stored.startswith("scrypt$") and verify("s3cret!", stored)
    assert "s3cret" not in done.stderr + done.stdout.replace(stored, "")


def test_tenants_lists_the_directory(tmp_path: Path) -> None:
    done = cli("tenants", "--config", str(write(tmp_path, {})))
    assert done.returncode == 0, done.stderr
    assert "contoso: region us-east; domains contoso.example" in done.stdout
    assert "fabrikam: region ap-south; domains fabrikam.example, fabrikam.test" in done.stdout
    assert "127.0.0.1:3526 (tls_name ap-south) (region:ap-south)" in done.stdout


def test_tenants_refuses_a_domain_in_two_tenants(tmp_path: Path) -> None:
    both = {"tenants": {"a": {"domains": ["x.example"], "mailbox": "127.0.0.1:1"},
                        "b": {"domains": ["x.example"], "mailbox": "127.0.0.1:2"}}}  # fmt: skip
    done = cli("tenants", "--config", str(write(tmp_path, both)))
    assert done.returncode == 2
    assert "domain x.example already belongs to tenant a" in done.stderr
