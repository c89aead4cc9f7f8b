"""The event loop of ingest and of each deliver process (``event_loop``: ``uvloop`` or ``asyncio``).

``uvloop`` (the default) is libuv's loop for asyncio: the same interface, with its transports,
timers and TLS (``loop.start_tls``: the deliver worker's STARTTLS, through aiosmtplib) written in
C. On loopback against the benchmark's sink it took about 4 % off the relay's CPU per message
(ingest and deliver 4–5 % each; bench/README.md, "Session 11"). ``asyncio`` is the standard
library's loop: for a platform uvloop does not build on, or to rule the loop out when
diagnosing.

What differs, and how this project copes:

- ``loop.time()`` has millisecond resolution and is read once per turn of the loop. Nothing here
  measures an interval on it finer than that: the deadlines that mix it with ``time.monotonic()``
  convert by the difference of the two (services/deliver/lanes.py), and a timer that fires a
  millisecond late changes no outcome.
- A connection whose client closes before the greeting goes out is reported by ``eof_received``
  alone (asyncio's loop, having written the greeting first, usually saw a reset instead): ingest
  closes the connection on end of file (services/ingest/session.py) so such a session never stays
  half-open.
- aiosmtpd builds the standard library's ``SSLProtocol`` for inbound STARTTLS over whichever loop
  runs it (``transport.set_protocol``), so ingest's TLS read buffer bound
  (services/common/tlsbuffers.py) holds on both. uvloop's own TLS transport (outbound STARTTLS)
  reserves a 256 KiB read buffer per session with ``malloc``, paged in only as far as reads fill
  it: the memory measured with 1 000 sessions in flight is in bench/README.md ("Session 11").

Failure: ``event_loop: uvloop`` where uvloop cannot be imported is a configuration error when
the configuration is loaded (:func:`check`, from services/common/config.py), not a silent
fallback: the operator chose it.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

Kind = Literal["uvloop", "asyncio"]
T = TypeVar("T")


def check(kind: Kind) -> None:
    """Raise :class:`RuntimeError` naming ``event_loop`` when ``kind`` cannot run here."""
    if kind == "uvloop":
        try:
            importlib.import_module("uvloop")
        except ImportError as exc:
            raise RuntimeError(
                f"uvloop cannot be imported ({exc}): install it or set event_loop: asyncio"
            ) from exc


def new_event_loop(kind: Kind) -> asyncio.AbstractEventLoop:
    """A new loop of that kind (not set as the thread's current loop)."""
    check(kind)
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], kind: Kind) -> T:
    """``asyncio.run(main)`` on a loop of that kind."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(main)
