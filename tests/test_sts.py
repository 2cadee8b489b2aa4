"""One verification attempt against STS, classified, through real STS answers.

Failure paths go through the STS stand-in (AWS's real XML and HTTP statuses behind
AWS_ENDPOINT_URL_STS), or a server answering AssumeRole word for word as the test queues
(tests/canned_sts.py); never through a mocked function of our own.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import boto3
import botocore.credentials
import botocore.exceptions
import pytest
from structlog.testing import capture_logs

from models import OutcomeKind
from sandbox.standin import StsStandIn
from tests.canned_sts import CannedSts, assumed_answer, error_answer
from worker.permissions import CATALOGUE, DEFAULT_PROBES, probe_session_policy
from worker.settings import Settings
from worker.sts.checks import check_role_details
from worker.sts.classify import classify_probe_error
from worker.sts.outcome import Outcome, RoleDetails
from worker.sts.probes import probe_budget_seconds
from worker.sts.verifier import DENY_ALL_POLICY, StsVerifier, session_name_for

ACCOUNT = "123456789012"
EXTERNAL_ID = "ext-0f1e2d3c4b5a"
PLATFORM_KEY = "AKIAPLATFORMTESTKEY1"
PLATFORM_SECRET = "platform-secret-for-tests-only"


@pytest.fixture(scope="module")
def standin() -> Iterator[StsStandIn]:
    """A zero-latency STS stand-in for the whole module."""
    with StsStandIn(median_ms=0, slow_seconds=3, seed=7) as sts:
        yield sts


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, standin: StsStandIn) -> None:
    """The platform's (fake) credentials and the stand-in as the STS endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", standin.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", standin.endpoint_url)  # the permission probes'
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch, standin: StsStandIn) -> Iterator[CannedSts]:
    """STS answering AssumeRole as the test queues, the platform's keys, and the stand-in for
    the permission probes' services."""
    with CannedSts() as sts:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", standin.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        yield sts


def verifier(**overrides: object) -> StsVerifier:
    """A verifier with short timeouts and one attempt, so failure paths are quick."""
    settings = Settings(
        sts_read_timeout_seconds=1,
        sts_connect_timeout_seconds=1,
        sts_max_attempts=1,
        platform_principal_arn="arn:aws:iam::111122223333:root",
        **overrides,  # type: ignore[arg-type]
    )
    return StsVerifier(settings)


def role(name: str, *, account: str = ACCOUNT, external_id: str = EXTERNAL_ID) -> RoleDetails:
    """Role details for a stand-in role whose name picks its behaviour."""
    return RoleDetails(
        account_id=uuid.UUID("550e8400-e29b-41d4-a716-446655440000"),
        aws_account_id=account,
        role_arn=f"arn:aws:iam::{account}:role/{name}",
        external_id=external_id,
    )


def attempt(
    name: str, *, check: bool = True, probe: tuple[str, ...] = (), **overrides: object
) -> Outcome:
    """One attempt on the stand-in role `name`."""
    return verifier(**overrides).verify(role(name), check_external_id=check, probe=probe)


# --- local checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("details", "code"),
    [
        (RoleDetails(uuid.uuid4(), ACCOUNT, "not-an-arn-at-all-x", EXTERNAL_ID), "InvalidRoleArn"),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:user/Someone", EXTERNAL_ID),
            "InvalidRoleArn",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws-cn:iam::{ACCOUNT}:role/R", EXTERNAL_ID),
            "UnsupportedPartition",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, "arn:aws:iam::999999999999:role/R", EXTERNAL_ID),
            "RoleAccountMismatch",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/R", "has space"),
            "InvalidExternalId",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/R", "x" * 1225),
            "InvalidExternalId",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/{'n' * 65}", "ab"),
            "InvalidRoleArn",
        ),
        # STS's patterns are ASCII, and a trailing newline is not "the end".
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/ok-rôle", "ab"),
            "InvalidRoleArn",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/R\n", "ab"),
            "InvalidRoleArn",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/R", "extérieur-ñandú"),
            "InvalidExternalId",
        ),
        (
            RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/R", "ext-1\n"),
            "InvalidExternalId",
        ),
    ],
)
def test_bad_rows_are_refused_locally_with_their_own_code(details: RoleDetails, code: str) -> None:
    """Each local problem is customer-fixable, with its own code and a message naming the fix."""
    outcome = check_role_details(details)
    assert outcome is not None
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, code)
    assert outcome.sts_calls == 0


