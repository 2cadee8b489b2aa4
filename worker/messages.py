"""A verification message's arguments, checked before any work: a message is input too.

Anyone who can write to the broker can send one, and a bug elsewhere can too. Each message is
bounded (a chunk, not a fleet: one with 200,000 ids meant 200,000 log lines and 19 s of a worker's
time) and every argument is checked, so a bad message is refused with one `task.rejected` line
instead of a traceback per message or a line per id.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Far above the chunks the dispatcher and `request_verification` send (DISPATCH_CHUNK_SIZE, at
# most 500), far below what would tie a worker up.
MIN_ACCOUNTS_LIMIT = 500
# The audit event's `actor` column.
MAX_ACTOR_LENGTH = 255
_SHOWN = 60
_NOTHING = object()


class RejectedMessageError(Exception):
    """The message is refused; `reason` says why in a few words, `accounts` how many it held."""

    def __init__(self, reason: str, *, accounts: int | None, example: object = _NOTHING) -> None:
        super().__init__(reason)
        self.reason = reason
        self.accounts = accounts
        # repr(), shortened: the value came from outside and may hold control characters.
        self.example = None if example is _NOTHING else repr(example)[:_SHOWN]


@dataclass(frozen=True, slots=True)
class ChunkMessage:
    """A verification message's arguments as objects."""

    account_ids: list[uuid.UUID]
    lease_id: uuid.UUID
    actor: str


def _uuid(value: object) -> uuid.UUID | None:
    # Only the canonical 36-character form the senders write; uuid.UUID would also take braces,
    # "urn:uuid:" prefixes and hex without dashes.
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def parse_chunk_message(
    account_ids: object,
    lease_id: object,
    actor: object,
    *,
    max_accounts: int,
    extra_args: Sequence[object] = (),
    extra_kwargs: Mapping[str, object] | None = None,
) -> ChunkMessage:
    """The arguments of a `verifier.verify_accounts` message; `RejectedMessageError` if any is
    malformed or the message holds more than `max_accounts` ids."""
    count = len(account_ids) if isinstance(account_ids, list) else None
    if extra_args or extra_kwargs:
        unexpected = [f"argument {4 + n}" for n in range(len(extra_args))]
        unexpected += sorted(extra_kwargs or {})
        raise RejectedMessageError(
            "unexpected arguments", accounts=count, example=", ".join(unexpected)
        )
    if not isinstance(account_ids, list):
        raise RejectedMessageError(
            "account ids are not a list", accounts=None, example=type(account_ids).__name__
        )
    if len(account_ids) > max_accounts:
        raise RejectedMessageError(
            f"too many accounts in one message (at most {max_accounts})", accounts=count
        )
    ids = [_uuid(value) for value in account_ids]
    bad = [value for value, parsed in zip(account_ids, ids, strict=True) if parsed is None]
    if bad:
        raise RejectedMessageError(
            f"{len(bad)} account id(s) are not UUIDs", accounts=count, example=bad[0]
        )
    lease = _uuid(lease_id)
    if lease is None:
        raise RejectedMessageError("the lease id is not a UUID", accounts=count, example=lease_id)
    if not isinstance(actor, str) or not 0 < len(actor) <= MAX_ACTOR_LENGTH:
        raise RejectedMessageError(
            f"the actor is not a string of 1 to {MAX_ACTOR_LENGTH} characters",
            accounts=count,
            example=actor if not isinstance(actor, str) else f"{len(actor)} characters",
        )
    return ChunkMessage(
        account_ids=[parsed for parsed in ids if parsed is not None],
        lease_id=lease,
        actor=actor,
    )
