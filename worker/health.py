"""Liveness and readiness, served with the metrics on one small HTTP server (METRICS_PORT).

- `/healthz` (liveness): the process is alive and its main loop turns. The worker's event loop
  touches a timestamp every few seconds (a consumer bootstep's timer, fired by the loop itself);
  while the consumer is reconnecting to the broker the loop is not running, and that counts as
  alive (readiness says why it cannot work). Beat: it tried to send a dispatch recently. No
  database or Redis call, no app import: a probe costs a thread's few microseconds.
- `/readyz` (readiness, worker): the database and Redis answer, the platform circuit breaker is
  closed, and verification is not stalled. Checked at most once a second whoever asks; a check
  running longer than CHECK_TIMEOUT_SECONDS counts as failed. Beat: its last dispatch reached
  the broker recently. For a load balancer, an orchestrator's readiness and alerting: it fails
  fleet-wide when a shared service is away, so never restart containers on it.
- `/metrics`: Prometheus's text format (worker.metrics).

Both answer 200 or 503 with a JSON body naming each check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from celery import bootsteps
from sqlalchemy import Engine, text

from worker import metrics
from worker.circuit import KEY as CIRCUIT_KEY
from worker.db import build_engine
from worker.fleet import BrokerState, FleetSummary, read_broker_state, summarize_fleet
from worker.logging import get_logger
from worker.settings import Settings
from worker.stall import StallWatch

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = get_logger("worker.health")

# The worker's loop touches its timestamp this often; liveness fails after LIVENESS_SECONDS
# without a touch (several missed ticks, so a busy loop is not mistaken for a dead one).
TICK_SECONDS = 2.0
LIVENESS_SECONDS = 30.0
# Starting (no turn of the loop yet) is alive for STARTUP_TIMEOUT_SECONDS (the wait for the
# database and Redis) and this much more for the broker's connection and the pool's fork.
STARTING_MARGIN_SECONDS = 60.0
READINESS_CACHE_SECONDS = 1.0
# A readiness check running longer than this counts as failed (checks that waited on a hung
# database would otherwise leave the last "ok" standing); its statement is cut off sooner.
CHECK_TIMEOUT_SECONDS = 3.0
STATEMENT_TIMEOUT = "2s"


@dataclass
class LoopState:
    """What the main loop last did (monotonic seconds)."""

    started: float
    last_tick: float | None = None
    reconnecting_since: float | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()
        self.reconnecting_since = None

    def reconnecting(self) -> None:
        if self.reconnecting_since is None:
            self.reconnecting_since = time.monotonic()


loop_state = LoopState(started=time.monotonic())


class LoopHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer bootstep: while connected, the event loop itself touches `loop_state`."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entry: Any = None

    def start(self, parent: Any) -> None:
        loop_state.tick()
        self._entry = parent.timer.call_repeatedly(TICK_SECONDS, loop_state.tick)

    def stop(self, parent: Any) -> None:
        # The connection is gone (or the worker stops): the consumer reconnects before the loop
        # runs again.
        loop_state.reconnecting()
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    shutdown = stop


def worker_liveness(
    starting_limit: float = 30.0 + STARTING_MARGIN_SECONDS,
) -> tuple[bool, dict[str, Any]]:
    """Whether the worker's main loop turned lately, is reconnecting to the broker, or has been
    starting for less than `starting_limit` seconds."""
    now = time.monotonic()
    state = loop_state
    if state.reconnecting_since is not None:
        return True, {
            "loop": f"reconnecting to the broker for {now - state.reconnecting_since:.0f}s"
        }
    if state.last_tick is None:
        # Starting: connecting for the first time, or forking the pool. Bounded: a worker stuck
        # there is restarted.
        starting = now - state.started
        return starting < starting_limit, {"loop": f"starting for {starting:.0f}s"}
    age = now - state.last_tick
    return age < LIVENESS_SECONDS, {"loop": f"last turn {age:.1f}s ago"}


class Progress:
    """This worker's finished verifications as its processes counted them, and since when the
    count has not moved (read from the multiprocess files)."""

    def __init__(self) -> None:
        self._count = -1.0
        self._since = time.monotonic()

    def idle_seconds(self) -> float:
        count = 0.0
        for family in metrics.read_process_files():
            if family.name in {"verifier_verifications", "verifier_verifications_discarded"}:
                count += sum(s.value for s in family.samples if s.name.endswith("_total"))
        now = time.monotonic()
        if count != self._count:
            self._count, self._since = count, now
        return now - self._since


# The longest-waiting due account that nobody holds: an index scan of `next_due_at` that stops
# at the first unleased row (the fleet's full counts are the metrics' job, on scrapes only).
OLDEST_DUE = text(
    """
SELECT extract(epoch FROM now() - min(next_due_at)) AS seconds
  FROM aws_accounts
 WHERE next_due_at <= now()
   AND (lease_expires_at IS NULL OR lease_expires_at <= now())
