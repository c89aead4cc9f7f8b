"""The life of a message: retries on the deferred queue, bounces and delay notices (RFC 3464),
expiry, DNS failures, worker crashes, the trace and the queue commands — end to end.

The sender's domain ``origin.test`` is routed to the ``senders`` sink, so every DSN the relay
sends is caught there and parsed.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import functools
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.common import spool
from tests.peers import Sink
from tests.sinksmtp import Message
from tests.world import World, make_world, message, wait_until

LIFETIME = 12  # seconds: max_queue_lifetime in this world
WARN_AFTER = 3  # seconds: delay_warning_after


class Script:
    """Scripted RCPT replies: ``replies[address]`` is a list consumed one per RCPT (then 250)."""

    def __init__(self) -> None:
        self.replies: dict[str, list[str | None]] = {}
        self.lock = threading.Lock()

    def __call__(self, address: str) -> str | None:
        with self.lock:
            queue = self.replies.get(address.lower())
            return queue.pop(0) if queue else None


SCRIPT = Script()


def settings(world: World) -> dict[str, Any]:
    at: Callable[[str], str] = lambda name: world.sinks[name].address_text  # noqa: E731
    return {
        "delivery": {
            "routes": {
                "origin.test": at("senders"),
                "flaky.test": at("scripted"),
                "tlsonly.test": at("plain"),
                "hold.test": at("scripted"),
            },
            "retry_schedule": ["1s"],
            "max_queue_lifetime": f"{LIFETIME}s",
            "delay_warning_after": f"{WARN_AFTER}s",
        },
        "rules": [
            {"name": "tls-only", "when": {"recipient_domain": "tlsonly.test"}, "tls": "enforced"}
        ],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sinks = {"senders": Sink("starttls"), "scripted": Sink("starttls", rcpt_replies=SCRIPT)}
    with make_world(tmp_path_factory.mktemp("life"), sinks, settings) as w:
        w.dns.add("nullmx.test", "MX", "0 .")
        yield w


def dsns_about(world: World, message_id: str, n: int = 1, timeout: float = 30) -> list[Any]:
    """The DSNs (parsed) the senders sink received about ``message_id``; waits for ``n``."""
    sink = world.sinks["senders"]

    def found() -> list[Message]:
        return [m for m in sink.messages if f"X-Tlsrelay-Queue-ID: {message_id}".encode() in m.data]

    sink.wait_for(lambda: len(found()) >= n, timeout, f"{n} DSN(s) about {message_id}")
    return [email.message_from_bytes(m.data, policy=email.policy.default) for m in found()]


def report(dsn: Any) -> tuple[str, dict[str, str], list[dict[str, str]], str]:
    """(human text, per-message fields, per-recipient fields, original headers) of a DSN."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    human, status, *rest = dsn.get_payload()  # no headers part: redacted (TLS-required mail)
    assert (human.get_content_type(), status.get_content_type()) == (
        "text/plain",
        "message/delivery-status",
    )
    assert [part.get_content_type() for part in rest] in ([], ["text/rfc822-headers"])
    blocks = [dict(block.items()) for block in status.get_payload()]
    return human.get_content(), blocks[0], blocks[1:], rest[0].get_payload() if rest else ""


def arrivals(sink: Sink, subject: str) -> list[list[str]]:
    return [m.rcpt_tos for m in sink.messages if f"Subject: {subject}\r\n".encode() in m.data]


def test_451_twice_then_250_is_delivered_on_the_third_attempt_once(world: World) -> None:
    SCRIPT.replies["twice@flaky.test"] = ["451 4.3.0 busy", "451 4.3.0 still busy"]
    message_id = world.send(["twice@flaky.test"], message("flaky twice"))
    trace = world.wait_completed(message_id)
    attempts = [e for e in trace if e["event"] == "attempt"]
    assert [a["replies"]["twice@flaky.test"][:3] for a in attempts] == ["451", "451", "250"]
    assert len([e for e in trace if e["event"] == "deferred"]) == 2
    assert arrivals(world.sinks["scripted"], "flaky twice") == [["twice@flaky.test"]]


