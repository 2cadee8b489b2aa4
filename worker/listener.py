"""Dispatch as soon as an account becomes due, instead of at beat's next tick.

A trigger on `aws_accounts` (migration 20261201_0002_notify) sends a notification on
`CHANNEL` when a row is inserted due now, or an update makes it due now (an edited role, a lease
given back), whoever writes it: the API or the worker. Beat listens on one connection of its own
and sends the ordinary dispatch task at once, so a new or edited connection starts within
milliseconds; the periodic tick stays, for everything that becomes due by the clock (a retry, a
re-check, an expired lease) and for anything a lost connection missed.

One dispatch covers every row due when it runs, so notifications are coalesced: none is sent
while one is already waiting in the dispatch queue, and at most one per `MIN_GAP_SECONDS`. A
dispatch that finds nothing (the API already requested the account) costs one index probe.
Concurrent dispatches are safe: claims use `SKIP LOCKED` and a lease.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from worker.db import KEEPALIVES
from worker.logging import get_logger
from worker.queues import DISPATCH_QUEUE
from worker.settings import Settings

log = get_logger("worker.listener")

CHANNEL = "aws_accounts_due"
DISPATCH_TASK = "verifier.dispatch_due_accounts"
# Notifications closer together than this share one dispatch (a bulk import, a busy API).
MIN_GAP_SECONDS = 0.05
# How often the wait for notifications wakes up to see whether it should stop.
POLL_SECONDS = 1.0
# Reconnecting after the database went away: these delays, then the last one again and again.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)


def listen_conninfo(settings: Settings) -> str:
    """A libpq connection string for `DATABASE_URL` (SQLAlchemy's driver suffix dropped)."""
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class DueAccountsListener:
    """A daemon thread that LISTENs on `CHANNEL` and calls `wake()` when accounts became due.

    It reconnects by itself after the database goes away (a restart, a failover), and wakes once
    on reconnecting: rows that became due while nobody listened are dispatched too.
    """

    def __init__(self, conninfo: str, wake: Callable[[], object]) -> None:
        self._conninfo = conninfo
        self._wake = wake
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="due-listener", daemon=True)
        # Set while a connection is listening (tests wait for it).
        self.listening = threading.Event()

    def start(self) -> DueAccountsListener:
        """Start listening in the background."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop at the next poll and close the connection."""
        self._stopped.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="account-verifier-listener",
                    # A server that vanished without closing the socket is noticed in about a
                    # minute, not after the kernel's two hours.
                    **KEEPALIVES,
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    log.info("listener.listening", channel=CHANNEL, reconnected=failures > 0)
                    if failures:
                        self._safe_wake()
                    failures = 0
                    self._listen(conn)
            except Exception as error:  # noqa: BLE001 - a listener that dies would go unnoticed
                self.listening.clear()
                if self._stopped.is_set():
                    break
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning(
                    "listener.disconnected",
                    error=f"{type(error).__name__}: {error}".strip(),
                    retry_in_seconds=delay,
                )
                self._stopped.wait(delay)
        self.listening.clear()

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stopped.is_set():
            if not any(True for _ in conn.notifies(timeout=POLL_SECONDS, stop_after=1)):
                continue
            # Whatever else is already queued is covered by the same dispatch.
            for _ in conn.notifies(timeout=0):
                pass
            self._safe_wake()
            # Notifications arriving during the gap are picked up by the next turn: one more
            # dispatch, sent after their rows committed.
            self._stopped.wait(MIN_GAP_SECONDS)

    def _safe_wake(self) -> None:
        try:
            self._wake()
        except Exception:
            # The broker may be away; beat's tick still dispatches once it is back.
            log.exception("listener.wake_failed")


def listen_for_due_accounts(app: Any, settings: Settings) -> DueAccountsListener:
    """Start beat's listener: a notification sends the dispatch task, unless one is already
    waiting in its queue (that one runs after the notified rows committed, so it claims them)."""
    from worker.redis_client import get_redis  # noqa: PLC0415

    def wake() -> None:
        if get_redis().llen(DISPATCH_QUEUE):
            return
        app.send_task(
            DISPATCH_TASK,
            queue=DISPATCH_QUEUE,
            # As beat's own: a dispatch that could not run in time is pointless.
            expires=settings.dispatch_interval_seconds * 2,
        )

    return DueAccountsListener(listen_conninfo(settings), wake).start()
