"""Every reply the ingest listeners send, named, beside the RFC section that defines it.

Clients and tests rely on these exact texts (the contract is in :mod:`services.ingest.server`);
tests compare replies with these names, not with ad-hoc strings. Also here: how a reply is made
fit to go out (:func:`with_enhanced_code`, :func:`printable`) and which replies are syntax errors.

Pure: no I/O, nothing fails here. An unknown reply code gets the enhanced status
``<class>.0.0``; a reply that already carries one is left as it is.
"""

from __future__ import annotations

import functools
import re
from typing import Final

# RFC 3463 enhanced status codes (with the RFC 5248 registry) for replies that aiosmtpd itself
# produces without one. Keyed by basic reply code; any other code gets "<class>.0.0".
ENHANCED_DEFAULTS: Final[dict[int, str]] = {
    221: "2.0.0",  # closing connection
    250: "2.0.0",  # other or undefined status: success
    421: "4.3.0",  # service not available: other mail system status
    451: "4.3.0",  # local error in processing
    454: "4.7.0",  # TLS not available (RFC 3207): security or policy status
    500: "5.5.2",  # syntax error, command unrecognized
    501: "5.5.4",  # syntax error in parameters: invalid command arguments
    502: "5.5.1",  # command not implemented: invalid command
    503: "5.5.1",  # bad sequence of commands: invalid command
    504: "5.5.4",  # parameter not implemented: invalid command arguments
    530: "5.7.0",  # must issue STARTTLS / authentication required: security or policy
    550: "5.0.0",  # mailbox unavailable: other undefined status
    552: "5.3.4",  # exceeded storage allocation: message too big for system
    554: "5.3.0",  # transaction failed: other or undefined mail system status
    555: "5.5.4",  # MAIL/RCPT parameters not recognized: invalid command arguments
}
_NO_ENHANCED_CODE: Final = frozenset({"334", "354"})  # AUTH challenge, DATA go-ahead
_HAS_ENHANCED_CODE = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
REPLY_LINE_MAX: Final = 512  # RFC 5321 §4.5.3.1.5, CRLF included
_NOT_PRINTABLE_REPLY = re.compile(r"[^ -~]")  # anything but printable ASCII or a space
_NOT_VISIBLE = re.compile(r"[^!-~]")  # anything but visible ASCII
# RFC 5321 §4.2.1: 50z replies are syntax errors (555: MAIL/RCPT parameters, RFC 5321 §4.3.2).
_SYNTAX_ERROR = re.compile(r"^(50\d|555)[ -]")

# --------------------------------------------------------------------------- limits and session
LINE_TOO_LONG = "500 5.5.2 Line too long"  # RFC 5321 §4.5.3.1.9
DATA_LINE_TOO_LONG = "500 5.6.0 Line too long: text lines are limited to 1000 octets"  # §4.5.3.1.6
HEADER_TOO_LARGE = "552 5.3.4 Header section too large"  # RFC 3463 §3.4: too big for system
TOO_MANY_HOPS = "554 5.4.6 Too many hops"  # RFC 5321 §6.3; RFC 3463 §3.5: routing loop
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"  # RFC 1870 §6.1
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"  # RFC 5321 §3.8
TIMEOUT = "421 4.4.2 Timeout, closing connection"  # RFC 5321 §4.5.3.2.7
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"  # RFC 5321 §3.8
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"  # RFC 5321 §3.8
TEMPFAIL = "451 4.3.0 Temporary failure, try again later"  # RFC 5321 §4.2.2: local error
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"  # an unexpected exception

# aiosmtpd texts replaced by the wording of our contract.
REWRITES: Final[dict[str, str]] = {
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "552 Error: Too much mail data": TOO_BIG,
    "500 Command line too long": LINE_TOO_LONG,
}

