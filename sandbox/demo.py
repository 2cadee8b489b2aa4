"""Demo customer connections, one for each way a connection behaves in the sandbox STS.

Each connection is what the API would hold for a customer (alias, AWS account, role, external
ID) plus what the sandbox does when the worker verifies it. `seed_demo_roles` creates the roles
through the sandbox's IAM API, so a worker pointed at the sandbox shows the customer mistakes seen
most: a role that trusts someone else, one that requires another external ID, one that was never
created, one that does not require the external ID at all (the confused-deputy case), and one that
can be assumed but has no policy attached, so it lacks the permissions a scan needs.

The first three look the same to the customer, as they do with AWS: STS answers all of them with
one `AccessDenied` and does not say which it is, on purpose (a caller learns nothing about roles it
may not use). So the worker cannot tell them apart either, and its message lists everything to
check. `DemoConnection.shows` says what each connection ends up showing.

Ids and external IDs are derived deterministically from the aliases, so demo data in a database
and the sandbox's roles agree across runs and machines.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sandbox.moto_sts import PLATFORM_PRINCIPAL_ARN, SCANNER_ACTIONS, create_customer_role

__all__ = [
    "DEMO_CONNECTIONS",
    "DEMO_ORGANIZATION_ID",
    "UNTRUSTED_PRINCIPAL_ARN",
    "DemoBehaviour",
    "DemoConnection",
    "demo_connection",
    "seed_demo_roles",
]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://sandbox.invalid/account-verifier/demo")

#: The organization the demo connections belong to.
DEMO_ORGANIZATION_ID = uuid.uuid5(_NAMESPACE, "organization")

#: Someone other than the platform: the principal the `denies` role trusts instead.
UNTRUSTED_PRINCIPAL_ARN = "arn:aws:iam::444455556666:root"


class DemoBehaviour(enum.StrEnum):
    """What the sandbox does when the connection's role is assumed with its external ID."""

    WORKS = "works"
    """The role trusts the platform and requires this external ID: assumed."""
    DENIES = "denies"
    """The role trusts another principal: AccessDenied."""
    WRONG_EXTERNAL_ID = "wrong_external_id"
    """The role requires a different external ID: the same AccessDenied."""
    EXTERNAL_ID_NOT_ENFORCED = "external_id_not_enforced"
    """The role trusts the platform with no external ID condition: assumed even without one."""
    MISSING_ROLE = "missing_role"
    """No role was created: the same AccessDenied."""
    MISSING_PERMISSIONS = "missing_permissions"
    """Assumed as for `works`, but no policy is attached: the permission probes are refused."""


_SHOWS = {
    DemoBehaviour.WORKS: "connected",
    DemoBehaviour.DENIES: "AccessDenied",
    DemoBehaviour.WRONG_EXTERNAL_ID: "AccessDenied",
    DemoBehaviour.EXTERNAL_ID_NOT_ENFORCED: "ExternalIdNotEnforced",
    DemoBehaviour.MISSING_ROLE: "AccessDenied",
    DemoBehaviour.MISSING_PERMISSIONS: "MissingPermissions",
}


@dataclass(frozen=True)
class DemoConnection:
    """One customer connection as the API would store it, and how the sandbox treats it."""

    id: uuid.UUID
    alias: str
    aws_account_id: str
    role_name: str
    external_id: str
    behaviour: DemoBehaviour

    @property
    def role_arn(self) -> str:
        """The ARN the customer gave the platform."""
        return f"arn:aws:iam::{self.aws_account_id}:role/{self.role_name}"

    @property
    def shows(self) -> str:
        """What the customer sees once it is verified: `connected`, or the error code it fails with.

        A role that trusts someone else, a wrong external ID and a missing role all show
        `AccessDenied`, with the same message: STS does not distinguish them.
        """
        return _SHOWS[self.behaviour]

    @property
    def required_external_id(self) -> str | None:
        """The external ID the role's trust policy requires (None: no condition at all)."""
        if self.behaviour is DemoBehaviour.WRONG_EXTERNAL_ID:
            return f"{self.external_id}-previous"
        if self.behaviour is DemoBehaviour.EXTERNAL_ID_NOT_ENFORCED:
            return None
        return self.external_id


def _connection(alias: str, aws_account_id: str, behaviour: DemoBehaviour) -> DemoConnection:
    connection_id = uuid.uuid5(_NAMESPACE, f"connection/{alias}")
    return DemoConnection(
        id=connection_id,
        alias=alias,
        aws_account_id=aws_account_id,
        role_name=f"FeguraRole-{connection_id.hex[:6]}",
        external_id=f"demo-{uuid.uuid5(_NAMESPACE, f'external-id/{alias}')}",
        behaviour=behaviour,
    )


#: One connection per behaviour, each in its own customer account.
DEMO_CONNECTIONS: tuple[DemoConnection, ...] = (
    _connection("Production", "210000000001", DemoBehaviour.WORKS),
    _connection("Analytics", "210000000002", DemoBehaviour.DENIES),
    _connection("Staging", "210000000003", DemoBehaviour.WRONG_EXTERNAL_ID),
    _connection("Legacy sandbox", "210000000004", DemoBehaviour.EXTERNAL_ID_NOT_ENFORCED),
    _connection("Data lake", "210000000005", DemoBehaviour.MISSING_ROLE),
    _connection("Audit logs", "210000000006", DemoBehaviour.MISSING_PERMISSIONS),
)


def demo_connection(behaviour: DemoBehaviour | str) -> DemoConnection:
    """The demo connection that shows `behaviour`."""
    wanted = DemoBehaviour(behaviour)
    return next(c for c in DEMO_CONNECTIONS if c.behaviour is wanted)


def seed_demo_roles(
    endpoint_url: str,
    *,
    trusted_principal_arn: str = PLATFORM_PRINCIPAL_ARN,
    connections: Iterable[DemoConnection] = DEMO_CONNECTIONS,
) -> list[str]:
    """Create the demo connections' roles in the sandbox; returns the ARNs of the created roles.

    `missing_role` connections get no role. Seeding again re-applies the trust policies, so it is
    safe against a sandbox that is already seeded.
    """
    created = []
    for connection in connections:
        if connection.behaviour is DemoBehaviour.MISSING_ROLE:
            continue
        trusted = (
            UNTRUSTED_PRINCIPAL_ARN
            if connection.behaviour is DemoBehaviour.DENIES
            else trusted_principal_arn
        )
        created.append(
            create_customer_role(
                endpoint_url,
                connection.aws_account_id,
                connection.role_name,
                trusted,
                connection.required_external_id,
                # Every other role carries what the worker's permission probes check.
                permissions=(
                    ()
                    if connection.behaviour is DemoBehaviour.MISSING_PERMISSIONS
                    else SCANNER_ACTIONS
                ),
            )
        )
    return created
