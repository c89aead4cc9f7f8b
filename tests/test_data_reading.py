"""DATA read in bulk (``read_data``: whole buffered lines at once) ends exactly as line by line.

The oracle is the loop ingest ran before the bulk path: ``readuntil(b"\\r\\n")`` for every line,
:meth:`MessageReader.line` on it, :meth:`MessageReader.fragment` for what overran the stream
buffer. Both read a real ``asyncio.StreamReader`` fed the same pieces at the same moments; what
must be equal: the refusal, the content kept, how the read ended (the final dot, or the end of
the stream and what was left of it) and the octets left unread after the final dot (the
client's next command). Hypothesis runs derandomized and bounded, as in ``test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingest import replies
from services.ingest.adapter import unread
from services.ingest.message import MessageReader
from services.ingest.session import AUTH_LINE_MAX, read_data

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Read = Callable[[asyncio.StreamReader, MessageReader], Awaitable[None]]


async def line_by_line(reader: asyncio.StreamReader, message: MessageReader) -> None:
    """The oracle: ingest's DATA loop before the bulk path (less the timeout restarts)."""
    while True:
        try:
            if message.line(await reader.readuntil(b"\r\n")):
                return
        except asyncio.LimitOverrunError as exc:
            message.fragment(await reader.read(exc.consumed))


async def in_bulk(reader: asyncio.StreamReader, message: MessageReader) -> None:
    await read_data(reader, message, lambda: None, 0.0)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 10_000
    max_header_bytes: int = 1_000
    max_hops: int = 5
    stream: int = AUTH_LINE_MAX


@dataclass(frozen=True)
class Outcome:
    refusal: str | None
    content: bytes
    ended: str  # "final dot", or "end of stream: <what readuntil had left>"
    unread: bytes  # what stayed in the stream after the read


async def _settle() -> None:
    """Let the reading task take all it can of what was fed (it never waits on anything else)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _outcome(read: Read, pieces: Sequence[bytes], early: int, limits: Limits) -> Outcome:
    stream = asyncio.StreamReader(limit=limits.stream)
    message = MessageReader(
        limits.max_bytes, limits.max_header_bytes, limits.max_hops, stream_limit=limits.stream
    )
    for piece in pieces[:early]:  # sent before the read began (a client not waiting for 354)
        stream.feed_data(piece)
    task = asyncio.ensure_future(read(stream, message))
    for piece in pieces[early:]:
        await _settle()
        assert len(message.content) <= limits.max_bytes, "memory beyond the size limit"
        stream.feed_data(piece)
    await _settle()
    stream.feed_eof()
    try:
        await task
        ended = "final dot"
    except asyncio.IncompleteReadError as exc:
        ended = f"end of stream: {exc.partial!r}"
    assert len(message.content) <= limits.max_bytes, "memory beyond the size limit"
    return Outcome(message.refusal, bytes(message.content), ended, bytes(unread(stream)))


def both(pieces: Sequence[bytes], early: int = 0, limits: Limits = Limits()) -> Outcome:
    """The outcome of the bulk path, after checking it is the oracle's."""

    async def run() -> tuple[Outcome, Outcome]:
        return (
            await _outcome(line_by_line, pieces, early, limits),
            await _outcome(in_bulk, pieces, early, limits),
        )

    old, new = asyncio.run(run())
    assert new == old
    return new


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# --------------------------------------------------------------------------- the table

QUIT = b"QUIT\r\n"
MAIL = b"MAIL FROM:<a@client.example>\r\n"


