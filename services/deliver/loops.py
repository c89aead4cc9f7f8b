"""Mail that would come straight back: a next hop that is one of this relay's own listeners.

Postfix says "mail for DOMAIN loops back to myself" when the best MX is the local machine. Here
the hosts of a round (routes, MX, implicit MX), in order, are cut at the first address that is
one of our ingest listeners (``ingest.listen``, ``ingest.submission``, ``ingest.relay`` or this
region's relay endpoint): a listener bound to ``0.0.0.0`` matches every local IPv4 address, one
bound to ``::`` every local address. When nothing is left, the round bounces ``5.4.6`` without
connecting (:func:`loop_reply`). A local address is one this process can bind to.

Failure: none raised; a listener name that does not resolve matches nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from services.common import listeners
from services.common.config import Config
from services.common.model import Reply
from services.common.values import HostPort

WILDCARDS_V4, WILDCARDS_V6 = ("0.0.0.0", ""), ("::",)


def own_listeners(config: Config) -> tuple[HostPort, ...]:
    """Where this relay's ingest listens (the same addresses ingest binds)."""
    return tuple(listeners.listener_addresses(config).values())


def is_myself(address: str, port: int, listeners: tuple[HostPort, ...]) -> bool:
    """Whether ``address:port`` reaches one of ``listeners``."""
    for listener in listeners:
        if listener.port != port:
            continue
        host = listener.host.strip("[]")
        if host in WILDCARDS_V6 or (host in WILDCARDS_V4 and ":" not in address):
            if is_local(address):
                return True
        elif address in _addresses(host):
            return True
    return False


def loop_reply(domain: str) -> Reply:
    return Reply(554, "5.4.6", f"mail for {domain} loops back to myself")


@functools.lru_cache(maxsize=256)
def is_local(address: str) -> bool:
    """Whether ``address`` is one of this machine's (it can be bound)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


@functools.lru_cache(maxsize=64)
def _addresses(host: str) -> frozenset[str]:
    try:
        ipaddress.ip_address(host)
        return frozenset({host})
    except ValueError:
        pass
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()
