"""A verification message's arguments are checked before any work."""

from __future__ import annotations

import uuid

import pytest

from worker.messages import RejectedMessageError, parse_chunk_message

LEASE = "2b7e1516-28ae-4d2a-a6ab-f7158809cf4f"  # fixed: it names parametrized tests (pytest ids)


def test_a_well_formed_message_becomes_objects() -> None:
    """Canonical UUID strings and a short actor come back as UUIDs and the actor."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    message = parse_chunk_message(ids, LEASE, "api:user:42", max_accounts=500)
    assert message.account_ids == [uuid.UUID(i) for i in ids]
    assert message.lease_id == uuid.UUID(LEASE)
    assert message.actor == "api:user:42"


def test_a_message_over_the_limit_is_refused_with_its_count() -> None:
    """501 ids at a limit of 500: refused as a whole, with the count, before any id is read."""
    ids = ["not even looked at"] * 501
    with pytest.raises(RejectedMessageError, match="too many accounts") as caught:
        parse_chunk_message(ids, LEASE, "worker", max_accounts=500)
    assert caught.value.accounts == 501


@pytest.mark.parametrize(
    ("account_ids", "lease_id", "actor", "reason", "example"),
    [
        ("not a list", LEASE, "worker", "not a list", "'str'"),
        ({"a": 1}, LEASE, "worker", "not a list", "'dict'"),
        ([str(uuid.uuid4()), 12], LEASE, "worker", "1 account id(s) are not UUIDs", "12"),
        (["\x1b[31mred"], LEASE, "worker", "not UUIDs", r"'\x1b[31mred'"),
        ([uuid.uuid4().hex], LEASE, "worker", "not UUIDs", None),
        ([str(uuid.uuid4())], "lease", "worker", "lease id is not a UUID", "'lease'"),
        ([str(uuid.uuid4())], None, "worker", "lease id is not a UUID", "None"),
        ([str(uuid.uuid4())], LEASE, 42, "actor is not a string", "42"),
        ([str(uuid.uuid4())], LEASE, "", "actor is not a string", "'0 characters'"),
        ([str(uuid.uuid4())], LEASE, "a" * 256, "actor is not a string", "'256 characters'"),
    ],
)
def test_malformed_arguments_are_refused_with_a_reason(
    account_ids: object, lease_id: object, actor: object, reason: str, example: str | None
) -> None:
    """Each malformed argument has its reason, and an example shown escaped (repr)."""
    with pytest.raises(RejectedMessageError) as caught:
        parse_chunk_message(account_ids, lease_id, actor, max_accounts=500)
    assert reason in caught.value.reason
    if example is not None:
        assert caught.value.example == example
    assert "\x1b" not in (caught.value.example or "")


def test_unexpected_arguments_are_refused() -> None:
    """A fourth positional argument or an unknown keyword is not silently ignored."""
    with pytest.raises(RejectedMessageError, match="unexpected arguments") as caught:
        parse_chunk_message(
            [str(uuid.uuid4())],
            LEASE,
            "worker",
            max_accounts=500,
            extra_args=("x",),
            extra_kwargs={"priority": 1},
        )
    assert caught.value.example == "'argument 4, priority'"
    assert caught.value.accounts == 1
