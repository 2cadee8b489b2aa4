"""A customer's webhook receiver, for tests and the local demo: verifies every message's
signature with the `standardwebhooks` package (not with the worker's own code) and records it.

    python -m sandbox.webhook_receiver [--port N] [--organization UUID|demo]

As a command it listens on 127.0.0.1, registers itself as an endpoint of the organization (the
demo organization by default; an endpoint already registered for its URL gets a new secret) and
prints one line per message. The worker must run with WEBHOOK_ALLOW_PRIVATE_NETWORKS=true to
deliver to it, and the same WEBHOOK_SECRET_KEY as this command.

In tests, `WebhookReceiver` runs in a thread; its `behaviour` makes it answer like a healthy
receiver, a broken one (500), one that is gone (410), one that throttles (429 with Retry-After),
one that hangs, one that trickles its answer a byte at a time (every read is quick, the
answer never ends), or one that closes a kept-alive connection when the next request comes.
"""

from __future__ import annotations

import argparse
import enum
import functools
import queue
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings


class Behaviour(enum.StrEnum):
    """How the receiver answers."""

    OK = "ok"  # 204
    ERROR = "error"  # 500
    GONE = "gone"  # 410
    THROTTLE = "throttle"  # 429 with Retry-After
    HANG = "hang"  # answers nothing for `hang_seconds` (or until `stop`)
    TRICKLE = "trickle"  # sends its headers a byte every 0.2 s for `hang_seconds` (or until `stop`)
    REDIRECT = "redirect"  # 302 to the cloud metadata service
    # 204 to a connection's first request; a later one on the same (kept-alive) connection is
    # read and the connection closed without an answer, as when a server's keep-alive timeout
    # runs out just as the client reuses the connection.
    CLOSE_KEPT = "close-kept"


@dataclass(frozen=True, slots=True)
class Received:
    """One request the receiver got."""

    webhook_id: str
    verified: bool
    payload: dict[str, Any] | None
    answered: int | None  # the status code sent back (None: hung up)
    at: float  # time.time()
    host: str = ""  # the Host header
    peer_port: int = 0  # the client's port: one per connection
    accept_encoding: str = ""  # the Accept-Encoding header

    @property
    def event_type(self) -> str | None:
        """The payload's `type`."""
        return None if self.payload is None else str(self.payload.get("type"))


