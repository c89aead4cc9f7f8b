"""MTA-STS (RFC 8461): find, cache and apply a destination domain's policy at delivery time.

Pieces, each usable alone:

- :func:`parse_txt` (§3.1) reads the ``_mta-sts.<domain>`` TXT records and gives the policy id.
- :func:`parse_policy` (§3.2) reads the policy file (``version``, ``mode``, ``mx``, ``max_age``).
- :func:`mx_matches` (§4.1) checks an MX host against the policy's ``mx`` patterns.
- :func:`fetch_policy` (§3.3) GETs ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` over
  verified HTTPS: no redirects (a 3xx is a fetch error), ``text/plain`` only, at most 64 KB.
- :class:`PolicyCache` keeps policies in Redis, shared by every worker, and answers
  :meth:`PolicyCache.lookup` with ONE Redis ``GET`` while the cached answer is fresh. A positive
  answer is re-checked against the TXT id after the TXT record's TTL (60 s–1 h) and refetched
  when the id changed or the policy's ``max_age`` ran out; a negative answer ("no policy") is kept
  for :data:`NEGATIVE_TTL`, so a domain without MTA-STS costs no DNS lookup per delivery.
- :func:`apply_sts` is pure: (decision, policy, TLS-Required: No) → the effective decision.

Failure: :meth:`PolicyCache.lookup` never raises for DNS or HTTPS trouble and always ends within
``delivery.mta_sts_timeout`` (a per-domain limit: other domains never wait on this one). A failed
refresh keeps a cached policy that has not expired (§5.1) — so a lookup failure never turns an
enforced domain into clear text — and is retried after :data:`FAILURE_RETRY`; without a cached
policy the domain is treated as having none (§5.1), and the failure is reported (TLSRPT
``sts-policy-fetch-error``, ``sts-policy-invalid`` or ``sts-webpki-invalid``). Redis errors
propagate, as everywhere in the deliver worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from services.common import spool
from services.common.model import Decision, TlsMode

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MODES = (ENFORCE, TESTING, NONE)
CIRCUMSTANCE = "mta-sts"
WELL_KNOWN = "/.well-known/mta-sts.txt"  # §3.3
MAX_BODY = 64 * 1024  # §3.3: senders may limit the policy size; 64 KB is the suggested bound
MAX_HEADER_LINES = 100
CLOSE_WAIT = 1.0  # seconds to wait for a closed HTTPS connection to finish closing
MAX_AGE_LIMIT = 31_557_600  # §3.2: max_age is at most one year
NEGATIVE_TTL = 3600.0  # "no policy" (no TXT record) is believed this long
FAILURE_RETRY = 300.0  # after a failed lookup or fetch, try again after this long
RECHECK_MIN, RECHECK_MAX = 60.0, 3600.0  # the TXT id is re-checked after its TTL, clamped
KEY_PREFIX = spool.PREFIX + "mtasts:"

# RFC 8460 §4.3.2.3 result types of policy retrieval failures
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyError(ValueError):
    """The policy text is not a valid STSv1 policy (§3.2)."""


class FetchError(Exception):
    """The policy could not be had; ``result_type`` is the RFC 8460 result type to report."""

    def __init__(self, text: str, result_type: str = FETCH_ERROR) -> None:
        super().__init__(text)
        self.result_type = result_type


class _ConnectError(FetchError):
    """This address did not answer: the next address of the policy host may."""


@dataclass(frozen=True)
class Policy:
    """A fetched policy, with the TXT id it was fetched under and when."""

    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    text: str  # the policy file as served (for TLSRPT's policy-string)
    fetched_at: float = 0.0

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    @property
    def lines(self) -> list[str]:
        """The policy's lines (RFC 8460 §4.4 ``policy-string``)."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "mx": list(self.mx), "max_age": self.max_age,
                "text": self.text, "fetched_at": self.fetched_at}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Policy:
        return cls(doc["id"], doc["mode"], tuple(doc["mx"]), int(doc["max_age"]), doc["text"],
                   float(doc["fetched_at"]))  # fmt: skip


# --------------------------------------------------------------------------- parsing (pure)

