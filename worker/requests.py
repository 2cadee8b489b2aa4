"""Asking for a verification now: the call the API and `scripts/reverify` use."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from models import AwsAccount
from worker.audit import insert_audit_events, requested_event
from worker.claims import claim_accounts
from worker.db import session_factory
from worker.logging import get_logger
from worker.queues import REQUESTED_QUEUE
from worker.settings import get_settings

log = get_logger("worker.requests")


# Ids named in an UnknownAccountsError's message; the rest are counted (all are in `missing`).
NAMED_UNKNOWN_IDS = 5


class UnknownAccountsError(LookupError):
    """Some requested account ids do not exist; nothing was requested."""

    def __init__(self, missing: list[uuid.UUID]) -> None:
        self.missing = missing
        named = ", ".join(str(m) for m in missing[:NAMED_UNKNOWN_IDS])
        rest = len(missing) - NAMED_UNKNOWN_IDS
        super().__init__(
            f"unknown account id(s): {named}" + (f" ... and {rest:,} more" if rest > 0 else "")
        )


@dataclass(frozen=True, slots=True)
class VerificationRequest:
    """What a request did: which accounts were leased and sent, which were already in flight."""

    correlation_id: str
    sent: list[uuid.UUID] = field(default_factory=list)
    in_flight: list[uuid.UUID] = field(default_factory=list)


def request_verification(
    account_ids: Iterable[uuid.UUID | str],
    *,
    requested_by: str,
    correlation_id: str | None = None,
    session: Session | None = None,
) -> VerificationRequest:
    """Ask for the given accounts to be verified now, ahead of scheduled work.

    Records a `verification_requested` audit event per account and leases the accounts that no
    verification holds yet (one already in flight is not started twice). The tasks are sent only
    after the transaction commits: with `session`, the caller's own transaction (nothing is sent
    if it rolls back); without it, a transaction of this function's own.

    Raises `UnknownAccountsError` (and writes nothing) if any id does not exist, and ValueError
    for an id that is not a UUID or an empty `requested_by`.
    """
    if not requested_by.strip():
        raise ValueError("requested_by must say who asked (for example 'api:user:42')")
    ids = list(dict.fromkeys(uuid.UUID(str(i)) for i in account_ids))
    correlation_id = correlation_id or str(uuid.uuid4())
    if session is None:
        with session_factory().begin() as own:
            return _request(own, ids, requested_by, correlation_id)
    return _request(session, ids, requested_by, correlation_id)


def _request(
    session: Session, ids: list[uuid.UUID], requested_by: str, correlation_id: str
) -> VerificationRequest:
    rows = session.execute(
        select(AwsAccount.id, AwsAccount.organization_id).where(AwsAccount.id.in_(ids))
    ).all()
    organizations = {row.id: row.organization_id for row in rows}
    missing = [i for i in ids if i not in organizations]
    if missing:
        raise UnknownAccountsError(missing)
    claim = claim_accounts(session, ids, lease_seconds=get_settings().lease_seconds)
    leased = set(claim.account_ids)
    insert_audit_events(
        session,
        [
            requested_event(
                organizations[account_id],
                account_id,
                actor=requested_by,
                correlation_id=correlation_id,
                already_in_flight=account_id not in leased,
            )
            for account_id in ids
        ],
    )
    result = VerificationRequest(
        correlation_id=correlation_id,
        sent=[i for i in ids if i in leased],
        in_flight=[i for i in ids if i not in leased],
    )
    lease = str(claim.lease_id)

    def send_after_commit(_: Session) -> None:
        # Deferred to the first send: sending loads the Celery app and its configuration, which
        # reads the settings (and exits on invalid ones).
        from worker.sending import send_verifications  # noqa: PLC0415

        send_verifications(
            [str(account_id) for account_id in result.sent],
            lease,
            queue=REQUESTED_QUEUE,
            actor=requested_by,
            correlation_id=correlation_id,
        )
        log.info(
            "verification.requested",
            requested_by=requested_by,
            correlation_id=correlation_id,
            sent=len(result.sent),
            in_flight=len(result.in_flight),
        )

    session.info.setdefault(_AFTER_COMMIT, []).append(send_after_commit)
    return result


# Sends wait in session.info until the session's transaction commits; a rollback drops them.
_AFTER_COMMIT = "account_verifier.after_commit"


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for send in session.info.pop(_AFTER_COMMIT, []):
        send(session)


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
