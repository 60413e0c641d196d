"""Standard output that a closed pipe ends quietly (``bus-guard policy schema | head -1``,
``bus-guard demo | head -3``).

Python ignores SIGPIPE (so that a socket's peer closing is an ``EPIPE`` to handle, which
the gateway needs), so a write to a pipe whose reader left raises ``BrokenPipeError``,
wherever it happens: in a command's body, or inside a NATS callback of ``watch`` or
``demo``, where nats-py would pass it to its error callback and carry on printing nothing
for ever. :class:`PipeGuard` catches it in ``write``/``flush``: from then on output goes
nowhere, the file descriptor points at ``/dev/null`` (so the interpreter's own flush at exit
is quiet too, as the Python docs recommend), and :meth:`until_broken` cancels the command
running under it, which then ends as if interrupted: the gateway drains, the embedded
server stops, and the process exits 141 (128 + SIGPIPE), without a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, cast

import anyio

__all__ = ("PipeGuard",)

_EXIT_PIPE = 141


class PipeGuard:
    """A text stream over *target* that never raises ``BrokenPipeError``."""

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self.broken = False
        self._on_broken: Callable[[], None] | None = None

    @property
    def stream(self) -> TextIO:
        """This object, typed as the text stream it stands in for."""
        return cast(TextIO, self)

    # -- the TextIO surface the CLI and rich use -------------------------------------------

    def write(self, text: str) -> int:
        if self.broken:
            return len(text)
        try:
            return self._target.write(text)
        except BrokenPipeError:
            self.broke()
            return len(text)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._target.flush()
        except BrokenPipeError:
            self.broke()

    def isatty(self) -> bool:
        return not self.broken and self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    # -- broken ------------------------------------------------------------------------

    def broke(self) -> None:
        """The reader is gone: drop all further output and stop the running command."""
        if self.broken:
            return
        self.broken = True
        # Not a real file (a test's StringIO): nothing flushes it at exit anyway.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._target.fileno())
            os.close(devnull)
        if self._on_broken is not None:
            self._on_broken()

    def flush_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()

    async def until_broken(self, command: Callable[[], Awaitable[int]]) -> int:
        """Run *command*; if the output breaks meanwhile, cancel it and return 141."""
        with anyio.CancelScope() as scope:
            self._on_broken = scope.cancel
            try:
                result = await command()
                return _EXIT_PIPE if self.broken else result
            finally:
                self._on_broken = None
        return _EXIT_PIPE
