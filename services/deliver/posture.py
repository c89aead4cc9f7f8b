"""TLS posture: deliveries per destination domain and day, how they rode, and what would have
broken had the domain been ``enforced`` or ``verified`` (``tlsrelay posture``).

Recording (deliver worker): every delivery round that delivered recipients — MX and routed mail
alike — is one *delivery* of its destination domain. :func:`columns` turns the attempt that ran
the transaction into counts (pure):

- ``deliveries``; how it rode: ``tls_verified`` (authenticated: the chain verified, or the
  certificate matched the host's DANE TLSA records — ``dane_verified``, which meets a
  ``verified`` requirement), ``tls`` (encrypted, certificate not checked) or
  ``clear``, with why (``clear_not_offered``, ``clear_handshake_failed``,
  ``clear_remembered_broken``, ``clear_disabled`` — mode ``none``); ``version:<TLS version>``;
- what-if ``enforced``: ``would_defer_enforced`` — delivered in clear (``enforced`` never falls
  back; a host remembered as broken would be tried and fail again);
- what-if ``verified``: ``would_defer_verified`` — delivered in clear, over TLS 1.0/1.1 (the
  verified context wants TLS 1.2), or over unverified TLS whose leaf fails verification
  (:mod:`services.deliver.leafcheck`: self-signed, expired, wrong name, unknown issuer), each
  also counted by why (``why_verified:<reason>``); ``verified_unknown`` — the leaf's verdict
  needs a chain the session did not expose, or mode ``none`` (STARTTLS never tried).

An attempt whose outcome never sends (``verify_failed``, ``dane_failed``: the session moved on
to the next host) adds nothing: it is not a delivery.

:func:`stage` queues them into the caller's transaction (``Ledger.record``): no round trip of its
own. One small Lua script adds one to the day's hash ``tlsrelay:posture:<YYYY-MM-DD>``, field
``"<domain> <class>"``, where the class lists the delivery's columns (``tls,version:TLSv1.3``:
a few distinct classes per domain, and one write per delivery, not one per column), and keeps
the day's domains in ``tlsrelay:posture:<day>:domains``: at most :data:`DOMAIN_CAP` domains per
day, the rest counted under :data:`OTHER`. Both keys expire ``posture.retention`` + 1 days after
the day's last new domain (set only then: a delivery costs three commands inside its one
script call), so the store holds at most retention × (cap + 1) rows, each a few fields. The
script catches its own errors (``redis.pcall``) and returns how many of its writes failed: a
recording error is logged and counted (``tlsrelay_posture_recording_errors_total``) by the
caller, never raised into the send path.

Reading (``tlsrelay posture``): :func:`read` sums the days of a window per domain (no probing).

The what-if is per delivery as recorded: a round that delivered in clear at its first host is
counted as deferred under ``enforced`` even when a later MX host (not tried) might have offered
TLS. ``tlsrelay check`` answers that for a domain, live.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Protocol

import redis

from services.common import spool
from services.deliver import leafcheck
from services.deliver.tls import Outcome as TlsOutcome

log = logging.getLogger("tlsrelay.deliver")

KEY_PREFIX: Final = spool.PREFIX + "posture:"
DOMAIN_CAP: Final = 1000  # domains per day with a row of their own; the rest share OTHER
OTHER: Final = "(other)"
DAY: Final = 86400
OLD_TLS: Final = frozenset({"TLSv1", "TLSv1.1", "SSLv3"})  # below the verified context's floor
COUNTS: Final = (
    "deliveries", "tls_verified", "tls", "clear", "clear_not_offered", "clear_handshake_failed",
    "clear_remembered_broken", "clear_disabled", "would_defer_enforced", "would_defer_verified",
    "verified_unknown",
)  # fmt: skip

# KEYS: the day's hash, the day's domain set. ARGV: domain, OTHER, cap, ttl, the delivery's class
# (its columns, see class_of). One HINCRBY per delivery; both keys' lifetime is set when a domain
# is new to the day. Returns the number of writes that failed (0: all done); never an error reply.
SCRIPT: Final = """
local domain, new = ARGV[1], false
local ok, known = pcall(redis.call, 'SISMEMBER', KEYS[2], domain)
if not ok then return 1 end
if known == 0 then
  local ok2, size = pcall(redis.call, 'SCARD', KEYS[2])
  if not ok2 then return 1 end
  if size >= tonumber(ARGV[3]) then
    domain = ARGV[2]
  else
    local added = redis.pcall('SADD', KEYS[2], domain)
    if type(added) == 'table' and added.err then return 1 end
    new = true
  end
end
local failed = 0
local r = redis.pcall('HINCRBY', KEYS[1], domain .. ' ' .. ARGV[5], 1)
if type(r) == 'table' and r.err then failed = failed + 1 end
if new then
  for _, key in ipairs(KEYS) do
    r = redis.pcall('EXPIRE', key, ARGV[4])
    if type(r) == 'table' and r.err then failed = failed + 1 end
  end
end
return failed
"""


class Delivered(Protocol):
    """The attempt that ran a round's transaction (``services.deliver.attempt.Attempt``)."""

    @property
    def outcome(self) -> TlsOutcome | None: ...
    @property
    def tls_version(self) -> str | None: ...
    @property
    def leaf_verdict(self) -> str | None: ...


def day_key(day: str) -> str:
    return f"{KEY_PREFIX}{day}"


def domains_key(day: str) -> str:
    return f"{KEY_PREFIX}{day}:domains"


def utc_day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


