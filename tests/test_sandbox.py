"""The sandbox STS answers AssumeRole the way AWS does, failure paths included.

Every test talks to one sandbox over HTTP with boto3, as the worker will. moto's state is shared by
the whole process, so each test makes its own roles under unique names instead of resetting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.credentials
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from sandbox.demo import (
    DEMO_CONNECTIONS,
    UNTRUSTED_PRINCIPAL_ARN,
    DemoBehaviour,
    demo_connection,
    seed_demo_roles,
)
from sandbox.moto_sts import (
    ADMIN_ACCESS_KEY_ID,
    PLATFORM_ACCESS_KEY_ID,
    PLATFORM_ACCOUNT_ID,
    PLATFORM_PRINCIPAL_ARN,
    PLATFORM_SECRET_ACCESS_KEY,
    SCANNER_ACTIONS,
    Caller,
    SandboxSts,
    TrustDecision,
    create_customer_role,
    delete_customer_role,
    evaluate_permission,
    evaluate_trust_policy,
    get_platform_credentials_valid,
    set_platform_credentials_valid,
    set_probe_fault,
    sts_calls,
    trust_policy,
)
from worker.permissions import CATALOGUE, DEFAULT_PROBES, probe_session_policy
from worker.settings import Settings
from worker.sts.classify import classify_probe_error
from worker.sts.outcome import RoleDetails
from worker.sts.verifier import StsVerifier

if TYPE_CHECKING:
    from mypy_boto3_sts import STSClient
    from mypy_boto3_sts.type_defs import AssumeRoleResponseTypeDef

REGION = "us-east-1"
CUSTOMER_ACCOUNT = "123456789012"
OTHER_ACCOUNT = "444455556666"
EXTERNAL_ID = "abc123-def456-ghi789"
SESSION = "verify-test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxSts]:
    """One sandbox for the module, with the machine's AWS configuration kept out of boto3."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_") or name == "MOTO_ACCOUNT_ID":
                patch.delenv(name)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        with SandboxSts() as running:
            yield running


def sts_client(
    endpoint_url: str,
    access_key_id: str = PLATFORM_ACCESS_KEY_ID,
    secret_access_key: str = PLATFORM_SECRET_ACCESS_KEY,
    session_token: str | None = None,
) -> STSClient:
    """An STS client for the sandbox built from explicit values only, without retries."""
    session = boto3.session.Session(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        aws_session_token=session_token,
        region_name=REGION,
    )
    return session.client(
        "sts", endpoint_url=endpoint_url, config=Config(retries={"total_max_attempts": 1})
    )


def make_role(
    sandbox: SandboxSts,
    external_id: str | None = EXTERNAL_ID,
    *,
    account_id: str = CUSTOMER_ACCOUNT,
    trusted: str = PLATFORM_PRINCIPAL_ARN,
) -> str:
    """A fresh, uniquely named customer role; returns its ARN."""
    name = f"CustomerRole-{uuid.uuid4().hex[:12]}"
    return create_customer_role(sandbox.endpoint_url, account_id, name, trusted, external_id)


def assume(
    sandbox: SandboxSts, role_arn: str, external_id: str | None = EXTERNAL_ID
) -> AssumeRoleResponseTypeDef:
    """AssumeRole as the platform, sending the external ID only when there is one."""
    client = sts_client(sandbox.endpoint_url)
    if external_id is None:
        return client.assume_role(RoleArn=role_arn, RoleSessionName=SESSION)
    return client.assume_role(RoleArn=role_arn, RoleSessionName=SESSION, ExternalId=external_id)


def denied_message(role_arn: str) -> str:
    """AWS's AccessDenied message for the platform principal and `role_arn`."""
    return (
        f"User: {PLATFORM_PRINCIPAL_ARN} is not authorized to perform: sts:AssumeRole "
        f"on resource: {role_arn}"
    )


def assert_access_denied(error: pytest.ExceptionInfo[ClientError], role_arn: str) -> None:
    """The error is STS's AccessDenied, with AWS's status, type and exact message."""
    response = error.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert response["Error"]["Code"] == "AccessDenied"
    assert response["Error"].get("Type") == "Sender"
    assert response["Error"]["Message"] == denied_message(role_arn)


def raw_sts(
    endpoint_url: str, body: str, access_key_id: str = PLATFORM_ACCESS_KEY_ID
) -> tuple[int, bytes]:
    """POST a Query-protocol STS request by hand (the sandbox does not check signatures)."""
    request = urllib.request.Request(  # noqa: S310 - the sandbox's own http URL
        endpoint_url,
        data=body.encode(),
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={access_key_id}/20260101/{REGION}/sts/aws4_request, "
                "SignedHeaders=host, Signature=0"
            ),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - ditto
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# --------------------------------------------------------------------------- AssumeRole outcomes


def test_trusted_role_with_right_external_id_is_assumed(sandbox: SandboxSts) -> None:
    """A role trusting the platform is assumed with its external ID, as a session in its account."""
    role_arn = make_role(sandbox)
    role_name = role_arn.rpartition("/")[2]

    response = assume(sandbox, role_arn)

    assert response["AssumedRoleUser"]["Arn"] == (
        f"arn:aws:sts::{CUSTOMER_ACCOUNT}:assumed-role/{role_name}/{SESSION}"
    )
    credentials = response["Credentials"]
    session = sts_client(
        sandbox.endpoint_url,
        credentials["AccessKeyId"],
        credentials["SecretAccessKey"],
        credentials["SessionToken"],
    )
    assert session.get_caller_identity()["Account"] == CUSTOMER_ACCOUNT