@dataclass
class WebhookReceiver:
    """An HTTP server in a thread that verifies and records webhook messages."""

    secrets: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    behaviour: Behaviour = Behaviour.OK
    hang_seconds: float = 30.0
    retry_after: str = "1"
    received: list[Received] = field(default_factory=list)
    # HTTP/1.1 with keep-alive, as most real servers (a client may then reuse the connection).
    keep_alive: bool = False
    # Behaviour.ERROR's body and its Content-Encoding header (none when empty).
    error_body: bytes = b""
    error_encoding: str = ""
    on_receive: Any = None  # called with each Received (the command prints it)
    # Serve HTTPS with this context (tests of the sender's TLS); plain HTTP when None.
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = _Server((self.host, self.port), _handler(self))
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where to send messages."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}/webhooks"

    def start(self) -> WebhookReceiver:
        """Start serving in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; requests left hanging or trickling end at once,
        unanswered (their connections are closed)."""
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stalls(self, seconds: float) -> bool:
        """Wait `seconds` while serving; False at once when the receiver stops."""
        return not self._stopped.wait(seconds)

    def record(self, item: Received) -> None:
        """Keep a request (thread-safe)."""
        with self._lock:
            self.received.append(item)
        if self.on_receive is not None:
            self.on_receive(item)

    def accepted(self) -> list[Received]:
        """Verified requests answered with 2xx: the messages the customer processed."""
        with self._lock:
            return [r for r in self.received if r.verified and r.answered in range(200, 300)]

    def accepted_ids(self) -> Counter[str]:
        """How often each `webhook-id` was accepted."""
        return Counter(r.webhook_id for r in self.accepted())

    def snapshot(self) -> list[Received]:
        """Every request so far."""
        with self._lock:
            return list(self.received)

    def verify(self, body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
        """The payload if one of the secrets verifies the signature, else None."""
        for secret in list(self.secrets):
            try:
                payload: dict[str, Any] = _webhook(secret).verify(body, headers)
            except (WebhookVerificationError, ValueError):  # ValueError: malformed headers
                continue
            return payload
        return None


@functools.lru_cache(maxsize=64)
def _webhook(secret: str) -> Webhook:
    """The verifier of one secret (its base64 decoded once, not per message)."""
    return Webhook(secret)


class _Server(ThreadingHTTPServer):
    """A threading server whose handler threads serve one connection after another: starting a
    thread per connection costs more than the request (the senders open one per message)."""

    # socketserver's default backlog is 5: a burst of connections beyond it (a worker's delivery
    # threads, every process's) has its SYNs dropped, each retried by the client's kernel after
    # a second — a delay of the receiver, not of the sender.
    request_queue_size = 256
    daemon_threads = True  # a hanging answer never holds up stop()

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._waiting: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._workers = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to an idle handler thread, or start one (none is idle)."""
        if not self._idle.acquire(blocking=False):
            self._workers += 1
            threading.Thread(target=self._work, daemon=True).start()
        self._waiting.put((request, client_address))

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            self.process_request_thread(*item)
            self._idle.release()

    def server_close(self) -> None:
        """Close the socket and let the idle handler threads end."""
        super().server_close()
        for _ in range(self._workers):
            self._waiting.put(None)


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"

        # Requests served on this handler's connection.
        served = 0

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload = receiver.verify(body, headers)
            webhook_id = headers.get("webhook-id", "")
            host = headers.get("host", "")
            peer_port = int(self.client_address[1])
            behaviour = receiver.behaviour
            self.served += 1
            unanswered = Received(
                webhook_id, payload is not None, payload, None, time.time(), host, peer_port
            )
            if behaviour is Behaviour.HANG:
                receiver.record(unanswered)
                receiver.stalls(receiver.hang_seconds)
                self.close_connection = True  # unanswered: the client must not wait on
                return
            if behaviour is Behaviour.TRICKLE:
                receiver.record(unanswered)
                self._trickle(receiver)
                return
            if behaviour is Behaviour.CLOSE_KEPT and self.served > 1:
                receiver.record(unanswered)
                self.close_connection = True
                return
            status = {
                Behaviour.OK: 204 if payload is not None else 401,
                Behaviour.CLOSE_KEPT: 204 if payload is not None else 401,
                Behaviour.ERROR: 500,
                Behaviour.GONE: 410,
                Behaviour.THROTTLE: 429,
                Behaviour.REDIRECT: 302,
            }[behaviour]
            receiver.record(
                Received(
                    webhook_id,
                    payload is not None,
                    payload,
                    status,
                    time.time(),
                    host,
                    peer_port,
                    headers.get("accept-encoding", ""),
                )
            )
            body = receiver.error_body if behaviour is Behaviour.ERROR else b""
            self.send_response(status)
            if behaviour is Behaviour.THROTTLE:
                self.send_header("retry-after", receiver.retry_after)
            if behaviour is Behaviour.REDIRECT:
                self.send_header("location", "http://169.254.169.254/latest/meta-data/")
            if body and receiver.error_encoding:
                self.send_header("content-encoding", receiver.error_encoding)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _trickle(self, receiver: WebhookReceiver) -> None:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-trickle: ")
            ends = time.monotonic() + receiver.hang_seconds
            try:
                while time.monotonic() < ends:
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    if not receiver.stalls(0.2):
                        return
            except OSError:
                return  # the client hung up

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the command prints its own lines."""

    return Handler


def _escape(value: object) -> str:
    """Customer-controlled text (aliases) with control characters escaped for the terminal."""
    text = str(value)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def describe(item: Received) -> str:
    """One printed line per message."""
    if not item.verified or item.payload is None:
        return f"{_escape(item.webhook_id)} REJECTED: no valid signature"
    data = item.payload.get("data") or {}
    account = data.get("account") or {}
    parts = [item.webhook_id, _escape(item.event_type)]
    if account:
        parts.append(f"account {_escape(account.get('alias'))} ({_escape(account.get('id'))})")
    if "from" in data:
        parts.append(f"{_escape(data.get('from'))} -> {_escape(data.get('to'))}")
    if data.get("reason"):
        parts.append(f"reason {_escape(data['reason'])}")
    return "  ".join(parts) + "  (signature verified)"


def demo_environment(data_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """What the demo's worker and receiver need: loopback allowed, and WEBHOOK_SECRET_KEY as
    given or else kept in DATA_DIR/webhook-secret-key (made once, readable by its owner only), so
    secrets stored by one run still decrypt in the next."""
    key = env.get("WEBHOOK_SECRET_KEY")
    if not key:
        from worker.webhooks.signing import generate_key  # noqa: PLC0415

        path = data_dir / "webhook-secret-key"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(generate_key())
        key = path.read_text().strip()
    return {"WEBHOOK_SECRET_KEY": key, "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true"}


DEMO_DESCRIPTION = "local demo receiver (sandbox.webhook_receiver)"


def register(url: str, organization_id: uuid.UUID) -> str:
    """Register `url` for the organization; the secret (see `register_in`)."""
    from worker.db import session_factory  # noqa: PLC0415 - only the command needs the database
    from worker.settings import get_settings_or_exit  # noqa: PLC0415

    settings = get_settings_or_exit()
    with session_factory().begin() as session:
        return register_in(session, url, organization_id, settings)


def register_in(session: Session, url: str, organization_id: uuid.UUID, settings: Settings) -> str:
    """Register `url` for the organization (or give its endpoint a new secret); the secret.

    Each run listens on a new port, so the endpoints of earlier runs' receivers (same
    description, another URL) are disabled: they would otherwise be retried for days.
    """
    from worker.webhooks import (  # noqa: PLC0415
        create_endpoint,
        disable,
        list_endpoints,
        rotate_secret,
    )

    secret = None
    for endpoint in list_endpoints(session, organization_id=organization_id):
        if not endpoint.enabled:
            continue
        if endpoint.url == url and secret is None:
            secret = rotate_secret(
                session, endpoint.id, organization_id=organization_id, settings=settings
            )
        elif endpoint.description == DEMO_DESCRIPTION and endpoint.url != url:
            disable(
                session,
                endpoint.id,
                organization_id=organization_id,
                reason="replaced by a newer demo receiver",
                actor="sandbox.webhook_receiver",
            )
    if secret is not None:
        return secret
    created = create_endpoint(
        session,
        organization_id=organization_id,
        url=url,
        settings=settings,
        description=DEMO_DESCRIPTION,
    )
    return created.secret


def _print(item: Received) -> None:
    print(describe(item), flush=True)  # noqa: T201 - a command's output


def main(argv: list[str] | None = None) -> int:
    """Run the receiver as a command until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.webhook_receiver",
        description=(__doc__ or "").strip().split("\n\n")[0],
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--organization", default="demo", help="organization id to register for (default: demo)"
    )
    args = parser.parse_args(argv)
    if args.organization == "demo":
        from sandbox.demo import DEMO_ORGANIZATION_ID  # noqa: PLC0415

        organization_id = DEMO_ORGANIZATION_ID
    else:
        organization_id = uuid.UUID(args.organization)
    receiver = WebhookReceiver(port=args.port, on_receive=_print)
    receiver.secrets.append(register(receiver.url, organization_id))
    print(  # noqa: T201 - a command's output
        f"webhook receiver listening on {receiver.url}, registered for organization "
        f"{organization_id}; signatures checked with standardwebhooks",
        flush=True,
    )
    receiver.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
