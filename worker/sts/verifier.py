"""One verification attempt: local checks, AssumeRole, identity, the external ID's enforcement and
the permission probes, as a typed `Outcome` (worker.sts); and the process's verifier."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import botocore.credentials
import botocore.exceptions

from models import OutcomeKind
from worker.permissions import CATALOGUE, probe_session_policy
from worker.sts.classify import OTHER_ERRORS, classify_error
from worker.sts.outcome import (
    Observer,
    Outcome,
    PermissionReport,
    RoleDetails,
    customer,
    with_calls,
)
from worker.sts.platform import PlatformAccounts
from worker.sts.probes import probe_verdict

_ASSUMED_ROLE_ARN = re.compile(
    r"arn:[a-z][a-z0-9-]*:sts::(?P<account>\d{12}):assumed-role/(?P<name>[^/]+)/(?P<session>.+)",
    re.ASCII,
)
SESSION_DURATION_SECONDS = 900  # the minimum STS allows: the credentials are never used
# A session policy intersects with the role's permissions; one that denies everything leaves the
# temporary credentials unable to do anything at all.
DENY_ALL_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}],
    },
    separators=(",", ":"),
)


def _silent(_step: str, _detail: str) -> None:
    """The default observer."""


def session_name_for(account_id: uuid.UUID, prefix: str, *, purpose: str = "") -> str:
    """A RoleSessionName the customer can trace in CloudTrail back to this account connection.

    `prefix-<32 hex of the account id>` (at most 20 + 1 + 2 + 32 = 55 characters), valid for
    STS's `[\\w+=,.@-]{2,64}`.
    """
    middle = f"-{purpose}" if purpose else ""
    return f"{prefix}{middle}-{account_id.hex}"


def _not_enforced_message(details: RoleDetails) -> str:
    return (
        f"Role {details.role_arn} can be assumed without an external ID, so another "
        "customer of this service could use it too. Add a condition to the role's trust "
        'policy: "Condition": {"StringEquals": {"sts:ExternalId": "<this connection\'s '
        'external ID>"}}, then verify again.'
    )


def _region_disabled_message(details: RoleDetails, regions: list[str]) -> str:
    return (
        f"AWS STS is not activated for AWS account {details.aws_account_id} in "
        f"{' or '.join(regions)}. Activate STS for one of these regions in the IAM console "
        "(Account settings, Security Token Service endpoints), then verify again."
    )


def _identity_mismatch_message(details: RoleDetails, actual: str) -> str:
    return (
        f"Role {details.role_arn} was assumed, but it belongs to AWS account {actual}, not "
        f"{details.aws_account_id}. Connect a role from account {details.aws_account_id}, "
        "or correct the AWS account ID."
    )


class StsVerifier(PlatformAccounts):
    """Verifies role details with a shared STS client per region (the hooks `before_call` and
    `on_throttled`: StsClients)."""

    def verify(
        self,
        details: RoleDetails,
        *,
        check_external_id: bool,
        probe: Sequence[str] = (),
        observe: Observer | None = None,
    ) -> Outcome:
        """One attempt: local checks, AssumeRole, identity, (if asked) enforcement, and (if any
        are named in `probe`) the permission probes.

        `observe(step, detail)` is told each step's result as it happens (`reverify --inline`).
        """
        say = observe or _silent
        refused = self._refuse_before_calling(details, say)
        if refused is not None:
            return refused
        prefix = self._settings.session_name_prefix
        principal = self._settings.platform_principal_arn
        regions = list(
            dict.fromkeys([self._settings.aws_region, self._settings.sts_fallback_region])
        )
        calls = 0
        response: dict[str, Any] | None = None
        region = regions[0]
        for region in regions:
            calls += 1
            try:
                response = self._call(
                    region,
                    RoleArn=details.role_arn,
                    RoleSessionName=session_name_for(details.account_id, prefix),
                    ExternalId=details.external_id,
                    DurationSeconds=SESSION_DURATION_SECONDS,
                    Policy=probe_session_policy(probe) if probe else DENY_ALL_POLICY,
                )
                break
            except botocore.exceptions.ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code == "RegionDisabledException":
                    say("AssumeRole", f"STS is not activated in {region} for this account")
                    continue
                outcome = with_calls(classify_error(error, details, principal), calls, region)
            except OTHER_ERRORS as error:
                outcome = with_calls(classify_error(error, details, principal), calls, region)
            say("AssumeRole", f"FAILED {outcome.code} ({outcome.kind.value}): {outcome.message}")
            return outcome
        if response is None:
            say("AssumeRole", "FAILED: STS is not activated in any region tried")
            return customer(
                "RegionDisabledException",
                _region_disabled_message(details, regions),
                sts_calls=calls,
                region=region,
            )
        # The response holds live credentials; keep only the role's ARN from it, and the
        # credentials (in memory, for the probes' calls) only when probes are due.
        assumed_arn = _assumed_role_arn(response)
        credentials = _credentials(response) if probe else None
        del response
        assumed = _ASSUMED_ROLE_ARN.fullmatch(assumed_arn or "")
        if assumed_arn is None or assumed is None:
            say("AssumeRole", "FAILED: the answer has no usable AssumedRoleUser.Arn")
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "AssumeRole answered without a usable AssumedRoleUser.Arn",
                sts_calls=calls,
                region=region,
            )
        say("AssumeRole", f"ok in {region}: {assumed_arn}")
        if assumed["account"] != details.aws_account_id:
            say("identity", f"FAILED: the role is in account {assumed['account']}")
            return customer(
                "IdentityMismatch",
                _identity_mismatch_message(details, assumed["account"]),
                assumed_role_arn=assumed_arn,
                sts_calls=calls,
                region=region,
            )
        say("identity", f"ok: account {details.aws_account_id}")
        return self._after_identity(
            details,
            assumed_arn,
            region,
            calls,
            check_external_id=check_external_id,
            probe=probe,
            credentials=credentials,
            say=say,
        )

    def _after_identity(
        self,
        details: RoleDetails,
        assumed_arn: str,
        region: str,
        calls: int,
        *,
        check_external_id: bool,
        probe: Sequence[str],
        credentials: botocore.credentials.ReadOnlyCredentials | None,
        say: Observer,
    ) -> Outcome:
        """The steps after the role is known to be the right one: the enforcement check and the
        permission probes, which run at the same time."""
        prefix = self._settings.session_name_prefix
        principal = self._settings.platform_principal_arn
        # The probes go out now and run while the enforcement check waits on STS. They ask the
        # region AssumeRole answered in: when STS is off in the configured region for this
        # account (it may be an opt-in region it has not enabled), other services there refuse
        # its tokens too, and the fallback region is the one known to work.
        probes = [CATALOGUE[name] for name in probe]
        started = time.monotonic()
        pending = (
            self.prober().start(probes, credentials, region) if credentials is not None else []
        )
        del credentials
        enforced: bool | None = None
        if check_external_id:
            calls += 1
            enforcement = self._check_enforcement(details, region, prefix, principal)
            if enforcement is not None:
                for future in pending:
                    future.cancel()
                say("external-ID check", f"FAILED {enforcement.code}: {enforcement.message}")
                return with_calls(enforcement, calls, region)
            say("external-ID check", "ok: refused without the external ID")
            enforced = True
        else:
            say("external-ID check", "skipped: checked recently")
        report: PermissionReport | None = None
        unknown: Outcome | None = None
        if pending:
            results = self.prober().finish(probes, pending, started)
            verdict = probe_verdict(details, results, say)
            if isinstance(verdict, PermissionReport):
                report = verdict
            elif verdict.kind is OutcomeKind.TRANSIENT:
                # STS verified the account and nothing was denied: a probe that could not get
                # an answer (an opt-in region's AuthFailure, an outage, a timeout) leaves the
                # permissions unknown, not the connection. Retrying the whole verification
                # would keep a pending account from ever connecting, and AssumeRole and the
                # external-ID check with it; the probes stay due on the next attempt.
                unknown = verdict
                say("probe", f"inconclusive: {verdict.code} from {verdict.service}")
            else:
                return dataclasses.replace(
                    verdict,
                    assumed_role_arn=assumed_arn,
                    sts_calls=calls,
                    region=region,
                    external_id_enforced=enforced,
                )
        elif probe:
            say("probe", "FAILED: AssumeRole answered without credentials")
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "AssumeRole answered without usable Credentials",
                sts_calls=calls,
                region=region,
                external_id_enforced=enforced,
            )
        else:
            say("probe", "skipped: not due, or probing is off")
        return Outcome(
            OutcomeKind.VERIFIED,
            "verified",
            f"assumed {assumed_arn}",
            external_id_enforced=enforced,
            assumed_role_arn=assumed_arn,
            region=region,
            sts_calls=calls,
            permissions=report,
            probe_calls=len(pending),
            service=unknown.service if unknown else None,
            permissions_unknown=unknown.code if unknown else None,
            unclassified=unknown.unclassified if unknown else False,
        )

    def _check_enforcement(
        self, details: RoleDetails, region: str, prefix: str, principal: str | None
    ) -> Outcome | None:
        """AssumeRole without the external ID must be refused (AWS's confused-deputy advice)."""
        try:
            response = self._call(
                region,
                RoleArn=details.role_arn,
                RoleSessionName=session_name_for(details.account_id, prefix, purpose="x"),
                DurationSeconds=SESSION_DURATION_SECONDS,
                Policy=DENY_ALL_POLICY,
            )
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") == "AccessDenied":
                return None  # refused: the external ID is enforced
            return classify_error(error, None, principal)
        except OTHER_ERRORS as error:
            return classify_error(error, None, principal)
        del response
        return customer("ExternalIdNotEnforced", _not_enforced_message(details))


def _assumed_role_arn(response: dict[str, Any]) -> str | None:
    user = response.get("AssumedRoleUser")
    if not isinstance(user, dict):
        return None
    arn = user.get("Arn")
    return arn if isinstance(arn, str) else None


def _credentials(response: dict[str, Any]) -> botocore.credentials.ReadOnlyCredentials | None:
    found = response.get("Credentials")
    if not isinstance(found, dict):
        return None
    parts = [found.get(key) for key in ("AccessKeyId", "SecretAccessKey", "SessionToken")]
    if not all(isinstance(part, str) and part for part in parts):
        return None
    return botocore.credentials.ReadOnlyCredentials(*parts)