def test_wrong_external_id_is_denied_with_aws_message(sandbox: SandboxSts) -> None:
    """A role requiring another external ID answers AccessDenied with AWS's exact message."""
    role_arn = make_role(sandbox)

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn, external_id="not-the-right-one")

    assert_access_denied(error, role_arn)


def test_missing_external_id_is_denied_when_role_requires_one(sandbox: SandboxSts) -> None:
    """An AssumeRole without ExternalId does not satisfy the role's sts:ExternalId condition."""
    role_arn = make_role(sandbox)

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn, external_id=None)

    assert_access_denied(error, role_arn)


def test_role_without_condition_is_assumed_without_external_id(sandbox: SandboxSts) -> None:
    """A trust policy without the condition lets the platform in with no external ID at all."""
    role_arn = make_role(sandbox, external_id=None)

    assert assume(sandbox, role_arn, external_id=None)["Credentials"]["AccessKeyId"]
    assert assume(sandbox, role_arn, external_id="anything-goes")["Credentials"]["AccessKeyId"]


def test_nonexistent_role_is_denied(sandbox: SandboxSts) -> None:
    """A role that does not exist gets the same AccessDenied as an untrusting one."""
    role_arn = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/NoSuchRole-{uuid.uuid4().hex[:8]}"

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn)

    assert_access_denied(error, role_arn)


def test_role_in_an_account_moto_never_saw_is_denied(sandbox: SandboxSts) -> None:
    """An ARN in an account with no IAM state at all is denied, not an error."""
    role_arn = "arn:aws:iam::987650000000:role/Anything"

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn)

    assert_access_denied(error, role_arn)


def test_role_trusting_another_account_is_denied(sandbox: SandboxSts) -> None:
    """A role that trusts someone other than the platform denies the platform."""
    role_arn = make_role(sandbox, trusted=f"arn:aws:iam::{OTHER_ACCOUNT}:root")

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn)

    assert_access_denied(error, role_arn)


def test_role_trusting_the_platform_account_is_assumed(sandbox: SandboxSts) -> None:
    """Trusting the platform's account root (or its bare id) trusts the platform's user."""
    for trusted in (f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:root", PLATFORM_ACCOUNT_ID):
        role_arn = make_role(sandbox, trusted=trusted)
        assert assume(sandbox, role_arn)["AssumedRoleUser"]["Arn"].endswith(f"/{SESSION}")


def test_explicit_deny_wins_over_allow(sandbox: SandboxSts) -> None:
    """A Deny statement matching the platform refuses it even though an Allow also matches."""
    name = f"DenyRole-{uuid.uuid4().hex[:12]}"
    document = trust_policy(PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID)
    document["Statement"].append(
        {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "sts:*"},
    )
    role = sandbox.iam_client_for(CUSTOMER_ACCOUNT).create_role(
        RoleName=name, AssumeRolePolicyDocument=json.dumps(document)
    )
    role_arn = role["Role"]["Arn"]

    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn)

    assert_access_denied(error, role_arn)


def test_role_created_later_starts_working(sandbox: SandboxSts) -> None:
    """A role is denied until the customer creates it, then assumed, and denied once deleted."""
    name = f"LateRole-{uuid.uuid4().hex[:12]}"
    role_arn = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/{name}"
    with pytest.raises(ClientError) as error:
        assume(sandbox, role_arn)
    assert_access_denied(error, role_arn)

    time.sleep(0.2)
    create_customer_role(
        sandbox.endpoint_url, CUSTOMER_ACCOUNT, name, PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID
    )
    assert assume(sandbox, role_arn)["AssumedRoleUser"]["Arn"].endswith(f"/{name}/{SESSION}")

    assert delete_customer_role(sandbox.endpoint_url, CUSTOMER_ACCOUNT, name)
    assert not delete_customer_role(sandbox.endpoint_url, CUSTOMER_ACCOUNT, name)
    with pytest.raises(ClientError):
        assume(sandbox, role_arn)


def test_propagation_delay_hides_a_new_role_for_a_while(sandbox: SandboxSts) -> None:
    """With a propagation delay a new role is denied at first and assumed once the delay passed."""
    # Seconds, not fractions: on a loaded machine creating the role and asking for it can take
    # longer than half a second, and the role would then already be visible.
    with SandboxSts(propagation_delay=5) as slow:
        role_arn = make_role(slow)
        with pytest.raises(ClientError) as error:
            assume(slow, role_arn)
        assert_access_denied(error, role_arn)

        time.sleep(5.1)
        assert assume(slow, role_arn)["Credentials"]["AccessKeyId"]


def test_re_creating_a_role_replaces_its_trust_policy(sandbox: SandboxSts) -> None:
    """Creating an existing role again re-points its trust policy (the customer fixed it)."""
    role_arn = make_role(sandbox, external_id="old-external-id")
    name = role_arn.rpartition("/")[2]
    with pytest.raises(ClientError):
        assume(sandbox, role_arn)

    again = create_customer_role(
        sandbox.endpoint_url, CUSTOMER_ACCOUNT, name, PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID
    )

    assert again == role_arn
    assert assume(sandbox, role_arn)["Credentials"]["AccessKeyId"]