@pytest.mark.parametrize(
    "arn",
    [
        f"arn:aws:iam::{ACCOUNT}:role/path/to/Role",
        f"arn:aws:iam::{ACCOUNT}:role/{'n' * 64}",
        f"arn:aws:iam::{ACCOUNT}:role/with+=,.@-chars",
    ],
)
def test_valid_but_unusual_arns_pass_the_local_checks(arn: str) -> None:
    """A path, a 64-character name and every allowed character are accepted."""
    assert check_role_details(RoleDetails(uuid.uuid4(), ACCOUNT, arn, "x" * 1224)) is None


def test_local_checks_make_no_call(aws_env: None, standin: StsStandIn) -> None:
    """A bad row never reaches STS."""
    before = standin.stats(roles=False)["requests"]
    outcome = verifier().verify(
        RoleDetails(uuid.uuid4(), ACCOUNT, "arn:aws:iam::999999999999:role/ok", EXTERNAL_ID),
        check_external_id=True,
    )
    assert outcome.code == "RoleAccountMismatch"
    assert standin.stats(roles=False)["requests"] == before


def test_a_role_in_the_platforms_own_account_is_refused_without_assume_role(
    aws_env: None, standin: StsStandIn
) -> None:
    """The account GetCallerIdentity names is the platform's: refused before any AssumeRole."""
    platform_account = "111122223333"  # the stand-in's platform identity
    before = standin.stats()
    outcome = verifier().verify(role("ok-Role", account=platform_account), check_external_id=True)
    after = standin.stats()
    assert (outcome.kind, outcome.code, outcome.decisive) == (
        OutcomeKind.CUSTOMER_MUST_FIX,
        "PlatformAccount",
        True,
    )
    assert "can be assumed" not in outcome.message
    assert platform_account in outcome.message
    by_action = cast(dict[str, int], after["by_action"])
    assert by_action.get("AssumeRole", 0) == cast(dict[str, int], before["by_action"]).get(
        "AssumeRole", 0
    )
    assert by_action["GetCallerIdentity"] == (
        cast(dict[str, int], before["by_action"]).get("GetCallerIdentity", 0) + 1
    )


def test_configured_sibling_accounts_are_refused_too(aws_env: None, standin: StsStandIn) -> None:
    """PLATFORM_ACCOUNT_IDS names more of the platform's accounts; their roles are refused."""
    sts = verifier(platform_account_ids=("444455556666",))
    before = cast(dict[str, int], standin.stats()["by_action"]).get("AssumeRole", 0)
    outcome = sts.verify(role("ok-Role", account="444455556666"), check_external_id=True)
    assert outcome.code == "PlatformAccount"
    assert cast(dict[str, int], standin.stats()["by_action"]).get("AssumeRole", 0) == before
    # A customer's account is still verified by the same verifier, which asked who it is once.
    assert sts.verify(role("ok-Role"), check_external_id=True).verified


def test_no_role_is_assumed_while_the_platforms_account_is_unknown(
    aws_env: None, standin: StsStandIn
) -> None:
    """If GetCallerIdentity fails, the attempt ends with its outcome and assumes nothing."""
    standin.configure(platform_credentials_valid=False)
    try:
        before = cast(dict[str, int], standin.stats()["by_action"]).get("AssumeRole", 0)
        outcome = attempt("ok-Role")
        after = cast(dict[str, int], standin.stats()["by_action"]).get("AssumeRole", 0)
    finally:
        standin.configure(platform_credentials_valid=True)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PLATFORM_FAULT, "InvalidClientTokenId")
    assert after == before


