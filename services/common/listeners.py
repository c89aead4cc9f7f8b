"""Where this relay's ingest listens: the listeners a configuration runs and their addresses.

One place for the list, read by ingest (which binds them), by ``tlsrelay run`` (which checks
they can be bound) and by delivery (which must never hand mail back to one of them:
:mod:`services.deliver.loops`). Pure functions of the validated configuration; no I/O.
"""

from __future__ import annotations

import enum

from services.common.config import Config
from services.common.values import HostPort

__all__ = ["Listener", "listener_addresses", "listener_key"]


class Listener(enum.StrEnum):
    """The role of a listening socket; the value is what ``Envelope.listener`` records."""

    LISTEN = "listen"
    SUBMISSION = "submission"
    RELAY = "relay"


def listener_addresses(config: Config) -> dict[Listener, HostPort]:
    """The listeners this configuration runs and where they bind, ``listen`` first.

    ``submission`` only when ``ingest.submission`` is set. ``relay`` binds ``ingest.relay``, or
    when that is absent this region's entry in ``regions`` (its ``relay`` address), else none.
    """
    ingest = config.ingest
    addresses = {Listener.LISTEN: ingest.listen}
    if ingest.submission is not None:
        addresses[Listener.SUBMISSION] = ingest.submission
    own_region = config.regions.get(config.region)
    relay = ingest.relay or (own_region.relay if own_region is not None else None)
    if relay is not None:
        addresses[Listener.RELAY] = relay
    return addresses


def listener_key(config: Config, listener: Listener) -> str:
    """The configuration key that sets where ``listener`` binds (for messages)."""
    if listener is Listener.RELAY and config.ingest.relay is None:
        return f"regions.{config.region}.relay"
    return f"ingest.{listener.value}"
