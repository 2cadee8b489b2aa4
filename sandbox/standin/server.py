"""HTTP/1.1 over asyncio protocols, `serve` for an existing event loop, and `StsStandIn`: the
loop on a background thread of this process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final, TypeVar, cast

from sandbox.standin.base import _Reply, _Request
from sandbox.standin.config import StandInConfig
from sandbox.standin.core import _Core

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 1024 * 1024


# --------------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio protocols (cheaper than streams: no coroutine per request).
# --------------------------------------------------------------------------------------------


def _header(head: str, lowered: str, name: str) -> str | None:
    """The value of header `name` (lower case) in a request head, or None."""
    start = lowered.find(f"\r\n{name}:")
    if start < 0:
        return None
    start += len(name) + 3
    end = head.find("\r\n", start)
    return (head[start:] if end < 0 else head[start:end]).strip()


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection. Requests are answered strictly in order (HTTP pipelining)."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # A parsed head whose body is still arriving: method, target, Authorization, close,
        # where the body starts in the buffer, its length, and X-Amz-Target.
        self._head: tuple[str, str, str, bool, int, int, str] | None = None
        self._continue_sent = False
        self._busy = False  # an answer is pending; later requests wait in the buffer
        self._processing = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._core.connections.add(self)
        self._core.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._core.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Close from the server side (shutdown)."""
        if self._transport is not None and not self._closed:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _MAX_HEAD + _MAX_BODY:
            self._abort()
        elif not self._busy and not self._processing:
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while not self._busy and not self._closed and self._buffer:
                request = self._parse()
                if request is None:
                    return
                self._busy = True
                try:
                    reply = self._core.handle(request)
                except Exception as error:  # noqa: BLE001 - a stand-in bug must not hang clients
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "sts stand-in failed to answer", "exception": error}
                    )
                    reply = self._core.plain(500, f"sts stand-in bug: {error!r}")
                self._dispatch(reply)
        finally:
            self._processing = False

    def _parse(self) -> _Request | None:
        """The next complete request from the buffer, or None (incomplete, or answered 4xx)."""
        buf = self._buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._reject(431, "request header too large")
                return None
            head = self._parse_head(buf[:end].decode("latin-1"), end + 4)
            if head is None:
                return None
            self._head = head
        method, target, authorization, close, body_start, length, amz_target = self._head
        if len(buf) < body_start + length:
            if not self._continue_sent and self._transport is not None:
                self._continue_sent = True  # harmless if the client did not wait for it
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buf[body_start : body_start + length])
        del buf[: body_start + length]
        self._head = None
        self._continue_sent = False
        return _Request(method, target, authorization, body, close, amz_target)

    def _parse_head(
        self, head: str, body_start: int
    ) -> tuple[str, str, str, bool, int, int, str] | None:
        line_end = head.find("\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reject(400, "malformed request line")
            return None
        method, target, version = parts
        # Only five headers matter. Finding them in a lower-cased copy (same length: latin-1)
        # costs a third of splitting and lower-casing every header line.
        lowered = head.lower()
        length_text = _header(head, lowered, "content-length") or "0"
        if not length_text.isdigit():
            self._reject(400, "bad Content-Length")
            return None
        if _header(head, lowered, "transfer-encoding") is not None:
            self._reject(501, "chunked request bodies are not supported")
            return None
        length = int(length_text)
        option = (_header(head, lowered, "connection") or "").lower()
        close = option == "close" or (version != "HTTP/1.1" and option != "keep-alive")
        authorization = _header(head, lowered, "authorization") or ""
        expect = (_header(head, lowered, "expect") or "").lower() == "100-continue"
        if length > _MAX_BODY:
            self._reject(413, "request body too large")
            return None
        self._continue_sent = not expect
        amz_target = _header(head, lowered, "x-amz-target") or ""
        return method, target, authorization, close, body_start, length, amz_target

    def _reject(self, status: int, text: str) -> None:
        self._busy = True
        self._buffer.clear()
        self._dispatch(self._core.plain(status, text))

    def _dispatch(self, reply: _Reply) -> None:
        if reply.delay > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(reply.delay, self._deliver, reply)
        else:
            self._deliver(reply)

    def _deliver(self, reply: _Reply) -> None:
        self._timer = None
        if self._closed or self._transport is None:
            return
        if reply.reset:
            self._abort()
            return
        self._transport.write(reply.data)
        if reply.close:
            self._closed = True
            self._transport.close()
            return
        self._busy = False
        if not self._processing and self._buffer:
            self._process()

    def _abort(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
        self._closed = True
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()


async def serve(
    config: StandInConfig,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve on the running loop until `stop` is set; `on_ready(port)` once listening.

    For embedding in an existing asyncio program; `StsStandIn` and `main` are built on it.
    """
    await _serve(_Core(config), stop, host=host, port=port, on_ready=on_ready)


async def _serve(
    core: _Core,
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    on_ready: Callable[[int], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpConnection(core), host, port)
    try:
        if on_ready is not None:
            on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        for connection in list(core.connections):
            connection.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop goes


# --------------------------------------------------------------------------------------------
# In-process use: the loop in a background thread.
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class StsStandIn:
    """The stand-in on a background thread of this process: ``with StsStandIn() as sts: ...``.

    Knobs are either a ``StandInConfig`` or keyword arguments with the same names, checked at
    run time (``StsStandIn(median_ms=0, rate_limit=100)``).
    """

    def __init__(
        self,
        config: StandInConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **knobs: object,
    ) -> None:
        base = config if config is not None else StandInConfig()
        self._core = _Core(base.with_changes(knobs) if knobs else base)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StsStandIn:
        """Listen, on a daemon thread; return once connections are accepted (or raise)."""
        if self._thread is not None:
            raise RuntimeError("the stand-in is already running")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="sts-standin", daemon=True
        )
        self._thread.start()
        try:
            self._port = ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        return self

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(
                self._core,
                self._stop,
                host=self._host,
                port=self._requested_port,
                on_ready=ready.set_result,
            )

        try:
            asyncio.run(main())
        except BaseException as error:
            if ready.done():
                raise  # after start-up: let threading's excepthook report it
            ready.set_exception(error)  # during start-up: start() re-raises it

    def stop(self) -> None:
        """Close every connection (pending answers are dropped) and join the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        self._thread = self._loop = self._stop = None
        self._port = None

    def __enter__(self) -> StsStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in is not running; call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """What to give boto3 as ``endpoint_url`` (or ``AWS_ENDPOINT_URL_STS``)."""
        return f"http://{self._host}:{self.port}"

    # -- knobs and statistics (thread-safe: they run on the loop's thread) -----------------------

    def _on_loop(self, function: Callable[[], _T]) -> _T:
        """Run `function` on the loop thread (state is only touched there) and return its result."""
        loop = self._loop
        if loop is None or self._thread is None or threading.current_thread() is self._thread:
            return function()
        result: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                result.set_result(function())
            except Exception as error:  # noqa: BLE001 - re-raised in the calling thread
                result.set_exception(error)

        loop.call_soon_threadsafe(call)
        return result.result(timeout=10)

    @property
    def config(self) -> StandInConfig:
        return self._core.config

    def configure(self, **changes: object) -> StandInConfig:
        """Change some knobs (same names and JSON types as ``POST /_standin/config``)."""
        return self._on_loop(lambda: self._core.change_config(changes))

    def replace_config(self, config: StandInConfig) -> StandInConfig:
        """Replace every knob at once (e.g. back to a test's baseline)."""
        return self._on_loop(lambda: self._core.replace_config(config))

    def stats(self, *, roles: bool = True) -> dict[str, object]:
        """A snapshot of the counters, as ``GET /_standin/stats`` answers them."""
        return self._on_loop(lambda: self._core.snapshot(roles=roles))

    def reset(self) -> None:
        """Zero the counters and the ``flaky`` roles' call counts."""
        self._on_loop(self._core.reset)
