"""Who may send what through which listener: pure decisions over the tenant directory.

The ingest service runs up to three listeners
(:class:`~services.common.listeners.Listener`), each with its own rules:

- ``listen`` (port 25's role) takes mail *to* a tenant domain from anyone; mail to any other
  domain only from ``ingest.relay_networks`` or from a tenant's ``networks`` (that tenant is then
  the sending tenant). No AUTH.
- ``submission`` (port 587's role): every message needs AUTH (offered only after STARTTLS); the
  authenticated tenant is the sending tenant, may use only its own domains in MAIL FROM and may
  send to any domain.
- ``relay`` (the inter-region endpoint): STARTTLS with a client certificate of the platform CA;
  takes mail only for tenants of this region (``config.region``).

Inputs: the validated :class:`~services.common.config.Config` (through the
:class:`~services.common.tenants.Directory`), the client's IP address as text and, for
submission, the authenticated tenant. No I/O and no exceptions: an unparsable client address
matches no network. The Redis-backed limits are in :mod:`services.ingest.limits`.
"""

from __future__ import annotations

from services.common.config import Config
from services.common.listeners import Listener
from services.common.model import domain_of
from services.common.tenants import Directory
from services.common.values import ip_address


def in_networks(config: Config, client_address: str) -> bool:
    """Whether the client is in ``ingest.relay_networks`` (may relay without AUTH)."""
    address = ip_address(client_address)
    if address is None:
        return False
    return any(address in network for network in config.ingest.relay_networks)


def may_relay(
    listener: Listener,
    directory: Directory,
    client_address: str,
    authenticated: bool,
    rcpt: str,
) -> bool:
    """Whether this client may send to ``rcpt`` on ``listener`` (else ``554 5.7.1``)."""
    tenant = directory.tenant_of_domain(domain_of(rcpt))
    if listener is Listener.RELAY:
        return tenant is not None and directory.is_local(tenant)
    if listener is Listener.SUBMISSION:
        return authenticated
    return (
        tenant is not None
        or in_networks(directory.config, client_address)
        or directory.tenant_of_address(client_address) is not None
    )


def sending_tenant(
    listener: Listener, directory: Directory, client_address: str, auth_tenant: str | None
) -> str | None:
    """The tenant a message is sent for (its rate limit applies): authenticated, or by network."""
    if listener is Listener.SUBMISSION:
        return auth_tenant
    if listener is Listener.LISTEN:
        return directory.tenant_of_address(client_address)
    return None  # relay: another region of the platform, already counted where it was sent


def may_send_as(
    listener: Listener, directory: Directory, auth_tenant: str | None, sender: str
) -> bool:
    """Whether MAIL FROM ``sender`` is allowed: on submission, only the tenant's own domains."""
    if listener is not Listener.SUBMISSION:
        return True
    return auth_tenant is not None and directory.owns_sender(auth_tenant, sender)