def test_duration_beyond_max_session_duration_is_a_validation_error(sandbox: SandboxSts) -> None:
    """DurationSeconds above the role's MaxSessionDuration gets AWS's ValidationError (400)."""
    name = f"LongRole-{uuid.uuid4().hex[:12]}"
    iam = sandbox.iam_client_for(CUSTOMER_ACCOUNT)
    role_arn = iam.create_role(
        RoleName=name,
        AssumeRolePolicyDocument=json.dumps(trust_policy(PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID)),
        MaxSessionDuration=7200,
    )["Role"]["Arn"]
    client = sts_client(sandbox.endpoint_url)

    def assume_for(seconds: int) -> AssumeRoleResponseTypeDef:
        return client.assume_role(
            RoleArn=role_arn,
            RoleSessionName=SESSION,
            ExternalId=EXTERNAL_ID,
            DurationSeconds=seconds,
        )

    assert assume_for(7200)["Credentials"]["AccessKeyId"]
    with pytest.raises(ClientError) as error:
        assume_for(7201)
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error.value.response["Error"]["Code"] == "ValidationError"
    assert error.value.response["Error"]["Message"] == (
        "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
    )


def test_role_chaining_is_judged_by_the_first_roles_session(sandbox: SandboxSts) -> None:
    """Credentials from one role may assume a role trusting it, for at most an hour."""
    first_arn = make_role(sandbox)
    second_arn = make_role(sandbox, external_id=None, trusted=first_arn)
    credentials = assume(sandbox, first_arn)["Credentials"]
    chained = sts_client(
        sandbox.endpoint_url,
        credentials["AccessKeyId"],
        credentials["SecretAccessKey"],
        credentials["SessionToken"],
    )

    second = chained.assume_role(RoleArn=second_arn, RoleSessionName="chained")
    assert second["AssumedRoleUser"]["Arn"].endswith(f"/{second_arn.rpartition('/')[2]}/chained")
    with pytest.raises(ClientError) as error:
        chained.assume_role(RoleArn=second_arn, RoleSessionName="chained", DurationSeconds=3601)
    assert error.value.response["Error"]["Code"] == "ValidationError"
    with pytest.raises(ClientError) as error:
        chained.assume_role(RoleArn=first_arn, RoleSessionName="chained", ExternalId=EXTERNAL_ID)
    assert error.value.response["Error"]["Message"] == (
        f"User: arn:aws:sts::{CUSTOMER_ACCOUNT}:assumed-role/{first_arn.rpartition('/')[2]}/"
        f"{SESSION} is not authorized to perform: sts:AssumeRole on resource: {first_arn}"
    )


# --------------------------------------------------------------------------- who is calling


def test_sts_calls_are_counted_per_action_and_role(sandbox: SandboxSts) -> None:
    """The sandbox counts the STS calls it receives, AssumeRole by role ARN, refused or not."""
    allowed = make_role(sandbox)
    refused = make_role(sandbox, trusted="arn:aws:iam::999988887777:root")
    before = sts_calls(sandbox.endpoint_url)

    assume(sandbox, allowed)
    with pytest.raises(ClientError):
        assume(sandbox, refused)
    sts_client(sandbox.endpoint_url).get_caller_identity()

    after = sts_calls(sandbox.endpoint_url)
    assert after["assume_role"][allowed] == before["assume_role"].get(allowed, 0) + 1
    assert after["assume_role"][refused] == before["assume_role"].get(refused, 0) + 1
    for action, more in (("AssumeRole", 2), ("GetCallerIdentity", 1)):
        assert after["by_action"][action] == before["by_action"].get(action, 0) + more


def test_a_role_in_the_platforms_own_account_can_be_assumed_by_the_platform(
    sandbox: SandboxSts,
) -> None:
    """As in AWS, a role in the platform's account that trusts it works: the worker must refuse
    such rows itself (tests/test_e2e_worker.py), the sandbox would not stop it."""
    role_arn = make_role(sandbox, account_id=PLATFORM_ACCOUNT_ID)

    response = assume(sandbox, role_arn)

    assert response["AssumedRoleUser"]["Arn"].startswith(f"arn:aws:sts::{PLATFORM_ACCOUNT_ID}:")


def test_get_caller_identity_names_the_platform_principal(sandbox: SandboxSts) -> None:
    """GetCallerIdentity with the platform's key answers the platform user, not moto's default."""
    identity = sts_client(sandbox.endpoint_url).get_caller_identity()

    assert identity["Account"] == PLATFORM_ACCOUNT_ID
    assert identity["Arn"] == PLATFORM_PRINCIPAL_ARN
    assert identity["UserId"].startswith("AIDA")
    assert len(identity["UserId"]) == 21


