"""The delivery side of the configuration: ``delivery`` (with its ``shaping`` and ``backoff``)
and ``posture``, sections of :class:`services.common.config.Config`.

Each section validates its own keys (types, ranges, site names, route keys, the
``reuse_max_messages`` alias); what needs the whole file (duplicate site names, the alias given
twice and differing, the task time against ``celery.visibility_timeout``) is checked by
:func:`services.common.config.load_config` once the rest is valid.

Failure: a wrong value raises ``ValueError`` inside pydantic's validation, which
:func:`~services.common.config.load_config` reports as a
:class:`~services.common.config.ConfigError` naming the file, line and dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, StrictInt, field_validator, model_validator

from services.common.configtypes import DnsServerT, Duration, OnOff, RateLimitT, RouteT, Section
from services.common.model import TlsMode
from services.common.values import Route, compile_regex, is_hostname

RegexT = Annotated[re.Pattern[str], BeforeValidator(compile_regex)]
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_SITE = "default"  # the label of every site without an entry of its own


class SiteLimits(Section):
    """Traffic shaping limits of one site (services/deliver/shaping.py): across every worker
    process and pod, through Redis."""

    connections: StrictInt = Field(default=20, gt=0)  # concurrent SMTP sessions to the site
    connection_rate: RateLimitT | None = None  # new connections per window (None: unlimited)
    rate: RateLimitT | None = None  # messages per window (None: unlimited)
    messages_per_connection: StrictInt = Field(default=100, gt=0)  # then a new session


class SiteConfig(Section):
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


class ShapingConfig(Section):
    """``delivery.shaping``: the limits of every site (``default``) and named sites."""

    default: SiteLimits = SiteLimits()
    sites: tuple[SiteConfig, ...] = ()
    # Oldest first under saturation: a job parked for a limit of its whole site waits in the
    # site's line and younger mail does not pass it (services/deliver/shaping.py). Off by
    # default: while a line stands each of its jobs waits for a scheduler pass, which cost
    # about 45 % of a saturated site's throughput (bench/README.md, "Session 5").
    line: OnOff = False


DEFAULT_BACKOFF_REPLIES = (
    r"^421 ",
    r"\b4\.7\.(0|28)\b",
    r"(?i)too many connections",
    r"(?i)rate limit",
)


class BackoffConfig(Section):
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


class DeliveryConfig(Section):
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
    # RFC 3030: where the server offers CHUNKING too, the message joins that round trip as
    # BDAT <size> LAST (services/deliver/transaction.py): one round trip per message, not two;
    # off = DATA always (a broken peer).
    chunking: OnOff = True
    # Jobs per deliver task (all for one destination domain, sent one after another over one
    # connection): fewer Celery hops per message. A destination that fails a job (no host
    # reachable, TLS unavailable) defers the rest of its batch without trying each.
    batch_max: StrictInt = Field(default=50, gt=0)
    # Deliveries one deliver process keeps in flight at once (services/deliver/batch.py: the
    # jobs of its task run in this many lanes, each over its own session), within the site's
    # connection limit (shaping). 10 × the default 2 processes = 20 sessions to a destination,
    # Postfix's default_destination_concurrency_limit. 1: one job after another.
    sessions_per_process: StrictInt = Field(default=10, gt=0, le=1000)
    # Deliver tasks one process works on at once (services/deliver/tasks.py): with 2, the next
    # task's jobs take the lanes the last task's jobs leave, instead of waiting for its slowest
    # job; the lanes of all of them together stay within sessions_per_process. A task is then
    # acknowledged when the one before it is done, its own jobs maybe still in flight, reserved
    # meanwhile under a tag of the process's own: should the process die, they are handed back
    # as a dead worker's reserved tasks are. 1: a task is acknowledged once its jobs are recorded.
    tasks_per_process: StrictInt = Field(default=2, gt=0, le=8)
    # Where a deliver process makes its Redis calls (services/deliver/offload.py): "threads"
    # (a pool, the loop goes on while Redis answers), "inline" (on the event loop: no thread
    # hop, the loop waits out each round trip), "auto": inline while Redis answers as from
    # this host (least wait of 32 calls under 0.5 ms), in the threads when it is farther.
    redis_calls: Literal["auto", "threads", "inline"] = "auto"
    # How often one deliver worker looks for queued work whose Celery task was lost (a worker
    # killed inside kombu's two-step take or restore) and queues it again: services/deliver/
    # rescue.py. Work is re-queued after two sweeps without a task, at least this far apart.
    rescue_interval: Duration = Field(default=30.0, gt=0)
    # Bounded work per delivery attempt (Postfix smtp_mx_address_limit / smtp_mx_session_limit):
    # at most this many addresses are tried, and at most this many SMTP sessions that reached a
    # greeting; 0 = no limit. A destination cannot hold a worker for every address × timeouts.
    mx_address_limit: StrictInt = Field(default=5, ge=0)
    mx_session_limit: StrictInt = Field(default=2, ge=0)
    # Celery worker processes: 2 fills the deliver pods' 2 CPUs (deploy/k8s); more lanes per
    # process (sessions_per_process) cost less CPU than more processes (bench/README, session 8)
    concurrency: StrictInt = Field(default=2, gt=0)
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
        setting: the one given fills the other (both, differing:
        :func:`services.common.config._check_alias`)."""
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


class PostureConfig(Section):
    """What ``tlsrelay posture`` reads: deliveries per destination domain and day
    (services/deliver/posture.py)."""

    # Days a day's counts are kept after its last delivery (at most ten years).
    retention: StrictInt = Field(default=30, gt=0, le=3660)