# --------------------------------------------------------------------------- MAIL and RCPT
SENDER_OK = "250 2.1.0 Ok"  # RFC 3463 §3.2: other address status (originator)
RECIPIENT_OK = "250 2.1.5 Ok"  # RFC 3463 §3.2: destination address valid
BAD_SENDER_SYNTAX = "501 5.1.7 Bad sender address syntax"  # RFC 3463 §3.2
BAD_RECIPIENT_SYNTAX = "501 5.1.3 Bad recipient address syntax"  # RFC 3463 §3.2
NON_ASCII_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"  # RFC 6531 §3.5
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"  # RFC 5321 §4.5.3.1.10
RELAY_DENIED = "554 5.7.1 Relay access denied"  # RFC 3463 §3.8: delivery not authorized
RATE_LIMITED = "451 4.7.0 Rate limit exceeded, try again later"  # RFC 3463 §3.8
# RFC 8689 §4.1 (REQUIRETLS takes no value, needs TLS) and the RFC 5248 registry (5.7.10).
REQUIRETLS_IN_CLEAR = "530 5.7.10 REQUIRETLS needs a TLS session, use STARTTLS first"
REQUIRETLS_WITH_VALUE = "501 5.5.4 REQUIRETLS takes no value"
REQUIRETLS_TWICE = "501 5.5.4 REQUIRETLS given more than once"

# --------------------------------------------------------------------------- DATA
# aiosmtpd's own DATA texts (RFC 5321 §4.1.1.4), kept as it words them; push() adds the codes.
NEED_RCPT = "503 Error: need RCPT command"
DATA_SYNTAX = "501 Syntax: DATA"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"

# --------------------------------------------------------------------------- AUTH (submission)
# RFC 4954 §6 and the RFC 5248 registry for the submission replies.
AUTH_NOT_AVAILABLE = "502 5.5.1 AUTH not available"
AUTH_TOO_MANY_FAILURES = "421 4.7.0 Too many authentication failures, try later"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_ABORTED = "501 5.7.0 Auth aborted"  # RFC 4954 §4: the client answered "*"
AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"  # RFC 4954 §4: not base64
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated tenant"


def queued_as(message_id: str) -> str:
    """DATA accepted: the message and its policy task are committed (RFC 3463 §3.1)."""
    return f"250 2.0.0 Ok: queued as {message_id}"


def unrecognized(verb: str) -> str:
    """An unknown verb (RFC 5321 §4.2.4); the verb may hold control characters: never echoed."""
    return f'500 Error: command "{_NOT_VISIBLE.sub("?", verb)[:20]}" not recognized'


def is_syntax_error(reply: str) -> bool:
    """Whether ``reply`` is a syntax error that counts towards ``ingest.max_bad_commands``."""
    return _SYNTAX_ERROR.match(reply) is not None


def printable(reply: str) -> str:
    """A reply line as it may go out: printable ASCII (aiosmtpd echoes arguments, which may hold
    CR, NUL or undecodable octets), at most 512 octets with the CRLF (RFC 5321 §4.5.3.1.5)."""
    return _NOT_PRINTABLE_REPLY.sub("?", reply)[: REPLY_LINE_MAX - 2]


@functools.lru_cache(maxsize=256)
def outgoing(status: str, code: bool) -> str:
    """``status`` as it goes out: with an RFC 3463 code when ``code`` (:func:`with_enhanced_code`),
    then :func:`printable`. Pure, and most replies repeat: each worked out once (256 kept)."""
    return printable(with_enhanced_code(status) if code else status)


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an RFC 3463 status after the basic code, unless it has one or takes none."""
    reply = REWRITES.get(reply, reply)
    code, sep, text = reply[:3], reply[3:4] or " ", reply[4:]
    if not code.isdigit() or code[0] not in "245" or code in _NO_ENHANCED_CODE:
        return reply
    if _HAS_ENHANCED_CODE.match(reply):
        return reply
    status = ENHANCED_DEFAULTS.get(int(code), f"{code[0]}.0.0")
    return f"{code}{sep}{status} {text}".rstrip()