def test_session_name_is_traceable_and_valid() -> None:
    """The session name carries the connection id and fits STS's pattern."""
    connection = uuid.uuid4()
    for purpose in ("", "x"):
        name = session_name_for(connection, "p" * 20, purpose=purpose)
        assert re.fullmatch(r"[\w+=,.@-]{2,64}", name)
        assert connection.hex in name


# --- verified ---------------------------------------------------------------------------------


def test_a_working_role_is_verified_with_enforcement_checked(aws_env: None) -> None:
    """AssumeRole succeeds, the identity matches, and the call without external ID is refused."""
    outcome = attempt("ok-Role")
    assert (outcome.kind, outcome.code) == (OutcomeKind.VERIFIED, "verified")
    assert outcome.external_id_enforced is True
    assert outcome.assumed_role_arn is not None
    assert outcome.assumed_role_arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/ok-Role/")
    assert outcome.sts_calls == 2


def test_without_the_enforcement_check_one_call_is_made(aws_env: None) -> None:
    """When the caller skips the check, one AssumeRole suffices and nothing is claimed about it."""
    outcome = attempt("ok-Role", check=False)
    assert outcome.kind is OutcomeKind.VERIFIED
    assert outcome.external_id_enforced is None
    assert outcome.sts_calls == 1


def test_assume_role_request_is_minimal_and_traceable(canned: CannedSts) -> None:
    """900 seconds, a deny-all session policy, the external ID and a traceable session name,
    signed with the platform's key."""
    details = role("ok-Role")
    canned.queue(assumed_answer(f"arn:aws:sts::{ACCOUNT}:assumed-role/ok-Role/s"))
    outcome = verifier().verify(details, check_external_id=False)
    assert outcome.kind is OutcomeKind.VERIFIED
    [(form, headers)] = canned.requests
    assert form == {
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": details.role_arn,
        "RoleSessionName": session_name_for(details.account_id, "verifier"),
        "ExternalId": EXTERNAL_ID,
        "DurationSeconds": "900",
        "Policy": DENY_ALL_POLICY,
    }
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={PLATFORM_KEY}/")
    assert '"Effect":"Deny"' in DENY_ALL_POLICY


# --- customer must fix ------------------------------------------------------------------------


def test_access_denied_tells_the_customer_what_to_check(aws_env: None) -> None:
    """AccessDenied names the role, the principal to trust and the external-ID condition."""
    outcome = attempt("deny-Role")
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "AccessDenied")
    assert f"arn:aws:iam::{ACCOUNT}:role/deny-Role" in outcome.message
    assert "arn:aws:iam::111122223333:root" in outcome.message
    assert "sts:ExternalId" in outcome.message
    assert EXTERNAL_ID not in outcome.message
    assert "RequestId" not in outcome.message


def test_role_without_external_id_condition_must_be_fixed(aws_env: None) -> None:
    """A role that can be assumed without the external ID is refused, telling how to fix it."""
    outcome = attempt("noext-Role")
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "ExternalIdNotEnforced")
    assert '"StringEquals": {"sts:ExternalId"' in outcome.message
    assert "noext-Role" in outcome.message


def test_identity_mismatch_is_reported(aws_env: None) -> None:
    """An assumed role naming another account is a customer problem, naming both accounts."""
    outcome = attempt("otheracct-Role")
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "IdentityMismatch")
    assert ACCOUNT in outcome.message


def test_region_disabled_falls_back_to_another_region(aws_env: None) -> None:
    """RegionDisabledException in the home region is retried in the fallback region."""
    outcome = attempt(
        "regiondisabled-Role", aws_region="eu-south-1", sts_fallback_region="us-east-1"
    )
    assert outcome.kind is OutcomeKind.VERIFIED
    assert outcome.region == "us-east-1"