AUTHENTICATED: Final = (TlsOutcome.TLS_VERIFIED, TlsOutcome.DANE_VERIFIED)
NEVER_SENT: Final = (TlsOutcome.VERIFY_FAILED, TlsOutcome.DANE_FAILED)  # next host, nothing sent


def columns(attempt: Delivered) -> dict[str, int]:
    """The counts one delivery adds (see the module docstring); none for an attempt that
    sent nothing."""
    outcome = attempt.outcome
    if outcome in NEVER_SENT:
        return {}
    counts = {"deliveries": 1}
    if outcome in AUTHENTICATED:
        counts["tls_verified"] = 1
    elif outcome is TlsOutcome.TLS:
        counts["tls"] = 1
        why = _unverified(attempt)
        if why == leafcheck.UNKNOWN:
            counts["verified_unknown"] = 1
        elif why is not None:
            counts.update({"would_defer_verified": 1, f"why_verified:{why}": 1})
    else:
        reason = outcome.value if outcome is not None else "disabled"
        counts.update({"clear": 1, f"clear_{reason}": 1})
        if outcome is TlsOutcome.DISABLED or outcome is None:
            counts["verified_unknown"] = 1
        else:
            counts.update(
                {"would_defer_enforced": 1, "would_defer_verified": 1, "why_verified:clear": 1}
            )
    if attempt.tls_version:
        counts[f"version:{attempt.tls_version}"] = 1
    return counts


def _unverified(attempt: Delivered) -> str | None:
    """Why a verified delivery would have failed on this unverified TLS session (None: it would
    not; ``unknown``: cannot tell)."""
    if attempt.tls_version in OLD_TLS:
        return "old_tls"
    verdict = attempt.leaf_verdict or leafcheck.UNKNOWN
    if verdict == leafcheck.OK:
        return None
    return verdict if verdict in leafcheck.FAILURES else leafcheck.UNKNOWN


def stage(
    pipe: redis.client.Pipeline,
    domain: str,
    counts: Mapping[str, int],
    now: float,
    retention_days: int,
) -> int:
    """Queue one delivery's ``counts`` into ``pipe`` (one EVAL); return the index of its reply
    (the number of failed writes) in the pipeline."""
    day = utc_day(now)
    args: list[str | int] = [
        domain.lower(),
        OTHER,
        DOMAIN_CAP,
        (retention_days + 1) * DAY,
        class_of(counts),
    ]
    at = len(pipe)
    pipe.eval(SCRIPT, 2, day_key(day), domains_key(day), *args)
    return at


def class_of(counts: Mapping[str, int]) -> str:
    """One field name for a delivery's counts: its columns, sorted, joined by commas (a count
    other than 1 as ``column=n``); :func:`columns_of` reads it back."""
    return ",".join(c if n == 1 else f"{c}={n}" for c, n in sorted(counts.items()) if n)


def columns_of(name: str) -> dict[str, int]:
    """The counts a class stands for (:func:`class_of`)."""
    found: dict[str, int] = {}
    for part in name.split(","):
        column, _, n = part.partition("=")
        if column:
            found[column] = found.get(column, 0) + (int(n) if n else 1)
    return found


# --------------------------------------------------------------------------- reading


@dataclass
class Row:
    """One destination domain over the window."""

    domain: str
    counts: dict[str, int] = field(default_factory=dict)
    days: set[str] = field(default_factory=set)

    def __getitem__(self, column: str) -> int:
        return self.counts.get(column, 0)

    def add(self, column: str, n: int) -> None:
        self.counts[column] = self.counts.get(column, 0) + n

    def prefixed(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in sorted(self.counts.items()) if k.startswith(prefix)}

    def share(self, column: str) -> float:
        return self[column] / self["deliveries"] if self["deliveries"] else 0.0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"domain": self.domain}
        doc.update({c: self[c] for c in COUNTS})
        doc["share_tls"] = round(self.share("tls") + self.share("tls_verified"), 4)
        doc["share_tls_verified"] = round(self.share("tls_verified"), 4)
        doc["share_clear"] = round(self.share("clear"), 4)
        doc["versions"] = self.prefixed("version:")
        doc["why_verified"] = self.prefixed("why_verified:")
        doc["days"] = len(self.days)
        return doc


def window(days: int, today: date) -> list[str]:
    """The ``days`` UTC days ending with ``today``, oldest first."""
    return [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


def read(client: redis.Redis, days: Iterable[str]) -> dict[str, Row]:
    """Every domain's counts summed over ``days`` (one pipelined round trip)."""
    days = list(days)
    with client.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(day_key(day))
        found: list[dict[bytes, bytes]] = pipe.execute()
    rows: dict[str, Row] = {}
    for day, raw in zip(days, found, strict=True):
        for name, value in raw.items():
            domain, _, kind = name.decode().partition(" ")
            row = rows.setdefault(domain, Row(domain))
            for column, n in columns_of(kind).items():
                row.add(column, n * int(value))
            row.days.add(day)
    return rows


def select(rows: Mapping[str, Row], pattern: str | None, top: int | None) -> list[Row]:
    """Rows whose domain matches the glob ``pattern`` (case-insensitive), by clear-text volume,
    then deliveries, then name; the first ``top`` of them."""
    chosen = [r for d, r in rows.items() if pattern is None or fnmatch.fnmatch(d, pattern.lower())]
    chosen.sort(key=lambda r: (-r["clear"], -r["deliveries"], r.domain))
    return chosen[:top] if top else chosen
