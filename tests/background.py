"""The base of the test peers that serve from a background thread (DNS, HTTPS, SMTP sinks).

A subclass defines :meth:`Background.start` (returns itself once it serves; raises when it
cannot) and :meth:`Background.stop` (waits for the thread; harmless when not started). The base
makes it a context manager: ``with Peer(...) as peer:`` starts it and stops it on the way out,
also when the block raises (the exception is not swallowed).
"""

from __future__ import annotations

import abc
from typing import Self

__all__ = ["Background"]


class Background(abc.ABC):
    """Start on ``with``, stop on leaving it."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Start serving; return ``self``."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving and join the background thread."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