def test_mixed_recipients_one_bounce_for_the_550_only(world: World) -> None:
    SCRIPT.replies["gone@flaky.test"] = ["550 5.1.1 no such user"]
    SCRIPT.replies["later@flaky.test"] = ["451 4.2.1 mailbox busy"]
    rcpts = ["gone@flaky.test", "ok@flaky.test", "later@flaky.test"]
    message_id = world.send(rcpts, message("mixed rcpts"))
    trace = world.wait_completed(message_id)
    assert sorted(arrivals(world.sinks["scripted"], "mixed rcpts")) == [
        ["later@flaky.test"],
        ["ok@flaky.test"],
    ]
    (dsn,) = dsns_about(world, message_id)
    human, per_message, per_rcpt, headers = report(dsn)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_rcpt == [
        {
            "Final-Recipient": "rfc822; gone@flaky.test",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": f"dns; {world.sinks['scripted'].host}",
            "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
            "Last-Attempt-Date": per_rcpt[0]["Last-Attempt-Date"],
        }
    ]
    assert "gone@flaky.test" in human and "550 5.1.1 no such user" in human
    assert "Subject: mixed rcpts" in headers
    (dsn_event,) = [e for e in trace if e["event"] == "dsn"]
    assert dsn_event["action"] == "failed"
    dsn_trace = world.wait_completed(dsn_event["dsn_id"])
    assert dsn_trace[0]["sender"] == "" and dsn_trace[0]["dsn_for"] == message_id


def test_enforced_tls_to_clear_host_expires_into_a_dsn_naming_the_rule(world: World) -> None:
    plain = world.sinks["plain"]
    message_id = world.send(["x@tlsonly.test"], message("must be encrypted"))
    trace = world.wait_completed(message_id, timeout=LIFETIME + 30)
    assert plain.cleartext_transactions == 0 and arrivals(plain, "must be encrypted") == []
    kinds = [e["event"] for e in trace]
    assert kinds.count("attempt") >= 3 and "bounced" in kinds
    dsns = dsns_about(world, message_id, n=2)  # the delay notice, then the bounce
    actions = sorted(report(d)[2][0]["Action"] for d in dsns)
    assert actions == ["delayed", "failed"]
    (failed,) = [d for d in dsns if report(d)[2][0]["Action"] == "failed"]
    human, _, (rcpt,), _ = report(failed)
    assert rcpt["Status"] == "4.7.10"
    assert "TLS required but not available" in rcpt["Diagnostic-Code"]
    assert "required TLS (mode enforced) because of: tls-only" in human
    assert "never sent unencrypted" in human
    assert "recipient_domain" not in human  # redacted: the rule is named, not what it matched
    assert failed.get_payload()[-1].get_content_type() != "text/rfc822-headers"


def test_delay_notice_once_then_delivered(world: World) -> None:
    SCRIPT.replies["slow@flaky.test"] = ["451 4.3.0 not yet"] * (WARN_AFTER + 3)
    message_id = world.send(["slow@flaky.test"], message("slow one"))
    world.wait_completed(message_id, timeout=LIFETIME + 10)
    (dsn,) = dsns_about(world, message_id)
    _, _, (rcpt,), _ = report(dsn)
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.3.0")
    assert "Will-Retry-Until" in rcpt
    assert arrivals(world.sinks["scripted"], "slow one") == [["slow@flaky.test"]]
    assert len(dsns_about(world, message_id)) == 1, "exactly one delay notice"


@pytest.mark.parametrize(
    ("rcpt", "status"), [("a@nullmx.test", "5.1.10"), ("b@nosuchdomain.test", "5.1.2")]
)
def test_null_mx_and_nxdomain_bounce_at_once(world: World, rcpt: str, status: str) -> None:
    message_id = world.send([rcpt], message(f"dns {status}"))
    trace = world.wait_completed(message_id)
    assert [e["event"] for e in trace].count("deferred") == 0
    (dsn,) = dsns_about(world, message_id)
    _, _, (fields,), _ = report(dsn)
    assert (fields["Action"], fields["Status"]) == ("failed", status)
    assert "Remote-MTA" not in fields


