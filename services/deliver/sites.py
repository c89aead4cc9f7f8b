"""Destination sites: which site a delivery round goes to, its limits, and the list of sites
seen (read by ``tlsrelay queue sites`` and the site gauges).

A **site** is where connections go (:func:`site_of`): a route's address, or the set of MX hosts
a domain resolves to (domains sharing their MX hosts share one site, KumoMTA's "MX rollup"). A
site named in ``delivery.shaping.sites`` (an MX host glob, a domain or a route's ``host:port``
matching one of its ``match`` entries) has that name and its own limits; every other site has
``delivery.shaping.default``'s and is labelled ``default`` in metrics. Traffic shaping
(:mod:`services.deliver.shaping`) holds each site to its limits.

Inputs: the configuration, a round's domain and the (host, port, source) of its plan's
destinations. Failure: finding a site is pure and does not fail; :func:`prune_sites` lets a
Redis error propagate (the scheduler's housekeeping logs it and goes on).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from services.common import spool
from services.common.config import Config
from services.common.deliveryconfig import DEFAULT_SITE, SiteLimits


@dataclass(frozen=True)
class Site:
    """One destination site: its Redis id, its metrics label and its limits."""

    id: str  # a configured site's name, else "mx:<hash of the MX hosts>" or "route:<host:port>"
    label: str  # the configured name, or "default"
    limits: SiteLimits
    hosts: tuple[str, ...] = ()  # what it stands for (MX hosts or the route), for operators

    def document(self) -> str:
        return json.dumps({"label": self.label, "hosts": list(self.hosts), "seen": time.time()})


def site_of(config: Config, domain: str, hosts: Iterable[tuple[str, int, str]]) -> Site:
    """The site of a round: ``hosts`` are (host name, port, source) of the plan's destinations,
    ``source`` as :class:`services.deliver.mx.Destination`'s ("route", "mx", "implicit")."""
    hosts = list(dict.fromkeys((h.lower().rstrip("."), p, s) for h, p, s in hosts))
    routes = [f"{h}:{p}" for h, p, s in hosts if s == "route"]
    names = sorted({h for h, _, s in hosts if s != "route"})
    shaping = config.delivery.shaping
    for site in shaping.sites:
        if _matches(site.match, domain.lower(), names, routes):
            return Site(site.name, site.name, site.limits(shaping.default), tuple(routes or names))
    if routes:
        return Site(f"route:{routes[0]}", DEFAULT_SITE, shaping.default, (routes[0],))
    digest = hashlib.sha1(" ".join(names or [domain.lower()]).encode()).hexdigest()[:16]
    return Site(f"mx:{digest}", DEFAULT_SITE, shaping.default, tuple(names or [domain.lower()]))


def limits_of(config: Config, site_id: str) -> SiteLimits:
    """The limits of the site ``site_id`` (a configured site's name, else the default's)."""
    shaping = config.delivery.shaping
    own = next((s for s in shaping.sites if s.name == site_id), None)
    return own.limits(shaping.default) if own is not None else shaping.default


SITE_MEMORY = 86400.0  # a site unseen this long, with no lease, leaves the list of sites seen


def prune_sites(client: redis.Redis, now: float) -> int:
    """Forget the sites not seen for :data:`SITE_MEMORY` that hold no lease (the list of sites
    seen feeds ``tlsrelay queue sites`` and the site gauges); return how many. Run with the
    deliver scheduler's housekeeping."""
    raw: dict[bytes, bytes] = client.hgetall(spool.SHAPING_SITES)  # type: ignore[assignment]
    old = [k.decode() for k, v in raw.items() if json.loads(v).get("seen", 0) < now - SITE_MEMORY]
    gone = [s for s in old if not client.zcount(spool.site_key("leases", s), now, "+inf")]
    return int(client.hdel(spool.SHAPING_SITES, *gone)) if gone else 0


def _matches(patterns: Sequence[str], domain: str, names: list[str], routes: list[str]) -> bool:
    for pattern in patterns:
        candidates = routes if ":" in pattern else [*names, domain]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            return True
    return False