@pytest.mark.parametrize("access_key_id", ["AKIAUNKNOWNKEY000000", ADMIN_ACCESS_KEY_ID])
def test_other_keys_are_invalid_for_sts(sandbox: SandboxSts, access_key_id: str) -> None:
    """STS refuses keys that are not the platform's, the admin key included."""
    role_arn = make_role(sandbox)
    client = sts_client(sandbox.endpoint_url, access_key_id)

    for call in (
        client.get_caller_identity,
        lambda: client.assume_role(RoleArn=role_arn, RoleSessionName=SESSION),
    ):
        with pytest.raises(ClientError) as error:
            call()
        assert error.value.response["Error"]["Code"] == "InvalidClientTokenId"
        assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_revoked_platform_credentials_are_refused_until_restored(sandbox: SandboxSts) -> None:
    """Revoked platform credentials get InvalidClientTokenId; restored ones work again."""
    role_arn = make_role(sandbox)
    sandbox.revoke_platform_credentials()
    try:
        for call in (
            lambda: assume(sandbox, role_arn),
            sts_client(sandbox.endpoint_url).get_caller_identity,
        ):
            with pytest.raises(ClientError) as error:
                call()
            assert error.value.response["Error"] == {
                "Type": "Sender",
                "Code": "InvalidClientTokenId",
                "Message": "The security token included in the request is invalid.",
            }
            assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    finally:
        sandbox.restore_platform_credentials()

    assert assume(sandbox, role_arn)["Credentials"]["AccessKeyId"]