def test_region_disabled_everywhere_must_be_fixed(aws_env: None) -> None:
    """When the fallback region is disabled too, the customer is told to activate STS."""
    outcome = attempt(
        "regiondisabled-Role", aws_region="eu-south-1", sts_fallback_region="eu-south-2"
    )
    assert (outcome.kind, outcome.code) == (
        OutcomeKind.CUSTOMER_MUST_FIX,
        "RegionDisabledException",
    )
    assert "eu-south-1 or eu-south-2" in outcome.message


def test_validation_error_does_not_echo_the_external_id(canned: CannedSts) -> None:
    """AWS's ValidationError quotes the bad value; the customer message names only the field."""
    canned.queue(
        error_answer(
            "ValidationError",
            f"1 validation error detected: Value '{EXTERNAL_ID}' at 'externalId' "
            "failed to satisfy constraint: Member must satisfy regular expression pattern",
        )
    )
    outcome = verifier().verify(role("ok-Role"), check_external_id=False)
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "ValidationError")
    assert EXTERNAL_ID not in outcome.message
    assert "externalId" in outcome.message


def test_service_control_policy_denial_says_so(canned: CannedSts) -> None:
    """An explicit SCP deny gets a message about the organization's policy."""
    canned.queue(
        error_answer(
            "AccessDenied",
            "User: arn:aws:iam::111122223333:user/v is not authorized to perform: "
            "sts:AssumeRole on resource: x with an explicit deny in a service control policy",
            status=403,
        )
    )
    outcome = verifier().verify(role("ok-Role"), check_external_id=False)
    assert outcome.kind is OutcomeKind.CUSTOMER_MUST_FIX
    assert "service control policy" in outcome.message


# --- transient --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("throttle-Role", "Throttling"),
        ("error500-Role", "InternalFailure"),
        ("error503-Role", "ServiceUnavailable"),
        ("slow-Role", "ReadTimeoutError"),
        ("reset-Role", "ConnectionClosedError"),
        ("garbage-Role", "ResponseParserError"),
    ],
)
def test_nobodys_fault_is_transient(aws_env: None, name: str, code: str) -> None:
    """Throttling, 5xx, timeouts, resets and unparseable answers are transient."""
    outcome = attempt(name)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, code)


def test_connection_refused_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening at the endpoint is a transient connection error."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET)
    outcome = attempt("ok-Role")
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, "EndpointConnectionError")


def test_an_unknown_error_code_is_transient(canned: CannedSts) -> None:
    """A code nobody has seen before changes no status: transient, with the code kept."""
    canned.queue(error_answer("BrandNewError"))
    outcome = verifier().verify(role("ok-Role"), check_external_id=False)
    assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, "BrandNewError")
    assert outcome.unclassified


def test_an_overlong_error_code_is_cut_to_what_the_database_stores(canned: CannedSts) -> None:
    """A code longer than the columns that keep it (128 characters) is cut, not a failed write."""
    canned.queue(error_answer("X" * 300))
    outcome = verifier().verify(role("ok-Role"), check_external_id=False)
    assert outcome.code == "X" * 128


def test_a_transient_error_in_the_enforcement_check_is_transient(canned: CannedSts) -> None:
    """If the call without external ID is throttled, nothing is concluded about enforcement."""
    canned.queue(
        assumed_answer(f"arn:aws:sts::{ACCOUNT}:assumed-role/r/s"),
        error_answer("Throttling", "Rate exceeded"),
    )
    outcome = verifier().verify(role("ok-Role"), check_external_id=True)
    assert (outcome.kind, outcome.code, outcome.sts_calls) == (
        OutcomeKind.TRANSIENT,
        "Throttling",
        2,
    )
    assert "ExternalId" not in canned.requests[1][0]


# --- platform faults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("expiredtoken-Role", "ExpiredToken"),
        ("invalidtoken-Role", "InvalidClientTokenId"),
        ("badsignature-Role", "SignatureDoesNotMatch"),
    ],
)
def test_our_own_credentials_failing_is_a_platform_fault(
    aws_env: None, name: str, code: str
) -> None:
    """Invalid, expired or mis-signed platform credentials blame no customer."""
    outcome = attempt(name)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PLATFORM_FAULT, code)


