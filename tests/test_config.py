"""Configuration: defaults, parsing, and bad input that names file, key and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config
from services.common.values import HostPort, Route, parse_duration, parse_hostport


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLSRELAY_CONFIG", raising=False)
    monkeypatch.delenv("TLSRELAY_REDIS_URL", raising=False)
    config = load_config(None)
    assert config.redis_url is None
    assert config.ingest.listen == HostPort("127.0.0.1", 2525)
    assert config.ingest.max_message_bytes == 36_700_160
    assert config.delivery.mx_port == 25
    assert config.delivery.connect_timeout == 30.0


def test_full_example_parses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
hostname: relay.example.test
redis_url: redis://127.0.0.1:6379/0
data_dir: ./var
ingest:
  listen: "[::1]:2525"
  max_message_bytes: 1000
  relay_networks: [127.0.0.0/8, "::1/128"]
delivery:
  routes:
    example.org: 127.0.0.1:2601
    "*.example.net": "[::1]:2602"
  dns_servers: ["127.0.0.1:5353", "127.0.0.2"]
  mx_port: 2525
  connect_timeout: 5s
  retry_schedule: [1s, 2m, 1h]
""",
    )
    config = load_config(path)
    assert config.data_dir == (tmp_path / "var").resolve()
    assert config.ingest.listen == HostPort("::1", 2525)
    assert config.delivery.routes["*.example.net"] == Route(HostPort("::1", 2602))
    assert config.delivery.dns_servers == (HostPort("127.0.0.1", 5353), HostPort("127.0.0.2", 53))
    assert config.delivery.retry_schedule == (1.0, 120.0, 3600.0)


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "redis_url: redis://127.0.0.1:1/0\n")
    monkeypatch.setenv("TLSRELAY_CONFIG", str(path))
    monkeypatch.setenv("TLSRELAY_REDIS_URL", "redis://127.0.0.1:2/0")
    assert load_config(None).redis_url == "redis://127.0.0.1:2/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ingest:\n  listen: 127.0.0.1:2525\n  lisen: x\n", ":3: ingest.lisen: unknown key"),
        ("ingest:\n  listen: '2525'\n", ":2: ingest.listen: expected host:port"),
        ("ingest:\n  listen: 127.0.0.1:99999\n", ":2: ingest.listen: port must be 1-65535"),
        ("ingest:\n  listen: ::1:25\n", ":2: ingest.listen: IPv6 addresses need brackets"),
        (
            "delivery:\n  mx_port: many\n",
            ':2: delivery.mx_port: expected an integer, got a string "many"',
        ),
        ("delivery:\n  connect_timeout: soon\n", ":2: delivery.connect_timeout: expected a dur"),
        (
            "delivery:\n  routes:\n    example.org: nowhere\n",
            ":3: delivery.routes.example.org: expected host:port",
        ),
        ("delivery:\n  routes:\n    'a*b.org': h:25\n", ":2: delivery.routes: route key"),
        ("hostname: a\nhostname: b\n", ":2: hostname: duplicate key"),
        ("ingest: [1, 2\n", ": invalid YAML"),
        ("- a\n- b\n", ":1: the top level must be a mapping"),
        ("redis_url: http://x\n", ":1: redis_url: expected redis://"),
        (
            "redis_appendfsync: sometimes\n",
            ":1: redis_appendfsync: expected 'everysec' or 'always', got a string",
        ),
        (
            "ingest:\n  tls_cert: /nonexistent/cert.pem\n  tls_key: /nonexistent/key.pem\n",
            ":2: ingest.tls_cert: file not found",
        ),
        ("ingest:\n  tls_cert: /etc/hostname\n", ": ingest: tls_cert and tls_key must be given"),
    ],
)
def test_bad_config_names_file_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))
    assert expected in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), (7, 7)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:25", HostPort("127.0.0.1", 25)),
        ("[::1]:2525", HostPort("::1", 2525)),
        ("mx.example.org:25", HostPort("mx.example.org", 25)),
    ],
)
def test_hostport(text: str, parsed: HostPort) -> None:
    assert parse_hostport(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize("command", ["run", "ingest", "policy", "deliver"])
def test_cli_refuses_bad_config_before_listening(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, "ingest:\n  listen: 127.0.0.1:2525\n  bogus: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{path}:3: ingest.bogus: unknown key" in done.stderr


def test_mta_sts_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLSRELAY_CONFIG", raising=False)
    defaults = load_config(None).delivery
    assert (defaults.mta_sts, defaults.mta_sts_ca_file, defaults.mta_sts_port) == (True, None, 443)
    assert defaults.mta_sts_timeout == 10.0
    (tmp_path / "sts-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = write(tmp_path, "delivery:\n  mta_sts: off\n  mta_sts_ca_file: sts-ca.pem\n"
                           "  mta_sts_port: 8443\n  mta_sts_timeout: 3s\n")  # fmt: skip
    delivery = load_config(path).delivery
    assert (delivery.mta_sts, delivery.mta_sts_port, delivery.mta_sts_timeout) == (False, 8443, 3)
    assert delivery.mta_sts_ca_file == (tmp_path / "sts-ca.pem").resolve()
    assert load_config(write(tmp_path, 'delivery:\n  mta_sts: "on"\n')).delivery.mta_sts


def test_pipelining_is_on_unless_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TLSRELAY_CONFIG", raising=False)
    assert load_config(None).delivery.pipelining is True
    assert (
        load_config(write(tmp_path, "delivery:\n  pipelining: off\n")).delivery.pipelining is False
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "delivery:\n  mta_sts: maybe\n",
            ':2: delivery.mta_sts: expected on or off, got a string "maybe"',
        ),
        (
            "delivery:\n\n  mta_sts_ca_file: none.pem\n",
            ":3: delivery.mta_sts_ca_file: file not found",
        ),
        (
            "delivery:\n  mta_sts_port: 0\n",
            ":2: delivery.mta_sts_port: must be greater than 0, got 0",
        ),
        (
            "delivery:\n  mta_sts_timeout: 0s\n",
            ":2: delivery.mta_sts_timeout: must be greater than 0, got 0",
        ),
    ],
)
def test_bad_mta_sts_keys_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)


