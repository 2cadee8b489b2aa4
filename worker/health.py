"""Liveness and readiness, served with the metrics on one small HTTP server (METRICS_PORT).

- `/healthz` (liveness): the process is alive and its main loop turns (worker.liveness). Beat:
  it tried to send a dispatch recently (worker.beat_health).
- `/readyz` (readiness): the worker's database and Redis answer, the platform circuit breaker is
  closed, and verification is not stalled (worker.readiness). Beat: its last dispatch reached
  the broker recently.
- `/metrics`: Prometheus's text format (worker.metrics, read by worker.scrape).

Both answer 200 or 503 with a JSON body naming each check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis

from worker import metrics
from worker.beat_health import beat_checks
from worker.cached_value import CachedValue
from worker.db import KEEPALIVES, build_engine
from worker.fleet import BrokerState, FleetSummary, read_broker_state, summarize_fleet
from worker.liveness import STARTING_MARGIN_SECONDS, worker_liveness
from worker.logging import get_logger
from worker.readiness import READINESS_CACHE_SECONDS, WorkerReadiness
from worker.scrape import FleetCollector, worker_registry
from worker.settings import Settings
from worker.stall import StallWatch

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = get_logger("worker.health")


# --- the HTTP server ----------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not worth a log line."""


Check = Callable[[], tuple[bool, dict[str, Any]]]


def wsgi_app(registry: CollectorRegistry, liveness: Check, readiness: Check) -> Any:
    """/metrics, /healthz, /readyz."""
    from prometheus_client import make_wsgi_app  # noqa: PLC0415

    serve_metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return serve_metrics(environ, start_response)  # type: ignore[no-any-return]
        check = {"/healthz": liveness, "/readyz": readiness}.get(path)
        if check is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"/metrics, /healthz or /readyz\n"]
        ok, checks = check()
        body = json.dumps({"status": "ok" if ok else "fail", "checks": checks}).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
        )
        return [body]

    return app


_server: _Server | None = None


def serve(settings: Settings, app: Any, *, process: str) -> _Server | None:
    """Serve `app` on METRICS_ADDRESS:METRICS_PORT from a daemon thread of this process."""
    global _server  # noqa: PLW0603 - one per process
    assert settings.metrics_port is not None  # noqa: S101 - callers check
    try:
        server = make_server(
            settings.metrics_address,
            settings.metrics_port,
            app,
            server_class=_Server,
            handler_class=_QuietHandler,
        )
    except OSError as error:
        # The process works on without the endpoint; its probes fail, which says something.
        log.error(  # noqa: TRY400 - the message says it all; a traceback would not help
            "metrics.unavailable",
            process=process,
            address=settings.metrics_address,
            port=settings.metrics_port,
            error=str(error),
        )
        return None
    _server = server
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    host, port = server.server_address[:2]
    log.info("metrics.serving", process=process, address=str(host), port=int(port))
    return server


def _close_in_child() -> None:
    # A forked pool process must not keep the listening socket open (the port would stay taken
    # after the main process exits); close its copy only, never shut the shared socket down.
    if _server is not None:
        _server.socket.close()


os.register_at_fork(after_in_child=_close_in_child)


def start_worker_endpoint(settings: Settings) -> None:
    """In the worker's main process, before its pool starts (METRICS_PORT set)."""
    metrics.enable_worker(settings)
    # The main process's own small pool and Redis client: the pool processes never share them.
    # Keepalives and a TCP user timeout: a server gone without closing the socket is noticed
    # within a minute, not after the kernel's two hours (the checks' timeout answers sooner).
    engine = build_engine(
        settings.model_copy(update={"database_pool_size": 2}),
        connect_args={**KEEPALIVES, "tcp_user_timeout": 30_000},
    )
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10
    )

    def read_fleet() -> FleetSummary:
        with engine.connect() as connection, connection.begin():
            from sqlalchemy.orm import Session  # noqa: PLC0415

            with Session(bind=connection) as session:
                return summarize_fleet(session, overdue_seconds=settings.connected_interval_seconds)

    # Stale after three intervals: verifier_fleet_query_up says 0 while the read hangs.
    fleet = CachedValue(read_fleet, settings.metrics_database_interval_seconds)
    watch = StallWatch(
        client,
        window_seconds=settings.stall_window_seconds,
        min_verifications=settings.stall_min_verifications,
    )

    def read_broker() -> BrokerState:
        state = read_broker_state(client, ceiling_per_second=settings.sts_rate_limit_per_second)
        return dataclasses.replace(state, stalled_code=watch.stalled_code())

    broker = CachedValue(read_broker, READINESS_CACHE_SECONDS)
    registry = worker_registry(FleetCollector(fleet, broker, settings))
    serve(
        settings,
        wsgi_app(
            registry,
            functools.partial(
                worker_liveness,
                starting_limit=settings.startup_timeout_seconds + STARTING_MARGIN_SECONDS,
            ),
            WorkerReadiness(settings, engine, client),
        ),
        process="worker",
    )


def start_beat_endpoint(settings: Settings) -> None:
    """In beat's process (METRICS_PORT set)."""
    registry = metrics.enable_beat()
    liveness, readiness = beat_checks(settings)
    serve(settings, wsgi_app(registry, liveness, readiness), process="beat")
