"""The probe catalogue: PERMISSION_PROBES parsing, the session policy, the customer's message."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from worker.permissions import (
    CATALOGUE,
    DEFAULT_PROBES,
    missing_permissions_message,
    parse_probe_names,
    probe_session_policy,
)
from worker.settings import Settings
from worker.sts.probes import probe_threads


def test_the_default_set_is_the_four_securityaudit_probes() -> None:
    """One probe per protocol botocore speaks, each a permission SecurityAudit grants."""
    assert DEFAULT_PROBES == (
        "iam:GetAccountSummary",
        "ec2:DescribeRegions",
        "s3:ListAllMyBuckets",
        "cloudtrail:DescribeTrails",
    )
    assert {CATALOGUE[name].service for name in DEFAULT_PROBES} == {
        "iam",
        "ec2",
        "s3",
        "cloudtrail",
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("none", ()),
        (" NONE ", ()),
        ("s3:ListAllMyBuckets", ("s3:ListAllMyBuckets",)),
        # Catalogue order, each once, names matched case-insensitively, blanks ignored.
        (
            "S3:listallmybuckets, iam:GetAccountSummary,,iam:GetAccountSummary",
            ("iam:GetAccountSummary", "s3:ListAllMyBuckets"),
        ),
    ],
)
def test_probe_names_are_parsed(given: str, expected: tuple[str, ...]) -> None:
    """`none` turns probing off; other names come back in catalogue spelling and order."""
    assert parse_probe_names(given) == expected


@pytest.mark.parametrize("given", ["ec2:DescribeInstances", "", " , ", "none,ec2:DescribeRegions"])
def test_unknown_or_empty_probe_names_are_refused(given: str) -> None:
    """A typo stops start-up instead of silently probing less."""
    with pytest.raises(ValueError, match="probe"):
        parse_probe_names(given)


def test_the_session_policy_allows_exactly_the_probed_actions() -> None:
    """One Allow statement naming the probed actions, no wildcard, nothing else."""
    policy = json.loads(probe_session_policy(["s3:ListAllMyBuckets", "ec2:DescribeRegions"]))
    assert policy == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["ec2:DescribeRegions", "s3:ListAllMyBuckets"],
                "Resource": "*",
            }
        ],
    }
    # STS refuses session policies over 2048 characters (packed); the full set is far below.
    assert len(probe_session_policy(DEFAULT_PROBES)) < 300


def test_the_message_names_every_missing_permission_and_the_fix() -> None:
    """The customer reads which actions are missing and what to attach."""
    message = missing_permissions_message(
        "arn:aws:iam::123456789012:role/Scanner", ["s3:ListAllMyBuckets", "ec2:DescribeRegions"]
    )
    assert message == (
        "Role arn:aws:iam::123456789012:role/Scanner can be assumed, but it is not allowed: "
        "ec2:DescribeRegions, s3:ListAllMyBuckets. Attach the AWS managed policy SecurityAudit "
        "to the role, or a policy that allows these actions. If it is attached, a service "
        "control policy may deny them."
    )


def test_probe_threads_are_every_verification_threads_probes_and_bounded() -> None:
    """32 threads x 4 probes is 128 probe threads; 300 x 4 would be more than a process may
    start, and is refused at start-up rather than queueing probes into their timeout."""
    assert probe_threads(Settings(worker_concurrency=32)) == 128
    assert probe_threads(Settings(worker_concurrency=32, permission_probes="none")) == 32
    assert Settings(worker_concurrency=300, permission_probes="ec2:DescribeRegions")
    with pytest.raises(ValidationError, match="WORKER_CONCURRENCY x the number of"):
        Settings(worker_concurrency=300)


def test_the_probe_calls_ask_for_one_small_page() -> None:
    """ListBuckets unpaged is refused above a 10,000-bucket quota; shadow trails only add
    other regions' trails to the answer."""
    assert CATALOGUE["s3:ListAllMyBuckets"].kwargs == {"MaxBuckets": 1}
    assert CATALOGUE["cloudtrail:DescribeTrails"].kwargs == {"includeShadowTrails": False}
