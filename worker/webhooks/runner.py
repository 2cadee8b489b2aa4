"""A worker process's delivery machinery: delivery threads, one recorder, one listener.

Claims hand due deliveries to WEBHOOK_CONCURRENCY delivery threads, each bounded by its
attempt's hard limit. A finished attempt's result goes to the recorder thread, which writes every
result waiting — and those of attempts still running that end within 20 ms — in one statement
(`recording.record_attempts`) and then has the claimer thread claim again: a burst is claimed
and recorded in batches, and a burst to one endpoint drains at its concurrency limit, not once
per tick. The recorder never claims itself: a claim may wait (for another process's claim, a
slow database), and a result waiting behind it could outlive its lease and be sent again. The
listener has it claim when PostgreSQL says a transaction created deliveries. The claimer claims
at most once per CLAIM_INTERVAL_SECONDS: every wish to claim made meanwhile is served by its next
claim, so a steady stream of events is claimed in fewer, larger batches.
The process's claims and records use a database pool of their own, so delivery never takes a
connection the verifications are waiting for.

A process that dies loses only leases, which expire: the deliveries are attempted again with the
same `webhook-id`. A warm shutdown stops claiming, lets the attempts in flight finish (each
within its limit) and records them before the process leaves.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait

import psycopg
from sqlalchemy.orm import sessionmaker

from worker.db import KEEPALIVES, build_engine, with_database_retry
from worker.logging import get_logger
from worker.settings import Settings
from worker.webhooks.claims import Message, lease_seconds
from worker.webhooks.connections import Connections
from worker.webhooks.delivery import Deliverer
from worker.webhooks.recording import Finished
from worker.webhooks.signing import SecretBox

log = get_logger("worker.webhooks")

NOTIFY_CHANNEL = "webhook_deliveries"
# A process claims at most once per this interval: what falls due meanwhile (notifications,
# recorded results freeing delivery threads) is served by the next claim. Each claim costs the
# same whatever it leases (the database's search of the endpoints with pending deliveries, a
# transaction, the claims' lock), so under a steady stream of events fewer, larger claims save
# CPU on both sides; an event waits at most this long for its claim.
CLAIM_INTERVAL_SECONDS = 0.1
# Without notifications, a claim this often anyway (retries falling due; a missed notification
# while the listener reconnected). Beat's task does the same, through the queue.
_IDLE_CLAIM_SECONDS = 5.0
# A finished attempt's result waits at most this long for those of the attempts still running,
# to be recorded with them.
_RECORD_WAIT_SECONDS = 0.02
# Connections of the delivery pool: the listener's or beat's claim, the recorder's write, and
# one to spare (the listener has its own connection besides).
_POOL_SIZE = 2


def build_deliverer(settings: Settings) -> Deliverer:
    """A deliverer with its own small database pool (`application_name` webhook-delivery)."""
    engine = build_engine(
        settings.model_copy(update={"database_pool_size": _POOL_SIZE}),
        connect_args={**KEEPALIVES, "application_name": "webhook-delivery"},
    )
    return Deliverer(
        sessions=sessionmaker(engine, expire_on_commit=False),
        settings=settings,
        box=SecretBox.from_settings(settings),
        connections=Connections(settings),
        rng=random.Random(),
    )


class Runner:
    """Delivery threads, the recorder thread and the claims that feed them, for one process."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer
        settings = deliverer.settings
        self._concurrency = settings.webhook_concurrency
        self._batch = settings.webhook_batch_size
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._futures: set[Future[None]] = set()
        self._claiming = threading.Lock()
        self._stopping = threading.Event()
        # Finished attempts waiting to be recorded; None tells the recorder to stop.
        self._finished: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        # Set by the recorder after each batch: claim again (one claim serves any number).
        self._claim_wanted = threading.Event()
        self._recorder = threading.Thread(
            target=self._record_forever, name="webhook-recorder", daemon=True
        )
        self._recorder.start()
        threading.Thread(target=self._claim_forever, name="webhook-claimer", daemon=True).start()

    def claim_and_submit(self) -> int:
        """Claim as many due deliveries as this process has free delivery threads; start them."""
        with self._claiming:
            return self._claim_locked()

    def _claim_locked(self) -> int:
        if self._stopping.is_set():
            return 0
        with self._lock:
            room = self._concurrency - self._in_flight
        if room <= 0:
            return 0
        claim = self.deliverer.claim(min(room, self._batch))
        for message in claim.messages:
            with self._lock:
                self._in_flight += 1
            future = self._pool.submit(self._attempt, message, claim.lease_id)
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._forget)
        return len(claim.messages)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _attempt(self, message: Message, lease_id: uuid.UUID) -> None:
        try:
            self._finished.put(Finished(message, lease_id, self.deliverer.attempt(message)))
        except Exception:
            # A thread's error must be logged, not lost; the lease makes the delivery due again.
            log.exception("webhook.attempt_error", delivery_id=str(message.delivery_id))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _record_forever(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect(self._finished.get())
            if batch:
                self._record(batch)
                # The recorded deliveries' slots are free: claim again soon rather than at the
                # next notification or tick.
                self.want_claim()

    def want_claim(self) -> None:
        """Have the claimer thread claim: at once, or CLAIM_INTERVAL_SECONDS after its last
        claim if that was more recent (one claim serves every wish made meanwhile)."""
        self._claim_wanted.set()

    def _claim_forever(self) -> None:
        last = -CLAIM_INTERVAL_SECONDS
        while True:
            self._claim_wanted.wait()
            pause = last + CLAIM_INTERVAL_SECONDS - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
            if self._stopping.is_set():
                return
            self._claim_wanted.clear()
            last = time.monotonic()
            try:
                self.claim_and_submit()
            except Exception:
                log.exception("webhook.claim_error")

    def _collect(self, item: Finished | None) -> tuple[list[Finished], bool]:
        """The results waiting, up to a batch, and those of the attempts still running that end
        within _RECORD_WAIT_SECONDS (a claim's attempts end within milliseconds of each other:
        one statement records them all, and one claim follows). True when told to stop."""
        batch: list[Finished] = []
        until = time.monotonic() + _RECORD_WAIT_SECONDS
        while item is not None:
            batch.append(item)
            if len(batch) >= self._batch:
                break
            try:
                item = self._finished.get_nowait()
            except queue.Empty:
                with self._lock:
                    running = self._in_flight
                left = until - time.monotonic()
                if running == 0 or left <= 0:
                    break
                try:
                    item = self._finished.get(timeout=left)
                except queue.Empty:
                    break
        return batch, item is None

    def _record(self, batch: list[Finished]) -> None:
        try:
            # Again on a fresh connection while the database is away (a restart, a failover):
            # safe, since each row is written only while its lease is the attempt's own.
            with_database_retry(lambda: self.deliverer.record(batch), deliveries=len(batch))
        except Exception:
            # Left to the leases: the deliveries are attempted again, with the same webhook-id.
            log.exception("webhook.record_error", deliveries=len(batch))

    def drain(self) -> None:
        """Stop claiming; let the attempts in flight finish (each within its hard limit) and
        record them (a process leaving on a warm shutdown)."""
        self._stopping.set()
        self._claim_wanted.set()  # the claimer thread leaves
        with self._claiming:  # a claim under way hands its deliveries over first
            pass
        with self._lock:
            pending = list(self._futures)
        log.info("webhook.draining", in_flight=len(pending))
        limit = lease_seconds(self.deliverer.settings)
        wait(pending, timeout=limit)
        self._finished.put(None)
        self._recorder.join(timeout=limit)
        self._pool.shutdown(wait=False)
        self.deliverer.connections.close()

    def listen_forever(self) -> None:
        """LISTEN for new deliveries (notified when their transaction commits) and claim them
        at once: the event reaches its endpoint without waiting for beat's next tick, and
        without a worker process free to take the task while verifications keep every process
        busy."""
        settings = self.deliverer.settings
        url = settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    url,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="webhook-listener",
                    **KEEPALIVES,
                ) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.want_claim()
                    while not self._stopping.is_set():
                        notified = any(
                            True for _ in conn.notifies(timeout=_IDLE_CLAIM_SECONDS, stop_after=1)
                        )
                        if notified:  # and those already here too
                            for _ in conn.notifies(timeout=0):
                                pass
                        self.want_claim()
            except Exception:  # the listener must outlive a database restart
                log.warning("webhook.listener_reconnecting", retry_in_seconds=5, exc_info=True)
                time.sleep(5)
