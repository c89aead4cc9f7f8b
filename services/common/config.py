"""Configuration: parsed and validated once, at start-up, then read many times.

Input: a YAML file (``--config FILE`` or ``$TLSRELAY_CONFIG``); ``$TLSRELAY_REDIS_URL`` overrides
``redis_url``. Every key is optional and has a documented default (README, "Configuration").

Types are strict where YAML's type matters: an integer, a boolean is never read from a string
(``concurrency: "4"`` is an error), nor a string from a number; durations take ``30s`` or plain
seconds, as documented.

Failure: any problem (YAML syntax, unknown key, wrong type, bad ``host:port``, missing certificate
file, duplicate key or rule name) raises :class:`ConfigError` whose text names the file, the line
and the dotted key, e.g. ``tlsrelay.yaml:7: ingest.listen: expected host:port, got '2525'`` —
every problem of the file, one per line, in line order (services/common/configerrors.py words
them). Cross-checks that need a valid file (tenants' regions and domains, files that must exist,
metrics vs listeners) are reported once the rest is valid. The CLI prints it and exits 2 before
anything listens. Relative paths in the file are resolved against the directory
of the config file, so a config works from any working directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from services.common.configerrors import ConfigError as ConfigError
from services.common.configerrors import Problems
from services.common.model import TlsMode
from services.common.rules import Rules
from services.common.values import (
    HostPort,
    RateLimit,
    Route,
    compile_regex,
    format_duration,
    is_hostname,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_route,
)

ENV_CONFIG = "TLSRELAY_CONFIG"
ENV_REDIS_URL = "TLSRELAY_REDIS_URL"


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


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _parse_networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of networks such as [127.0.0.0/8, '::1/128']")
    return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)


TlsProfileName = Literal["permissive", "intermediate", "modern"]


class TlsProfiles(_Section):
    """Inbound TLS profile per listener (services/ingest/tlsprofile.py): RFC 7435's widest set
    on port 25, Mozilla "intermediate" for submission, TLS 1.3 between our own regions."""

    listen: TlsProfileName = "permissive"
    submission: TlsProfileName = "intermediate"
    relay: TlsProfileName = "modern"


class IngestConfig(_Section):
    """The SMTP listener (services/ingest)."""

    listen: HostPortT = HostPort("127.0.0.1", 2525)
    # Submission (port 587's role): STARTTLS, then AUTH; absent → not offered.
    submission: HostPortT | None = None
    # The inter-region endpoint (mutual TLS with the platform CA); absent → regions[region].relay
    # when this region is listed there, else not offered.
    relay: HostPortT | None = None
    auth_failure_limit: StrictInt = Field(default=5, gt=0)  # failed AUTHs per client address ...
    auth_failure_window: Duration = 300.0  # ... in this window, then 421 4.7.0 until it passes
    # On SIGTERM: stop accepting, close idle sessions (421 4.3.2), let transactions in progress
    # finish this long, then answer 421 to them.
    drain_grace: Duration = 30.0
    tls_cert: Path | None = None  # absent → self-signed, generated into data_dir
    tls_key: Path | None = None
    tls_profiles: TlsProfiles = TlsProfiles()
    max_message_bytes: StrictInt = Field(default=36_700_160, gt=0)  # SIZE (RFC 1870)
    max_recipients: StrictInt = Field(default=1000, gt=0)  # RFC 5321 §4.5.3.1.8: at least 100
    # Hostile-client limits (services/ingest/server.py). Open sessions per listener, beyond which
    # a new connection is answered 421 4.7.0 and closed.
    max_connections: StrictInt = Field(default=1000, gt=0)
    # RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes for the next command (and for
    # each line of DATA); then 421 4.4.2 and the connection is closed.
    command_timeout: Duration = Field(default=300.0, gt=0)
    max_bad_commands: StrictInt = Field(default=10, gt=0)  # 5xx syntax replies, then 421, close
    max_header_bytes: StrictInt = Field(default=1_048_576, gt=0)  # header section; above: 552 5.3.4
    # RFC 5321 §6.3: more Received: fields than this in a message is a loop: 554 5.4.6.
    max_hops: StrictInt = Field(default=50, gt=0)
    # Group commit (commit.Committer): while messages arrive more often than once per window,
    # those finishing DATA within it share one Redis transaction and one policy task (the 250
    # waits for it); slower, each is written at once. 0 = only those finished in the same
    # event-loop turn. At most batch_max messages per commit.
    batch_window: Duration = Field(default=0.02, ge=0, le=1)
    batch_max: StrictInt = Field(default=100, gt=0)
    relay_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    @field_validator("relay_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> tuple[Network, ...]:
        return _parse_networks(value)

    @model_validator(mode="after")
    def _cert_pair(self) -> IngestConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


class PlatformTls(_Section):
    """The platform's own CA and this region's certificate (intra-platform mutual TLS)."""

    ca: Path
    cert: Path
    key: Path


class RegionConfig(_Section):
    """Another data centre of the platform, reached at its inter-region endpoint."""

    relay: HostPortT
    tls_name: str | None = None  # the name on that endpoint's certificate; default: region name


RateLimitT = Annotated[RateLimit, BeforeValidator(parse_rate)]


class TenantConfig(_Section):
    """A customer organisation of the platform."""

    region: str | None = None  # default: this deployment's region
    domains: tuple[str, ...] = Field(min_length=1)
    mailbox: RouteT  # where mail for its domains is finally delivered (verified, platform CA)
    users: dict[str, str] = Field(default_factory=dict)  # submission logins → passwd hashes
    networks: tuple[Network, ...] = ()  # hosts that may relay without AUTH
    rate_limit: RateLimitT | None = None  # messages per window; over it → 451 4.7.0

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for domain in value:
            if not is_hostname(domain):
                raise ValueError(f"not a domain: {domain!r}")
        return tuple(d.lower().rstrip(".") for d in value)

    @field_validator("users")
    @classmethod
    def _users(cls, value: dict[str, str]) -> dict[str, str]:
        from services.common.passwords import check_format

        for user, stored in value.items():
            if not re.fullmatch(r"[A-Za-z0-9._+-]+", user):
                raise ValueError(f"user name {user!r}: letters, digits and . _ + - only")
            try:
                check_format(stored)
            except ValueError as exc:
                raise ValueError(f"user {user}: {exc}") from None
        return value

    @field_validator("networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> tuple[Network, ...]:
        return _parse_networks(value)


class PolicyConfig(_Section):
    """The classification workers (services/policy)."""

    concurrency: StrictInt = Field(default=2, gt=0)  # Celery worker processes
    # Body rules scan at most this many bytes of decoded text per message.
    body_scan_bytes: StrictInt = Field(default=1_048_576, gt=0)


RegexT = Annotated[re.Pattern[str], BeforeValidator(compile_regex)]
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_SITE = "default"  # the label of every site without an entry of its own


class SiteLimits(_Section):
    """Traffic shaping limits of one site (services/deliver/shaping.py): across every worker
    process and pod, through Redis."""

    connections: StrictInt = Field(default=20, gt=0)  # concurrent SMTP sessions to the site
    connection_rate: RateLimitT | None = None  # new connections per window (None: unlimited)
    rate: RateLimitT | None = None  # messages per window (None: unlimited)
    messages_per_connection: StrictInt = Field(default=100, gt=0)  # then a new session


class SiteConfig(_Section):
    """A named site: the MX hosts (globs), destination domains or route addresses (host:port)
    it covers, and the limits that differ from ``shaping.default``."""

    name: str
    match: tuple[str, ...] = Field(min_length=1)
    connections: StrictInt | None = Field(default=None, gt=0)
    connection_rate: RateLimitT | None = None
    rate: RateLimitT | None = None
    messages_per_connection: StrictInt | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SITE_NAME.match(value) or len(value) > 64:
            raise ValueError(f"site name {value!r}: letters, digits and . _ - only (at most 64)")
        if value.lower() == DEFAULT_SITE:
            raise ValueError("'default' is the name of every site without an entry")
        return value

    @field_validator("match", mode="before")
    @classmethod
    def _match(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        for item in items:
            if not isinstance(item, str) or not item.strip() or any(c.isspace() for c in item):
                raise ValueError(f"expected MX host globs, domains or host:port, got {item!r}")
        return tuple(str(i).lower().rstrip(".") for i in items)

    def limits(self, default: SiteLimits) -> SiteLimits:
        """The site's limits: its own where it sets them, else ``default``'s."""
        own = {k: v for k, v in self.model_dump().items() if k in SiteLimits.model_fields}
        given = {k: getattr(self, k) for k, v in own.items() if v is not None}
        return default.model_copy(update=given)


class ShapingConfig(_Section):
    """``delivery.shaping``: the limits of every site (``default``) and named sites."""

    default: SiteLimits = SiteLimits()
    sites: tuple[SiteConfig, ...] = ()


DEFAULT_BACKOFF_REPLIES = (
    r"^421 ",
    r"\b4\.7\.(0|28)\b",
    r"(?i)too many connections",
    r"(?i)rate limit",
)


class BackoffConfig(_Section):
    """``delivery.backoff``: a destination's reply line (greeting, MAIL, RCPT) matching one of
    ``replies`` lowers its site's connection limit by ``factor`` for every worker (at least 1);
    it recovers one step per ``recover_after``."""

    replies: tuple[RegexT, ...] = tuple(re.compile(r) for r in DEFAULT_BACKOFF_REPLIES)
    factor: float = Field(default=0.5, gt=0, lt=1)
    recover_after: Duration = Field(default=300.0, gt=0)

    @field_validator("factor", mode="before")
    @classmethod
    def _factor(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value  # pydantic words the type error
        return float(value)


class DeliveryConfig(_Section):
    """The delivery workers (services/deliver)."""

    routes: dict[str, RouteT] = Field(default_factory=dict)  # transport map, before DNS
    default_tls: TlsMode = TlsMode.OPPORTUNISTIC  # when no matching rule sets a mode
    ca_file: Path | None = None  # CA bundle for `verified` (absent → the system CAs)
    dns_servers: tuple[DnsServerT, ...] = ()  # empty → the system resolver (/etc/resolv.conf)
    mx_port: StrictInt = Field(default=25, gt=0, lt=65536)
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0  # RFC 5321 §4.5.3.2: 5 minutes for most replies
    greeting_timeout: Duration = 300.0  # RFC 5321 §4.5.3.2.1: the 220 greeting, 5 minutes
    data_timeout: Duration = 600.0  # RFC 5321 §4.5.3.2.6: the reply to the final dot, 10 min
    # One job's round (DNS, MTA-STS, every host in turn) is abandoned after this and deferred
    # (the retry schedule and queue lifetime apply). A deliver task starts no new job after a
    # tenth of it and hands the rest back (task_window, task_budget below);
    # celery.visibility_timeout must be at least twice this long.
    job_timeout: Duration = Field(default=600.0, gt=0)
    tls_broken_ttl: Duration = 3600.0  # how long a host with a failed handshake is skipped
    retry_schedule: tuple[Duration, ...] = (300.0, 600.0, 1200.0, 2400.0, 3600.0)
    # RFC 5321 §4.5.4.1: give up no sooner than 4-5 days; then bounce with a DSN.
    max_queue_lifetime: Duration = 5 * 86400.0
    delay_warning_after: Duration = 4 * 3600.0  # one "delayed" DSN to the sender; 0 = off
    scheduler_interval: Duration = 1.0  # how often deferred entries are checked for due ones
    # Connection reuse (per worker process, per destination and TLS profile): a session carries
    # at most this many transactions (1 = no reuse) and is kept idle at most this long.
    reuse_max_messages: StrictInt = Field(default=100, gt=0)
    reuse_idle_timeout: Duration = 30.0
    # RFC 2920: MAIL, every RCPT and DATA in one round trip where the server offers PIPELINING
    # (services/deliver/pipelining.py); off = one command at a time everywhere (Postfix's
    # smtp_discard_ehlo_keywords = pipelining), for a broken peer or a comparison.
    pipelining: OnOff = True
    # Jobs per deliver task (all for one destination domain, sent one after another over one
    # connection): fewer Celery hops per message. A destination that fails a job (no host
    # reachable, TLS unavailable) defers the rest of its batch without trying each.
    batch_max: StrictInt = Field(default=50, gt=0)
    # Deliveries one deliver process keeps in flight at once (services/deliver/batch.py: the
    # jobs of its task run in this many lanes, each over its own session), within the site's
    # connection limit (shaping). 5 × the default 4 processes = 20 sessions to a destination,
    # Postfix's default_destination_concurrency_limit. 1: one job after another.
    sessions_per_process: StrictInt = Field(default=5, gt=0, le=1000)
    # How often one deliver worker looks for queued work whose Celery task was lost (a worker
    # killed inside kombu's two-step take or restore) and queues it again: services/deliver/
    # rescue.py. Work is re-queued after two sweeps without a task, at least this far apart.
    rescue_interval: Duration = Field(default=30.0, gt=0)
    # Bounded work per delivery attempt (Postfix smtp_mx_address_limit / smtp_mx_session_limit):
    # at most this many addresses are tried, and at most this many SMTP sessions that reached a
    # greeting; 0 = no limit. A destination cannot hold a worker for every address × timeouts.
    mx_address_limit: StrictInt = Field(default=5, ge=0)
    mx_session_limit: StrictInt = Field(default=2, ge=0)
    concurrency: StrictInt = Field(default=4, gt=0)  # Celery worker processes
    # MTA-STS (RFC 8461, services/deliver/mtasts.py): look up and apply the destination domain's
    # policy at delivery time (never for routed mail). The policy is fetched over verified HTTPS
    # with mta_sts_ca_file (absent → the system CAs) from mta_sts_port (443; another port only
    # for tests and labs); the DNS lookup and fetch of one domain take at most mta_sts_timeout.
    mta_sts: OnOff = True  # on | off (YAML booleans; "on"/"off" quoted work too)
    mta_sts_ca_file: Path | None = None
    mta_sts_port: StrictInt = Field(default=443, gt=0, lt=65536)
    mta_sts_timeout: Duration = Field(default=10.0, gt=0)
    # DNSSEC (services/deliver/dane.py): "none" ignores it; "trust_resolver" counts answers of
    # dns_servers that carry the AD bit as validated (queries set DO). The operator vouches that
    # those servers validate and are reached over a trusted path (a local resolver), as Postfix's
    # smtp_dns_support_level = dnssec. A word, not a boolean: YAML reads a bare `off` as false.
    dnssec: Literal["none", "trust_resolver"] = "none"
    # DANE (RFC 7672) for MX deliveries, effective only with dnssec: trust_resolver: TLSA records
    # of DNSSEC-validated MX hosts make TLS mandatory and say which certificate to accept.
    dane: OnOff = True

    @property
    def dane_active(self) -> bool:
        """DANE is applied: ``dane: on`` and DNSSEC answers are trusted."""
        return self.dane and self.dnssec == "trust_resolver"

    # Traffic shaping per destination site (services/deliver/shaping.py): connections, rates,
    # sessions' messages; back-off on throttling replies. reuse_max_messages is an alias of
    # shaping.default.messages_per_connection (either may be given; both only when equal).
    shaping: ShapingConfig = ShapingConfig()
    backoff: BackoffConfig = BackoffConfig()

    @model_validator(mode="before")
    @classmethod
    def _messages_per_connection(cls, data: object) -> object:
        """``reuse_max_messages`` and ``shaping.default.messages_per_connection`` are one
        setting: the one given fills the other (both, differing: :func:`_check_alias`)."""
        if not isinstance(data, dict):
            return data
        shaping = data.get("shaping")
        default = shaping.get("default") if isinstance(shaping, dict) else None
        alias = default.get("messages_per_connection") if isinstance(default, dict) else None
        reuse = data.get("reuse_max_messages")
        if reuse is not None and alias is None and isinstance(shaping, dict | None):
            shaping = dict(shaping or {})
            shaping["default"] = {**(default or {}), "messages_per_connection": reuse}
            return {**data, "shaping": shaping}
        if alias is not None and reuse is None:
            return {**data, "reuse_max_messages": alias}
        return data

    @property
    def task_window(self) -> float:
        """A deliver task starts no new job after running this long (the rest is queued again
        as a new task): a tenth of ``job_timeout``."""
        return self.job_timeout / 10

    @property
    def claim_ttl(self) -> float:
        """How long a job's claim outlives its owner's last refresh (services/deliver/
        claims.py): 15 s, or half the job timeout when that is shorter."""
        return min(15.0, self.job_timeout / 2)

    @property
    def task_budget(self) -> float:
        """How long a deliver task may run: its start window, a wait for a job another worker
        held (at most its claim's TTL), then one job's round (plus a few Redis round trips) —
        1.1 × job_timeout + 15 s by default. Kept well below ``celery.visibility_timeout``, and
        below the deliver pods' ``terminationGracePeriodSeconds`` (a warm shutdown waits)."""
        return self.task_window + self.claim_ttl + self.job_timeout

    @field_validator("routes")
    @classmethod
    def _route_keys(cls, value: dict[str, Route]) -> dict[str, Route]:
        for key in value:
            bare = key[2:] if key.startswith("*.") else key
            if not bare or "*" in bare or not is_hostname(bare):
                raise ValueError(f"route key must be a domain or '*.suffix', got {key!r}")
        return {k.lower().rstrip("."): v for k, v in value.items()}

    @field_validator("default_tls", mode="before")
    @classmethod
    def _tls_mode(cls, value: object) -> TlsMode:
        return value if isinstance(value, TlsMode) else TlsMode.parse(str(value))

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("retry_schedule needs at least one step")
        return value


class PostureConfig(_Section):
    """What ``tlsrelay posture`` reads: deliveries per destination domain and day
    (services/deliver/posture.py)."""

    # Days a day's counts are kept after its last delivery (at most ten years).
    retention: StrictInt = Field(default=30, gt=0, le=3660)


class CeleryConfig(_Section):
    """Queue transport tuning shared by every worker."""

    # kombu's Redis transport hands an unacknowledged task to another worker after this long;
    # it must exceed the longest task: at least twice delivery.job_timeout (checked at load;
    # a deliver task ends within delivery.task_budget, at most 1.6 × job_timeout).
    visibility_timeout: Duration = 1800.0
    # Workers touch <data_dir>/heartbeat-<service> this often; `tlsrelay healthcheck` fails when
    # the file is older than heartbeat_max_age (Kubernetes liveness, independent of Redis).
    heartbeat_interval: Duration = 10.0
    heartbeat_max_age: Duration = 60.0
    # A worker that has received no task for this long while its queue has some exits (status
    # 3) so its supervisor starts a fresh one (see services/common/celeryapp.py, Watchdog).
    stall_after: Duration = 120.0


class MetricsConfig(_Section):
    """Where each service serves Prometheus ``/metrics`` over HTTP (``null`` → not served)."""

    ingest: HostPortT | None = HostPort("127.0.0.1", 9101)
    policy: HostPortT | None = HostPort("127.0.0.1", 9102)
    deliver: HostPortT | None = HostPort("127.0.0.1", 9103)

    @model_validator(mode="after")
    def _distinct(self) -> MetricsConfig:
        seen: dict[HostPort, str] = {}
        for service in ("ingest", "policy", "deliver"):
            address = getattr(self, service)
            if address is not None and address in seen:
                raise ValueError(f"{service} and {seen[address]} both on {address}")
            if address is not None:
                seen[address] = service
        return self


class Config(_Section):
    """The whole file. ``source`` is the path it was read from (None for built-in defaults)."""

    hostname: str = Field(default_factory=socket.getfqdn)
    redis_url: str | None = None  # absent → embedded server under data_dir, AOF on
    # The embedded server's AOF fsync policy: everysec (a machine crash may lose the last second
    # of accepted mail) or always (fsync before every reply: nothing lost, slower).
    redis_appendfsync: Literal["everysec", "always"] = "everysec"
    # Ingest answers 250 only once this many replicas acknowledged the commit (WAIT, at most
    # redis_replica_timeout; below the client's 10 s socket timeout), else 451 4.3.0.
    redis_min_replicas: StrictInt = Field(default=0, ge=0)
    redis_replica_timeout: Duration = Field(default=1.0, gt=0, le=5.0)
    data_dir: Path = Path("./var")
    trace_ttl: Duration = 7 * 86400.0  # how long a message's event log is kept after its last event
    ingest: IngestConfig = IngestConfig()
    policy: PolicyConfig = PolicyConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    celery: CeleryConfig = CeleryConfig()
    metrics: MetricsConfig = MetricsConfig()
    posture: PostureConfig = PostureConfig()
    # Special-handling rules (syntax and validation: services/common/rules.py).
    rules: Rules = ()
    region: str = "default"  # this deployment's region
    regions: dict[str, RegionConfig] = Field(default_factory=dict)
    platform_tls: PlatformTls | None = None
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not is_hostname(value):
            raise ValueError(f"not a valid host name: {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix|sentinel)://", value):
            raise ValueError(f"expected redis://, rediss://, unix:// or sentinel:// URL: {value!r}")
        return value


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and return the configuration; raise :class:`ConfigError` listing every
    problem of the file (in line order) when there is any."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    root: yaml.Node | None = None
    source = Path(path) if path is not None else None
    if source is not None:
        data, root = _read_yaml(source)
    problems = Problems(source, root)
    problems.add_duplicates()
    if os.environ.get(ENV_REDIS_URL):
        data["redis_url"] = os.environ[ENV_REDIS_URL]
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems.add_validation(exc)
        problems.check()
        raise  # not reached: a ValidationError always has errors
    config = _check_platform(_resolve_paths(config, source, problems), problems)
    _check_metrics(config, problems)
    _check_task_time(config, problems, root)
    _check_alias(config, problems, root)
    _check_sites(config, problems)
    problems.check()
    return config


def _read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    if data is None:
        return {}, root
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys")
    return data, root


# Settings that name files: checked to exist, made absolute (against the config file's directory).
FILE_KEYS = (
    ("ingest", "tls_cert"),
    ("ingest", "tls_key"),
    ("delivery", "ca_file"),
    ("delivery", "mta_sts_ca_file"),
    ("platform_tls", "ca"),
    ("platform_tls", "cert"),
    ("platform_tls", "key"),
)


def _resolve_paths(config: Config, source: Path | None, problems: Problems) -> Config:
    """Make relative paths absolute (against the config file's directory); check files exist."""
    base = source.parent.resolve() if source else Path.cwd()
    updates: dict[str, dict[str, Path]] = {}
    for section, key in FILE_KEYS:
        value = getattr(getattr(config, section), key, None)
        if value is None:
            continue
        path = value if value.is_absolute() else (base / value).resolve()
        if not path.is_file():
            problems.add((section, key), f"file not found: {path}")
        updates.setdefault(section, {})[key] = path
    copies: dict[str, Any] = {
        section: getattr(config, section).model_copy(update=fields)
        for section, fields in updates.items()
    }
    data_dir = config.data_dir if config.data_dir.is_absolute() else base / config.data_dir
    return config.model_copy(update={"data_dir": data_dir.resolve(), **copies})


def _check_platform(config: Config, problems: Problems) -> Config:
    """Cross-checks of tenants and regions; fills each tenant's region (default: ours)."""
    owner: dict[str, str] = {}
    tenants = {}
    for name, tenant in config.tenants.items():
        region = tenant.region or config.region
        if region != config.region and region not in config.regions:
            why = f"unknown region {region!r}: add it under 'regions' with its relay"
            problems.add(("tenants", name, "region"), why)
        for domain in tenant.domains:
            if domain in owner:
                why = f"domain {domain} already belongs to tenant {owner[domain]}"
                problems.add(("tenants", name, "domains"), why)
            owner[domain] = name
        tenants[name] = tenant.model_copy(update={"region": region})
    if tenants and config.platform_tls is None:
        why = "tenants need platform_tls (ca, cert, key): mail between them is verified TLS"
        problems.add(("tenants",), why)
    return config.model_copy(update={"tenants": tenants})


def _check_metrics(config: Config, problems: Problems) -> None:
    """A metrics endpoint must not be one of the SMTP listeners."""
    smtp = {config.ingest.listen, config.ingest.submission, config.ingest.relay} - {None}
    for service in ("ingest", "policy", "deliver"):
        address = getattr(config.metrics, service)
        if address in smtp:
            why = f"{address} is also an SMTP listener (ingest.*)"
            problems.add(("metrics", service), why)


VISIBILITY_MARGIN = 2.0  # celery.visibility_timeout ≥ this × delivery.job_timeout


def _check_task_time(config: Config, problems: Problems, root: yaml.Node | None) -> None:
    """A deliver task must end well before kombu hands it to a second worker: the visibility
    timeout is at least twice the job timeout (a task runs at most 1.6 × job_timeout). The
    error points at ``delivery.job_timeout`` when the file sets it, else at the visibility
    timeout."""
    visibility, job = config.celery.visibility_timeout, config.delivery.job_timeout
    if visibility >= VISIBILITY_MARGIN * job:
        return
    why = (
        f"celery.visibility_timeout ({format_duration(visibility)}) must be at least twice "
        f"delivery.job_timeout ({format_duration(job)}): a deliver task may run up to "
        f"{format_duration(config.delivery.task_budget)} (its start window, a wait for a job "
        "another worker held, one job's round), and after the visibility timeout a second "
        "worker gets the same task"
    )
    given = _given(root, ("delivery", "job_timeout"))
    problems.add(given or ("celery", "visibility_timeout"), why)


def _check_sites(config: Config, problems: Problems) -> None:
    """Site names are unique (case-insensitive: they are Redis keys and metrics labels)."""
    seen: set[str] = set()
    for index, site in enumerate(config.delivery.shaping.sites):
        if site.name.lower() in seen:
            why = f"duplicate site name {site.name!r}"
            problems.add(("delivery", "shaping", "sites", index, "name"), why)
        seen.add(site.name.lower())


def _check_alias(config: Config, problems: Problems, root: yaml.Node | None) -> None:
    """``delivery.reuse_max_messages`` is an alias of
    ``delivery.shaping.default.messages_per_connection``: a file giving both must agree."""
    alias = ("delivery", "shaping", "default", "messages_per_connection")
    if not _given(root, ("delivery", "reuse_max_messages")) or not _given(root, alias):
        return
    delivery = config.delivery
    if delivery.reuse_max_messages != delivery.shaping.default.messages_per_connection:
        why = (
            f"delivery.reuse_max_messages ({delivery.reuse_max_messages}) is an alias of this "
            "setting and differs: give one of them"
        )
        problems.add(alias, why)


def _given(root: yaml.Node | None, loc: tuple[str, ...]) -> tuple[str, ...] | None:
    """``loc`` when the YAML file sets that key, else None."""
    node = root
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            return None
        match = [v for k, v in node.value if str(k.value) == part]
        if not match:
            return None
        node = match[0]
    return loc


def dump_summary(config: Config) -> Mapping[str, object]:
    """A JSON-able view of the effective configuration (for ``tlsrelay run`` start-up output)."""
    return config.model_dump(mode="json")
