"""The Celery tasks, and the per-process window that runs a chunk's verifications at once."""

from __future__ import annotations

import contextvars
import functools
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from celery import Task, signals
from sqlalchemy.exc import DBAPIError, OperationalError

from worker import metrics
from worker.app import CORRELATION_HEADER, app
from worker.circuit import PlatformCircuit
from worker.claims import release_leases
from worker.db import session_factory
from worker.dispatch import dispatch_due_accounts
from worker.fleet import remember_dispatch
from worker.logging import bind_context, current_context, get_logger, unbind_account_context
from worker.messages import MIN_ACCOUNTS_LIMIT, RejectedMessageError, parse_chunk_message
from worker.queues import DISPATCH_QUEUE, REQUESTED_QUEUE, SCHEDULED_QUEUE
from worker.ratelimit import REQUESTED_LANE, StsRateLimiter
from worker.redis_client import get_redis
from worker.settings import get_settings
from worker.stall import StallWatch
from worker.sts.verifier import get_verifier
from worker.verify import (
    WORKER_ACTOR,
    Applied,
    Attempt,
    Checked,
    Verification,
    account_fields,
    apply_checked,
    check_account,
    read_attempts,
    report_applied,
)

log = get_logger("worker.tasks")

_lock = threading.Lock()
_context: Verification | None = None


def verification_context() -> Verification:
    """The worker process's sessions, STS client, circuit breaker and settings, built once."""
    global _context  # noqa: PLW0603 - one per process
    if _context is None:
        with _lock:
            if _context is None:
                settings = get_settings()
                _context = Verification(
                    sessions=session_factory(),
                    verifier=get_verifier(
                        before_call=sts_rate_limiter().acquire,
                        on_throttled=sts_rate_limiter().throttled,
                    ),
                    circuit=platform_circuit(),
                    settings=settings,
                    rng=random.Random(),
                )
    return _context


@functools.cache
def sts_rate_limiter() -> StsRateLimiter:
    """The worker process's handle on the global STS budget."""
    settings = get_settings()
    return StsRateLimiter(
        get_redis(),
        rate_per_second=settings.sts_rate_limit_per_second,
        requested_share=settings.sts_requested_share,
    )


@functools.cache
def stall_watch() -> StallWatch:
    """The worker process's handle on the fleet's outcome counters (`verification.stalled`)."""
    settings = get_settings()
    return StallWatch(
        get_redis(),
        window_seconds=settings.stall_window_seconds,
        min_verifications=settings.stall_min_verifications,
    )


@functools.cache
def platform_circuit() -> PlatformCircuit:
    """The worker process's view of the shared circuit breaker."""
    return PlatformCircuit(get_redis(), pause_seconds=get_settings().platform_pause_seconds)


def _redelivered_too_often(task: Task) -> bool:
    """Count redeliveries of a message whose worker died; True past MAX_REDELIVERIES."""
    if not (task.request.delivery_info or {}).get("redelivered"):
        return False
    key = f"verifier:redeliveries:{task.request.id}"
    pipe = get_redis().pipeline()
    pipe.incr(key)
    pipe.expire(key, 24 * 3600)
    count = int(pipe.execute()[0])
    return count > get_settings().max_redeliveries


def send_verifications(
    account_ids: Sequence[str],
    lease_id: str,
    *,
    queue: str = SCHEDULED_QUEUE,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
) -> int:
    """Enqueue verifications, `DISPATCH_CHUNK_SIZE` accounts per message; returns messages sent.

    The correlation id travels in the message headers (the current one if none is given).
    """
    correlation_id = correlation_id or current_context().get("correlation_id")
    size = get_settings().dispatch_chunk_size
    sent = 0
    for start in range(0, len(account_ids), size):
        verify_accounts_task.apply_async(
            args=(list(account_ids[start : start + size]), lease_id),
            kwargs={"actor": actor} if actor != WORKER_ACTOR else None,
            queue=queue,
            headers={CORRELATION_HEADER: correlation_id} if correlation_id else None,
        )
        sent += 1
    return sent


