"""Redis commands packed in C (hiredis), for the synchronous clients of :func:`spool.connect`.

redis-py packs each command in Python first — every argument through its encoder, in a
generator — and only then hands the encoded tuple to ``hiredis.pack_command``. hiredis takes
``str``, ``bytes``, ``int`` and ``float`` arguments as they are (UTF-8, and ``repr`` for a
float, as redis-py's encoder does), so :class:`Packer` hands them over directly: a deliver
round's transaction (a dozen commands) costs a fifth less CPU to send (bench/README.md,
"Session 7").

Contract: the bytes on the wire are those redis-py would send. An argument hiredis does not
take (a ``bool``, ``None``, a ``memoryview``, a ``bytearray``) goes redis-py's own way (its
Python packer, the same in redis-py 5 to 8), which packs it or raises its ``DataError`` as
before. A command name with spaces in it (``"SCRIPT LOAD"``) is split into words, as redis-py
does. Without hiredis (:data:`AVAILABLE` false), or for a ``redis_url`` with an encoding other
than strict UTF-8, nothing changes: :func:`connection_kwargs` is empty.
"""

from __future__ import annotations

from typing import Any

from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

try:
    import hiredis

    AVAILABLE = True
except ImportError:  # pragma: no cover - hiredis is in the locks
    AVAILABLE = False

BUFFER_CUTOFF = 6000  # redis-py's, for its Python packer (larger arguments: pieces of their own)


class Packer:
    """A redis-py ``command_packer``: ``pack(*args)`` → the command's bytes, in one piece."""

    def __init__(self) -> None:
        encode = Encoder("utf-8", "strict", False).encode  # type: ignore[no-untyped-call]
        self._redis_py = PythonRespSerializer(BUFFER_CUTOFF, encode)  # redis-py 5 to 8 alike

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]  # split into words as redis-py splits it ("SCRIPT LOAD")
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif isinstance(name, bytes) and b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # an argument hiredis does not take: redis-py's way
            return list(self._redis_py.pack(*args))  # type: ignore[no-untyped-call]


def connection_kwargs(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a synchronous client's connections take to use :class:`Packer` (empty without
    hiredis). ``options``: the client's own (a ``redis://`` URL's query, e.g.); with an
    ``encoding`` or ``encoding_errors`` other than UTF-8's strict (hiredis encodes ``str`` as
    UTF-8, strictly) redis-py packs, with that encoding, as every other client of the URL does."""
    options = options or {}
    if options.get("encoding", "utf-8").lower().replace("_", "-") not in ("utf-8", "utf8"):
        return {}
    if options.get("encoding_errors", "strict") != "strict":
        return {}
    return {"command_packer": Packer()} if AVAILABLE else {}
