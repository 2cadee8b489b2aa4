"""The worker process's verifications in flight: a thread pool and a bound on what it holds.

A task hands its chunk's accounts over to the window and returns once all are in flight, so a
process takes its next message while the slowest STS answers of the previous one are still
coming; with each task waiting for its whole chunk instead, a process idled on its chunk's
latency tail. Each account runs `worker.chunk.check_into` on a thread of the window; the last
one of a chunk writes it.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import redis

from worker import metrics
from worker.chunk import ChunkInFlight, check_into
from worker.claims import release_leases
from worker.logging import get_logger
from worker.queues import REQUESTED_QUEUE
from worker.ratelimit import REQUESTED_LANE
from worker.verify import WORKER_ACTOR, Attempt

log = get_logger("worker.window")

# How often a scheduled chunk being handed over asks Redis whether a requested verification
# waits for a process: one LLEN per process at most this often.
YIELD_CHECK_SECONDS = 0.02

GiveBackReason = Literal["requested_waiting", "window_full"]


class RequestedWaiting:
    """Whether a requested verification waits in its queue, asked of Redis at most once per
    `YIELD_CHECK_SECONDS` (a scheduled chunk's hand-over asks before each account)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._checked = -YIELD_CHECK_SECONDS
        self._waiting = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= YIELD_CHECK_SECONDS:
            self._checked = now
            try:
                self._waiting = bool(self._redis.llen(REQUESTED_QUEUE))
            except redis.RedisError:
                self._waiting = False
        return self._waiting

    def forget(self) -> None:
        """Ask Redis next time: the request this process yielded to may be taken already."""
        self._checked = -YIELD_CHECK_SECONDS


class VerificationWindow:
    """`size` verifications at most in flight in this process, on a pool of threads."""

    def __init__(self, size: int, client: redis.Redis) -> None:
        # Not a BoundedSemaphore: a hand-over interrupted inside the executor's submit, once the
        # account is queued, gives its slot back twice, and one slot too many is better than a
        # task crashing on it.
        self.slots = threading.Semaphore(size)
        # A few threads more than slots: the thread finishing a chunk writes it after giving its
        # slot back, and the next account should not queue behind that write.
        self.executor = ThreadPoolExecutor(max_workers=size + 4, thread_name_prefix="verify")
        self.requested_waiting = RequestedWaiting(client)

    def drain(self) -> None:
        """Wait for everything in flight to be checked and written (a process exiting cleanly)."""
        self.executor.shutdown(wait=True)

    def wait_for_slot(self, deadline: float, *, scheduled: bool) -> GiveBackReason | None:
        """Take a slot; None once taken, else why the rest of the chunk goes back.

        During a sweep a process spends most of its time handing chunks over account by
        account, as slots free up and as its main thread gets the interpreter between the
        verification threads, and takes no message meanwhile: a requested verification would
        wait for the whole hand-over. So before each account a scheduled chunk looks whether a
        requested one is waiting, and if so gives the rest of its accounts back (due at once,
        claimed again in a moment).
        """
        while True:
            if scheduled and self.requested_waiting():
                self.requested_waiting.forget()
                return "requested_waiting"
            if self.slots.acquire(blocking=False):
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return "window_full"
            timeout = min(left, YIELD_CHECK_SECONDS) if scheduled else left
            if self.slots.acquire(timeout=timeout):
                return None

    def hand_over(self, chunk: ChunkInFlight, lease_id: uuid.UUID) -> dict[str, int]:
        """Put a chunk's accounts in flight, one slot each; returns once all are (or once the
        rest went back: no room in time, or a requested verification waiting)."""
        attempts = chunk.attempts
        scheduled = chunk.actor == WORKER_ACTOR
        # The accounts handed over (each one's thread gives its slot back) and the slots taken,
        # each counted by the very statement that submits an account or takes a slot (one
        # line each): an exception landing between two statements (Celery's soft time limit,
        # raised asynchronously) finds them telling which slot to give back and which
        # accounts to leave to their leases.
        handed: list[Future[None]] = []
        taken = 0
        # Waiting for slots is bounded well inside the task's time limits: when STS is so slow
        # that the window does not move, the rest of the chunk goes back to the queue of due
        # accounts (another process may have room) instead of the task being killed with work
        # in flight.
        deadline = time.monotonic() + chunk.deps.settings.verify_time_limit_seconds / 2
        # A requested verification's STS calls go ahead of the sweep's in the shared budget;
        # each account runs in a copy of this context, so the copies carry the lane.
        lane = REQUESTED_LANE.set(not scheduled)
        try:
            for attempt in attempts:
                taken += (reason := self.wait_for_slot(deadline, scheduled=scheduled)) is None
                if reason is not None:
                    _give_back(chunk, attempts[len(handed) :], lease_id, reason)
                    return {"accepted": len(handed), "deferred": len(attempts) - len(handed)}
                # Each account runs in a copy of this task's logging context (task id,
                # correlation id).
                run = contextvars.copy_context().run
                handed.append(self.executor.submit(run, self._check, chunk, attempt))
        except BaseException:
            # Interrupted (a time limit, a shutdown): the slot taken for an account not handed
            # over goes back; what was handed over is still written when it is done; the rest
            # is left to its lease.
            for _ in range(taken - len(handed)):
                self.slots.release()
            chunk.abandon(attempts[len(handed) :])
            raise
        finally:
            REQUESTED_LANE.reset(lane)
        return {"accepted": len(attempts)}

    def _check(self, chunk: ChunkInFlight, attempt: Attempt) -> None:
        check_into(chunk, attempt, before_accounting=self.slots.release)


def _give_back(
    chunk: ChunkInFlight, attempts: list[Attempt], lease_id: uuid.UUID, reason: GiveBackReason
) -> None:
    """Release accounts not handed over: due again now, for any process."""
    chunk.abandon(attempts)
    ids = [attempt.account_id for attempt in attempts]
    with chunk.deps.sessions.begin() as session:
        release_leases(session, ids, lease_id, due_in_seconds=0)
    # Yielding to a request is the design working; a full window is worth a look.
    emit = log.info if reason == "requested_waiting" else log.warning
    emit("verification.deferred", reason=reason, accounts=len(ids))
    metrics.record_deferred(reason, len(ids))
