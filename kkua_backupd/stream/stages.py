"""The interface of the byte chain's stages (docs/architecture.md, "Adding a stream stage").

A backup's bytes go source -> compress -> [encrypt] -> hash -> file. On the way out each stage is a `Sink`
that wraps the next one: `write` takes bytes in order, `close` writes what the stage still holds (a
compressor's trailer, the last encrypted chunk) into its inner sink and then closes that sink, and `abort`
drops everything without finishing (on an error or a kill) and aborts the inner sink, so that no partial
file survives. On the way back a stage is a `Reader`: a function from the stored chunks to the chunks
before it, which raises IntegrityError where the bytes are not what the stage wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol


class Sink(Protocol):
    """One stage on the way out, or the file at its end."""

    def write(self, data: bytes, /) -> None:
        """Take the next bytes of the stream."""

    def close(self) -> None:
        """Finish the stream: write what is held into the inner sink, then close it."""

    def abort(self) -> None:
        """Give up: drop what is held, abort the inner sink; safe to call more than once, and after close."""


Reader = Callable[[Iterable[bytes]], Iterator[bytes]]
