"""A chunk of verifications: read together, checked one by one, written in one commit.

The one way through a verification, for every caller: `start_chunk` reads the leased accounts,
`check_into` checks one of them (unless the circuit breaker is open) and accounts for it in the
chunk, and the last account accounted for writes the whole chunk (`worker.apply`) and reports
each result. The worker runs `check_into` on the threads of its window (`worker.window`), many
chunks at once; `verify_chunk` runs it on the calling thread (`reverify --inline`, the
benchmark's trace, the tests).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError

from worker import metrics
from worker.apply import apply_checked
from worker.claims import release_leases
from worker.db import database_away, with_database_retry
from worker.logging import bind_context, get_logger, unbind_account_context
from worker.verify import (
    RULES_DECIDE,
    WORKER_ACTOR,
    Applied,
    Attempt,
    Checked,
    CheckOptions,
    Result,
    VerificationDeps,
    account_fields,
    check_account,
    read_attempts,
    report_applied,
)

log = get_logger("worker.chunk")


class ChunkInFlight:
    """One chunk's accounts in flight; the last one accounted for writes them all in one commit.

    Each account is accounted for once, whoever reports it first: its check with a result,
    `paused` (the circuit opened before its turn), or `abandon` (never handed over). The leases
    of accounts without a result bring them back. `results` says how each account ended once
    the chunk is written.
    """

    def __init__(
        self,
        deps: VerificationDeps,
        attempts: Sequence[Attempt],
        actor: str,
        correlation_id: str | None,
    ) -> None:
        self.deps = deps
        self.attempts = list(attempts)
        self.actor = actor
        self._correlation_id = correlation_id
        self._lock = threading.Lock()
        self._pending = {attempt.account_id for attempt in attempts}
        self._checked: list[Checked] = []
        self._paused: list[Attempt] = []
        self.results: dict[uuid.UUID, Result] = {}

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
                self.results[attempt.account_id] = Result.PAUSED
            else:
                self.results.setdefault(attempt.account_id, Result.ERROR)
            if self._pending:
                return
        self._write()

    def _apply(self, checked: Sequence[Checked], paused: Sequence[Attempt]) -> list[Applied]:
        with self.deps.sessions.begin() as session:
            for lease_id in {attempt.lease_id for attempt in paused}:
                release_leases(
                    session,
                    [attempt.account_id for attempt in paused if attempt.lease_id == lease_id],
                    lease_id,
                    due_in_seconds=self.deps.settings.platform_pause_seconds,
                )
            return apply_checked(
                self.deps, session, checked, actor=self.actor, correlation_id=self._correlation_id
            )

    def _write(self) -> None:
        checked, paused = self._checked, self._paused
        if not checked and not paused:
            return
        count = len(checked) + len(paused)
        if self.deps.stall is not None:
            self.deps.stall.record([item.outcome for item in checked])
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
                self.results[result.checked.attempt.account_id] = report_applied(result)
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


def start_chunk(
    deps: VerificationDeps,
    account_ids: Sequence[uuid.UUID],
    lease_id: uuid.UUID,
    *,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
) -> ChunkInFlight:
    """Read the accounts still leased to `lease_id` (one query); the others are skipped."""

    def read() -> list[Attempt]:
        with deps.sessions.begin() as session:
            return read_attempts(session, account_ids, lease_id)

    attempts = with_database_retry(read, accounts=len(account_ids))
    chunk = ChunkInFlight(deps, attempts, actor, correlation_id)
    missing = set(account_ids) - {attempt.account_id for attempt in attempts}
    for account_id in missing:
        log.info("verification.skipped", account_id=str(account_id), reason="not_leased")
        chunk.results[account_id] = Result.SKIPPED
    metrics.record_skipped("not_leased", len(missing))
    return chunk


def check_into(
    chunk: ChunkInFlight,
    attempt: Attempt,
    options: CheckOptions = RULES_DECIDE,
    *,
    before_accounting: Callable[[], object] | None = None,
) -> None:
    """Check one account of a chunk and account for it there; an error is logged and left to
    the lease. `before_accounting` runs first once the check is over (the window gives its slot
    back there, before a write that may follow)."""
    deps = chunk.deps
    checked: Checked | None = None
    paused = False
    try:
        bind_context(**account_fields(attempt))
        # The circuit may have opened while this account waited for its turn.
        paused = deps.circuit is not None and deps.circuit.is_open()
        if not paused:
            checked = check_account(deps, attempt, options)
    except Exception:
        log.exception("verification.error", stage="sts")
        metrics.record_error("sts")
    finally:
        try:
            if before_accounting is not None:
                before_accounting()
            # The account's fields are dropped before a chunk write whose lines are about
            # other accounts too.
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


def verify_chunk(
    deps: VerificationDeps,
    account_ids: Sequence[uuid.UUID],
    lease_id: uuid.UUID,
    *,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
    options: CheckOptions = RULES_DECIDE,
) -> dict[uuid.UUID, Result]:
    """Verify leased accounts on this thread, as the worker does on its window; how each ended.

    Safe to run twice for the same lease: the second run finds the leases gone.
    """
    chunk = start_chunk(deps, account_ids, lease_id, actor=actor, correlation_id=correlation_id)
    for n, attempt in enumerate(chunk.attempts):
        try:
            check_into(chunk, attempt, options)
        except BaseException:
            # Interrupted: the rest is left to its lease (and the chunk written without it).
            chunk.abandon(chunk.attempts[n + 1 :])
            raise
    return chunk.results


def verify_account(
    deps: VerificationDeps,
    account_id: uuid.UUID,
    lease_id: uuid.UUID,
    *,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
    options: CheckOptions = RULES_DECIDE,
) -> Result:
    """Verify one leased account: a chunk of one (`verify_chunk`)."""
    results = verify_chunk(
        deps, [account_id], lease_id, actor=actor, correlation_id=correlation_id, options=options
    )
    return results[account_id]