def test_control_endpoint_flips_platform_credentials_over_http(sandbox: SandboxSts) -> None:
    """Another process can revoke and restore the platform's credentials over HTTP."""
    url = sandbox.endpoint_url
    assert get_platform_credentials_valid(url) is True
    try:
        set_platform_credentials_valid(url, False)
        assert get_platform_credentials_valid(url) is False
        with pytest.raises(ClientError) as error:
            sts_client(url).get_caller_identity()
        assert error.value.response["Error"]["Code"] == "InvalidClientTokenId"
    finally:
        set_platform_credentials_valid(url, True)
    assert sts_client(url).get_caller_identity()["Arn"] == PLATFORM_PRINCIPAL_ARN

    bad = urllib.request.Request(  # noqa: S310 - the sandbox's own http URL
        f"{url}/_sandbox/platform-credentials", data=b'{"valid": "no"}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(bad, timeout=10)  # noqa: S310 - ditto
    assert rejected.value.code == 400
    assert get_platform_credentials_valid(url) is True


def test_errors_use_sts_wire_format(sandbox: SandboxSts) -> None:
    """The AccessDenied body is STS's ErrorResponse XML, namespace and RequestId included."""
    role_arn = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/NoSuchRole"
    body = (
        "Action=AssumeRole&Version=2011-06-15&RoleSessionName=raw-test"
        f"&RoleArn={urllib.parse.quote(role_arn, safe='')}&ExternalId={EXTERNAL_ID}"
    )

    status, raw = raw_sts(sandbox.endpoint_url, body)

    assert status == 403
    root = ET.fromstring(raw)  # noqa: S314 - the sandbox's own response
    assert root.tag == f"{STS_NS}ErrorResponse"
    assert root.findtext(f"{STS_NS}Error/{STS_NS}Type") == "Sender"
    assert root.findtext(f"{STS_NS}Error/{STS_NS}Code") == "AccessDenied"
    assert root.findtext(f"{STS_NS}Error/{STS_NS}Message") == denied_message(role_arn)
    assert uuid.UUID(root.findtext(f"{STS_NS}RequestId") or "")


# --------------------------------------------------------------------------- trust policy rules


PLATFORM = Caller(arn=PLATFORM_PRINCIPAL_ARN, account_id=PLATFORM_ACCOUNT_ID, is_platform=True)


def statement(**fields: Any) -> dict[str, Any]:
    """An Allow statement for the platform's user, with `fields` replacing or adding keys."""
    base: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": PLATFORM_PRINCIPAL_ARN},
        "Action": "sts:AssumeRole",
    }
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("policy_statement", "external_id", "expected"),
    [
        (statement(Principal="*"), None, TrustDecision.ALLOWED),
        (statement(Principal={"AWS": ["arn:aws:iam::1:root", "*"]}), None, TrustDecision.ALLOWED),
        (statement(Action=["s3:GetObject", "sts:*"]), None, TrustDecision.ALLOWED),
        (statement(Action="*"), None, TrustDecision.ALLOWED),
        (statement(Action="STS:assumerole"), None, TrustDecision.ALLOWED),
        (statement(Action="sts:AssumeRoleWithSAML"), None, TrustDecision.IMPLICITLY_DENIED),
        (
            statement(Principal={"Service": "ec2.amazonaws.com"}),
            None,
            TrustDecision.IMPLICITLY_DENIED,
        ),
        (
            statement(Principal={"AWS": f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:user/someone"}),
            None,
            TrustDecision.IMPLICITLY_DENIED,
        ),
        (
            statement(Condition={"StringEquals": {"STS:EXTERNALID": ["a1", "b2"]}}),
            "b2",
            TrustDecision.ALLOWED,
        ),
        (
            statement(Condition={"StringEquals": {"sts:ExternalId": "a1"}}),
            "A1",
            TrustDecision.IMPLICITLY_DENIED,
        ),
        (
            statement(Condition={"StringLike": {"sts:ExternalId": "tenant-*"}}),
            "tenant-42",
            TrustDecision.ALLOWED,
        ),
        (
            statement(Condition={"StringEqualsIfExists": {"sts:ExternalId": "a1"}}),
            None,
            TrustDecision.ALLOWED,
        ),
        (
            statement(Condition={"Null": {"sts:ExternalId": "false"}}),
            None,
            TrustDecision.IMPLICITLY_DENIED,
        ),
        (
            statement(Condition={"NumericLessThan": {"sts:ExternalId": "1"}}),
            "0",
            TrustDecision.IMPLICITLY_DENIED,
        ),
        (
            statement(Effect="Deny", Condition={"StringNotEquals": {"sts:ExternalId": "a1"}}),
            None,
            TrustDecision.EXPLICITLY_DENIED,
        ),
        (
            statement(Effect="Deny", Condition={"NumericLessThan": {"aws:Unknown": "1"}}),
            None,
            TrustDecision.EXPLICITLY_DENIED,
        ),
    ],
)
def test_trust_policy_rules(
    policy_statement: dict[str, Any], external_id: str | None, expected: TrustDecision
) -> None:
    """Principal, action and condition forms are evaluated as IAM does; unknowns err to refuse."""
    # A Deny is shown against an Allow that would otherwise let the platform in.
    others = [] if policy_statement["Effect"] == "Allow" else [statement()]
    document = {"Version": "2012-10-17", "Statement": [*others, policy_statement]}

    assert evaluate_trust_policy(document, caller=PLATFORM, external_id=external_id) is expected


def test_unparseable_trust_policy_trusts_nobody() -> None:
    """A trust policy that is not JSON allows nothing rather than raising."""
    assert (
        evaluate_trust_policy("{not json", caller=PLATFORM, external_id=EXTERNAL_ID)
        is TrustDecision.IMPLICITLY_DENIED
    )


def test_assumed_role_session_matches_its_role_arn() -> None:
    """A policy naming a role trusts that role's sessions, whose ARN is an sts assumed-role one."""
    role_arn = f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:role/Verifier"
    session = Caller(
        arn=f"arn:aws:sts::{PLATFORM_ACCOUNT_ID}:assumed-role/Verifier/s1",
        account_id=PLATFORM_ACCOUNT_ID,
        role_arn=role_arn,
    )
    document = trust_policy(role_arn, None)

    assert evaluate_trust_policy(document, caller=session, external_id=None) is (
        TrustDecision.ALLOWED
    )
    assert evaluate_trust_policy(document, caller=PLATFORM, external_id=None) is (
        TrustDecision.IMPLICITLY_DENIED
    )


# --------------------------------------------------------------------------- demo data


def test_demo_connections_behave_as_labelled(sandbox: SandboxSts) -> None:
    """Seeded demo roles give each connection the outcome its behaviour names."""
    seeded = seed_demo_roles(sandbox.endpoint_url)
    assert seed_demo_roles(sandbox.endpoint_url) == seeded
    assert len({c.id for c in DEMO_CONNECTIONS}) == len(DEMO_CONNECTIONS)
    assert {c.behaviour for c in DEMO_CONNECTIONS} == set(DemoBehaviour)
    assert demo_connection("missing_role").role_arn not in seeded

    works = demo_connection(DemoBehaviour.WORKS)
    assert assume(sandbox, works.role_arn, works.external_id)["AssumedRoleUser"]["Arn"] == (
        f"arn:aws:sts::{works.aws_account_id}:assumed-role/{works.role_name}/{SESSION}"
    )
    with pytest.raises(ClientError):
        assume(sandbox, works.role_arn, external_id=None)

    relaxed = demo_connection(DemoBehaviour.EXTERNAL_ID_NOT_ENFORCED)
    assert assume(sandbox, relaxed.role_arn, relaxed.external_id)
    assert assume(sandbox, relaxed.role_arn, external_id=None)

    for behaviour in (
        DemoBehaviour.DENIES,
        DemoBehaviour.WRONG_EXTERNAL_ID,
        DemoBehaviour.MISSING_ROLE,
    ):
        connection = demo_connection(behaviour)
        with pytest.raises(ClientError) as error:
            assume(sandbox, connection.role_arn, connection.external_id)
        assert_access_denied(error, connection.role_arn)

    # Assumed like `works`, but refused every probe: shown failed with the missing list.
    lacking = demo_connection(DemoBehaviour.MISSING_PERMISSIONS)
    assert assume(sandbox, lacking.role_arn, lacking.external_id)
    lacking_iam = role_client(sandbox, lacking.role_arn, "iam", external_id=lacking.external_id)
    assert error_code(lacking_iam.get_account_summary) == "AccessDenied"
    role_client(sandbox, works.role_arn, "iam", external_id=works.external_id).get_account_summary()

    denies = demo_connection(DemoBehaviour.DENIES)
    trusted = json.dumps(
        sandbox.iam_client_for(denies.aws_account_id).get_role(RoleName=denies.role_name)["Role"][
            "AssumeRolePolicyDocument"
        ]
    )
    assert UNTRUSTED_PRINCIPAL_ARN in trusted


def test_demo_connections_show_what_the_readme_says(
    sandbox: SandboxSts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified by the worker's own code, each demo account shows what the README's table says,
    and the three AccessDenied causes give the customer one and the same message."""
    seed_demo_roles(sandbox.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sandbox.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint_url)  # the permission probes'
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET_ACCESS_KEY)
    verifier = StsVerifier(
        Settings(sts_max_attempts=1, platform_principal_arn=PLATFORM_PRINCIPAL_ARN),
        session=boto3.session.Session(),
    )
    readme = Path(ROOT, "README.md").read_text()
    denied_messages = set()
    for connection in DEMO_CONNECTIONS:
        details = RoleDetails(
            connection.id, connection.aws_account_id, connection.role_arn, connection.external_id
        )
        # As on a first success: the enforcement check and the default permission probes.
        outcome = verifier.verify(details, check_external_id=True, probe=DEFAULT_PROBES)
        assert ("connected" if outcome.verified else outcome.code) == connection.shows, outcome
        row = re.search(rf"^\| {re.escape(connection.alias)} \|.*\|(.*)\|$", readme, re.M)
        assert row is not None, f"the README's demo table has no row for {connection.alias}"
        assert f"`{connection.shows}`" in row.group(1)
        if connection.shows == "AccessDenied":
            assert outcome.message is not None
            denied_messages.add(
                outcome.message.replace(connection.role_arn, "<role>").replace(
                    connection.aws_account_id, "<account>"
                )
            )
    assert len(denied_messages) == 1, denied_messages
    assert sum(c.shows == "AccessDenied" for c in DEMO_CONNECTIONS) == 3


# --------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``python -m sandbox`` from the repository root."""
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_serves_until_sigterm(sandbox: SandboxSts) -> None:
    """`serve` prints its endpoint and key, answers STS, and exits cleanly on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = run_cli("serve", "--port", str(port))
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        endpoint = f"http://127.0.0.1:{port}"
        assert endpoint in line
        assert PLATFORM_ACCESS_KEY_ID in line
        assert sts_client(endpoint).get_caller_identity()["Arn"] == PLATFORM_PRINCIPAL_ARN
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr


def test_cli_reports_a_port_in_use(sandbox: SandboxSts) -> None:
    """`serve` on a port that is taken exits non-zero with a one-line reason."""
    process = run_cli("serve", "--port", str(sandbox.port))
    stdout, stderr = process.communicate(timeout=20)

    assert process.returncode == 1
    assert stdout == ""
    assert stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{sandbox.port}: address already in use"
    )


def test_cli_flips_platform_credentials(sandbox: SandboxSts) -> None:
    """`platform-credentials revoke/restore` steer a running sandbox from another process."""
    url = sandbox.endpoint_url
    try:
        revoke = run_cli("platform-credentials", "revoke", "--endpoint-url", url)
        assert revoke.communicate(timeout=20)[0].strip() == "platform credentials: revoked"
        assert not sandbox.middleware.platform_credentials_valid
    finally:
        restore = run_cli("platform-credentials", "restore", "--endpoint-url", url)
        assert restore.communicate(timeout=20)[0].strip() == "platform credentials: valid"
    assert sandbox.middleware.platform_credentials_valid


# --- what an assumed role may do (the permission probes) ----------------------------------------


def test_the_sandbox_roles_carry_what_the_default_probes_need() -> None:
    """The sandbox's default role policy and the worker's default probes are the same actions."""
    assert tuple(SCANNER_ACTIONS) == DEFAULT_PROBES


@pytest.mark.parametrize(
    ("statements", "action", "expected"),
    [
        ([{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}], "ec2:DescribeRegions",
         TrustDecision.ALLOWED),
        ([{"Effect": "Allow", "Action": "EC2:describeregions", "Resource": "*"}],
         "ec2:DescribeRegions", TrustDecision.ALLOWED),
        ([{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}], "ec2:RunInstances",
         TrustDecision.IMPLICITLY_DENIED),
        ([{"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}], "iam:GetAccountSummary",
         TrustDecision.IMPLICITLY_DENIED),
        ([{"Effect": "Allow", "Action": "*", "Resource": "*"},
          {"Effect": "Deny", "Action": "s3:*", "Resource": "arn:aws:s3:::x"}],
         "s3:ListAllMyBuckets", TrustDecision.EXPLICITLY_DENIED),
        # Errs towards refusing: resource-scoped and conditional Allows do not apply.
        ([{"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::x"}],
         "s3:ListAllMyBuckets", TrustDecision.IMPLICITLY_DENIED),
        ([{"Effect": "Allow", "Action": "*", "Resource": "*",
           "Condition": {"Bool": {"aws:SecureTransport": "true"}}}],
         "s3:ListAllMyBuckets", TrustDecision.IMPLICITLY_DENIED),
    ],
)  # fmt: skip
def test_permission_policies_are_evaluated_as_iam_does(
    statements: list[dict[str, Any]], action: str, expected: TrustDecision
) -> None:
    """Wildcards and case-insensitive actions match, a Deny wins, doubtful Allows do not count."""
    document = {"Version": "2012-10-17", "Statement": statements}
    assert evaluate_permission([json.dumps(document)], action) is expected


def role_client(
    sandbox: SandboxSts,
    role_arn: str,
    service: str,
    policy: str | None = None,
    *,
    external_id: str = EXTERNAL_ID,
) -> Any:
    """A `service` client signing with credentials of `role_arn` (session policy `policy`)."""
    params: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": SESSION}
    params.update(ExternalId=external_id, **({"Policy": policy} if policy else {}))
    credentials = sts_client(sandbox.endpoint_url).assume_role(**params)["Credentials"]
    session: Any = boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name=REGION,
    )
    return session.client(
        service,
        endpoint_url=sandbox.endpoint_url,
        config=Config(retries={"total_max_attempts": 1}),
    )


def error_code(call: Any, **params: Any) -> str:
    """The error code `call` answers with (fails if it succeeds)."""
    with pytest.raises(ClientError) as error:
        call(**params)
    return str(error.value.response["Error"]["Code"])


def admin_role(sandbox: SandboxSts) -> str:
    """A role allowed everything."""
    name = f"Admin-{uuid.uuid4().hex[:12]}"
    return create_customer_role(
        sandbox.endpoint_url,
        CUSTOMER_ACCOUNT,
        name,
        PLATFORM_PRINCIPAL_ARN,
        EXTERNAL_ID,
        permissions=["*"],
    )


def test_the_probe_credentials_cannot_call_anything_outside_the_probe_set(
    sandbox: SandboxSts,
) -> None:
    """Even for a role allowed everything, credentials issued with the probes' session policy
    make the probe calls and are refused every other call, on every service."""
    role_arn = admin_role(sandbox)
    policy = probe_session_policy(DEFAULT_PROBES)
    iam = role_client(sandbox, role_arn, "iam", policy)
    ec2 = role_client(sandbox, role_arn, "ec2", policy)
    s3 = role_client(sandbox, role_arn, "s3", policy)
    cloudtrail = role_client(sandbox, role_arn, "cloudtrail", policy)
    iam.get_account_summary()
    ec2.describe_regions()
    s3.list_buckets()
    cloudtrail.describe_trails()
    assert error_code(iam.list_users) == "AccessDenied"
    assert error_code(iam.create_user, UserName="intruder") == "AccessDenied"
    assert error_code(ec2.describe_instances) == "UnauthorizedOperation"
    assert error_code(s3.create_bucket, Bucket=f"b-{uuid.uuid4().hex[:12]}") == "AccessDenied"
    assert error_code(cloudtrail.list_trails) == "AccessDeniedException"
    # The same role without a session policy may: the refusals above were the session policy's.
    role_client(sandbox, role_arn, "iam").list_users()
    role_client(sandbox, role_arn, "ec2").describe_instances()


def test_a_role_without_the_policy_is_refused_whatever_the_session_policy_allows(
    sandbox: SandboxSts,
) -> None:
    """The session policy only narrows: a role with no permissions can call none of the probes."""
    name = f"NoPerms-{uuid.uuid4().hex[:12]}"
    role_arn = create_customer_role(
        sandbox.endpoint_url,
        CUSTOMER_ACCOUNT,
        name,
        PLATFORM_PRINCIPAL_ARN,
        EXTERNAL_ID,
        permissions=(),
    )
    policy = probe_session_policy(DEFAULT_PROBES)
    iam = role_client(sandbox, role_arn, "iam", policy)
    with pytest.raises(ClientError) as error:
        iam.get_account_summary()
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "no identity-based policy allows the iam:GetAccountSummary action" in str(error.value)
    assert error_code(role_client(sandbox, role_arn, "ec2", policy).describe_regions) == (
        "UnauthorizedOperation"
    )
    assert error_code(role_client(sandbox, role_arn, "s3", policy).list_buckets) == "AccessDenied"
    assert error_code(role_client(sandbox, role_arn, "cloudtrail", policy).describe_trails) == (
        "AccessDeniedException"
    )


@pytest.fixture
def probing_verifier(sandbox: SandboxSts, monkeypatch: pytest.MonkeyPatch) -> StsVerifier:
    """The worker's verifier pointed at the sandbox for STS and every probed service."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLATFORM_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLATFORM_SECRET_ACCESS_KEY)
    return StsVerifier(Settings(sts_max_attempts=1))


def probe_role(sandbox: SandboxSts, probing_verifier: StsVerifier, **role: Any) -> Any:
    """Create a role with `role`'s policies and verify it with every probe."""
    account = f"{uuid.uuid4().int % 10**12:012d}"
    name = f"Probed-{uuid.uuid4().hex[:12]}"
    arn = create_customer_role(
        sandbox.endpoint_url, account, name, PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID, **role
    )
    details = RoleDetails(uuid.uuid4(), account, arn, EXTERNAL_ID)
    return probing_verifier.verify(details, check_external_id=True, probe=DEFAULT_PROBES)


def test_a_role_with_security_audit_passes_every_probe(
    sandbox: SandboxSts, probing_verifier: StsVerifier
) -> None:
    """SecurityAudit's own document (wildcards such as iam:Get*, ec2:Describe*) allows the four."""
    outcome = probe_role(sandbox, probing_verifier, permissions=(), security_audit=True)
    assert outcome.verified
    assert outcome.permissions.proven == DEFAULT_PROBES


def test_a_role_missing_one_permission_is_told_that_one(
    sandbox: SandboxSts, probing_verifier: StsVerifier
) -> None:
    """Three of the four allowed: MissingPermissions naming the fourth."""
    outcome = probe_role(sandbox, probing_verifier, permissions=DEFAULT_PROBES[:3])
    assert outcome.code == "MissingPermissions"
    assert outcome.permissions.missing == ("cloudtrail:DescribeTrails",)
    assert "not allowed: cloudtrail:DescribeTrails. Attach" in outcome.message


def test_an_explicit_deny_beats_an_allow(
    sandbox: SandboxSts, probing_verifier: StsVerifier
) -> None:
    """A role allowed everything but denied s3:* (as a service control policy would) misses S3."""
    outcome = probe_role(sandbox, probing_verifier, permissions=["*"])
    assert outcome.verified
    account = f"{uuid.uuid4().int % 10**12:012d}"
    name = f"Denied-{uuid.uuid4().hex[:12]}"
    arn = create_customer_role(
        sandbox.endpoint_url, account, name, PLATFORM_PRINCIPAL_ARN, EXTERNAL_ID, permissions=["*"]
    )
    sandbox.iam_client_for(account).put_role_policy(
        RoleName=name,
        PolicyName="NoS3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Deny", "Action": "s3:*", "Resource": "*"}]}
        ),
    )  # fmt: skip
    details = RoleDetails(uuid.uuid4(), account, arn, EXTERNAL_ID)
    denied = probing_verifier.verify(details, check_external_id=False, probe=DEFAULT_PROBES)
    assert denied.permissions is not None
    assert denied.permissions.missing == ("s3:ListAllMyBuckets",)