"""
)


class WorkerReadiness:
    """The worker's readiness checks, on a small engine and Redis client of the main process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        stalled: Callable[[], str | None] | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._redis = client
        self._oldest_due_seconds = 0.0
        self._progress = Progress()
        # Another detector may replace the default (both rules below).
        self._stalled = stalled or self._stalled_by_default
        self._stall_watch = StallWatch(
            client,
            window_seconds=settings.stall_window_seconds,
            min_verifications=settings.stall_min_verifications,
        )
        self._cache = metrics.CachedValue(
            self._check, READINESS_CACHE_SECONDS, timeout=CHECK_TIMEOUT_SECONDS
        )

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        ok, checks = self._cache.get() or (False, {"checks": self._cache.error})
        return ok, checks

    def _check(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            with self._engine.connect() as connection, connection.begin():
                connection.execute(text(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"))
                seconds = connection.execute(OLDEST_DUE).scalar_one()
            self._oldest_due_seconds = max(0.0, float(seconds or 0))
            checks["database"] = "ok"
        except Exception as error:  # noqa: BLE001 - the answer says what failed
            checks["database"] = _failure(error)
        try:
            circuit = self._redis.get(CIRCUIT_KEY)
            checks["redis"] = "ok"
            checks["platform"] = "ok" if circuit is None else "circuit open: " + _circuit(circuit)
        except redis.RedisError as error:
            checks["redis"] = _failure(error)
            checks["platform"] = "unknown (Redis)"
        stalled = None
        if checks["database"] == "ok" and checks["redis"] == "ok":
            try:
                stalled = self._stalled()
            except redis.RedisError as error:
                stalled = "unknown: " + _failure(error)
        checks["verification"] = stalled or "ok"
        return all(value == "ok" for value in checks.values()), checks

    def _stalled_by_default(self) -> str | None:
        """Stalled: the fleet-wide `verification.stalled` condition holds (worker.stall: every
        verification of the window transient with one code), or accounts have been overdue for
        STALL_IDLE_SECONDS while this worker finished nothing for as long (the circuit breaker
        has its own check)."""
        code = self._stall_watch.stalled_code()
        if code is not None:
            window = self._settings.stall_window_seconds
            return f"stalled: every verification of the last {window}s transient with {code}"
        limit = self._settings.stall_idle_seconds
        overdue = self._oldest_due_seconds
        idle = self._progress.idle_seconds()
        if overdue > limit and idle > limit:
            return (
                f"stalled: accounts overdue {overdue:.0f}s, nothing verified here for {idle:.0f}s"
            )
        return None


def _failure(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first[:200]}"


def _circuit(raw: Any) -> str:
    try:
        return str(json.loads(raw).get("code", "?"))
    except (ValueError, AttributeError):
        return "?"


@dataclass
class BeatState:
    """When beat last tried to send a dispatch, and last succeeded (monotonic seconds)."""

    started: float
    last_tick: float | None = None
    last_sent: float | None = None


beat_state = BeatState(started=time.monotonic())


def beat_tick(*, sent: bool) -> None:
    """Beat tried to send a dispatch; `sent`: the broker took it."""
    now = time.monotonic()
    if sent:
        beat_state.last_sent = now
    else:
        beat_state.last_tick = now
    metrics.record_beat_tick(sent=sent)


def _recent(at: float | None, started: float, limit: float, *, grace: bool) -> tuple[bool, str]:
    now = time.monotonic()
    if at is None:
        return grace and now - started < limit, f"none yet ({now - started:.0f}s since start)"
    return now - at < limit, f"{now - at:.1f}s ago"


def beat_checks(settings: Settings) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Beat's liveness (it tries to dispatch on schedule) and readiness (the broker takes it)."""
    limit = max(LIVENESS_SECONDS, 5 * settings.dispatch_interval_seconds)

    def liveness() -> tuple[bool, dict[str, Any]]:
        ok, detail = _recent(beat_state.last_tick, beat_state.started, limit, grace=True)
        return ok, {"dispatch_tick": detail}

    def readiness() -> tuple[bool, dict[str, Any]]:
        ok, detail = _recent(beat_state.last_sent, beat_state.started, limit, grace=False)
        return ok, {"dispatch_sent": detail}

    return liveness, readiness


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
        connect_args={
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        },
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
    fleet = metrics.CachedValue(read_fleet, settings.metrics_database_interval_seconds)
    watch = StallWatch(
        client,
        window_seconds=settings.stall_window_seconds,
        min_verifications=settings.stall_min_verifications,
    )

    def read_broker() -> BrokerState:
        state = read_broker_state(client, ceiling_per_second=settings.sts_rate_limit_per_second)
        return dataclasses.replace(state, stalled_code=watch.stalled_code())

    broker = metrics.CachedValue(read_broker, READINESS_CACHE_SECONDS)
    registry = metrics.worker_registry(metrics.FleetCollector(fleet, broker, settings))
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