def test_revoked_platform_credentials_fail_every_role_as_a_platform_fault(
    aws_env: None, standin: StsStandIn
) -> None:
    """With the stand-in refusing our key, even a working role is a platform fault."""
    standin.configure(platform_credentials_valid=False)
    try:
        outcome = attempt("ok-Role")
        probe = verifier().probe()
    finally:
        standin.configure(platform_credentials_valid=True)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PLATFORM_FAULT, "InvalidClientTokenId")
    assert probe.kind is OutcomeKind.PLATFORM_FAULT
    assert verifier().probe().kind is OutcomeKind.VERIFIED


def test_missing_credentials_is_a_platform_fault(
    monkeypatch: pytest.MonkeyPatch, standin: StsStandIn, tmp_path: object
) -> None:
    """No credentials anywhere is the platform's configuration problem."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", standin.endpoint_url)
    sts = StsVerifier(Settings(sts_max_attempts=1), session=boto3.session.Session())
    outcome = sts.verify(role("ok-Role"), check_external_id=True)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PLATFORM_FAULT, "NoCredentialsError")


def test_root_credentials_are_a_platform_fault(canned: CannedSts) -> None:
    """'Roles may not be assumed by root accounts' is our misconfiguration, not the customer's."""
    canned.queue(
        error_answer("AccessDenied", "Roles may not be assumed by root accounts", status=403)
    )
    outcome = verifier().verify(role("ok-Role"), check_external_id=False)
    assert (outcome.kind, outcome.code) == (OutcomeKind.PLATFORM_FAULT, "AccessDenied")


# --- secrets ----------------------------------------------------------------------------------

ALL_BEHAVIOURS = [
    "ok-Role",
    "noext-Role",
    "deny-Role",
    "otheracct-Role",
    "throttle-Role",
    "error500-Role",
    "garbage-Role",
    "expiredtoken-Role",
    "invalidtoken-Role",
    "noperms-Role",
    "noec2-Role",
    "probeerror-Role",
    "bigquota-Role",
]


def test_no_credential_value_appears_in_outcomes_or_logs(aws_env: None) -> None:
    """Neither the platform's keys nor the temporary credentials (those the probes used
    included) appear in any outcome or log."""
    sts = verifier()
    with capture_logs() as logs:
        outcomes = [
            sts.verify(role(name), check_external_id=True, probe=DEFAULT_PROBES)
            for name in ALL_BEHAVIOURS
        ]
    text = repr(outcomes) + repr(logs)
    assert PLATFORM_KEY not in text
    assert PLATFORM_SECRET not in text
    # The stand-in's temporary credentials: ASIAFAKE... keys, FAKEstandin... secrets and tokens.
    assert "ASIA" not in text
    assert "FAKEstandin" not in text
    assert EXTERNAL_ID not in text


def test_every_throttled_answer_is_reported_retried_ones_included(aws_env: None) -> None:
    """With two attempts against a role STS always throttles, the limiter hears both answers;
    a working role's answers report nothing."""
    heard: list[str] = []
    settings = Settings(
        sts_read_timeout_seconds=1,
        sts_connect_timeout_seconds=1,
        sts_max_attempts=2,
        platform_principal_arn="arn:aws:iam::111122223333:root",
    )
    sts = StsVerifier(settings, on_throttled=lambda: heard.append("throttled"))
    outcome = sts.verify(role("throttle-Role"), check_external_id=False)
    assert (outcome.code, heard) == ("Throttling", ["throttled", "throttled"])
    heard.clear()
    assert sts.verify(role("ok-Role"), check_external_id=True).verified
    assert heard == []


# --- permission probes ------------------------------------------------------------------------


def _probe_calls(standin: StsStandIn) -> dict[str, int]:
    by_probe = standin.stats(roles=False)["by_probe"]
    assert isinstance(by_probe, dict)
    return dict(by_probe)


