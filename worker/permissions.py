"""The permission probes: which read-only call proves which permission a scanner needs.

Pure data, no boto3: the settings validate `PERMISSION_PROBES` against this catalogue, the rules
decide when probes are due, and `worker.sts` makes the calls. Each probe is the cheapest call
that needs exactly one IAM action and no resource: it answers in one request whatever the account
holds. Together the default set spans the protocols botocore speaks (query, ec2, rest-xml, json),
so a role that passes them can be signed for and answered by every kind of service a scan uses.
See docs/permissions.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CATALOGUE",
    "DEFAULT_PROBES",
    "Probe",
    "missing_permissions_message",
    "parse_probe_names",
    "probe_session_policy",
]


@dataclass(frozen=True, slots=True)
class Probe:
    """One permission and the client call that proves it."""

    permission: str  # the IAM action, "service:Action"
    service: str  # botocore's service name
    operation: str  # the client method
    # Its keyword arguments, as pairs (a frozen dataclass stays hashable): each keeps the answer
    # to one small page, whatever the account holds.
    arguments: tuple[tuple[str, object], ...] = ()

    @property
    def kwargs(self) -> dict[str, object]:
        """The call's keyword arguments."""
        return dict(self.arguments)

    @property
    def service_name(self) -> str:
        """The part of the permission before the colon (what IAM calls the service prefix)."""
        return self.permission.partition(":")[0]


#: Every probe the project ships, by permission. `PERMISSION_PROBES` names a subset.
CATALOGUE: dict[str, Probe] = {
    probe.permission: probe
    for probe in (
        Probe("iam:GetAccountSummary", "iam", "get_account_summary"),
        Probe("ec2:DescribeRegions", "ec2", "describe_regions"),
        # Unpaged, ListBuckets is refused for an account whose bucket quota is above 10,000 and
        # otherwise answers with up to 10,000 buckets; one is enough to prove the permission.
        Probe("s3:ListAllMyBuckets", "s3", "list_buckets", (("MaxBuckets", 1),)),
        # Without shadow trails (other regions' multi-region trails) the answer stays small.
        Probe(
            "cloudtrail:DescribeTrails",
            "cloudtrail",
            "describe_trails",
            (("includeShadowTrails", False),),
        ),
    )
}

#: What the AWS managed policy SecurityAudit grants, one call per protocol.
DEFAULT_PROBES: tuple[str, ...] = tuple(CATALOGUE)

DISABLED = "none"


def parse_probe_names(value: str) -> tuple[str, ...]:
    """`PERMISSION_PROBES` as catalogue names, in catalogue order; () for "none".

    Names are matched case-insensitively (IAM's own action names are), blanks are ignored, and an
    unknown name is an error naming the catalogue, so a typo stops the worker at start-up rather
    than silently probing less.
    """
    names = [part.strip() for part in value.split(",") if part.strip()]
    if [name.lower() for name in names] == [DISABLED]:
        return ()
    if not names:
        raise ValueError(f'name at least one probe, or "{DISABLED}" to turn probing off')
    known = {permission.lower(): permission for permission in CATALOGUE}
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise ValueError(
            f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(CATALOGUE)} "
            f'(or "{DISABLED}")'
        )
    wanted = {known[name.lower()] for name in names}
    return tuple(permission for permission in CATALOGUE if permission in wanted)


def probe_session_policy(permissions: Iterable[str]) -> str:
    """The AssumeRole session policy that allows exactly these actions and nothing else.

    A session policy intersects with the role's own permissions: the credentials can do what
    both allow, so even a role with AdministratorAccess yields credentials that can only read an
    account summary, list regions, buckets and trails.
    """
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": sorted(permissions), "Resource": "*"}],
        },
        separators=(",", ":"),
    )


def missing_permissions_message(role_arn: str, missing: Iterable[str]) -> str:
    """What the customer reads when the role lacks some of the probed permissions."""
    return (
        f"Role {role_arn} can be assumed, but it is not allowed: {', '.join(sorted(missing))}. "
        "Attach the AWS managed policy SecurityAudit to the role, or a policy that allows these "
        "actions. If it is attached, a service control policy may deny them."
    )