@pytest.mark.parametrize(
    ("pieces", "limits", "refusal", "content", "left"),
    [
        # An empty message, and the command pipelined after it.
        ([b".\r\n" + QUIT], Limits(), None, b"", QUIT),
        ([b".", b"\r", b"\n", MAIL], Limits(), None, b"", MAIL),
        # A line of 1000 octets with its CRLF is taken; of 1001, refused.
        ([b"x" * 998 + b"\r\n.\r\n"], Limits(), None, b"x" * 998 + b"\r\n", b""),
        ([b"x" * 999 + b"\r\n.\r\n"], Limits(), replies.DATA_LINE_TOO_LONG, b"", b""),
        # 1001 octets on the wire with a stuffed dot: 1000 stored.
        ([b".." + b"y" * 997 + b"\r\n.\r\n"], Limits(), None, b"." + b"y" * 997 + b"\r\n", b""),
        # Stuffed dots undone, "\r\n..\r\n" in the body is a line of one dot.
        ([b"A: b\r\n\r\n..\r\n.x\r\nend\r\n.\r\n" + QUIT], Limits(), None,
         b"A: b\r\n\r\n.\r\nx\r\nend\r\n", QUIT),
        # The final dot split over three reads; the next command stays in the stream.
        ([b"a\r\n", b"b\r\n.", b"\r", b"\n" + MAIL + QUIT], Limits(), None, b"a\r\nb\r\n",
         MAIL + QUIT),
        # Bare LF and bare CR end nothing: ".\n", "\r.\r\n" and "\n.\r\n" are kept as they are.
        ([b"a\n.\r\n.\n\r\n\r.\r\n.\r\n"], Limits(), None, b"a\n.\r\n\n\r\n\r.\r\n", b""),
        # The size counts CRLFs, not stuffed dots (RFC 1870).
        ([b"..abc\r\n.\r\n"], Limits(max_bytes=6), None, b".abc\r\n", b""),
        ([b"..abcd\r\n.\r\n"], Limits(max_bytes=6), replies.TOO_BIG, b"", b""),
        # Received fields count in the header section only.
        ([b"Received: a\r\nreceived :b\r\n\r\nReceived: c\r\n.\r\n"], Limits(max_hops=2), None,
         b"Received: a\r\nreceived :b\r\n\r\nReceived: c\r\n", b""),
        ([b"Received: a\r\nreceived :b\r\nRECEIVED: c\r\n\r\n.\r\n"], Limits(max_hops=2),
         replies.TOO_MANY_HOPS, b"", b""),
        # A stuffed dot is undone before the header section is looked at.
        ([b"A: b\r\n.Received: x\r\n..B: c\r\n\r\n.\r\n"], Limits(max_hops=1), None,
         b"A: b\r\nReceived: x\r\n.B: c\r\n\r\n", b""),
        ([b"A: b\r\n.Received: x\r\n\r\n.\r\n"], Limits(max_hops=0), replies.TOO_MANY_HOPS,
         b"", b""),
        ([b"A: b\r\n.B: " + b"h" * 91 + b"\r\n\r\n.\r\n"], Limits(max_header_bytes=102),
         None, b"A: b\r\nB: " + b"h" * 91 + b"\r\n\r\n", b""),
        ([b"A: " + b"h" * 98 + b"\r\n\r\n.\r\n"], Limits(max_header_bytes=100),
         replies.HEADER_TOO_LARGE, b"", b""),
        # The first limit crossed decides: a long line before the size limit, and after it.
        ([b"x" * 1001 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n"], Limits(max_bytes=1500),
         replies.DATA_LINE_TOO_LONG, b"", b""),
        ([b"y" * 900 + b"\r\n" + b"x" * 1001 + b"\r\n.\r\n"], Limits(max_bytes=1500),
         replies.TOO_BIG, b"", b""),
        # A line as long as the stream buffer comes whole; one octet more, a stuffed dot
        # included, and it comes in fragments: refused, below 1000 octets as it is.
        ([b"a\r\n" + b"x" * 16 + b"\r\n.\r\n"], Limits(stream=16), None,
         b"a\r\n" + b"x" * 16 + b"\r\n", b""),
        ([b"a\r\n." + b"x" * 16 + b"\r\n.\r\n"], Limits(stream=16), replies.DATA_LINE_TOO_LONG,
         b"", b""),
        # After a line longer than the stream buffer, ".\r\n" ends that line, not the message.
        ([b"z" * 40, b".\r\n.\r\n" + QUIT], Limits(stream=16), replies.DATA_LINE_TOO_LONG, b"",
         QUIT),
        # ... and once that line has ended, ".\r\n" ends the message.
        ([b"z" * 40 + b"\r\n", b".\r\n" + QUIT], Limits(stream=16), replies.DATA_LINE_TOO_LONG,
         b"", QUIT),
    ],
)  # fmt: skip
@pytest.mark.parametrize("early", [0, 1], ids=["awaited", "buffered"])
def test_what_a_transfer_gives(
    pieces: list[bytes],
    limits: Limits,
    refusal: str | None,
    content: bytes,
    left: bytes,
    early: int,
) -> None:
    """Awaited: the first line comes through ``readuntil``; buffered: all of the first piece
    was there when the read began, so its lines come through the bulk path."""
    outcome = both(pieces, early, limits)
    assert (outcome.refusal, outcome.content) == (refusal, content)
    assert (outcome.ended, outcome.unread) == ("final dot", left)


def test_an_endless_transfer_keeps_memory_within_the_size_limit() -> None:
    """Lines without a final dot, and a line without a CRLF: nothing kept past the limit."""
    lines = [b"Subject: x\r\n\r\n"] + [b"b" * 500 + b"\r\n"] * 400
    outcome = both([*lines, b"w" * 100_000], limits=Limits(max_bytes=10_000))
    assert (outcome.refusal, outcome.content) == (replies.TOO_BIG, b"")
    assert outcome.ended.startswith("end of stream")


def test_the_timeout_restarts_on_lines_and_fragments_not_on_partial_lines() -> None:
    async def run() -> list[str]:
        stream = asyncio.StreamReader(limit=16)
        message = MessageReader(10_000, 1_000, 5, stream_limit=16)
        seen: list[str] = []
        task = asyncio.ensure_future(read_data(stream, message, lambda: seen.append("r"), 0.0))
        for piece in (b"abc", b"def", b"\r\n", b"x" * 8, b"y" * 12, b"\r\na\r\nb\r\n", b".\r\n"):
            seen.append(piece.decode())
            stream.feed_data(piece)
            await _settle()
        await task
        return seen

    # One restart for "abcdef", one for the fragment past 16 octets, one for its line end and
    # one for the two lines taken together; none for the final dot (the read is over).
    assert asyncio.run(run()) == [
        "abc", "def", "\r\n", "r", "x" * 8, "y" * 12, "r", "\r\na\r\nb\r\n", "r", "r", ".\r\n"
    ]  # fmt: skip


# --------------------------------------------------------------------------- the fuzz

FIELDS = (
    b"Received: from a", b"received :by b", b"RECEIVED:", b"Received", b"Subject: s", b"X-A:",
    b"From : a", b" folded", b"\tfolded", b"Not a field", b":no name", b".Received: x", b"",
    b"X-Received: a", b"Subject: received: x", b"X: a\rb", b"X: a\nb", b"X: a\r", b"X: \r\r",
    b"Received: a\nReceived: b", b"..X: a", b". folded",
)  # fmt: skip
_BYTES = st.sampled_from(list(b"ab .:\r\n\tR")).map(lambda byte: bytes([byte]))
short_lines = st.lists(_BYTES, max_size=12).map(b"".join)
ENDS = (b".\r\n", b".\r\n" + QUIT, b".\r\n" + MAIL + QUIT, b".\r\n.\r\n", b".", b"", b".\r\nx")
STREAM_LIMITS = (2, 5, 16, 64, 300, 997, 998, 999, 1000, 1001, AUTH_LINE_MAX)


def long_lines(stream: int) -> st.SearchStrategy[bytes]:
    """Lines about as long as the stream buffer or a text line may be, with a stuffed dot or
    without, of octets a line may have anywhere."""
    sizes = (stream - 2, stream - 1, stream, stream + 1, 996, 997, 998, 999, 1000)
    return st.builds(
        lambda dots, size, fill: b"." * dots + fill * size,
        st.integers(0, 2),
        st.sampled_from([size for size in sizes if size >= 0]) | st.integers(0, 1100),
        st.sampled_from([b"x", b"x", b"\r", b"\n", b"."]),
    )


def _near(value: int) -> st.SearchStrategy[int]:
    """About ``value``: a limit just reached, or just crossed."""
    return st.integers(max(value - 2, 0), value + 2)


def _measures(data: bytes) -> tuple[int, int, int]:
    """What the message in ``data`` weighs, roughly as the reader counts (limits drawn about
    these values land on their edges): its size, its header section's, its hops."""
    size = header = hops = 0
    in_header = True
    for line in data.split(b"\r\n")[:-1]:
        if line == b".":
            break
        line = line.removeprefix(b".")
        size += len(line) + 2
        in_header = in_header and re.match(rb"[!-9;-~]+[ \t]*:|[ \t]", line) is not None
        header += (len(line) + 2) * in_header
        hops += in_header and re.match(rb"(?i)received[ \t]*:", line) is not None
    return size, header, hops


@FUZZ
@given(st.data())
def test_bulk_reading_is_reading_line_by_line(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from(STREAM_LIMITS), "stream limit")
    line = st.one_of(
        st.sampled_from(FIELDS),
        st.sampled_from(FIELDS),
        short_lines,
        long_lines(stream),
        st.sampled_from([b".", b"..", b"...", b".\r", b"\n.", b"\r"]),
    )
    body = data.draw(st.lists(line, max_size=40), "lines")
    end = data.draw(st.sampled_from(ENDS) | short_lines, "end")
    sent = b"".join(line + b"\r\n" for line in body) + end
    size, header, hops = _measures(sent)
    limits = Limits(
        max_bytes=data.draw(_near(size) | st.integers(0, 4000) | st.just(100_000), "max_bytes"),
        max_header_bytes=data.draw(_near(header) | st.integers(0, 300), "max_header_bytes"),
        max_hops=data.draw(_near(hops) | st.integers(0, 3), "max_hops"),
        stream=stream,
    )
    cuts = data.draw(st.lists(st.integers(0, len(sent)), max_size=12), "cuts")
    early = data.draw(st.integers(0, 2), "pieces sent before the read")
    both(split(sent, cuts), early, limits)
