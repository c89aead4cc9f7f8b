"""The configuration's field types and the base of its sections (services/common/config.py and
services/common/deliveryconfig.py build their sections from them).

Types are strict where YAML's type matters: an integer, a boolean is never read from a string
(``concurrency: "4"`` is an error), nor a string from a number; durations take ``30s`` or plain
seconds, as documented. A section forbids unknown keys and is frozen once read.

Failure: a value that does not parse raises ``ValueError`` inside pydantic's validation, which
:func:`services.common.config.load_config` words with the file, line and key.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from services.common.values import (
    HostPort,
    RateLimit,
    Route,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_route,
)

# --------------------------------------------------------------------------- value types
# The values and their parsers are in services/common/values.py; here they become field types.

HostPortT = Annotated[HostPort, BeforeValidator(parse_hostport)]
RouteT = Annotated[Route, BeforeValidator(parse_route)]
DnsServerT = Annotated[HostPort, BeforeValidator(lambda v: parse_hostport(v, default_port=53))]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _on_off(value: object) -> object:
    """A YAML boolean (``on``/``off`` unquoted are booleans in YAML 1.1), or ``"on"``/``"off"``."""
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    if not isinstance(value, bool):
        got = f'a string "{value}"' if isinstance(value, str) else repr(value)
        raise ValueError(f"expected on or off, got {got}")
    return value


OnOff = Annotated[bool, BeforeValidator(_on_off)]
RateLimitT = Annotated[RateLimit, BeforeValidator(parse_rate)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
