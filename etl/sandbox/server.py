"""Running the sandbox: uvicorn in a background thread, or in the foreground.

:class:`SandboxServer` is what tests and the embedded default target use: a
real HTTP server on loopback, started and stopped around a block.
:func:`serve_forever` is the CLI's: the same server until SIGINT or SIGTERM.

The sandbox speaks plain HTTP and keeps PHI-shaped data, so it binds only
loopback addresses unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import uvicorn

from etl.errors import UsageError
from etl.load.client import is_loopback_host
from etl.sandbox.app import Sandbox, SandboxConfig, build_app

__all__ = ["SandboxServer", "announce", "serve_forever"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def _check_loopback(host: str, allow_remote: bool) -> None:
    # The clients' own rule for what is loopback: ``localhost`` only when it resolves to loopback alone.
    if not allow_remote and not is_loopback_host(host):
        raise UsageError(
            f"refusing to serve the sandbox on {host!r}, which is not a loopback address: "
            "it speaks plain HTTP (pass allow_remote=True to do it anyway)"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only sets TCP_NODELAY on sockets that do,
    # and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hint = (
            "another process is listening there: stop it, or pick another port (0: any free one)"
            if exc.errno == errno.EADDRINUSE
            else "pick another --host or --port"
        )
        raise UsageError(f"cannot serve the sandbox on {where}: {exc.strerror or exc}; {hint}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, stopped without its fixed pauses: a stop took 0.2 s of every sandbox's life (each test's,
    each load into the embedded one), spent waiting.

    uvicorn notices ``should_exit`` at its next tick, a tenth of a second apart; here :meth:`wake` ends the wait
    at once. Its shutdown then waits a tenth of a second after asking the open connections to close; here it
    polls every hundredth until they have (no wait when none is open), for as long as uvicorn's graceful
    timeout allows, as uvicorn does. ``uvicorn.Server``'s ``on_tick``, ``servers``, ``server_state`` and
    ``lifespan`` are used as uvicorn's own loop and shutdown use them.
    """

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):  # the date header once a second, the exit flag every tick
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def wake(self) -> None:
        """End the current tick's wait (from any thread), so ``should_exit`` is seen now."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server has stopped already
                loop.call_soon_threadsafe(wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()  # an idle keep-alive connection closes now, a busy one after its response
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while (state.connections or state.tasks) and not self.force_exit:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            for task in state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


class SandboxServer:
    """The sandbox served by uvicorn in a daemon thread.

    >>> with SandboxServer() as server:  # doctest: +SKIP
    ...     httpx.get(server.base_url + "/health")

    ``port=0`` picks a free port; :attr:`base_url` has the real one.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
    ) -> None:
        _check_loopback(host, allow_remote)
        self.config = config or SandboxConfig()
        self.host = host
        self.port = port
        self._sandbox: Sandbox | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._socket is None:
            raise RuntimeError("the sandbox server is not running")
        port = self._socket.getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    @property
    def api_key(self) -> str:
        """The first configured API key."""
        return self.config.api_key

    @property
    def sandbox(self) -> Sandbox:
        """The running sandbox: its store and its fault plan."""
        if self._sandbox is None:
            raise RuntimeError("the sandbox server is not running")
        return self._sandbox

    def start(self) -> SandboxServer:
        """Bind, start serving and wait until requests are accepted."""
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        self._socket = _bind(self.host, self.port)
        self._sandbox = Sandbox(self.config)
        uv_config = uvicorn.Config(
            build_app(self._sandbox),
            host=self.host,
            port=self._socket.getsockname()[1],
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(uv_config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="clinik-sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox server failed to start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving, finish bulk jobs and close the store (idempotent)."""
        if self._thread is not None:
            self._server.should_exit = True
            self._server.wake()
            self._thread.join(_STOP_TIMEOUT)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join()
        if self._socket is not None:
            self._socket.close()
        if self._sandbox is not None:
            self._sandbox.close()
        self._thread = self._server = self._socket = self._sandbox = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def announce(server: SandboxServer) -> None:
    """Print where a foreground sandbox listens and the key to use with it."""
    print(f"ClinikAPI sandbox listening on {server.base_url} (Ctrl+C to stop)", flush=True)
    print(f"API key: {server.api_key}", flush=True)
    print(f"Redox bearer token (load --target redox): {server.config.redox_tokens[0]}", flush=True)
    faults = server.sandbox.faults
    if faults.active:
        print(faults.describe(), flush=True)
    if server.config.search_lag:
        print(f"search shows new resources after {server.config.search_lag:g} s", flush=True)
    print(f"responses: {server.config.responses} (etl.sandbox.shapes)", flush=True)
    config = server.config
    period = f"{config.quota_window:g} s" if config.quota_window else "month (UTC)"
    if config.quota:
        print(f"monthly quota: {config.quota} requests per {period}", flush=True)
    if config.sandbox_quota:
        print(f"sandbox allowance: {config.sandbox_quota} test requests per {period}", flush=True)


def serve_forever(
    config: SandboxConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    ready: Callable[[SandboxServer], None] | None = None,
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly.

    ``ready`` is called once the server accepts requests; by default it
    prints the base URL and the first key to stdout, since an operator who
    starts a sandbox needs both to point ``load --base-url`` at it. Must be
    called from the main thread, which owns signal handling. Returns normally
    after a signal; the caller picks the exit status.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SandboxServer(config, host, port, allow_remote=allow_remote) as server:
            (ready or announce)(server)
            # A timeout keeps the wait responsive to signals on every platform.
            while not stopping.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
