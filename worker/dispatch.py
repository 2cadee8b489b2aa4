"""The dispatcher: claim what is due, in batches, and enqueue one verification per account."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from worker.circuit import PlatformCircuit
from worker.claims import claim_due_accounts
from worker.logging import get_logger
from worker.settings import Settings
from worker.sts.verifier import StsVerifier

log = get_logger("worker.dispatch")

# (account ids, lease id) -> enqueue their verification; returns the messages sent
Sender = Callable[[Sequence[str], str], int]


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What one dispatcher run did."""

    claimed: int
    sent: int  # messages
    batches: int
    paused: bool = False
    reclaimed: int = 0  # claimed accounts whose previous lease had expired without a result


def probe_platform(circuit: PlatformCircuit, verifier: StsVerifier) -> bool:
    """While paused, probe our own credentials when due; True if verification may go on."""
    if not circuit.is_open():
        return True
    if not circuit.probe_due():
        return False
    outcome = verifier.probe()
    if outcome.verified:
        circuit.close()
        log.warning("platform.recovered", detail=outcome.message)
        return True
    circuit.postpone(outcome.code, outcome.message)
    log.critical(
        "platform.fault",
        error_code=outcome.code,
        detail=outcome.message,
        action="verification stays paused; probing again later",
    )
    return False


def dispatch_due_accounts(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    send: Sender,
    queued: Callable[[], int],
    circuit: PlatformCircuit,
    verifier: StsVerifier,
) -> DispatchReport:
    """Claim due accounts batch by batch and enqueue them, each batch after its commit.

    Stops when nothing more is due or the queue already holds `DISPATCH_MAX_QUEUED` messages, so
    a backlog waits in the database (where leases cannot expire) rather than in the broker.
    """
    if not probe_platform(circuit, verifier):
        log.debug("dispatch.paused", reason="platform_fault")
        return DispatchReport(claimed=0, sent=0, batches=0, paused=True)
    room = settings.dispatch_max_queued - queued()
    claimed = sent = batches = reclaimed = 0
    while room > 0:
        limit = min(settings.dispatch_batch_size, room)
        with sessions.begin() as session:
            claim = claim_due_accounts(session, limit=limit, lease_seconds=settings.lease_seconds)
        batches += 1
        claimed += len(claim.account_ids)
        reclaimed += claim.reclaimed
        try:
            sent += send([str(i) for i in claim.account_ids], str(claim.lease_id))
        except Exception:
            # The batch keeps its lease and becomes due again when it expires.
            log.exception("dispatch.send_failed", claimed=claimed, messages=sent)
            raise
        room -= len(claim.account_ids)
        if len(claim.account_ids) < limit:
            break
    if claimed:
        log.info("dispatch.claimed", claimed=claimed, messages=sent, batches=batches)
    else:
        log.debug("dispatch.claimed", claimed=0, messages=0, batches=batches)
    return DispatchReport(claimed=claimed, sent=sent, batches=batches, reclaimed=reclaimed)
