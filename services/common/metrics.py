"""Prometheus metrics: every metric object of every service with its name and labels, the
recording functions of ingest and policy events, the Redis queue collector and the ``/metrics``
HTTP server.

Names and labels are a contract — dashboards and alerts use them (README, "Observability").
Labels take few values: never an address, a domain or a message id. The services call a
recording function at the point where the event happens (``metrics.ingest_accepted(...)``;
deliver's, which read delivery results, are in ``services/deliver/observe.py``); the label logic
lives there, not at the call site. The metric objects belong to no registry until a service
serves them: each service exposes only its own (:data:`SERVED`), plus the queue gauges from the
policy and deliver services.

Processes:

- **ingest** is one asyncio process: the default registry (with the client library's
  ``process_*``/``python_*`` collectors), served by :func:`serve` from a daemon thread.
- **policy** and **deliver** are Celery prefork pools: prometheus_client's multiprocess mode.
  ``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is first imported in the
  process (the CLI does that: ``services/cli.py``); each pool process writes its own
  ``*_<pid>.db`` files there and the parent serves their sum (:func:`serve_workers`, with
  :class:`MultiProcessCollector`). There are no in-process gauges (``multiprocess_mode`` would
  apply to them); the queue gauges come from :class:`QueueCollector`, which reads Redis when
  scraped, in the parent only.

Failure: :func:`serve` raises :class:`MetricsError` naming the config key when the address cannot
be bound. A scrape while Redis is down leaves the queue gauges out (and logs a warning) rather
than failing the whole exposition.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final
from wsgiref.simple_server import WSGIServer, make_server

import prometheus_client
import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app
from prometheus_client.registry import Collector

from services.common import health, queueing, spool
from services.common.model import Decision, TlsMode
from services.common.values import HostPort

log = logging.getLogger("tlsrelay.metrics")

ENV_MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"

# The exposition carries no ``*_created`` series: nothing reads them, and they double the output.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class MetricsError(Exception):
    """``/metrics`` cannot be served; ``str()`` names the config key (``metrics.ingest: ...``)."""


# --------------------------------------------------------------------------- ingest

INGEST_CONNECTIONS = Counter(
    "tlsrelay_ingest_connections_total",
    "SMTP connections, counted when they close. listener: listen | submission | relay; "
    "tls: yes when STARTTLS succeeded during the connection, else no.",
    ["listener", "tls"],
    registry=None,
)
INGEST_MESSAGES = Counter(
    "tlsrelay_ingest_messages_total",
    "Replies to MAIL, RCPT and DATA that decide a message's fate. result: accepted (250 after "
    "DATA: the message is in the spool), rejected (a 5xx), tempfail (a 4xx: 451 4.3.0, rate "
    "limit, too many recipients).",
    ["listener", "result"],
    registry=None,
)
INGEST_MESSAGE_SIZE = Histogram(
    "tlsrelay_ingest_message_size_bytes",
    "Size of accepted messages as stored (with our Received header).",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
    registry=None,
)


def ingest_connection(listener: str, tls: bool) -> None:
    """A connection to ``listener`` closed; ``tls``: STARTTLS succeeded on it."""
    INGEST_CONNECTIONS.labels(listener, "yes" if tls else "no").inc()


def ingest_accepted(listener: str, size: int) -> None:
    """A message was stored and is answered ``250`` after DATA."""
    INGEST_MESSAGES.labels(listener, "accepted").inc()
    INGEST_MESSAGE_SIZE.observe(size)


def ingest_refused(listener: str, reply: str) -> None:
    """A reply to MAIL, RCPT or DATA: 5xx → rejected, 4xx → tempfail, anything else ignored."""
    result = {"5": "rejected", "4": "tempfail"}.get(reply[:1])
    if result is not None and reply[1:3].isdigit():
        INGEST_MESSAGES.labels(listener, result).inc()


# --------------------------------------------------------------------------- policy

POLICY_DECISIONS = Counter(
    "tlsrelay_policy_decisions_total",
    "Policy decisions, one per destination domain of a message. circumstance: the decision's "
    "first circumstance (a platform floor such as intra-platform or requiretls, else the first "
    "matching rule's name, else default); tls_mode: none | opportunistic | enforced | verified.",
    ["circumstance", "tls_mode"],
    registry=None,
)


def decisions(made: Iterable[Decision]) -> None:
    """The decisions of one classified message."""
    for decision in made:
        first = decision.circumstances[0] if decision.circumstances else "default"
        POLICY_DECISIONS.labels(first, decision.tls.label).inc()


# --------------------------------------------------------------------------- deliver

# Label values. The functions that turn a delivery's results into observations of these
# metrics live beside the delivery code (services/deliver/observe.py).
NO_CONNECTION: Final = "no_connection"  # tls_outcome of an attempt that never got to TLS
FALLBACK_REASONS: Final = frozenset({"not_offered", "handshake_failed", "remembered_broken"})

DELIVERY_ATTEMPTS = Counter(
    "tlsrelay_delivery_attempts_total",
    "Delivery attempts, one per address tried. tls_mode: the requirement (dane: an MX host with "
    "usable TLSA records); tls_outcome: tls, tls_verified, dane_verified, dane_failed, "
    "not_offered, handshake_failed, remembered_broken, verify_failed, disabled, or "
    "no_connection (refused, timeout, bad greeting); result: delivered (some recipient accepted), "
    "bounced (none accepted, some refused permanently), deferred (otherwise, incl. next host).",
    ["tls_mode", "tls_outcome", "result"],
    registry=None,
)
# The versions a TLS attempt can negotiate (ssl.SSLObject.version()); anything else is "other".
TLS_VERSIONS: Final = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
DELIVERY_TLS_VERSIONS = Counter(
    "tlsrelay_delivery_tls_versions_total",
    "Delivery attempts that rode TLS (tls_outcome tls, tls_verified or dane_verified), by "
    "negotiated version: "
    "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3 (other: never expected).",
    ["version"],
    registry=None,
)
PLAINTEXT_FALLBACK = Counter(
    "tlsrelay_plaintext_fallback_total",
    "Opportunistic attempts that sent a message in clear (reached DATA). reason: not_offered | "
    "handshake_failed | remembered_broken.",
    ["reason"],
    registry=None,
)
TLS_REQUIRED_DEFERRALS = Counter(
    "tlsrelay_tls_required_deferrals_total",
    "Delivery rounds that ended with recipients deferred because TLS was required but not "
    "available (4.7.10). tls_mode: enforced | verified | dane.",
    ["tls_mode"],
    registry=None,
)
MESSAGES_FINAL = Counter(
    "tlsrelay_messages_final_total",
    "Messages whose last recipient became final. result: delivered (every recipient was "
    "delivered) | bounced (some recipient bounced).",
    ["result"],
    registry=None,
)
DSN_SENT = Counter(
    "tlsrelay_dsn_sent_total",
    "Delivery status notifications queued to senders. action: failed | delayed.",
    ["action"],
    registry=None,
)
INTERRUPTED = Counter(
    "tlsrelay_delivery_interrupted_total",
    "Deliveries found interrupted while sending DATA (a worker died in the RFC 1047 window): "
    "their recipients are sent again, so the destination may see the message twice.",
    registry=None,
)
UNREPLICATED_MARKS = Counter(
    "tlsrelay_delivery_unreplicated_marks_total",
    "Delivery rounds deferred unsent because their in-flight mark was not acknowledged by "
    "redis_min_replicas replicas within redis_replica_timeout (a failover could lose it).",
    registry=None,
)
MTA_STS = Counter(
    "tlsrelay_mta_sts_total",
    "Delivery rounds to a domain with an MTA-STS policy (RFC 8461), or whose policy lookup "
    "failed. mode: enforce | testing | none | unknown (lookup failed, nothing cached); result: "
    "ok (the policy was met), failed (enforce: held back, never sent in clear; testing: would "
    "have failed), relaxed (TLS-Required: No on the message), fetch_error (refresh failed; a "
    "cached policy still applies).",
    ["mode", "result"],
    registry=None,
)
DANE_RESULTS: Final = ("ok", "failed", "no_usable_tlsa", "lookup_error")
DANE = Counter(
    "tlsrelay_dane_total",
    "Delivery rounds to a domain whose MX records are DNSSEC-validated, where DANE (RFC 7672) "
    "applied to some MX host. result: ok (a session was authenticated by a TLSA record), failed "
    "(hosts had usable TLSA records and no session was authenticated: deferred, never sent in "
    "clear), no_usable_tlsa (only unusable records: TLS required, not authenticated), "
    "lookup_error (a TLSA lookup failed: that host was not used).",
    ["result"],
    registry=None,
)
THROTTLED = Counter(
    "tlsrelay_throttled_total",
    "Delivery rounds that waited for a traffic-shaping limit instead of being tried (parked, "
    "not an attempt). site: a configured site's name, else default; reason: connections, "
    "connection_rate, rate, suspended, backoff, line (older mail to the site goes first).",
    ["site", "reason"],
    registry=None,
)
BACKOFF_EVENTS = Counter(
    "tlsrelay_backoff_events_total",
    "Throttling replies from a destination (delivery.backoff.replies) that lowered its site's "
    "connection limit. site: a configured site's name, else default.",
    ["site"],
    registry=None,
)
POSTURE_DELIVERIES = Counter(
    "tlsrelay_posture_deliveries_total",
    "Delivery rounds that delivered recipients (MX and routed), by how the delivering session "
    "rode: transport: clear | tls (encrypted, certificate not checked) | tls_verified "
    "(authenticated: a verified chain, or a certificate matching DANE TLSA records).",
    ["transport"],
    registry=None,
)
POSTURE_WOULD_DEFER = Counter(
    "tlsrelay_posture_would_defer_total",
    "Of those deliveries, the ones that would have been deferred had their domain been at "
    "tls_mode: enforced (delivered in clear) | verified (in clear, TLS 1.0/1.1, or a "
    "certificate that fails verification). Totals only; per domain: tlsrelay posture.",
    ["tls_mode"],
    registry=None,
)
POSTURE_RECORDING_ERRORS = Counter(
    "tlsrelay_posture_recording_errors_total",
    "Deliveries whose posture counts (tlsrelay posture) could not be written; the delivery "
    "itself is recorded as usual.",
    registry=None,
)
POSTURE_TLS: Final = ("clear", "tls", "tls_verified")
DELIVERY_DURATION = Histogram(
    "tlsrelay_delivery_duration_seconds",
    "Duration of one delivery attempt (connect to QUIT).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=None,
)
END_TO_END = Histogram(
    "tlsrelay_end_to_end_seconds",
    "From acceptance by ingest to delivery, per delivery round that delivered recipients.",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000),
    registry=None,
)


def prime(service: str) -> None:
    """Create the label sets every deployment has, at 0, so they exist before the first event
    (a series that appears only with its first increment hides that increment from rate())."""
    if service == "deliver":
        for action in ("failed", "delayed"):
            DSN_SENT.labels(action)
        for result in ("delivered", "bounced"):
            MESSAGES_FINAL.labels(result)
        for reason in sorted(FALLBACK_REASONS):
            PLAINTEXT_FALLBACK.labels(reason)
        for mode in (TlsMode.ENFORCED, TlsMode.VERIFIED, TlsMode.DANE):
            TLS_REQUIRED_DEFERRALS.labels(mode.label)
        for mode in (TlsMode.ENFORCED, TlsMode.VERIFIED):
            POSTURE_WOULD_DEFER.labels(mode.label)
        for tls in POSTURE_TLS:
            POSTURE_DELIVERIES.labels(tls)
        for result in DANE_RESULTS:
            DANE.labels(result)


def prime_ingest(listeners: Iterable[str]) -> None:
    """As :func:`prime`, for the ingest listeners that are configured."""
    for listener in listeners:
        for tls in ("yes", "no"):
            INGEST_CONNECTIONS.labels(listener, tls)
        for result in ("accepted", "rejected", "tempfail"):
            INGEST_MESSAGES.labels(listener, result)


# --------------------------------------------------------------------------- queues

QUEUES: Final = (queueing.QUEUE_POLICY, queueing.QUEUE_DELIVER)
DEFERRED: Final = "deferred"
_WAITING: Final = {
    queueing.QUEUE_POLICY: spool.WAITING_POLICY,
    queueing.QUEUE_DELIVER: spool.WAITING_DELIVER,
}


class QueueCollector:
    """``tlsrelay_queue_messages{queue}`` and ``tlsrelay_queue_oldest_age_seconds{queue}``,
    read from Redis when scraped (a handful of O(1)/O(log n) commands, never a scan).

    - ``policy`` and ``deliver``: ``ZCARD`` of ``tlsrelay:waiting:policy`` (messages not yet
      classified) and ``tlsrelay:waiting:deliver`` (message × domain jobs queued or being sent,
      not deferred), kept in the same transactions as the work (see ``common/spool.py``): Celery
      tasks carry batches, so the lists' lengths count tasks, not messages. The oldest age is
      the lowest score (the acceptance time).
    - ``deferred``: ``ZCARD tlsrelay:deferred`` (entries are per-domain jobs); the oldest age
      comes from the index ``tlsrelay:deferred:since`` (message id → acceptance time, written
      with every deferral, removed when the message completes; see ``deliver/scheduler.py``).
      Entries of messages already gone are skipped here (a scrape only reads); the scheduler
      drops them from the index.

    An empty queue has age 0.
    """

    def __init__(self, redis_url: str, timeout: float = 2.0) -> None:
        self.redis_url = redis_url
        self.timeout = timeout
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # on first scrape, in the serving process
            self._client = spool.connect(self.redis_url)
        return self._client

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        try:
            readings = self.read(time.time())
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("queue gauges left out of this scrape, Redis unavailable: %s", exc)
            return iter(())
        return self._families(readings)

    def read(self, now: float) -> dict[str, tuple[int, float]]:
        """queue → (entries, age of the oldest in seconds)."""
        with self.client.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.zcard(_WAITING[queue])
                pipe.zrange(_WAITING[queue], 0, 0, withscores=True)
            pipe.zcard(spool.DEFERRED)
            replies = pipe.execute()
        readings = {}
        for i, queue in enumerate(QUEUES):
            size, oldest = replies[2 * i], replies[2 * i + 1]
            age = max(0.0, now - oldest[0][1]) if oldest else 0.0
            readings[queue] = (int(size), age)
        deferred = int(replies[-1])
        readings[DEFERRED] = (deferred, self._oldest_deferred(now) if deferred else 0.0)
        return readings

    def _oldest_deferred(self, now: float) -> float:
        """The age of the first message in the index that still exists (a few pages at most)."""
        for page in range(spool.DEFERRED_SINCE_PAGES):
            start = page * spool.DEFERRED_SINCE_PAGE
            head = spool.deferred_since_page(self.client, start)
            if not head:
                return 0.0
            alive = spool.messages_exist(self.client, [member for member, _ in head])
            for (_member, score), exists in zip(head, alive, strict=True):
                if exists:
                    return max(0.0, now - score)
        return 0.0

    def _families(self, readings: dict[str, tuple[int, float]]) -> Iterator[Metric]:
        sizes = GaugeMetricFamily(
            "tlsrelay_queue_messages",
            "Entries waiting, read from Redis when scraped: the policy and deliver task lists, "
            "and the deferred set (one entry per message and destination domain).",
            labels=["queue"],
        )
        ages = GaugeMetricFamily(
            "tlsrelay_queue_oldest_age_seconds",
            "Age (since acceptance by ingest) of the oldest message waiting in each queue; 0 "
            "when the queue is empty.",
            labels=["queue"],
        )
        for queue, (size, age) in readings.items():
            sizes.add_metric([queue], size)
            ages.add_metric([queue], round(age, 3))
        yield sizes
        yield ages


def _steps(raw: list[bytes | None], now: float) -> int:
    """Back-off steps in force: those recorded, less one per ``recover`` seconds since (the
    state is written back lazily, when the site is next used)."""
    steps, at, recover = raw
    if not steps or not at or not recover:
        return 0
    return max(0, int(steps) - int((now - float(at)) // float(recover)))


class SiteCollector:
    """The traffic-shaping gauges (services/deliver/shaping.py), read from Redis when scraped,
    per site label (a configured site's name, or ``default`` for every other site):

    - ``tlsrelay_site_connections{site}``: sessions open (connection leases in force, busy or
      parked), across every worker and pod;
    - ``tlsrelay_site_backoff_steps{site}``: back-off steps in force (the most of the label's
      sites; 0: the configured limit);
    - ``tlsrelay_site_suspended{site}``: suspensions in force (``tlsrelay queue suspend``).

    Reads the sites seen (``tlsrelay:shaping:sites``, pruned by the deliver scheduler) and two
    small reads per site, in one pipeline.
    """

    def __init__(self, redis_url: str) -> None:
        self.queues = QueueCollector(redis_url)  # for its client

    def describe(self) -> list[Metric]:
        return list(self._families({}, {}, {}))

    def collect(self) -> Iterator[Metric]:
        try:
            readings = self.read(time.time())
        except (redis.exceptions.RedisError, OSError, ValueError) as exc:
            log.warning("site gauges left out of this scrape, Redis unavailable: %s", exc)
            return iter(())
        return self._families(*readings)

    def read(self, now: float) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """(connections, back-off steps, suspensions) per label."""
        client = self.queues.client
        sites: dict[bytes, bytes] = client.hgetall(spool.SHAPING_SITES)  # type: ignore[assignment]
        ids = [
            (i.decode(), str(json.loads(doc).get("label", "default"))) for i, doc in sites.items()
        ]
        with client.pipeline(transaction=False) as pipe:
            for site_id, _ in ids:
                pipe.zcount(spool.site_key("leases", site_id), now, "+inf")
                pipe.hmget(spool.site_key("backoff", site_id), "steps", "at", "recover")
            pipe.hgetall(spool.SHAPING_SUSPENDED)
            replies = pipe.execute()
        connections: dict[str, int] = {"default": 0}
        steps: dict[str, int] = {"default": 0}
        for n, (_, label) in enumerate(ids):
            connections[label] = connections.get(label, 0) + int(replies[2 * n])
            steps[label] = max(steps.get(label, 0), _steps(replies[2 * n + 1], now))
        suspended: dict[str, int] = dict.fromkeys(connections, 0)
        for raw in replies[-1].values():
            doc = json.loads(raw)
            if not doc.get("until") or float(doc["until"]) > now:
                label = str(doc.get("label", "default"))
                suspended[label] = suspended.get(label, 0) + 1
        return connections, steps, suspended

    def _families(
        self, connections: dict[str, int], steps: dict[str, int], suspended: dict[str, int]
    ) -> Iterator[Metric]:
        specs = (
            ("tlsrelay_site_connections", "SMTP sessions open to each site (busy or parked for "
             "reuse), across every deliver worker: its connection leases in force.", connections),
            ("tlsrelay_site_backoff_steps", "Back-off steps in force at each site (its "
             "connection limit × delivery.backoff.factor per step); 0: the configured limit.",
             steps),
            ("tlsrelay_site_suspended", "Suspensions in force (tlsrelay queue suspend) of each "
             "site or of domains it serves; nothing is attempted there meanwhile.", suspended),
        )  # fmt: skip
        for name, text, by_label in specs:
            family = GaugeMetricFamily(name, text, labels=["site"])
            for label, value in sorted(by_label.items()):
                family.add_metric([label], value)
            yield family


# --------------------------------------------------------------------------- serving

SERVED: Final[dict[str, tuple[Counter | Histogram, ...]]] = {
    "ingest": (INGEST_CONNECTIONS, INGEST_MESSAGES, INGEST_MESSAGE_SIZE),
    "policy": (POLICY_DECISIONS,),
    "deliver": (
        DELIVERY_ATTEMPTS,
        DELIVERY_TLS_VERSIONS,
        PLAINTEXT_FALLBACK,
        TLS_REQUIRED_DEFERRALS,
        MESSAGES_FINAL,
        DSN_SENT,
        INTERRUPTED,
        UNREPLICATED_MARKS,
        MTA_STS,
        DANE,
        THROTTLED,
        BACKOFF_EVENTS,
        POSTURE_DELIVERIES,
        POSTURE_WOULD_DEFER,
        POSTURE_RECORDING_ERRORS,
        DELIVERY_DURATION,
        END_TO_END,
    ),
}


class _Only:
    """The families of ``collector`` named in ``names`` (a pool's files also hold the unlabeled
    histograms every process creates when it imports this module, at 0)."""

    def __init__(self, collector: Collector, names: frozenset[str]) -> None:
        self.collector, self.names = collector, names

    def collect(self) -> Iterable[Metric]:
        return [family for family in self.collector.collect() if family.name in self.names]


def serve(address: HostPort, key: str, service: str = "ingest") -> WSGIServer:
    """One process (ingest): serve ``service``'s metrics and the client library's process
    collectors at ``http://address/metrics`` from a daemon thread; return the server.

    A port in use (or an address that cannot be bound) raises :class:`MetricsError` naming
    ``key`` (``metrics.ingest``...)."""
    for metric in SERVED[service]:
        REGISTRY.register(metric)
    return _listen(address, key, REGISTRY, probes=service == "ingest")


def serve_workers(address: HostPort, key: str, service: str, redis_url: str) -> WSGIServer:
    """The main process of a Celery prefork pool: serve the sum of its processes' metrics
    (multiprocess mode) and the queue gauges. Binds first, then removes earlier runs' files from
    the directory (so a second instance on a busy port exits without touching them)."""
    directory = os.environ.get(ENV_MULTIPROC_DIR)
    if not directory or values.ValueClass is values.MutexValue:
        raise RuntimeError(
            f"{ENV_MULTIPROC_DIR} must be set before prometheus_client is first imported"
        )
    registry = CollectorRegistry()
    files = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
    names = frozenset(family.name for metric in SERVED[service] for family in metric.describe())
    registry.register(_Only(files, names))
    registry.register(QueueCollector(redis_url))
    if service == "deliver":
        registry.register(SiteCollector(redis_url))
    prime(service)
    server = _listen(address, key, registry)
    _remove_stale(Path(directory))
    return server


def _listen(
    address: HostPort, key: str, registry: CollectorRegistry, probes: bool = False
) -> WSGIServer:
    """Serve ``/metrics`` (and, for ingest, the ``/ready`` and ``/live`` probes) from a thread."""
    app = make_wsgi_app(registry)
    if probes:
        app = health.with_probes(app)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

    try:
        server = make_server(address.host, address.port, app, Server, handler_class=_SilentHandler)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise MetricsError(f"{key}: cannot serve /metrics on {address}: {why}") from None
    threading.Thread(target=server.serve_forever, name=f"metrics-{key}", daemon=True).start()
    return server


def _remove_stale(directory: Path) -> None:
    """Delete the ``*.db`` files of other processes (earlier runs); keep this process's own."""
    mine = f"_{os.getpid()}.db"
    for path in directory.glob("*.db"):
        if not path.name.endswith(mine):
            path.unlink(missing_ok=True)


def process_dead(pid: int) -> None:
    """A pool process exited: drop its live-gauge files (its counters stay in the sum)."""
    directory = os.environ.get(ENV_MULTIPROC_DIR)
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