EVERY_PROBLEM = """\
policy:
  concurrency: "4"
delivery:
  mta_sts: maybe
  mx_port: 25
  mx_port: 26
  connect_timeout: "30s"
  command_timeout: 300
rules:
  - name: a
    when: {subject: "(?i"}
  - name: b
    when: {recipient_domain: b.example}
  - name: a
    when: {size_over: "10"}
ingest:
  max_connections: true
"""


@pytest.mark.parametrize("command", [("rules", "check"), ("ingest",)])
def test_every_problem_at_once_in_line_order_in_our_words(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """No coercion between strings and numbers (durations keep taking both); all problems,
    the duplicate rule name among them, reported together, through the real command line."""
    path = write(tmp_path, EVERY_PROBLEM)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *command, "--config", str(path)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == (1 if command[0] == "rules" else 2)
    problems = done.stderr.splitlines()[1:]
    assert problems == [
        f'{path}:2: policy.concurrency: expected an integer, got a string "4"',
        f'{path}:4: delivery.mta_sts: expected on or off, got a string "maybe"',
        f"{path}:6: delivery.mx_port: duplicate key",
        f"{path}:11: rules[a].when.subject: bad regex '(?i': missing -, : or ) at position 3",
        f"{path}:14: rules[a].name: duplicate rule name 'a'",
        f'{path}:15: rules[a].when.size_over: expected an integer, got a string "10"',
        f"{path}:17: ingest.max_connections: expected an integer, got a boolean true",
    ], done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "policy:\n  concurrency: 4.0\n",
            "policy.concurrency: expected an integer, got a number 4.0",
        ),
        ("hostname: 7\n", "hostname: expected a string, got an integer 7"),
        ("ingest:\n  listen: [a]\n", "ingest.listen: expected host:port, got ['a']"),
        ("tenants: 3\n", "tenants: expected a mapping, got an integer 3"),
        (
            "ingest:\n  tls_profiles: {listen: strong}\n",
            "ingest.tls_profiles.listen: expected 'permissive', 'intermediate' or 'modern', "
            'got a string "strong"',
        ),
    ],
)
def test_wrong_types_in_our_words(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value) == f"{tmp_path / 'tlsrelay.yaml'}:{text.count(chr(10))}: {message}"


def test_durations_and_quoted_on_off_keep_working(tmp_path: Path) -> None:
    text = 'delivery:\n  connect_timeout: "30"\n  command_timeout: 45\n  mta_sts: "off"\n'
    delivery = load_config(write(tmp_path, text)).delivery
    assert (delivery.connect_timeout, delivery.command_timeout, delivery.mta_sts) == (30, 45, False)


def test_dnssec_and_dane_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLSRELAY_CONFIG", raising=False)
    defaults = load_config(None).delivery
    assert (defaults.dnssec, defaults.dane, defaults.dane_active) == ("none", True, False)
    delivery = load_config(write(tmp_path, "delivery:\n  dnssec: trust_resolver\n")).delivery
    assert (delivery.dnssec, delivery.dane, delivery.dane_active) == ("trust_resolver", True, True)
    path = write(tmp_path, "delivery:\n  dnssec: trust_resolver\n  dane: off\n")
    assert not load_config(path).delivery.dane_active


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "delivery:\n  dnssec: off\n",  # YAML's false: the key takes a word for this reason
            ":2: delivery.dnssec: expected 'none' or 'trust_resolver', got a boolean false (YAML",
        ),
        (
            "delivery:\n  dnssec: validate\n",
            ":2: delivery.dnssec: expected 'none' or 'trust_resolver', got a string",
        ),
        ("delivery:\n  dane: sometimes\n", ":2: delivery.dane: expected on or off, got a string"),
    ],
)
def test_bad_dnssec_and_dane_keys(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)


def test_event_loop_is_uvloop_or_asyncio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(write(tmp_path, "hostname: relay.example\n")).event_loop == "uvloop"
    assert load_config(write(tmp_path, "event_loop: asyncio\n")).event_loop == "asyncio"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "hostname: relay.example\nevent_loop: epoll\n"))
    assert ":2: event_loop: " in str(caught.value)
    # Chosen but not installed: an error when the configuration is read, not in a worker later.
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "event_loop: uvloop\n"))
    assert ":1: event_loop: uvloop cannot be imported" in str(caught.value)
    assert "set event_loop: asyncio" in str(caught.value)