def _queued_verifications() -> int:
    """Accounts waiting in the scheduled queue (messages times the chunk size, an upper bound)."""
    return int(get_redis().llen(SCHEDULED_QUEUE)) * get_settings().dispatch_chunk_size


@app.task(name="verifier.dispatch_due_accounts", queue=DISPATCH_QUEUE, acks_late=False)
def dispatch_due_accounts_task() -> dict[str, Any]:
    """Claim due accounts and enqueue their verification (run by beat)."""
    ctx = verification_context()
    # Beat's listener dispatches as soon as the database is back after a restart, when this
    # process's pooled connections are dead: claim again on fresh ones, not at the next tick.
    report = with_database_retry(
        lambda: dispatch_due_accounts(
            sessions=ctx.sessions,
            settings=ctx.settings,
            send=send_verifications,
            queued=_queued_verifications,
            circuit=platform_circuit(),
            verifier=ctx.verifier,
        ),
        accounts=0,
    )
    metrics.record_dispatch(
        claimed=report.claimed, reclaimed=report.reclaimed, paused=report.paused
    )
    remember_dispatch(get_redis(), claimed=report.claimed, sent=report.sent, paused=report.paused)
    return {"claimed": report.claimed, "sent": report.sent, "paused": report.paused}


_T = TypeVar("_T")

# Backoff for a database that is briefly away (a restart, a failover): about 15 s in all. Longer
# outages fail the chunk, and its leases bring the accounts back.
DATABASE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# SQLSTATEs of a server going away: admin_shutdown, crash_shutdown, cannot_connect_now.
_SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03"})


