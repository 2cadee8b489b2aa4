"""The checks of a connection's details made before any AWS call: STS's own patterns, locally."""

from __future__ import annotations

import re

from worker.sts.outcome import Outcome, RoleDetails, customer, shorten

# IAM role ARN: partition, 12-digit account, optional path, role name (IAM: 1-64 of [\w+=,.@-]).
# STS's own patterns are ASCII: re.ASCII keeps \w and \d from accepting "é" or "٣", and
# fullmatch() (unlike match(...$)) does not let a trailing newline through.
_ROLE_ARN = re.compile(
    r"arn:(?P<partition>[a-z][a-z0-9-]*):iam::(?P<account>\d{12}):role/"
    r"(?P<path>(?:[\x21-\x7e]{1,511}/)?)(?P<name>[\w+=,.@-]{1,64})",
    re.ASCII,
)


_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)
# Partitions the platform's own credentials can reach: cross-partition AssumeRole does not exist.
SUPPORTED_PARTITIONS = frozenset({"aws"})


def check_role_details(details: RoleDetails) -> Outcome | None:
    """Local checks before any AWS call; an outcome for the first problem, or None if all good."""
    match = _ROLE_ARN.fullmatch(details.role_arn)
    if match is None:
        return customer(
            "InvalidRoleArn",
            f"The role ARN {shorten(details.role_arn)!r} is not a valid IAM role ARN. "
            "Copy the role's ARN from the IAM console; it looks like "
            "arn:aws:iam::123456789012:role/RoleName.",
        )
    if match["partition"] not in SUPPORTED_PARTITIONS:
        return customer(
            "UnsupportedPartition",
            f"The role ARN {shorten(details.role_arn)} is in the {match['partition']!r} "
            "partition, which this service cannot reach. Create the role in a standard AWS "
            "account (ARNs starting with arn:aws:).",
        )
    if match["account"] != details.aws_account_id:
        return customer(
            "RoleAccountMismatch",
            f"The role ARN {shorten(details.role_arn)} belongs to AWS account "
            f"{match['account']}, but this connection is for AWS account "
            f"{details.aws_account_id}. Use a role in account {details.aws_account_id}, or "
            "correct the AWS account ID.",
        )
    if not _EXTERNAL_ID.fullmatch(details.external_id):
        return customer(
            "InvalidExternalId",
            "This connection's external ID is not one STS accepts (2 to 1224 characters: "
            "letters, digits and +=,.@:/-). Recreate the connection to get a new external ID, "
            "then update the role's trust policy with it.",
        )
    return None
