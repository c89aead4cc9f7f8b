"""The command line as people type it: options anywhere, clear answers for unknown ids and bad
addresses, quiet on a closed pipe, `TLSRELAY_CONFIG` and what to pass when no Redis is found,
and rules stopped by `unless` named in the reasons — each through `python -m services.cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis

from services.common import spool
from services.common.redisserver import EmbeddedRedis
from tests.rulesets import partner_rules

ENV = {"PATH": "/usr/bin:/bin"}


def tlsrelay(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", *args]
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=60
    )


@pytest.fixture
def config(tmp_path: Path, valkey: EmbeddedRedis) -> Iterator[Path]:
    path = tmp_path / "tlsrelay.yaml"
    path.write_text(f"redis_url: {valkey.url}\n" + partner_rules("127.0.0.1:2700"))
    with redis.Redis.from_url(valkey.url) as client:
        client.flushall()
        spool.append_trace(
            client, "DONE1", spool.event("received"), spool.event("delivered"),
            spool.event("completed"),
        )  # fmt: skip
        yield path


def test_queue_options_anywhere_and_unknown_or_finished_ids_exit_1(config: Path) -> None:
    done = tlsrelay("queue", "retry", "--config", str(config), "NOSUCH")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "unknown message NOSUCH\n")
    done = tlsrelay("queue", "--config", str(config), "bounce", "NOSUCH")
    assert (done.returncode, done.stderr) == (1, "unknown message NOSUCH\n")
    done = tlsrelay("queue", "bounce", "DONE1", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.startswith("no deferred delivery for DONE1 (delivered ")
    assert done.stderr.endswith(" ago)\n")
    assert tlsrelay("--config", str(config), "queue", "retry").returncode == 0


def test_trace_into_a_closed_pipe_ends_quietly(config: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (`| head` that has ended)
    argv = [sys.executable, "-m", "services.cli", "trace", "DONE1", "--json", "--config"]
    try:
        done = subprocess.run(
            [*argv, str(config)], stdout=write, stderr=subprocess.PIPE, env=ENV, timeout=60
        )
    finally:
        os.close(write)
    assert done.returncode == 1
    assert done.stderr == b""


def test_without_config_the_error_says_what_to_pass_and_the_environment_is_honoured(
    tmp_path: Path, config: Path
) -> None:
    done = tlsrelay("trace", "DONE1", cwd=tmp_path)
    assert done.returncode == 2
    assert "no 'tlsrelay run' is running with data_dir ./var" in done.stderr
    assert "pass --config FILE of the running relay (or set $TLSRELAY_CONFIG=FILE)" in done.stderr
    env = {"TLSRELAY_CONFIG": str(config)}
    done = tlsrelay("trace", "DONE1", cwd=tmp_path, env=env)
    assert (done.returncode, done.stdout.count("\n")) == (0, 3), done.stderr
    assert tlsrelay("queue", "--json", cwd=tmp_path, env=env).returncode == 0


def test_explain_refuses_a_bad_address_as_a_usage_error(config: Path) -> None:
    done = tlsrelay(
        "rules", "explain", "--from", "a@origin.example", "--to", "notanaddress",
        "--config", str(config),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert "argument --to: expected an address such as user@example.com, got 'notanaddress'" in (
        done.stderr
    )


def test_a_rule_stopped_by_unless_says_so(config: Path, tmp_path: Path) -> None:
    msg = EmailMessage()
    msg["Subject"] = "Confidential numbers"
    msg.set_content("x\n")
    eml = tmp_path / "m.eml"
    eml.write_bytes(msg.as_bytes())
    done = tlsrelay(
        "rules", "explain", str(eml), "--config", str(config),
        "--from", "news@newsletter.example.com", "--to", "c@d.example",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "d.example: tls opportunistic",
        "  circumstances: default",
        "  - confidential: when matched, unless sender_domain newsletter.example.com matched "
        "newsletter.example.com",
        "  - default: delivery.default_tls is opportunistic",
        "  MX delivery: DANE and MTA-STS are decided at delivery time and may raise this mode "
        "(dane off (delivery.dnssec is none), mta_sts on); never for a domain in delivery.routes",
    ]