def test_a_role_allowed_every_probe_is_verified_with_them_proven(
    aws_env: None, standin: StsStandIn
) -> None:
    """Each probe is called once, on its own service, and none of them spends an STS call."""
    before = _probe_calls(standin)
    outcome = attempt("ok-Role", probe=DEFAULT_PROBES)
    assert outcome.kind is OutcomeKind.VERIFIED
    assert outcome.permissions is not None
    assert (outcome.permissions.proven, outcome.permissions.missing) == (DEFAULT_PROBES, ())
    assert (outcome.sts_calls, outcome.probe_calls) == (2, 4)
    after = _probe_calls(standin)
    assert {name: after[name] - before.get(name, 0) for name in DEFAULT_PROBES} == dict.fromkeys(
        DEFAULT_PROBES, 1
    )


def test_a_role_without_permissions_fails_naming_all_four(aws_env: None) -> None:
    """Every denial (AccessDenied, UnauthorizedOperation, AccessDeniedException) is named."""
    outcome = attempt("noperms-Role", probe=DEFAULT_PROBES)
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "MissingPermissions")
    assert outcome.message.startswith(
        f"Role arn:aws:iam::{ACCOUNT}:role/noperms-Role can be assumed, but it is not allowed: "
        "cloudtrail:DescribeTrails, ec2:DescribeRegions, iam:GetAccountSummary, "
        "s3:ListAllMyBuckets. Attach the AWS managed policy SecurityAudit"
    )
    assert outcome.permissions is not None
    assert (outcome.permissions.proven, outcome.permissions.missing) == ((), DEFAULT_PROBES)


def test_a_role_missing_one_permission_fails_naming_only_that_one(aws_env: None) -> None:
    """The three allowed probes are proven; the message names ec2:DescribeRegions alone."""
    outcome = attempt("noec2-Role", probe=DEFAULT_PROBES)
    assert (outcome.kind, outcome.code) == (OutcomeKind.CUSTOMER_MUST_FIX, "MissingPermissions")
    assert "not allowed: ec2:DescribeRegions. Attach" in outcome.message
    assert outcome.permissions is not None
    assert outcome.permissions.missing == ("ec2:DescribeRegions",)
    assert "ec2:DescribeRegions" not in outcome.permissions.proven


def test_a_failing_probe_service_is_inconclusive_and_named(aws_env: None) -> None:
    """A 503 from the probed services (nothing denied) leaves the account verified with its
    permissions unknown, naming the service, and keeps the external-ID check's result."""
    outcome = attempt("probeerror-Role", probe=DEFAULT_PROBES)
    assert (outcome.kind, outcome.permissions_unknown, outcome.service) == (
        OutcomeKind.VERIFIED,
        "ServiceUnavailable",
        "iam",
    )
    assert outcome.permissions is None
    assert (outcome.external_id_enforced, outcome.probe_calls) == (True, 4)


def test_missing_permissions_keep_the_external_id_checks_result(aws_env: None) -> None:
    """A role lacking a permission was still shown to enforce the external ID: the outcome
    says so, and the rules record the check (it is not repeated on every retry)."""
    outcome = attempt("noec2-Role", probe=DEFAULT_PROBES)
    assert (outcome.code, outcome.external_id_enforced) == ("MissingPermissions", True)


def test_unpaged_list_buckets_is_never_sent(aws_env: None) -> None:
    """An account whose bucket quota is above 10,000 refuses an unpaged ListBuckets: the S3
    probe asks for one bucket, so its permission is proven there too."""
    outcome = attempt("bigquota-Role", probe=DEFAULT_PROBES)
    assert outcome.permissions is not None, outcome.permissions_unknown
    assert outcome.permissions.proven == DEFAULT_PROBES


def test_probes_ask_the_region_assume_role_answered_in(aws_env: None) -> None:
    """STS off in the configured region (an opt-in region the account has not enabled, where
    its tokens are refused too): AssumeRole falls back, and so do the probes."""
    outcome = attempt(
        "regiondisabled-Role",
        probe=DEFAULT_PROBES,
        aws_region="eu-south-1",
        sts_fallback_region="us-east-1",
    )
    assert outcome.region == "us-east-1"
    assert outcome.permissions is not None, outcome.permissions_unknown
    assert outcome.permissions.proven == DEFAULT_PROBES


