"""Configuration: parsed and validated once, at start-up, then read many times.

Input: a YAML file (``--config FILE`` or ``$TLSRELAY_CONFIG``); ``$TLSRELAY_REDIS_URL`` overrides
``redis_url``. Every key is optional and has a documented default (README, "Configuration").

Types are strict where YAML's type matters (services/common/configtypes.py: the field types and
the base of every section). The delivery sections (``delivery``, its ``shaping`` and ``backoff``,
``posture``) are services/common/deliveryconfig.py's; :class:`Config` and the checks that need
the whole file are here.

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
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from services.common import eventloop
from services.common.configerrors import ConfigError as ConfigError
from services.common.configerrors import Problems
from services.common.configtypes import Duration, HostPortT, Network, RateLimitT, RouteT, Section
from services.common.deliveryconfig import DeliveryConfig, PostureConfig
from services.common.rules import Rules
from services.common.values import (
    HostPort,
    format_duration,
    is_hostname,
)

ENV_CONFIG = "TLSRELAY_CONFIG"
ENV_REDIS_URL = "TLSRELAY_REDIS_URL"


# --------------------------------------------------------------------------- sections


def _parse_networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of networks such as [127.0.0.0/8, '::1/128']")
    return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)


TlsProfileName = Literal["permissive", "intermediate", "modern"]


class TlsProfiles(Section):
    """Inbound TLS profile per listener (services/ingest/tlsprofile.py): RFC 7435's widest set
    on port 25, Mozilla "intermediate" for submission, TLS 1.3 between our own regions."""

    listen: TlsProfileName = "permissive"
    submission: TlsProfileName = "intermediate"
    relay: TlsProfileName = "modern"


class IngestConfig(Section):
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
    # Under that load, a policy task gathers the messages of consecutive commits until it holds
    # delivery.batch_max of them or the first has waited task_window (0: one task per commit).
    task_window: Duration = Field(default=0.05, ge=0, le=1)
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


class PlatformTls(Section):
    """The platform's own CA and this region's certificate (intra-platform mutual TLS)."""

    ca: Path
    cert: Path
    key: Path


class RegionConfig(Section):
    """Another data centre of the platform, reached at its inter-region endpoint."""

    relay: HostPortT
    tls_name: str | None = None  # the name on that endpoint's certificate; default: region name


class TenantConfig(Section):
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


class PolicyConfig(Section):
    """The classification workers (services/policy)."""

    concurrency: StrictInt = Field(default=2, gt=0)  # Celery worker processes
    # Body rules scan at most this many bytes of decoded text per message.
    body_scan_bytes: StrictInt = Field(default=1_048_576, gt=0)


class CeleryConfig(Section):
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


class MetricsConfig(Section):
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


class Config(Section):
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
    # The event loop of ingest and of each deliver process (services/common/eventloop.py).
    event_loop: eventloop.Kind = Field(default="uvloop", validate_default=True)
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

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: eventloop.Kind) -> eventloop.Kind:
        try:
            eventloop.check(value)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
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
