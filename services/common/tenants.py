"""The tenant directory: which customer organisation owns a domain, a network or a login, and
where mail for a tenant goes (its mailbox in this region, else its region's relay endpoint).

Built once from the validated :class:`~services.common.config.Config` (one domain belongs to at
most one tenant — the config loader refuses anything else); every lookup is a pure dictionary or
network match. ``authenticate`` is the only expensive call (scrypt): run it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common import passwords
from services.common.config import Config, TenantConfig
from services.common.values import Route, ip_address

PLATFORM_PROFILE = "platform"  # Decision.tls_profile: verify with the platform CA, present ours


@dataclass(frozen=True)
class Endpoint:
    """Where to deliver a tenant's mail from this region, and the name its certificate carries."""

    route: Route
    hop: str  # "mailbox" (same region) or "region:<name>" (another region's relay endpoint)


class Directory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tenants: dict[str, TenantConfig] = dict(config.tenants)
        self._by_domain = {d: name for name, t in self.tenants.items() for d in t.domains}

    def __bool__(self) -> bool:
        return bool(self.tenants)

    def tenant_of_domain(self, domain: str) -> str | None:
        return self._by_domain.get(domain.lower().rstrip("."))

    def tenant_of_address(self, address: str) -> str | None:
        """The tenant whose ``networks`` contain the client address (relay without AUTH)."""
        ip = ip_address(address)
        if ip is None:
            return None
        for name, tenant in self.tenants.items():
            if any(ip in network for network in tenant.networks):
                return name
        return None

    def is_local(self, tenant: str) -> bool:
        return self.tenants[tenant].region == self.config.region

    def endpoint(self, tenant: str) -> Endpoint:
        """Same region: the tenant's mailbox. Other region: that region's relay endpoint."""
        config = self.tenants[tenant]
        if self.is_local(tenant):
            return Endpoint(config.mailbox, "mailbox")
        region = str(config.region)
        remote = self.config.regions[region]
        return Endpoint(Route(remote.relay, remote.tls_name or region), f"region:{region}")

    def login(self, username: str) -> tuple[str, str] | None:
        """``user@domain`` (a domain of the tenant) → (tenant, user), when such a user exists."""
        user, _, domain = username.rpartition("@")
        tenant = self.tenant_of_domain(domain) if user else None
        if tenant is None or user not in self.tenants[tenant].users:
            return None
        return tenant, user

    def authenticate(self, username: str, password: str) -> str | None:
        """The tenant of a valid login, else None. Constant work whether or not the user exists."""
        found = self.login(username)
        stored = self.tenants[found[0]].users[found[1]] if found else None
        ok = passwords.verify(password, stored)
        return found[0] if ok and found else None

    def owns_sender(self, tenant: str, sender: str) -> bool:
        """Whether ``sender`` (a MAIL FROM address) uses one of the tenant's domains."""
        return self.tenant_of_domain(sender.rpartition("@")[2]) == tenant
