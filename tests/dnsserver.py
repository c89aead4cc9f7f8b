"""A real authoritative DNS server on 127.0.0.1 (UDP and TCP, same free port) for tests.

    with LocalDns() as dns:
        dns.add("example.test", "MX", "10 mx1.example.test.")
        dns.add("mx1.example.test", "A", "127.0.0.2")
        dns.servfail("broken.test")
        ... HostPort("127.0.0.1", dns.port) ...

Records are kept by (name, type) and may change while the server runs. A name with no records
at all answers NXDOMAIN; a known name without records of the asked type answers NOERROR with an
empty answer (NODATA); a name marked with :meth:`LocalDns.servfail` answers SERVFAIL. Null MX is
``dns.add(name, "MX", "0 .")``. TXT data is given
unquoted, as one record's text (``dns.add("_mta-sts.a.test", "TXT", "v=STSv1; id=1")``), and
:meth:`LocalDns.set_txt` replaces a name's TXT records while the server runs.
:meth:`LocalDns.secure` marks names (or some of their types) as DNSSEC-signed and validated:
answers about them carry the AD bit, as a validating resolver's would (given whether or not
the query set DO, so a relay that must ignore AD can be shown to ignore it);
:attr:`LocalDns.do_queries` counts the queries that set DO. TLSA data is zone syntax
(``dns.add("_25._tcp.mx.a.test", "TLSA", "3 1 1 <hex>")``).
:meth:`LocalDns.stop` shuts both servers down, closes their
sockets and joins their threads, so nothing leaks into ``filterwarnings = error`` runs.
"""

from __future__ import annotations

import threading
from typing import Any

from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.background import Background

_BIND_ATTEMPTS = 20


def _key(name: str) -> str:
    return name.strip().lower().rstrip(".")


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: LocalDns) -> None:
        self._owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        return self._owner._answer(request)


class LocalDns(Background):
    """An in-memory authoritative server; ``port`` is known after :meth:`start`."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.port = 0
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], list[str]] = {}
        self._servfail: set[str] = set()
        self._secure: set[tuple[str, str]] = set()  # (name, type); type "*": every type
        self.do_queries = 0
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- data

    def add(self, name: str, rtype: str, rdata: str) -> None:
        """Add one record, e.g. ``add("a.test", "MX", "10 mx.a.test.")``."""
        with self._lock:
            self._records.setdefault((_key(name), rtype.upper()), []).append(rdata)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for every query about ``name``."""
        with self._lock:
            self._servfail.add(_key(name))

    def secure(self, name: str, *types: str) -> None:
        """Answers about ``name`` (only those of ``types`` when given) carry the AD bit."""
        with self._lock:
            for rtype in types or ("*",):
                self._secure.add((_key(name), rtype.upper()))

    def clear(self) -> None:
        """Forget all records, SERVFAIL and secure marks."""
        with self._lock:
            self._records.clear()
            self._servfail.clear()
            self._secure.clear()

    def _answer(self, request: DNSRecord) -> DNSRecord:
        qname = _key(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype)
        reply = request.reply()  # aa=1, ra=1, question copied
        with self._lock:
            failing = qname in self._servfail
            known = any(name == qname for name, _ in self._records)
            rdatas = list(self._records.get((qname, qtype), ()))
            signed = bool({(qname, "*"), (qname, qtype)} & self._secure)
            self.do_queries += any(rr.rtype == QTYPE.OPT and rr.edns_do for rr in request.ar)
        reply.ar = []  # no OPT record back: dnspython then does not insist on EDNS
        if failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif signed:
            reply.header.ad = 1
        elif not known:
            reply.header.rcode = RCODE.NXDOMAIN
        for rdata in rdatas if not failing else ():
            if qtype == "TXT":  # as given (zone syntax would take ";" for a comment)
                strings = [rdata[i : i + 255] for i in range(0, len(rdata), 255)] or [""]
                reply.add_answer(RR(f"{qname}.", QTYPE.TXT, rdata=TXT(strings), ttl=60))
                continue
            for rr in RR.fromZone(f"{qname}. 60 IN {qtype} {rdata}"):
                reply.add_answer(rr)
        return reply

    def set_txt(self, name: str, *texts: str) -> None:
        """Replace the TXT records of ``name`` (each text one record; none → remove them)."""
        with self._lock:
            self._records.pop((_key(name), "TXT"), None)
            if texts:
                self._records[(_key(name), "TXT")] = list(texts)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LocalDns:
        """Bind UDP and TCP on one free port and serve both from background threads."""
        udp, tcp = self._bind()
        self._servers = [udp, tcp]
        self.port = int(udp.server.server_address[1])
        for server in self._servers:
            thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"LocalDns-{self.port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _bind(self) -> tuple[DNSServer, DNSServer]:
        logger = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda _s: None)
        resolver = _Resolver(self)
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            udp = DNSServer(resolver, address=self.address, port=0, logger=logger)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address=self.address, port=port, tcp=True, logger=logger)
            except OSError as exc:  # the TCP side of that port is taken: try another one
                udp.server.server_close()
                last = exc
                continue
            return udp, tcp
        raise OSError(f"LocalDns: no free UDP+TCP port pair on {self.address}") from last

    def stop(self) -> None:
        """Stop serving, close the sockets and join the threads (idempotent)."""
        for server, thread in zip(self._servers, self._threads, strict=False):
            if thread.is_alive():
                server.server.shutdown()  # returns once serve_forever has left its loop
            thread.join(timeout=5)
        for server in self._servers:
            server.server.server_close()  # closes the socket, joins handler threads
        self._servers, self._threads = [], []
