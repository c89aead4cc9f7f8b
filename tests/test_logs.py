"""Structured logging: JSON lines on stderr, extra fields, tracebacks, redaction, text mode."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import signals as celery_signals

from services.common import logs
from services.common.logs import JsonFormatter, RedactingFilter, setup_logging

ROOT = Path(__file__).resolve().parent.parent
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# "\0alice\0s3cret" in base64: what a client sends after AUTH PLAIN.
PLAIN = "AGFsaWNlAHMzY3JldA=="
_TOUCHED = ("celery", "celery.task", "celery.redirected", "celery.worker", "mail.log", "mail.debug")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging() changes process-wide state: put it all back for the other tests."""
    monkeypatch.delenv(logs.ENV_LOG_FORMAT, raising=False)
    for flag in ("logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))  # restored afterwards
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved = [(name, logging.getLogger(name)) for name in _TOUCHED]
    states = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in saved}
    yield
    for handler in root.handlers[:]:
        if handler not in saved_root[0]:
            root.removeHandler(handler)
            handler.close()
    for handler in saved_root[0]:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(saved_root[1])
    for name, lg in saved:
        lg.handlers[:], lg.level, lg.propagate = states[name]
    logging.captureWarnings(False)
    celery_signals.setup_logging.disconnect(dispatch_uid="tlsrelay.logs")
    logs._state.clear()


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == "", "logs go to stderr only"
    return captured.err.splitlines()


def records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(capsys)]


def test_one_json_object_per_line_with_the_fixed_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("ingest")
    before = datetime.now(UTC)
    logging.getLogger("tlsrelay.ingest").info("%s: queued from %s", "ID1", "192.0.2.1")
    logging.getLogger("tlsrelay.ingest").warning("second")
    first, second = records(capsys)
    assert set(first) == {"ts", "level", "service", "logger", "event"}
    assert first["level"] == "INFO" and second["level"] == "WARNING"
    assert first["service"] == "ingest"
    assert first["logger"] == "tlsrelay.ingest"
    assert first["event"] == "ID1: queued from 192.0.2.1"
    assert TS.match(first["ts"]), first["ts"]
    at = datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert abs((at - before).total_seconds()) < 5


