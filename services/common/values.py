"""Values of the configuration language and of the documents that cross Redis: endpoints,
durations, rates and routes, each with the parser that reads its text form.

Depends on the standard library only, so every floor may use it. Each ``parse_*`` takes what a
YAML or JSON document holds (or an already parsed value, returned as it is) and raises
``ValueError`` with an operator-facing text (``expected host:port, got '2525'``); the
configuration loader (``services/common/config.py``) adds the file, key and line.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


def is_hostname(text: str) -> bool:
    """Whether ``text`` is a syntactically valid host or domain name (RFC 1123 labels, ``_``)."""
    return bool(_HOSTNAME.match(text))


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def ip_address(text: str) -> IpAddress | None:
    """``text`` as an IP address, None when it is not one. Cached: a client's address is
    looked at several times per message (the relay check, the tenant, the trace field)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    return ip_address(text) is not None  # cached: a route's host is looked at per message


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True, order=True)
class HostPort:
    """A network endpoint. ``str()`` gives the canonical form (IPv6 in brackets); documents
    (``Decision.route`` in Redis) store that text and parse it back to an equal value."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        return _is_ip(self.host)


def parse_hostport(value: object, default_port: int | None = None) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` (or a bare host when ``default_port`` is given)."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected host:port, got {value!r}")
    text = value.strip()
    host, port_text = text, ""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m:
        host, port_text = m.group(1), m.group(2) or ""
        ipaddress.IPv6Address(host)  # ValueError names the problem
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets, as [::1]:2525; got {value!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"expected host:port, got {value!r}")
        port_text = str(default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_text!r} in {value!r}")
    if not m and not _is_ip(host) and not _HOSTNAME.match(host):
        raise ValueError(f"not a valid host name or address: {host!r}")
    return HostPort(host, int(port_text))


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """Where to connect instead of MX (a transport route, a rule's route, a tenant's hop) and,
    optionally, the name its certificate must carry."""

    address: HostPort
    tls_name: str | None = None

    def __str__(self) -> str:
        return f"{self.address} (tls_name {self.tls_name})" if self.tls_name else str(self.address)


def parse_route(value: object) -> Route:
    """``"host:port"`` or ``{address: "host:port", tls_name: "mx.example.org"}``."""
    if isinstance(value, Route):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"address", "tls_name"}
        if unknown or "address" not in value:
            raise ValueError("a route is 'host:port' or {address: 'host:port', tls_name: NAME}")
        name = value.get("tls_name")
        if name is not None and (not isinstance(name, str) or not _HOSTNAME.match(name)):
            raise ValueError(f"tls_name must be a host name, got {name!r}")
        return Route(parse_hostport(value["address"]), name)
    return Route(parse_hostport(value))


# --------------------------------------------------------------------------- durations and rates

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """``30s``, ``5m``, ``4h``, ``5d``, ``250ms`` or a plain number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 4h, 5d; got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration such as 30s, 5m, 4h, 5d; got {value!r}")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for messages: ``432000`` → ``5d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


@dataclass(frozen=True)
class RateLimit:
    count: int
    window: float  # seconds

    def __str__(self) -> str:
        return f"{self.count}/{format_duration(self.window)}"


def parse_rate(value: object) -> RateLimit:
    """``600/m``, ``10/s``, ``5000/h`` or ``100/30s``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*\s*(?:s|m|h|d))\s*", str(value))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"expected a rate such as 600/m, got {value!r}")
    window = m.group(2).strip()
    return RateLimit(
        int(m.group(1)), parse_duration(window if window[0].isdigit() else "1" + window)
    )


def compile_regex(value: object) -> re.Pattern[str]:
    """A configuration value as a compiled regular expression (a rule's match, a back-off
    pattern); ValueError naming the pattern and what is wrong with it."""
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression (a string), got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regex '{value}': {exc}") from None