def database_away(error: DBAPIError) -> bool:
    """Whether an error means the database is away (restart, failover, network), not refusing.

    A statement or lock timeout is the server answering, and a constraint violation is about the
    statement: retrying those on a fresh connection would not help.
    """
    if error.connection_invalidated:
        return True
    if not isinstance(error, OperationalError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    # No SQLSTATE: the connection itself failed; class 08: connection exception.
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _SERVER_GOING_AWAY


def with_database_retry(operation: Callable[[], _T], *, accounts: int) -> _T:
    """Run a read or write of a chunk, again on a fresh connection while the database is away.

    Safe to repeat: a write whose commit did happen finds its leases gone the second time, and
    the compare-and-set applies nothing twice.
    """
    for delay in (*DATABASE_RETRY_DELAYS, None):
        try:
            return operation()
        except DBAPIError as error:
            if delay is None or not database_away(error):
                raise
            log.warning("database.reconnecting", accounts=accounts, retry_in_seconds=delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class VerificationWindow:
    """The worker process's verifications in flight: a thread pool and a bound on what it holds.

    A task hands its accounts over and returns once all are in flight, so a process takes its
    next message while the slowest STS answers of the previous one are still coming; with each
    task waiting for its whole chunk instead, a process idled on its chunk's latency tail.
    """

    def __init__(self, size: int) -> None:
        # Not a BoundedSemaphore: a hand-over interrupted at the wrong instant may give a slot
        # back twice, and one slot too many is better than a task crashing on it.
        self.slots = threading.Semaphore(size)
        # A few threads more than slots: the thread finishing a chunk writes it after giving its
        # slot back, and the next account should not queue behind that write.
        self.executor = ThreadPoolExecutor(max_workers=size + 4, thread_name_prefix="verify")

    def drain(self) -> None:
        """Wait for everything in flight to be checked and written (a process exiting cleanly)."""
        self.executor.shutdown(wait=True)


_window: VerificationWindow | None = None


def verification_window() -> VerificationWindow:
    """Built on first use, so inside the prefork child that runs tasks, never in the parent."""
    global _window  # noqa: PLW0603 - one per process
    if _window is None:
        with _lock:
            if _window is None:
                _window = VerificationWindow(get_settings().worker_concurrency)
    return _window


@signals.worker_process_shutdown.connect
def _drain_on_exit(**_: object) -> None:
    # A child leaving on a warm shutdown finishes what it accepted; a killed one leaves its
    # accounts to their leases, which expire and make them due again.
    if _window is not None:
        log.info("worker.draining")
        _window.drain()


class ChunkInFlight:
    """One message's accounts in flight; the last one accounted for writes them all in one commit.

    Each account is accounted for once, whoever reports it first: its thread with a result,
    `paused` (the circuit opened before its turn), or `abandon` (never handed over). The leases
    of accounts without a result bring them back.
    """

    def __init__(
        self,
        ctx: Verification,
        attempts: Sequence[Attempt],
        actor: str,
        correlation_id: str | None,
    ) -> None:
        self._ctx = ctx
        self._actor = actor
        self._correlation_id = correlation_id
        self._lock = threading.Lock()
        self._pending = {attempt.account_id for attempt in attempts}
        self._checked: list[Checked] = []
        self._paused: list[Attempt] = []

    def done(self, attempt: Attempt, checked: Checked | None) -> None:
        """One account's result (None: it failed, and is left to its lease)."""
        self._record(attempt, checked, paused=False)

    def paused(self, attempt: Attempt) -> None:
        """One account not verified because verification is paused: due again after the pause."""
        self._record(attempt, None, paused=True)

    def abandon(self, attempts: Sequence[Attempt]) -> None:
        """Accounts that were never handed over (an interrupted task): left to their leases."""
        for attempt in attempts:
            self._record(attempt, None, paused=False)

    def _record(self, attempt: Attempt, checked: Checked | None, *, paused: bool) -> None:
        with self._lock:
            if attempt.account_id not in self._pending:
                return
            self._pending.discard(attempt.account_id)
            if checked is not None:
                self._checked.append(checked)
            if paused:
                self._paused.append(attempt)
            if self._pending:
                return
        self._write()

    def _apply(self, checked: Sequence[Checked], paused: Sequence[Attempt]) -> list[Applied]:
        with self._ctx.sessions.begin() as session:
            for lease_id in {attempt.lease_id for attempt in paused}:
                release_leases(
                    session,
                    [attempt.account_id for attempt in paused if attempt.lease_id == lease_id],
                    lease_id,
                    due_in_seconds=self._ctx.settings.platform_pause_seconds,
                )
            return apply_checked(
                self._ctx,
                session,
                checked,
                actor=self._actor,
                correlation_id=self._correlation_id,
            )

    def _write(self) -> None:
        checked, paused = self._checked, self._paused
        if not checked and not paused:
            return
        count = len(checked) + len(paused)
        stall_watch().record([item.outcome for item in checked])
        try:
            results = with_database_retry(lambda: self._apply(checked, paused), accounts=count)
        except DBAPIError as error:
            if database_away(error) or len(checked) < 2:
                # Their leases expire and the accounts are due again: nothing is lost.
                log.exception("verification.error", stage="write", accounts=count)
                metrics.record_error("write", len(checked))
                return
            # The database refused the statement: one account's row may be the cause. Write them
            # one by one so that the rest are not held back with it.
            log.warning("verification.write_split", accounts=count, error=type(error).__name__)
            results = self._write_one_by_one(checked, paused)
        except Exception:
            log.exception("verification.error", stage="write", accounts=count)
            metrics.record_error("write", len(checked))
            return
        for result in results:
            try:
                report_applied(result)
            except Exception:
                log.exception(
                    "verification.report_failed", **account_fields(result.checked.attempt)
                )

    def _write_one_by_one(
        self, checked: Sequence[Checked], paused: Sequence[Attempt]
    ) -> list[Applied]:
        results: list[Applied] = []
        groups: list[tuple[list[Checked], list[Attempt]]] = [([item], []) for item in checked]
        if paused:
            groups.append(([], list(paused)))
        for group_checked, group_paused in groups:
            try:
                results += with_database_retry(
                    lambda: self._apply(group_checked, group_paused),  # noqa: B023 - called now
                    accounts=len(group_checked) + len(group_paused),
                )
            except Exception:
                fields = account_fields(group_checked[0].attempt) if group_checked else {}
                log.exception("verification.error", stage="write", **fields)
                metrics.record_error("write", len(group_checked))
        return results


def check_in_window(
    ctx: Verification, attempt: Attempt, chunk: ChunkInFlight, window: VerificationWindow
) -> None:
    """Ask STS about one account of a chunk, on a slot of the window it holds; an error is
    logged and left to the lease."""
    checked: Checked | None = None
    paused = False
    try:
        bind_context(**account_fields(attempt))
        # The circuit may have opened while this account waited for its turn.
        paused = ctx.circuit is not None and ctx.circuit.is_open()
        if not paused:
            checked = check_account(ctx, attempt)
    except Exception:
        log.exception("verification.error", stage="sts")
        metrics.record_error("sts")
    finally:
        window.slots.release()
        try:
            # Account fields were bound in this copy of the task's context; drop them with it
            # (before a chunk write whose lines are about other accounts too).
            unbind_account_context()
        finally:
            if paused:
                log.info(
                    "verification.skipped", reason="platform_paused", **account_fields(attempt)
                )
                metrics.record_skipped("platform_paused")
                chunk.paused(attempt)
            else:
                chunk.done(attempt, checked)


def _give_back(
    ctx: Verification,
    chunk: ChunkInFlight,
    attempts: Sequence[Attempt],
    lease_id: uuid.UUID,
    reason: str,
) -> None:
    """Release accounts not handed over: due again now, for any process."""
    chunk.abandon(attempts)
    ids = [attempt.account_id for attempt in attempts]
    with ctx.sessions.begin() as session:
        release_leases(session, ids, lease_id, due_in_seconds=0)
    # Yielding to a request is the design working; a full window is worth a look.
    emit = log.info if reason == "requested_waiting" else log.warning
    emit("verification.deferred", reason=reason, accounts=len(ids))
    metrics.record_deferred(reason, len(ids))


# How often a scheduled chunk being handed over asks Redis whether a requested verification
# waits for a process: one LLEN per process at most this often.
YIELD_CHECK_SECONDS = 0.02


class RequestedWaiting:
    """Whether a requested verification waits in its queue, asked of Redis at most once per
    `YIELD_CHECK_SECONDS` (a scheduled chunk's hand-over asks before each account)."""

    def __init__(self) -> None:
        self._checked = -YIELD_CHECK_SECONDS
        self._waiting = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= YIELD_CHECK_SECONDS:
            self._checked = now
            try:
                self._waiting = bool(get_redis().llen(REQUESTED_QUEUE))
            except redis.RedisError:
                self._waiting = False
        return self._waiting

    def forget(self) -> None:
        """Ask Redis next time: the request this process yielded to may be taken already."""
        self._checked = -YIELD_CHECK_SECONDS


requested_waiting = RequestedWaiting()


def wait_for_slot(window: VerificationWindow, deadline: float, *, scheduled: bool) -> str | None:
    """Take a slot of the window; None once taken, else why the rest of the chunk goes back.

    During a sweep a process spends most of its time handing chunks over account by account, as
    slots free up and as its main thread gets the interpreter between the verification threads,
    and takes no message meanwhile: a requested verification would wait for the whole hand-over.
    So before each account a scheduled chunk looks whether a requested one is waiting, and if
    so gives the rest of its accounts back (due at once, claimed again in a moment).
    """
    while True:
        if scheduled and requested_waiting():
            requested_waiting.forget()
            return "requested_waiting"
        if window.slots.acquire(blocking=False):
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return "window_full"
        if window.slots.acquire(timeout=min(left, YIELD_CHECK_SECONDS) if scheduled else left):
            return None


def _read_chunk(
    ctx: Verification, account_ids: list[uuid.UUID], lease_id: uuid.UUID
) -> list[Attempt]:
    def read() -> list[Attempt]:
        with ctx.sessions.begin() as session:
            return read_attempts(session, account_ids, lease_id)

    return with_database_retry(read, accounts=len(account_ids))


@app.task(bind=True, name="verifier.verify_accounts")
def verify_accounts_task(
    self: Task,
    account_ids: object = None,
    lease_id: object = None,
    actor: object = WORKER_ACTOR,
    *extra_args: object,
    **extra_kwargs: object,
) -> dict[str, int]:
    """Verify a chunk of accounts leased together: read them, then check each on the window.

    Returns once every account is in flight (or skipped); the last account checked writes the
    chunk's results in one transaction. A malformed or oversized message is refused (any
    arguments are accepted, so that even a wrong number of them is refused, not a traceback).
    """
    try:
        message = parse_chunk_message(
            account_ids,
            lease_id,
            actor,
            max_accounts=max(get_settings().dispatch_chunk_size, MIN_ACCOUNTS_LIMIT),
            extra_args=extra_args,
            extra_kwargs=extra_kwargs,
        )
    except RejectedMessageError as rejected:
        log.error(  # noqa: TRY400 - a refusal: the reason says it all, a traceback would not
            "task.rejected",
            reason=rejected.reason,
            accounts=rejected.accounts,
            example=rejected.example,
        )
        return {"rejected": rejected.accounts or 0}
    lease, ids = message.lease_id, message.account_ids
    if _redelivered_too_often(self):
        log.error("task.dropped", reason="redelivered too often", accounts=len(ids))
        return {"dropped": len(ids)}
    ctx = verification_context()
    attempts = _read_chunk(ctx, ids, lease)
    found = {attempt.account_id for attempt in attempts}
    missing = set(ids) - found
    for account_id in missing:
        log.info("verification.skipped", account_id=str(account_id), reason="not_leased")
    skipped = len(missing)
    metrics.record_skipped("not_leased", skipped)
    window = verification_window()
    chunk = ChunkInFlight(ctx, attempts, message.actor, current_context().get("correlation_id"))
    handed = 0
    # Waiting for slots is bounded well inside the task's time limits: when STS is so slow that
    # the window does not move, the rest of the chunk goes back to the queue of due accounts
    # (another process may have room) instead of the task being killed with work in flight.
    deadline = time.monotonic() + ctx.settings.verify_time_limit_seconds / 2
    # A requested verification's STS calls go ahead of the sweep's in the shared budget; each
    # account runs in a copy of this context, so the copies carry the lane.
    lane = REQUESTED_LANE.set(message.actor != WORKER_ACTOR)
    try:
        for attempt in attempts:
            reason = wait_for_slot(window, deadline, scheduled=message.actor == WORKER_ACTOR)
            if reason is not None:
                _give_back(ctx, chunk, attempts[handed:], lease, reason)
                return {"accepted": handed, "skipped": skipped, "deferred": len(attempts) - handed}
            queued = False
            try:
                # Each account runs in a copy of this task's logging context (task id,
                # correlation id).
                window.executor.submit(
                    contextvars.copy_context().run, check_in_window, ctx, attempt, chunk, window
                )
                queued = True
            finally:
                if not queued:
                    window.slots.release()
            handed += 1
    except BaseException:
        # Interrupted (a time limit, a shutdown): what was handed over is still written when it
        # is done; the rest is left to its lease.
        chunk.abandon(attempts[handed:])
        raise
    finally:
        REQUESTED_LANE.reset(lane)
    return {"accepted": len(attempts), "skipped": skipped}
