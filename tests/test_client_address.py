"""The client's address as ingest records it (``Received:``, the envelope, the relay and tenant
checks): IPv4-mapped IPv6 unmapped, a zone id dropped, text that is no address kept as it is;
``values.ip_address`` parses it once (cached) and says None for what is not an address."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import pytest

from services.common.values import ip_address
from services.ingest.message import client_ip


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (("192.0.2.7", 40000), "192.0.2.7"),
        (("::ffff:192.0.2.7", 40000, 0, 0), "192.0.2.7"),
        (("fe80::1%eth0", 40000, 0, 2), "fe80::1"),
        (("2001:DB8::1", 25, 0, 0), "2001:db8::1"),
        ("/run/tlsrelay.sock", "/run/tlsrelay.sock"),
        (None, ""),
    ],
)
def test_client_ip(peer: Any, expected: str) -> None:
    assert client_ip(SimpleNamespace(peer=peer)) == expected


def test_client_ip_is_worked_out_once_per_session_and_again_for_a_new_peer() -> None:
    session = SimpleNamespace(peer=("::ffff:192.0.2.7", 40000, 0, 0))
    first = client_ip(session)
    assert first == "192.0.2.7" and client_ip(session) is first  # kept, not worked out again
    session.peer = ("2001:DB8::1", 25, 0, 0)  # the session's peer replaced: asked anew
    assert client_ip(session) == "2001:db8::1"
    assert client_ip(SimpleNamespace(peer=("192.0.2.8", 1))) == "192.0.2.8"  # its own session


def test_ip_address_is_none_for_what_is_not_one_and_the_same_object_when_asked_again() -> None:
    assert ip_address("not an address") is None
    assert ip_address("") is None
    assert ip_address("192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert ip_address("192.0.2.1") is ip_address("192.0.2.1")