def test_a_probe_fault_is_inconclusive_naming_the_service(
    sandbox: SandboxSts, probing_verifier: StsVerifier
) -> None:
    """With EC2 answering 503 (switched over HTTP), the account is verified with its
    permissions unknown, naming ec2; once EC2 answers, they are proven."""
    set_probe_fault(sandbox.endpoint_url, "ec2", "Unavailable")
    try:
        outcome = probe_role(sandbox, probing_verifier)
    finally:
        set_probe_fault(sandbox.endpoint_url, "ec2", None)
    assert (outcome.kind.value, outcome.permissions_unknown, outcome.service) == (
        "verified",
        "Unavailable",
        "ec2",
    )
    assert outcome.permissions is None
    assert probe_role(sandbox, probing_verifier).permissions.proven == DEFAULT_PROBES


def test_a_session_policy_denial_from_the_sandbox_is_the_platforms_fault(
    sandbox: SandboxSts,
) -> None:
    """Credentials whose session policy (ours) lacks ec2:DescribeRegions are refused by the
    sandbox for the session policy's sake; the worker blames itself, not the customer."""
    role_arn = admin_role(sandbox)
    ec2 = role_client(sandbox, role_arn, "ec2", probe_session_policy(["iam:GetAccountSummary"]))
    with pytest.raises(ClientError) as error:
        ec2.describe_regions()
    outcome = classify_probe_error(CATALOGUE["ec2:DescribeRegions"], error.value)
    assert (outcome.kind.value, outcome.code) == ("platform_fault", "UnauthorizedOperation")