_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")  # §3.1: sts-id = 1*32(ALPHA / DIGIT)
_FIELD = re.compile(r"^([A-Za-z0-9_.-]+)[ \t]*=[ \t]*(.*?)[ \t]*$")


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records (each a record's strings joined), or None.

    §3.1: records not starting with ``v=STSv1;`` are ignored; unless exactly one remains and it
    is valid (``v`` first, an ``id`` of 1–32 letters and digits), there is no policy.
    """
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        if not part.strip():
            continue
        m = _FIELD.match(part.strip())
        if not m:
            return None
        fields.setdefault(m.group(1), m.group(2))
    sts_id = fields.get("id", "")
    return sts_id if fields.get("v") == "STSv1" and _TXT_ID.match(sts_id) else None


def parse_policy(text: str, sts_id: str = "", fetched_at: float = 0.0) -> Policy:
    """Parse a policy file (§3.2); raise :class:`PolicyError` when it is not valid.

    Lines are ``key: value`` (CRLF or LF); unknown keys are ignored; ``mx`` may repeat.
    ``version`` must be ``STSv1``, ``mode`` one of enforce/testing/none, ``max_age`` an integer
    0–31557600, and at least one ``mx`` unless the mode is ``none``.
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a 'key: value' line: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError(f"version must be STSv1, got {values.get('version')!r}")
    mode = values.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode must be enforce, testing or none, got {mode!r}")
    max_age = values.get("max_age", "")
    if (
        not (max_age.isascii() and max_age.isdigit())
        or len(max_age) > 10
        or int(max_age) > MAX_AGE_LIMIT
    ):
        raise PolicyError(f"max_age must be 0-{MAX_AGE_LIMIT} seconds, got {max_age!r}")
    if mode != NONE and not mx:
        raise PolicyError("no mx pattern")
    for pattern in mx:
        if not _valid_pattern(pattern):
            raise PolicyError(f"bad mx pattern {pattern!r}")
    return Policy(sts_id, mode, tuple(mx), int(max_age), text, fetched_at)


_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?$")


def _valid_pattern(pattern: str) -> bool:
    labels = pattern.split(".")
    if labels[0] == "*":  # §4.1: a wildcard only as the whole leftmost label
        labels = labels[1:]
    return len(labels) >= 1 and all(_LABEL.match(label) for label in labels)


def mx_matches(host: str, patterns: Sequence[str]) -> bool:
    """Whether MX ``host`` matches one of ``patterns`` (§4.1): case-insensitive; ``*.b.c``
    matches exactly one more label on the left (``a.b.c``, not ``b.c`` nor ``x.a.b.c``)."""
    name = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            label, _, rest = name.partition(".")
            if label and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False


# --------------------------------------------------------------------------- applying (pure)


def apply_sts(decision: Decision, policy: Policy | None, tls_required_no: bool) -> Decision:
    """The effective decision for delivering to ``decision.domain`` under ``policy``.

    - routed mail (``decision.route``), no policy, mode ``none``: unchanged;
    - ``enforce``: circumstance ``mta-sts``, mode raised to at least ``verified``, only MX hosts
      matching the policy (``mx_patterns``);
    - ``testing``: unchanged but for a reason line (the deliverer counts what would have failed);
    - a message with ``TLS-Required: No`` (RFC 8689 §5): the policy is not enforced, TLS is still
      tried (at least ``opportunistic``); the reason says so.
    """
    if decision.route or policy is None or policy.mode == NONE:
        return decision
    mx = ", ".join(policy.mx)
    about = f"mta-sts: {decision.domain} publishes policy {policy.id} (mode {policy.mode}, mx {mx})"
    if tls_required_no:
        relaxed = f"{about}; not enforced for this message: TLS-Required: No (RFC 8689 §5)"
        tls = decision.tls.at_least(TlsMode.OPPORTUNISTIC)
        return replace(decision, tls=tls, reasons=(*decision.reasons, relaxed))
    if policy.mode == TESTING:
        return replace(decision, reasons=(*decision.reasons, f"{about}; testing: reported only"))
    names = decision.circumstances if decision.circumstances != ("default",) else ()
    return replace(
        decision,
        tls=decision.tls.at_least(TlsMode.VERIFIED),
        circumstances=(*names, CIRCUMSTANCE),
        reasons=(*decision.reasons, f"{about}: verified TLS to a matching MX host"),
        mx_patterns=policy.mx,
    )


# --------------------------------------------------------------------------- testing mode

# OpenSSL X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them
CERT_HAS_EXPIRED = 10
HOSTNAME_MISMATCH = 62


def leaf_problem(der: bytes, name: str, now: float) -> int | None:
    """What verification would say about a server certificate in ``testing`` mode, where the
    session does not verify (as before): ``CERT_HAS_EXPIRED``, ``HOSTNAME_MISMATCH`` (RFC 6125
    DNS names; a wildcard only as the whole leftmost label), or None. The chain is not checked
    (the unverified session does not give it)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return HOSTNAME_MISMATCH
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        return CERT_HAS_EXPIRED
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    except Exception:  # a malformed or duplicate extension: verification would fail on it too
        return HOSTNAME_MISMATCH
    wanted = [n.lower().rstrip(".") for n in dns_names]
    return None if mx_matches(name, wanted) else HOSTNAME_MISMATCH


# --------------------------------------------------------------------------- fetching


def https_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified HTTPS (§3.3: the policy host's certificate must be valid for its name)."""
    return ssl.create_default_context(cafile=ca_file)


async def fetch_policy(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    context: ssl.SSLContext,
    port: int = 443,
) -> str:
    """The policy text of ``domain``; raises :class:`FetchError` (callers bound the time)."""
    host = f"mta-sts.{domain}"
    addresses = await _addresses(resolver, host)
    if not addresses:
        raise FetchError(f"{host} has no address")
    last: FetchError | None = None
    for address in addresses:
        try:
            return await _get(address, port, host, context)
        except _ConnectError as exc:
            last = exc
    assert last is not None
    raise last


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    found: list[str] = []
    for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise FetchError(f"DNS lookup of {host} failed: {exc}") from None
        found += [r.to_text() for r in answer]
    return found


async def _get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    try:
        reader, writer = await asyncio.open_connection(
            address, port, ssl=context, server_hostname=host
        )
    except ssl.SSLCertVerificationError as exc:
        raise FetchError(f"certificate of {host}: {exc.verify_message}", WEBPKI_INVALID) from None
    except (OSError, ssl.SSLError) as exc:
        raise _ConnectError(f"connect to {host} ({address}:{port}) failed: {exc}") from None
    try:
        request = (
            f"GET {WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tlsrelay\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        body = await _response(reader, host)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise FetchError(f"reading https://{host}{WELL_KNOWN} failed: {exc}") from None
    finally:
        await _close(writer)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"policy of {host} is not UTF-8 text", POLICY_INVALID) from None


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the connection and wait (briefly) until its socket is closed: TLS sends its
    close_notify first, and a loop that ends before that leaves the socket open behind it."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)


async def _response(reader: asyncio.StreamReader, host: str) -> bytes:
    """Status 200 and ``text/plain`` (§3.3: redirects are not followed), then the body."""
    status = (await reader.readline()).decode("latin-1").split()
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        code = status[1] if len(status) > 1 else "no status line"
        raise FetchError(f"https://{host}{WELL_KNOWN} answered {code} (only 200 is accepted)")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = (await reader.readline()).decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise FetchError(f"https://{host}{WELL_KNOWN}: too many header lines")
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise FetchError(
            f"policy of {host} is {media or 'untyped'}, not text/plain", POLICY_INVALID
        )
    return await _body(reader, headers, host)


async def _body(reader: asyncio.StreamReader, headers: dict[str, str], host: str) -> bytes:
    too_big = FetchError(f"policy of {host} is larger than {MAX_BODY} bytes", POLICY_INVALID)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            if len(body) + size > MAX_BODY:
                raise too_big
            body += await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
        return body
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY:
            raise too_big
        return await reader.readexactly(length)
    body = await reader.read(MAX_BODY + 1)
    while len(body) <= MAX_BODY and (more := await reader.read(MAX_BODY + 1 - len(body))):
        body += more
    if len(body) > MAX_BODY:
        raise too_big
    return body


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Lookup:
    """What :meth:`PolicyCache.lookup` found: the policy to apply (None: none), where it came
    from, and a failure to report (the policy may still be a cached one, §5.1)."""

    policy: Policy | None
    source: str  # "cache" | "fetched" | "dns" (looked up, no policy) | "kept" (refresh failed)
    error: str | None = None
    error_type: str | None = None  # RFC 8460 result type of the failure


@dataclass(frozen=True)
class _Entry:
    policy: Policy | None
    check_after: float

    def fresh(self, now: float) -> bool:
        expired = self.policy is not None and now >= self.policy.expires_at
        return now < self.check_after and not expired

    def unexpired_policy(self, now: float) -> Policy | None:
        return self.policy if self.policy is not None and now < self.policy.expires_at else None


class CacheStore(Protocol):
    """The Redis commands :class:`PolicyCache` uses (``redis.Redis`` has them): another command
    fails type-checking, not at run time in ``tlsrelay check``'s in-memory stand-in."""

    def get(self, name: str, /) -> Any: ...
    def set(self, name: str, value: str, /, ex: int | None = None) -> Any: ...


@dataclass
class PolicyCache:
    """Policies in Redis under ``tlsrelay:mtasts:<domain>`` (JSON), shared by every worker."""

    client: CacheStore
    resolver: dns.asyncresolver.Resolver
    ca_file: str | None = None
    port: int = 443
    timeout: float = 10.0
    _context: ssl.SSLContext | None = field(default=None, repr=False)

    async def lookup(self, domain: str, now: float | None = None) -> Lookup:
        """The policy for ``domain``: one Redis GET while the cached answer is fresh."""
        now = time.time() if now is None else now
        entry = self._read(domain)
        if entry is not None and entry.fresh(now):
            return Lookup(entry.policy, "cache")
        cached = entry.unexpired_policy(now) if entry is not None else None
        try:
            return await asyncio.wait_for(self._refresh(domain, cached, now), self.timeout)
        except TimeoutError:
            error = f"MTA-STS lookup for {domain} took longer than {self.timeout:g}s"
            return self._failed(domain, cached, now, FetchError(error))

    async def _refresh(self, domain: str, cached: Policy | None, now: float) -> Lookup:
        try:
            sts_id, ttl = await self._txt(domain)
        except FetchError as exc:
            return self._failed(domain, cached, now, exc)
        recheck = min(max(ttl, RECHECK_MIN), RECHECK_MAX)
        if sts_id is None:  # no (valid) record: a cached policy stays until it expires (§5.1)
            self._write(domain, _Entry(cached, now + (recheck if cached else NEGATIVE_TTL)), now)
            return Lookup(cached, "kept" if cached else "dns")
        if cached is not None and cached.id == sts_id:
            self._write(domain, _Entry(cached, now + recheck), now)
            return Lookup(cached, "cache")
        try:
            text = await fetch_policy(domain, self.resolver, self.context, self.port)
            policy = parse_policy(text, sts_id, now)
        except PolicyError as exc:
            return self._failed(domain, cached, now, FetchError(str(exc), POLICY_INVALID))
        except FetchError as exc:
            return self._failed(domain, cached, now, exc)
        self._write(domain, _Entry(policy, now + recheck), now)
        return Lookup(policy, "fetched")

    def _failed(self, domain: str, cached: Policy | None, now: float, exc: FetchError) -> Lookup:
        """§5.1: keep an unexpired cached policy; look again after FAILURE_RETRY either way."""
        self._write(domain, _Entry(cached, now + FAILURE_RETRY), now)
        return Lookup(cached, "kept" if cached else "dns", str(exc), exc.result_type)

    async def _txt(self, domain: str) -> tuple[str | None, float]:
        """The policy id in ``_mta-sts.<domain>`` (None: no valid record) and the record's TTL."""
        name = f"_mta-sts.{domain}"
        try:
            answer = await self.resolver.resolve(name, dns.rdatatype.TXT, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None, NEGATIVE_TTL
        except dns.exception.DNSException as exc:
            raise FetchError(f"DNS lookup of {name}/TXT failed: {exc}") from None
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else RECHECK_MIN
        return parse_txt(texts), ttl

    @property
    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = https_context(self.ca_file)
        return self._context

    def _read(self, domain: str) -> _Entry | None:
        raw: bytes | None = self.client.get(KEY_PREFIX + domain)
        if raw is None:
            return None
        doc = json.loads(raw)
        policy = Policy.from_json(doc["policy"]) if doc.get("policy") else None
        return _Entry(policy, float(doc["check_after"]))

    def _write(self, domain: str, entry: _Entry, now: float) -> None:
        until = max(entry.check_after, entry.policy.expires_at if entry.policy else 0.0)
        doc = {"policy": entry.policy.to_json() if entry.policy else None,
               "check_after": entry.check_after}  # fmt: skip
        ttl = max(1, math.ceil(until - now))
        self.client.set(KEY_PREFIX + domain, json.dumps(doc), ex=ttl)
