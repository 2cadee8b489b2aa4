"""What one verification attempt is about and what it returns: plain data, no boto3.

`worker.rules`, `worker.stall` and `worker.verify` read outcomes without loading botocore.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models import OutcomeKind

# (step, detail): told each step of an attempt as it happens.
Observer = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class RoleDetails:
    """What a verification needs to know about one account connection."""

    account_id: uuid.UUID
    aws_account_id: str
    role_arn: str
    external_id: str


@dataclass(frozen=True, slots=True)
class PermissionReport:
    """What the permission probes showed: each probed permission is proven or missing."""

    proven: tuple[str, ...]
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt.

    `code` is stable and machine-readable ("verified", an AWS error code, or one of our own checks
    such as "InvalidRoleArn"). `message` is written for the customer when `kind` is
    customer_must_fix, and for the operator otherwise. Neither ever holds a credential, a request
    id or a stack trace.
    """

    kind: OutcomeKind
    code: str
    message: str
    # True: shown to refuse AssumeRole without the external ID in this attempt; None: not checked.
    external_id_enforced: bool | None = None
    assumed_role_arn: str | None = None
    region: str | None = None
    sts_calls: int = 0
    # An error code this module does not know (classified transient to be safe): worth a look.
    unclassified: bool = False
    # Decided without asking AWS, and no IAM propagation or odd answer can change it: the state
    # rules fail the account at once (no grace window, no confirming re-attempt, no wave hold).
    decisive: bool = False
    # Set when the permission probes gave a verdict (all proven, or some missing).
    permissions: PermissionReport | None = None
    # Calls to other services than STS (the probes); they do not spend the STS budget.
    probe_calls: int = 0
    # The service whose answer made this outcome, when it was not STS (a probe's).
    service: str | None = None
    # Verified, but a probe failed transiently and no probe was denied: the error code that
    # left the permissions unknown this time (they stay as recorded, and due next attempt).
    permissions_unknown: str | None = None

    @property
    def verified(self) -> bool:
        """Whether the account may be shown as connected."""
        return self.kind is OutcomeKind.VERIFIED


def shorten(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def customer(code: str, message: str, **extra: Any) -> Outcome:
    return Outcome(OutcomeKind.CUSTOMER_MUST_FIX, code, message, **extra)


def with_calls(outcome: Outcome, calls: int, region: str) -> Outcome:
    return dataclasses.replace(outcome, sts_calls=calls, region=region)
