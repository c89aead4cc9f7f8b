"""Structured logs: one JSON object per line on stderr, credentials redacted.

Every service calls :func:`setup_logging` once, first thing, with its name::

    setup_logging("ingest")
    log = logging.getLogger("tlsrelay.ingest")
    log.info("queued", extra={"message_id": stored.id, "size": stored.size})

gives (one line)::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "service": "ingest",
     "logger": "tlsrelay.ingest", "event": "queued", "message_id": "…", "size": 1234}

- ``event`` is the log message with its ``%`` arguments applied; ``extra`` fields become
  top-level keys (an extra field named like one of ours is written as ``extra_<name>``);
  ``exc`` is the formatted traceback of ``exc_info``, one string.
- :class:`RedactingFilter` sits on the handler, so it sees every record, whichever logger it came
  from: values of fields named like password/secret/auth/token/credentials (nested dicts too)
  become ``[REDACTED]``, and so do ``AUTH PLAIN <base64>`` / ``AUTH LOGIN <base64>`` initial
  responses and ``scheme://user:password@`` URL passwords anywhere in the message, string fields
  and tracebacks. Fields named like a message body are replaced by their size; ``bytes`` are never
  written, only their length.
- The filter changes the record in place (it is the same object every handler sees): it applies
  the ``%`` arguments itself, once per record (an argument's ``str``/``repr`` runs once), and
  leaves the redacted text in ``record.msg`` with ``record.args = None``. A handler that sees the
  record after ours gets the same text from ``getMessage()``, but neither the template nor the
  arguments.
- :func:`setup_logging` turns off, process-wide, what no line of ours shows: records made after
  it carry no thread, process or process name (``None``; ``logging.logThreads``,
  ``logProcesses``, ``logMultiprocessing``). Another handler's ``%(threadName)s``-style format
  would show ``None``. The caller's file, line and function are still recorded.
- Message bodies are never logged: aiosmtpd logs every ``DATA`` line at DEBUG and every SMTP
  command at INFO on ``mail.log``; those loggers are held at WARNING whatever the level.
- ``TLSRELAY_LOG_FORMAT=text`` writes plain human-readable lines instead (for developers); the
  same redaction applies.
- Celery: a receiver of ``celery.signals.setup_logging`` keeps Celery (and its prefork children)
  from installing handlers of its own; the ``celery*`` loggers propagate to our root handler.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = [
    "ENV_LOG_FORMAT",
    "SERVICES",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "redact_text",
    "setup_logging",
]

ENV_LOG_FORMAT: Final = "TLSRELAY_LOG_FORMAT"
SERVICES: Final = frozenset({"ingest", "policy", "deliver", "run", "cli"})
REDACTED: Final = "[REDACTED]"

# Keys that our JSON line owns; an `extra` field with one of these names is renamed.
_OWN_KEYS: Final = frozenset({"ts", "level", "service", "logger", "event", "exc", "stack"})

# Every attribute a plain LogRecord has (plus the ones Formatter/3.12 add): anything else on a
# record came from `extra=`.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("x", logging.INFO, __file__, 1, "", None, None).__dict__
) | {"message", "asctime", "taskName"}

_SECRET_KEY = re.compile(
    r"passw(?:or)?d|passphrase|secret|auth|token|credential|api_?key|private_?key", re.IGNORECASE
)
_BODY_KEY = re.compile(r"^(?:body|message_body|raw_message|mail_body|content|payload)$", re.I)
# SMTP AUTH initial responses (RFC 4954) as they appear in command lines, reprs and errors.
_SMTP_AUTH = re.compile(
    r"(\bAUTH\s+(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER)\s+)([A-Za-z0-9+/]{2,}={0,2})", re.IGNORECASE
)
# ... but not the mechanism list of an EHLO reply ("250-AUTH PLAIN LOGIN").
_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM", "GSSAPI"})
# The password of a URL's userinfo: redis://:secret@host, smtp://user:secret@host.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")

_CELERY_LOGGERS: Final = ("celery", "celery.task", "celery.redirected", "celery.worker")
# aiosmtpd: INFO is every SMTP command line of every session, DEBUG includes every DATA line.
_QUIET_LOGGERS: Final = ("mail.log", "mail.debug")

_state: dict[str, str] = {}  # what the last setup_logging() call configured


def _redact_auth(match: re.Match[str]) -> str:
    if match.group(2).upper() in _MECHANISMS:
        return match.group(0)
    return match.group(1) + REDACTED


def redact_text(text: str) -> str:
    """``text`` with SMTP AUTH initial responses and URL passwords replaced by ``[REDACTED]``."""
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    if "auth" in text.lower():
        text = _SMTP_AUTH.sub(_redact_auth, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return REDACTED if value is not None else None
    if _BODY_KEY.match(key) and isinstance(value, str | bytes | bytearray):
        return f"<omitted: {len(value)} {'chars' if isinstance(value, str) else 'bytes'}>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value("", v) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_value("", v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Redacts credentials in place on every record; never drops one.

    Put it on the *handler*: filters on a logger do not see records propagated from its children.
    It leaves ``record.msg`` as the final message text (``%`` arguments applied, redacted) and
    ``record.args`` as ``None``, so that arguments are formatted once per record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Formatted once, here: the formatter's getMessage() then only returns it.
        record.msg, record.args = redact_text(record.getMessage()), None
        fields = record.__dict__
        if not fields.keys() <= _RECORD_ATTRS:  # some came from `extra=` (a set test, in C)
            for key in fields.keys() - _RECORD_ATTRS:
                fields[key] = _redact_value(key, fields[key])
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339, UTC, milliseconds: ``2025-01-01T12:00:00.123Z``."""
    second = int(record.created)
    return _second(second) + f"{int((record.created - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = record.__dict__
    if fields.keys() <= _RECORD_ATTRS:  # most records have no `extra=`: skip the loop
        return {}
    return {  # in the order the caller gave them
        (f"extra_{key}" if key in _OWN_KEYS else key): value
        for key, value in fields.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: never the content of bytes (could be a message body)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat()
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        try:
            return to_json()
        except Exception:  # a to_json() that needs arguments or fails: fall back to str()
            pass
    return str(value)


# What json.dumps(value, default=_jsonable, ensure_ascii=False) builds on every call; one for all.
_to_json: Final = json.JSONEncoder(default=_jsonable, ensure_ascii=False).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(_extra_fields(record))
        exc = _exception_text(self, record)
        if exc:
            doc["exc"] = exc
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _to_json(doc)


class TextFormatter(logging.Formatter):
    """``ts LEVEL service logger: event key=value …`` and the traceback below, for people."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {record.levelname:<7} {self.service} {record.name}: "
            f"{record.getMessage()}"
        )
        fields = _extra_fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_to_json(value)}" for key, value in fields.items())
        exc = _exception_text(self, record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _Handler(logging.StreamHandler[TextIO]):
    """Our root handler; the class marks it so setup_logging() can tell it from others."""


def _celery_setup_logging(**kwargs: Any) -> None:
    """``celery.signals.setup_logging`` receiver: with a receiver connected, Celery installs no
    handlers of its own (in the worker and in each prefork child); keep our configuration."""
    if _state:
        setup_logging(_state["service"], _state["level"])


def _route_celery() -> None:
    for name in _CELERY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    try:
        from celery import signals
    except ImportError:  # pragma: no cover - celery is a dependency; the CLI may run without it
        return
    signals.setup_logging.connect(_celery_setup_logging, weak=False, dispatch_uid="tlsrelay.logs")


def setup_logging(service: str, level: str = "INFO") -> None:
    """Send every log record of this process to stderr as JSON lines (or text, see module doc).

    Idempotent: each call replaces the root logger's handlers with one of ours.
    """
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {sorted(SERVICES)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    text = os.environ.get(ENV_LOG_FORMAT, "json").strip().lower() == "text"

    handler = _Handler(sys.stderr)
    handler.setFormatter(TextFormatter(service) if text else JsonFormatter(service))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if isinstance(old, _Handler):
            old.close()  # ours (a StreamHandler's close() leaves sys.stderr open)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # Neither formatter writes a record's thread, process or process name: don't look them up
    # for every record (the logging HOWTO's "Optimization"). The caller's file, line and function
    # are still found (logging._srcfile is left alone): stack_info=True needs that walk.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.captureWarnings(True)
    _state.update(service=service, level=level)
    _route_celery()