def test_no_dsn_about_a_null_sender_message(world: World) -> None:
    message_id = world.send(["c@nosuchdomain.test"], message("null sender"), sender="")
    trace = world.wait_completed(message_id)
    assert "bounced" in [e["event"] for e in trace]
    assert not [e for e in trace if e["event"] == "dsn"]


def cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", *args, "--config", str(world.config_path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def postpone(world: World, message_id: str) -> None:
    """Push the message's deferred entries an hour ahead (as a long retry schedule would)."""
    with world.client() as client:
        for member, due in client.zrange(spool.DEFERRED, 0, -1, withscores=True):
            if json.loads(member)["id"] == message_id:
                client.zadd(spool.DEFERRED, {member: due + 3600}, xx=True)


def deferred_once(world: World, rcpt: str, subject: str) -> str:
    SCRIPT.replies[rcpt] = ["451 4.3.0 later"]
    message_id = world.send([rcpt], message(subject))
    wait_until(lambda: world.events(message_id, "deferred"), 30, "a deferral")
    postpone(world, message_id)
    return message_id


def test_queue_lists_and_retry_makes_due_now(world: World) -> None:
    message_id = deferred_once(world, "q@flaky.test", "queue retry")
    listing = json.loads(cli(world, "queue", "--json").stdout)["deferred"]
    (entry,) = [e for e in listing if e["id"] == message_id]
    assert entry["recipients"] == ["q@flaky.test"] and entry["next_attempt_in_seconds"] > 3000
    assert entry["last_error"] == "451 4.3.0 later"
    assert message_id in cli(world, "queue").stdout
    done = cli(world, "queue", "retry", message_id)
    assert done.returncode == 0, done.stderr
    world.wait_completed(message_id)
    assert arrivals(world.sinks["scripted"], "queue retry") == [["q@flaky.test"]]


def test_queue_bounce_gives_up_with_a_dsn(world: World) -> None:
    message_id = deferred_once(world, "b@flaky.test", "queue bounce")
    done = cli(world, "queue", "bounce", message_id)
    assert done.returncode == 0 and "b@flaky.test" in done.stdout, done.stderr
    trace = world.wait_completed(message_id)
    assert "bounced" in [e["event"] for e in trace]
    (dsn,) = dsns_about(world, message_id)
    assert report(dsn)[2][0]["Action"] == "failed"
    assert arrivals(world.sinks["scripted"], "queue bounce") == []


def test_trace_json_is_a_stable_document(world: World) -> None:
    message_id = world.send(["t@flaky.test"], message("traced"))
    world.wait_completed(message_id)
    doc = json.loads(cli(world, "trace", message_id, "--json").stdout)
    assert doc["id"] == message_id
    kinds = [e["event"] for e in doc["events"]]
    assert kinds == ["received", "classified", "attempt", "delivered", "completed"]
    text = cli(world, "trace", message_id).stdout
    assert "attempt" in text and "tls_outcome" in text


def test_killed_deliver_workers_and_scheduler_lose_nothing(world: World) -> None:
    rcpts = [f"h{i}@hold.test" for i in range(5)]
    for rcpt in rcpts:
        SCRIPT.replies[rcpt] = ["451 4.3.0 hold"] * 1000
    ids = [world.send([rcpt], message(f"held {rcpt}")) for rcpt in rcpts]
    for message_id in ids:
        wait_until(functools.partial(world.events, message_id, "deferred"), 30, "deferred")
    world.stop_service("deliver", kill=True)  # the workers and the scheduler, mid-schedule
    for rcpt in rcpts:
        SCRIPT.replies[rcpt] = []
    world.start_service("deliver")
    for message_id in ids:
        world.wait_completed(message_id, timeout=60)
    got = Counter(r for m in world.sinks["scripted"].messages for r in m.rcpt_tos if r in rcpts)
    assert got == Counter(rcpts), "each held message delivered exactly once"