def test_a_malformed_service_endpoint_is_the_platforms_fault(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad AWS_ENDPOINT_URL_S3 fails the S3 probe's client: a platform fault naming s3 (the
    circuit breaker's business), never an exception out of verify()."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "not a url")
    outcome = attempt("ok-Role", probe=DEFAULT_PROBES)
    assert (outcome.kind, outcome.code, outcome.service) == (
        OutcomeKind.PLATFORM_FAULT,
        "ProbeClientError",
        "s3",
    )


def test_a_probe_without_an_answer_in_time_is_a_probe_timeout(aws_env: None) -> None:
    """A probe still unanswered when the budget is spent is given up on: transient ProbeTimeout
    naming its service (so the verification is inconclusive, not stuck)."""
    prober = verifier().prober()
    never: concurrent.futures.Future[Any] = concurrent.futures.Future()
    probe = CATALOGUE["ec2:DescribeRegions"]
    started = time.monotonic() - prober.budget_seconds
    (result,) = prober.finish([probe], [never], started)
    assert result.outcome is not None
    assert (result.outcome.kind, result.outcome.code, result.outcome.service) == (
        OutcomeKind.TRANSIENT,
        "ProbeTimeout",
        "ec2",
    )
    assert never.cancelled()


def test_the_probe_budget_covers_every_attempt_at_its_limits() -> None:
    """Three attempts of 2 s connect + 5 s read, backoffs of 1 and 2 s, a second's margin."""
    settings = Settings(
        sts_connect_timeout_seconds=2, sts_read_timeout_seconds=5, sts_max_attempts=3
    )
    assert probe_budget_seconds(settings) == 3 * 7 + 1 + 2 + 1


def _denial(message: str) -> botocore.exceptions.ClientError:
    """EC2's refusal as botocore raises it, with AWS's own message."""
    response: Any = {
        "Error": {"Code": "UnauthorizedOperation", "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 403},
    }
    return botocore.exceptions.ClientError(response, "DescribeRegions")


@pytest.mark.parametrize(
    "why",
    [
        "because no session policy allows the ec2:DescribeRegions action",
        "with an explicit deny in a session policy",
        "because no VPC endpoint policy allows the ec2:DescribeRegions action",
    ],
)
def test_a_denial_by_our_own_policies_is_the_platforms_fault(why: str) -> None:
    """A denial that blames the session policy (ours, built from the catalogue) or a VPC
    endpoint policy (the platform's network) trips the circuit instead of failing customers."""
    probe = CATALOGUE["ec2:DescribeRegions"]
    outcome = classify_probe_error(
        probe,
        _denial(f"User: arn:aws:sts::1:assumed-role/R/s is not authorized to perform: {why}"),
    )
    assert (outcome.kind, outcome.service) == (OutcomeKind.PLATFORM_FAULT, "ec2")


def test_a_denial_by_the_customers_policies_is_theirs() -> None:
    """An identity-based policy or an SCP denial stays the customer's to fix."""
    probe = CATALOGUE["ec2:DescribeRegions"]
    for why in (
        "because no identity-based policy allows the ec2:DescribeRegions action",
        "with an explicit deny in a service control policy",
    ):
        outcome = classify_probe_error(probe, _denial(f"not authorized to perform: {why}"))
        assert outcome.kind is OutcomeKind.CUSTOMER_MUST_FIX, why


def test_a_probe_is_signed_with_the_accounts_credentials_never_the_default_chain(
    aws_env: None,
) -> None:
    """The platform's keys are in the environment, yet a probe's request is kept unsigned and
    each send signs it with the credentials it is given."""
    call = verifier().prober()._call(CATALOGUE["iam:GetAccountSummary"], "us-east-1")
    assert PLATFORM_KEY not in repr(call)
    assert "authorization" not in {name.lower() for name, _ in call.headers}
    account = botocore.credentials.ReadOnlyCredentials("ASIAFAKEF0" + "0" * 10, "s", "t")
    signed = call.signed_headers(account, datetime.datetime.now(datetime.UTC))
    assert signed["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIAFAKEF0")
    assert PLATFORM_KEY not in repr(signed)


def test_only_the_configured_probes_are_called(aws_env: None, standin: StsStandIn) -> None:
    """Probing one permission calls one service; probing none calls none."""
    before = _probe_calls(standin)
    outcome = attempt("noec2-Role", probe=("s3:ListAllMyBuckets",))
    assert outcome.verified
    assert outcome.permissions is not None
    assert outcome.permissions.proven == ("s3:ListAllMyBuckets",)
    assert attempt("ok-Role").permissions is None
    after = _probe_calls(standin)
    assert {name: after[name] - before.get(name, 0) for name in after} == {
        **dict.fromkeys(after, 0),
        "s3:ListAllMyBuckets": 1,
    }


def test_probing_assume_role_carries_a_policy_allowing_exactly_the_probes(
    canned: CannedSts,
) -> None:
    """When probes are due the session policy allows the probed actions (and nothing else);
    the credentials AssumeRole returned are the ones the probes sign with."""
    details = role("ok-Role")
    # What the stand-in would issue for a role allowed only ec2:DescribeRegions (mask 2): the
    # probes reach the stand-in with exactly these credentials.
    issued = {
        "AccessKeyId": "ASIAFAKE20" + "0" * 10,
        "SecretAccessKey": "FAKEstandin-secret",
        "SessionToken": "FAKE-token",
        "Expiration": "2030-01-01T00:00:00Z",
    }
    canned.queue(assumed_answer(f"arn:aws:sts::{ACCOUNT}:assumed-role/ok-Role/s", issued))
    outcome = verifier().verify(details, check_external_id=False, probe=DEFAULT_PROBES)
    [(form, _)] = canned.requests
    assert form["Policy"] == probe_session_policy(DEFAULT_PROBES)
    assert form["ExternalId"] == EXTERNAL_ID
    assert outcome.permissions is not None
    assert outcome.permissions.proven == ("ec2:DescribeRegions",)


def test_probes_do_not_spend_the_sts_budget(aws_env: None) -> None:
    """The rate limiter hook runs for STS calls only: probing adds none to an attempt."""
    spent: list[int] = []
    settings = Settings(sts_max_attempts=1, platform_principal_arn="arn:aws:iam::111122223333:root")
    sts = StsVerifier(settings, before_call=lambda: spent.append(1))
    sts.verify(role("ok-Role"), check_external_id=True)  # the platform check's call, once
    spent.clear()
    assert sts.verify(role("ok-Role"), check_external_id=True).verified
    without = len(spent)
    spent.clear()
    outcome = sts.verify(role("ok-Role"), check_external_id=True, probe=DEFAULT_PROBES)
    assert (outcome.verified, outcome.probe_calls) == (True, 4)
    assert len(spent) == without == 2


def test_the_probes_of_one_account_run_at_once_beside_the_enforcement_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every answer taking one second: AssumeRole, then the enforcement check with the four
    probes beside it, is about two seconds, not six."""
    with StsStandIn(median_ms=1000, latency_sigma=0, seed=5) as slow:
        monkeypatch.setenv("AWS_ENDPOINT_URL", slow.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET)
        sts = StsVerifier(Settings(sts_max_attempts=1, sts_read_timeout_seconds=5))
        sts.verify(role("ok-Role"), check_external_id=False)  # the platform check, once
        started = time.perf_counter()
        outcome = sts.verify(role("ok-Role"), check_external_id=True, probe=DEFAULT_PROBES)
        took = time.perf_counter() - started
    assert (outcome.verified, outcome.probe_calls) == (True, 4)
    # Sequential probes would take at least 6 s; concurrent ones 2 s and some overhead (a
    # loaded machine's included).
    assert took < 5.8, took
