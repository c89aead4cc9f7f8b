"""The load: how many messages, how big, to whom, over how many sessions, at what rate.

Shared by the load client (:mod:`bench.load`), the sink routing and the report, so all three agree
on the destination domains and on which of them offer STARTTLS.

Destination domains are ``d0.bench.test`` … ``d<D-1>.bench.test``. Recipient ``j`` of message
``i`` is ``r<j>@d<(i+j) mod D>.bench.test``, so a message reaches ``min(recipients, domains)``
domains and each reached domain is one delivery (one arrival at a sink). The first
``round(tls_mix × D)`` domains are routed to the sink that offers STARTTLS, the rest to the plain
one (with one domain, ``tls_mix`` ≥ 0.5 means "TLS").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SENDER = "bench@load.bench.test"
LINE = b"x" * 76 + b"\r\n"


@dataclass(frozen=True)
class Workload:
    messages: int = 10_000
    size: int = 2048  # bytes per message as sent, headers included (approximately)
    sessions: int = 20
    recipients: int = 1
    domains: int = 1
    tls_mix: float = 1.0  # share of destination domains whose sink offers STARTTLS
    rate: float = 0.0  # messages/s offered by the client; 0 = as fast as possible
    client_tls: bool = False  # the client uses STARTTLS towards the relay
    connect_first: bool = False  # every client session connects before any sends

    def __post_init__(self) -> None:
        if self.messages < 1 or self.sessions < 1 or self.recipients < 1 or self.domains < 1:
            raise ValueError("messages, sessions, recipients and domains must be at least 1")
        if not 0.0 <= self.tls_mix <= 1.0:
            raise ValueError("tls_mix must be between 0 and 1")
        if self.rate < 0:
            raise ValueError("rate must be 0 (as fast as possible) or positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def domain_names(self) -> list[str]:
        return [f"d{k}.bench.test" for k in range(self.domains)]

    @property
    def tls_domains(self) -> set[str]:
        count = math.floor(self.tls_mix * self.domains + 0.5)
        return set(self.domain_names[:count])

    def recipients_of(self, index: int) -> list[str]:
        return [f"r{j}@d{(index + j) % self.domains}.bench.test" for j in range(self.recipients)]

    @property
    def deliveries_per_message(self) -> int:
        return min(self.recipients, self.domains)

    @property
    def deliveries(self) -> int:
        return self.messages * self.deliveries_per_message


def bench_id(run_id: str, index: int) -> str:
    return f"{run_id}-{index}"


def message_bytes(run_id: str, index: int, recipients: list[str], size: int) -> bytes:
    """One message of about ``size`` bytes with an ``X-Bench-Id`` header (dot-stuffing-safe)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{recipients[0]}>\r\nSubject: bench message {index}\r\n"
        f"Message-ID: <{run_id}.{index}@load.bench.test>\r\n"
        f"X-Bench-Id: {bench_id(run_id, index)}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    room = max(size - len(head), 0)
    lines, rest = divmod(room, len(LINE))
    body = LINE * lines + (b"x" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    return head + body
