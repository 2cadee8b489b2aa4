"""The naive alternative the worker is compared with: a plain sequential boto3 loop."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from scripts.benchmarks.seeding import Account

SESSION_POLICY: Final = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]}'
)


@dataclass
class SequentialResult:
    """The naive alternative's figures."""

    verifications: int
    verified: int
    wall_seconds: float
    cpu_seconds: float
    call_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Verifications per second."""
        return self.verifications / self.wall_seconds if self.wall_seconds > 0 else math.nan

    @property
    def mean_call_seconds(self) -> float:
        """Mean wall time of one STS call as one thread sees it."""
        return statistics.fmean(self.call_ms) / 1000 if self.call_ms else math.nan


def sequential_loop(accounts: Sequence[Account]) -> SequentialResult:
    """A plain boto3 loop: AssumeRole with the external ID, then without (it must be refused).

    The credentials and the endpoint come from the environment, as a plain script's would.
    """
    import boto3  # noqa: PLC0415 - the loop is the only boto3 user here
    import botocore.exceptions  # noqa: PLC0415

    client = boto3.client("sts")
    calls: list[float] = []
    verified = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for account in accounts:
        session_name = f"bench-{account.id.hex[:24]}"
        t0 = time.perf_counter()
        response = client.assume_role(
            RoleArn=account.role_arn,
            RoleSessionName=session_name,
            ExternalId=account.external_id,
            DurationSeconds=900,
            Policy=SESSION_POLICY,
        )
        t1 = time.perf_counter()
        ok = f":{account.aws_account_id}:" in response["AssumedRoleUser"]["Arn"]
        del response
        try:
            client.assume_role(
                RoleArn=account.role_arn,
                RoleSessionName=session_name + "-x",
                DurationSeconds=900,
                Policy=SESSION_POLICY,
            )
            enforced = False
        except botocore.exceptions.ClientError as error:
            enforced = error.response.get("Error", {}).get("Code") == "AccessDenied"
        t2 = time.perf_counter()
        calls += [(t1 - t0) * 1000, (t2 - t1) * 1000]
        verified += ok and enforced
    return SequentialResult(
        verifications=len(accounts),
        verified=verified,
        wall_seconds=time.perf_counter() - wall0,
        cpu_seconds=time.process_time() - cpu0,
        call_ms=calls,
    )