def test_extra_fields_become_keys(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("deliver")
    logging.getLogger("tlsrelay.deliver").info(
        "queued",
        extra={
            "message_id": "0123abcd",
            "size": 1234,
            "tls": None,
            "hosts": ["mx1.example", "mx2.example"],
            "decision": {"domain": "example.org", "tls_mode": "enforced"},
            "domains": {"b.example", "a.example"},
            "level": "not ours",  # would collide with our own key
            "at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        },
    )
    (doc,) = records(capsys)
    assert doc["event"] == "queued"
    assert doc["message_id"] == "0123abcd" and doc["size"] == 1234 and doc["tls"] is None
    assert doc["hosts"] == ["mx1.example", "mx2.example"]
    assert doc["decision"] == {"domain": "example.org", "tls_mode": "enforced"}
    assert doc["domains"] == ["a.example", "b.example"]
    assert doc["level"] == "INFO" and doc["extra_level"] == "not ours"
    assert doc["at"] == "2025-01-02T03:04:05+00:00"


def test_exception_is_one_string_field(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("deliver")
    try:
        raise RuntimeError("connection lost\nsecond line")
    except RuntimeError:
        logging.getLogger("tlsrelay.deliver").exception("delivery failed", extra={"attempt": 2})
    (line,) = lines(capsys)  # the traceback's newlines are escaped: still one line
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and doc["event"] == "delivery failed" and doc["attempt"] == 2
    assert doc["exc"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: connection lost\nsecond line" in doc["exc"]


def test_secret_fields_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("ingest")
    logging.getLogger("tlsrelay.ingest").info(
        "login",
        extra={
            "password": "hunter2",
            "auth_token": "tok-123",
            "credentials": ("alice", "s3cret"),
            "smtp": {"user": "alice", "Secret": "s3cret", "nested": {"api_key": "k-1"}},
            "passwd": None,  # absent stays visibly absent
            "user": "alice",
        },
    )
    (line,) = lines(capsys)
    for secret in ("hunter2", "tok-123", "s3cret", "k-1"):
        assert secret not in line
    doc = json.loads(line)
    assert doc["password"] == doc["auth_token"] == doc["credentials"] == "[REDACTED]"
    assert doc["smtp"] == {
        "user": "alice",
        "Secret": "[REDACTED]",
        "nested": {"api_key": "[REDACTED]"},
    }
    assert doc["passwd"] is None and doc["user"] == "alice"


def test_smtp_auth_lines_are_redacted_in_messages(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("ingest")
    log = logging.getLogger("mail.log")
    log.warning("%r >> %r", ("192.0.2.1", 40000), f"AUTH PLAIN {PLAIN}\r\n".encode())
    log.warning("client said: auth login YWxpY2U= then waited")
    logging.getLogger("tlsrelay.ingest").warning(
        "session", extra={"last_command": f"AUTH PLAIN {PLAIN}", "redis": "redis://:pw1@r:6379/0"}
    )
    try:
        raise ValueError(f"bad command AUTH PLAIN {PLAIN}")
    except ValueError:
        logging.getLogger("tlsrelay.ingest").exception("SMTP session error")
    out = "\n".join(lines(capsys))
    assert PLAIN not in out and "YWxpY2U=" not in out and "pw1" not in out
    first, second, third, fourth = (json.loads(line) for line in out.splitlines())
    assert first["event"] == "('192.0.2.1', 40000) >> b'AUTH PLAIN [REDACTED]\\r\\n'"
    assert second["event"] == "client said: auth login [REDACTED] then waited"
    assert third["last_command"] == "AUTH PLAIN [REDACTED]"
    assert third["redis"] == "redis://:[REDACTED]@r:6379/0"
    assert "ValueError: bad command AUTH PLAIN [REDACTED]" in fourth["exc"]


def test_auth_words_without_a_credential_are_left_alone() -> None:
    assert logs.redact_text("AUTH from 192.0.2.1 refused: 3 failures") == (
        "AUTH from 192.0.2.1 refused: 3 failures"
    )
    assert logs.redact_text("offering AUTH PLAIN LOGIN") == "offering AUTH PLAIN LOGIN"
    assert logs.redact_text("smtp://mx.example:25") == "smtp://mx.example:25"


def test_redacting_filter_and_json_formatter_on_their_own() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "AUTH LOGIN %s", ("dXNlcg==",), None)
    record.token = "abc"
    record.body = "Subject: hi\r\n\r\nsecret body"
    record.raw = b"\x00" * 10
    assert RedactingFilter().filter(record) is True  # redacts, never drops
    doc = json.loads(JsonFormatter("policy").format(record))
    assert doc["event"] == "AUTH LOGIN [REDACTED]"
    assert doc["token"] == "[REDACTED]"
    assert doc["body"] == "<omitted: 26 chars>"  # message bodies are never logged
    assert doc["raw"] == "<10 bytes>"  # nor are bytes, whatever the field is called
    assert doc["service"] == "policy"


def test_text_mode_for_developers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(logs.ENV_LOG_FORMAT, "text")
    setup_logging("cli")
    log = logging.getLogger("tlsrelay.cli")
    log.info("hello %s", "world", extra={"message_id": "M1", "password": "hunter2"})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.error("boom", exc_info=True)
    out = lines(capsys)
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO +cli tlsrelay\.cli: hello world "
        r'message_id="M1" password="\[REDACTED\]"$',
        out[0],
    ), out[0]
    assert "hunter2" not in "\n".join(out)
    assert re.match(r"^\S+ ERROR +cli tlsrelay\.cli: boom$", out[1]), out[1]
    assert out[2] == "Traceback (most recent call last):"
    assert out[-1] == "ZeroDivisionError: division by zero"
    with pytest.raises(json.JSONDecodeError):
        json.loads(out[0])


def test_setup_is_idempotent_and_replaces_root_handlers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(sys.stderr)
    root.addHandler(foreign)
    setup_logging("policy")
    setup_logging("policy")
    setup_logging("deliver", "DEBUG")
    assert foreign not in root.handlers
    assert len(root.handlers) == 1
    assert root.level == logging.DEBUG
    logging.getLogger("tlsrelay.deliver").debug("once")
    (doc,) = records(capsys)  # exactly one line: one handler
    assert doc["event"] == "once" and doc["service"] == "deliver"


def test_level_and_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("deliver", "warning")
    logging.getLogger("tlsrelay.deliver").info("hidden")
    logging.getLogger("tlsrelay.deliver").warning("shown")
    assert [doc["event"] for doc in records(capsys)] == ["shown"]
    with pytest.raises(ValueError, match="unknown service"):
        setup_logging("smtpd")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("deliver", "LOUD")


def test_smtp_library_never_logs_data_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("ingest", "DEBUG")
    logging.getLogger("mail.log").debug("DATA readline: %s", b"the message body")
    logging.getLogger("mail.log").info("%r >> %r", ("192.0.2.1", 1), b"RCPT TO:<a@example.org>")
    logging.getLogger("mail.log").warning("too many bogus commands")
    assert [doc["event"] for doc in records(capsys)] == ["too many bogus commands"]


def test_python_warnings_are_logged(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("run")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old option", DeprecationWarning, stacklevel=1)
    (doc,) = records(capsys)
    assert doc["logger"] == "py.warnings" and doc["level"] == "WARNING"
    assert "DeprecationWarning: old option" in doc["event"]


def test_celery_loggers_go_through_our_handler(capsys: pytest.CaptureFixture[str]) -> None:
    task_logger = logging.getLogger("celery.task")
    task_logger.addHandler(logging.StreamHandler(sys.stderr))
    task_logger.propagate = False
    setup_logging("policy")
    assert task_logger.handlers == [] and task_logger.propagate
    # With a receiver connected, Celery configures no logging of its own (worker and children).
    responses = celery_signals.setup_logging.send(sender=None, loglevel="DEBUG", logfile=None,
                                                  format="", colorize=False)  # fmt: skip
    assert responses, "setup_logging has no receiver: Celery would install its own handlers"
    assert len(logging.getLogger().handlers) == 1
    assert logging.getLogger().level == logging.INFO  # ours, not the worker's --loglevel
    task_logger.info("task ran")
    (doc,) = records(capsys)
    assert doc == {**doc, "service": "policy", "logger": "celery.task", "event": "task ran"}


def test_subprocess_stderr_is_json_lines() -> None:
    """A real interpreter: our setup, a Celery app's own logging setup and the libraries' loggers
    all end up as JSON lines on stderr (stdout stays for the program's own output)."""
    code = f"""
import logging, warnings
from services.common.logs import setup_logging
setup_logging("policy")
from celery import Celery
from celery.utils.log import get_task_logger
app = Celery("t", set_as_current=False)
app.conf.worker_hijack_root_logger = False
app.log.setup(loglevel="INFO")  # what a worker (and each prefork child) does at start
log = logging.getLogger("tlsrelay.policy")
log.info("classified", extra={{"message_id": "M1", "decisions": [{{"domain": "a.example"}}]}})
get_task_logger("services.policy.tasks").warning("from a task")
logging.getLogger("celery.worker").info("celery says hi")
logging.getLogger("mail.log").debug("DATA readline: body text")
logging.getLogger("mail.log").warning("AUTH PLAIN {PLAIN}")
warnings.warn("careful")
try:
    {{}}["missing"]
except KeyError:
    log.exception("unexpected")
print("stdout is untouched")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(logs.ENV_LOG_FORMAT, None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stdout is untouched\n"
    docs = []
    for line in proc.stderr.splitlines():
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}\n--- stderr:\n{proc.stderr}")
    assert all(doc["service"] == "policy" and TS.match(doc["ts"]) for doc in docs)
    by_event = {doc["event"]: doc for doc in docs}
    assert by_event["classified"]["message_id"] == "M1"
    assert by_event["from a task"]["logger"] == "services.policy.tasks"
    assert by_event["celery says hi"]["logger"] == "celery.worker"
    assert by_event["AUTH PLAIN [REDACTED]"]["logger"] == "mail.log"
    assert "KeyError: 'missing'" in by_event["unexpected"]["exc"]
    assert any(doc["logger"] == "py.warnings" and "careful" in doc["event"] for doc in docs)
    assert "body text" not in proc.stderr and PLAIN not in proc.stderr


_TS_FIELD = re.compile(r'"ts": "[^"]*"|^\S+Z')


def _without_ts(line: str) -> str:
    return _TS_FIELD.sub("<ts>", line, count=1)


def _log_the_usual_records() -> str:
    """A few records of each kind (plain, policy-style list argument, extras, credentials, a
    traceback, a stack); returns the traceback text the ``exc`` field must hold."""
    ingest = logging.getLogger("tlsrelay.ingest")
    ingest.info("%s: queued from %s, %d bytes", "M1", "192.0.2.1", 2048)
    logging.getLogger("services.policy.tasks").info(
        "classified %s: %s",
        "M1",
        [{"domain": "exämple.org", "tls": "enforced", "route": None, "reasons": ["r1"]}],
    )
    ingest.info(
        "queued",
        extra={
            "message_id": "M1",
            "size": 3,
            "level": "not ours",
            "password": "hunter2",
            "smtp": {"user": "alice", "token": "t"},
            "body": "Subject: x",
            "raw": b"xx",
            "domains": {"b.example", "a.example"},
            "_private": "not written",
        },
    )
    logging.getLogger("mail.log").warning(
        "%r >> %r", ("192.0.2.1", 40000), f"AUTH PLAIN {PLAIN}\r\n".encode()
    )
    ingest.info("literal 100%% and %s", "redis://:pw1@r:6379/0")
    try:
        raise ValueError(f"bad command AUTH PLAIN {PLAIN}")
    except ValueError as exc:
        ingest.exception("SMTP session error", extra={"attempt": 2})
        traceback_text = "".join(traceback.format_exception(exc)).rstrip("\n")
    ingest.warning("where", stack_info=True)
    return traceback_text.replace(PLAIN, "[REDACTED]")


def test_json_lines_are_exactly_these(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole line, key order and escaping included (only the timestamp varies)."""
    setup_logging("ingest")
    exc = _log_the_usual_records()
    out = lines(capsys)
    stack = json.loads(out[-1])["stack"]
    assert stack.startswith("Stack (most recent call last):\n")
    assert "in _log_the_usual_records\n" in stack and 'ingest.warning("where"' in stack
    assert [_without_ts(line) for line in out] == [
        '{<ts>, "level": "INFO", "service": "ingest", "logger": "tlsrelay.ingest", '
        '"event": "M1: queued from 192.0.2.1, 2048 bytes"}',
        '{<ts>, "level": "INFO", "service": "ingest", "logger": "services.policy.tasks", '
        "\"event\": \"classified M1: [{'domain': 'exämple.org', 'tls': 'enforced', "
        "'route': None, 'reasons': ['r1']}]\"}",
        '{<ts>, "level": "INFO", "service": "ingest", "logger": "tlsrelay.ingest", '
        '"event": "queued", "message_id": "M1", "size": 3, "extra_level": "not ours", '
        '"password": "[REDACTED]", "smtp": {"user": "alice", "token": "[REDACTED]"}, '
        '"body": "<omitted: 10 chars>", "raw": "<2 bytes>", '
        '"domains": ["a.example", "b.example"]}',
        '{<ts>, "level": "WARNING", "service": "ingest", "logger": "mail.log", '
        "\"event\": \"('192.0.2.1', 40000) >> b'AUTH PLAIN [REDACTED]\\\\r\\\\n'\"}",
        '{<ts>, "level": "INFO", "service": "ingest", "logger": "tlsrelay.ingest", '
        '"event": "literal 100% and redis://:[REDACTED]@r:6379/0"}',
        '{<ts>, "level": "ERROR", "service": "ingest", "logger": "tlsrelay.ingest", '
        '"event": "SMTP session error", "attempt": 2, "exc": ' + json.dumps(exc) + "}",
        '{<ts>, "level": "WARNING", "service": "ingest", "logger": "tlsrelay.ingest", '
        '"event": "where", "stack": ' + json.dumps(stack, ensure_ascii=False) + "}",
    ]


def test_text_lines_are_exactly_these(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(logs.ENV_LOG_FORMAT, "text")
    setup_logging("ingest")
    exc = _log_the_usual_records()
    out = capsys.readouterr().err
    stack = out[out.index("Stack (most recent call last):") :].rstrip("\n")
    entries = [_without_ts(entry) for entry in re.split(r"\n(?=\S+Z )", out.rstrip("\n"))]
    assert entries == [
        "<ts> INFO    ingest tlsrelay.ingest: M1: queued from 192.0.2.1, 2048 bytes",
        "<ts> INFO    ingest services.policy.tasks: classified M1: [{'domain': 'exämple.org', "
        "'tls': 'enforced', 'route': None, 'reasons': ['r1']}]",
        '<ts> INFO    ingest tlsrelay.ingest: queued message_id="M1" size=3 '
        'extra_level="not ours" password="[REDACTED]" '
        'smtp={"user": "alice", "token": "[REDACTED]"} body="<omitted: 10 chars>" '
        'raw="<2 bytes>" domains=["a.example", "b.example"]',
        "<ts> WARNING ingest mail.log: ('192.0.2.1', 40000) >> b'AUTH PLAIN [REDACTED]\\r\\n'",
        "<ts> INFO    ingest tlsrelay.ingest: literal 100% and redis://:[REDACTED]@r:6379/0",
        "<ts> ERROR   ingest tlsrelay.ingest: SMTP session error attempt=2\n" + exc,
        "<ts> WARNING ingest tlsrelay.ingest: where\n" + stack,
    ]


class _Counted:
    """A ``%`` argument that counts how often it is turned into text."""

    def __init__(self) -> None:
        self.calls = 0

    def __str__(self) -> str:
        self.calls += 1
        return "counted"

    __repr__ = __str__


@pytest.mark.parametrize("text", [False, True], ids=["json", "text"])
def test_arguments_are_formatted_once_per_record(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: bool
) -> None:
    if text:
        monkeypatch.setenv(logs.ENV_LOG_FORMAT, "text")
    setup_logging("policy")
    log = logging.getLogger("services.policy.tasks")
    as_str, as_repr, in_list = _Counted(), _Counted(), _Counted()
    log.info("classified %s: %r %s", as_str, as_repr, [in_list])
    assert (as_str.calls, as_repr.calls, in_list.calls) == (1, 1, 1)
    assert lines(capsys)[0].endswith(
        "classified counted: counted [counted]" + ("" if text else '"}')
    )


def test_the_filter_leaves_the_final_text_on_the_record() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "AUTH PLAIN %s (%d%%)", (PLAIN, 5), None
    )
    RedactingFilter().filter(record)
    assert (record.msg, record.args) == ("AUTH PLAIN [REDACTED] (5%)", None)
    assert record.getMessage() == "AUTH PLAIN [REDACTED] (5%)"
    RedactingFilter().filter(record)  # a second pass changes nothing
    assert record.getMessage() == "AUTH PLAIN [REDACTED] (5%)"