def platform_client(sandbox: SandboxSts, service: str, key: str) -> Any:
    """A `service` client signing with access key `key` (no session token)."""
    session: Any = boto3.session.Session(
        aws_access_key_id=key, aws_secret_access_key="x", region_name=REGION
    )
    config = Config(retries={"total_max_attempts": 1})
    return session.client(service, endpoint_url=sandbox.endpoint_url, config=config)


@pytest.mark.parametrize("key", [PLATFORM_ACCESS_KEY_ID, "AKIANOBODYISSUEDTHIS"])
def test_the_probed_services_refuse_keys_that_are_not_a_customers_role(
    sandbox: SandboxSts, key: str
) -> None:
    """The platform's own key, or one nobody issued, gets each service's authentication
    error: a worker that signed its probes with the platform's credentials would fail here."""
    assert error_code(platform_client(sandbox, "iam", key).get_account_summary) == (
        "InvalidClientTokenId"
    )
    assert error_code(platform_client(sandbox, "ec2", key).describe_regions) == "AuthFailure"
    assert error_code(platform_client(sandbox, "s3", key).list_buckets) == "InvalidAccessKeyId"
    assert error_code(platform_client(sandbox, "cloudtrail", key).describe_trails) == (
        "UnrecognizedClientException"
    )


def test_an_unsigned_request_to_a_probed_service_is_refused(sandbox: SandboxSts) -> None:
    """No signature at all: refused, where moto alone would answer it."""
    url = sandbox.endpoint_url + "/?Action=GetAccountSummary&Version=2010-05-08"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=10)  # noqa: S310 - the sandbox's http:// URL
    with error.value:  # its response holds the connection
        assert error.value.code == 403


def test_the_platforms_credentials_never_sign_a_probe(probing_verifier: StsVerifier) -> None:
    """A probe's request is built with a placeholder key and kept unsigned, with the platform's
    keys in the environment: every send is signed with the credentials passed to it, and the
    sandbox refuses the request signed with the platform's keys."""
    call = probing_verifier.prober()._call(CATALOGUE["iam:GetAccountSummary"], REGION)
    assert PLATFORM_ACCESS_KEY_ID not in repr(call)
    assert "authorization" not in {name.lower() for name, _ in call.headers}
    platform = botocore.credentials.ReadOnlyCredentials(
        PLATFORM_ACCESS_KEY_ID, PLATFORM_SECRET_ACCESS_KEY, None
    )
    with pytest.raises(ClientError) as refused:
        call.send(platform)
    assert refused.value.response["Error"]["Code"] == "InvalidClientTokenId"
