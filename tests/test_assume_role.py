"""AssumeRole made without a botocore client call (worker/sts/assume_role.py): the same body,
signature, reading of the answer and retries as a botocore client's, checked against botocore
itself and through a real HTTP server."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import uuid
from collections.abc import Iterator
from typing import cast

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest
from botocore.config import Config
from botocore.model import Shape
from botocore.retries import quota

from tests.canned_sts import CannedSts, assumed_answer, error_answer
from worker.permissions import DEFAULT_PROBES, probe_session_policy
from worker.settings import Settings
from worker.sts.assume_role import build_assume_role_call, form_body, read_answer
from worker.sts.client import client_config
from worker.sts.outcome import RoleDetails
from worker.sts.signing import capture
from worker.sts.verifier import DENY_ALL_POLICY, StsVerifier

ACCOUNT = "123456789012"
PLATFORM_KEYS = botocore.credentials.ReadOnlyCredentials(
    "ASIAPLATFORMEXAMPLE0", "platform-secret", "platform-session-token"
)
CONFIG = client_config(Settings())
PARAMS: list[dict[str, str | int]] = [
    {
        "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/Example",
        "RoleSessionName": "verifier-" + "0f" * 16,
        "ExternalId": "ext-0f1e2d3c4b5a",
        "DurationSeconds": 900,
        "Policy": DENY_ALL_POLICY,
    },
    {  # the external-ID check: no ExternalId
        "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/Example",
        "RoleSessionName": "verifier-x-" + "0f" * 16,
        "DurationSeconds": 900,
        "Policy": DENY_ALL_POLICY,
    },
    {  # a path of printable characters, every character the external ID may hold, the probes
        "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/a+b=c,d.e@f-g/h!~*'();&$#%[]/R_1",
        "RoleSessionName": "prefix_+=,.@-" + "ab" * 16,
        "ExternalId": "Ab9_+=,.@:/-" * 3,
        "DurationSeconds": 900,
        "Policy": probe_session_policy(DEFAULT_PROBES),
    },
]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform's keys; AWS's own endpoints."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLATFORMTESTKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "platform-secret")


@pytest.fixture
def canned(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[CannedSts]:
    with CannedSts() as sts:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        yield sts


@pytest.mark.parametrize("params", PARAMS)
def test_the_body_is_the_one_botocore_sends_for_the_same_parameters(
    aws_env: None, params: dict[str, str | int]
) -> None:
    request, _ = capture("sts", "eu-west-1", CONFIG, "assume_role", params)
    body = request.body.encode() if isinstance(request.body, str) else request.body
    assert form_body(params) == body


@pytest.mark.parametrize("params", PARAMS)
def test_each_call_is_signed_exactly_as_botocores_signer_signs_it(
    aws_env: None, params: dict[str, str | int]
) -> None:
    """Any body, the platform's key with a session token, a fixed time: the Authorization
    header is the one botocore's own SigV4 signer computes for the same request."""
    call = build_assume_role_call("eu-west-1", CONFIG, 1)
    body = form_body(params)
    now = datetime.datetime(2026, 12, 1, 16, 0, 5, tzinfo=datetime.UTC)
    ours = call.signed_headers(PLATFORM_KEYS, now, hashlib.sha256(body).hexdigest())
    signed = call._signed.split(";")
    request = botocore.awsrequest.AWSRequest(
        call.method,
        call.url,
        headers={name: value for name, value in call.headers if name.lower() in signed},
        data=body,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
        botocore.auth.SigV4Auth(PLATFORM_KEYS, "sts", "eu-west-1").add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert "x-amz-security-token" in ours["Authorization"]
    assert call.url == "https://sts.eu-west-1.amazonaws.com/"
    assert not any(name.lower() == "content-length" for name, _ in call.headers)


_SUCCESS = assumed_answer(
    f"arn:aws:sts::{ACCOUNT}:assumed-role/Example/s",
    {
        "AccessKeyId": "ASIAEXAMPLE000000000",
        "SecretAccessKey": "temporary-secret",
        "SessionToken": "temporary-token",
        "Expiration": "2030-01-01T00:00:00Z",
    },
)[1]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, _SUCCESS),
        (403, error_answer("AccessDenied", "User: x is not authorized", status=403)[1]),
        (400, error_answer("RegionDisabledException", "STS is not activated")[1]),
        (503, error_answer("ServiceUnavailable", "", status=503)[1]),
        (503, b"<html><body>Service Unavailable</body></html>"),
        (500, b""),
        (
            400,
            b"<Response><Errors><Error><Code>Odd</Code><Message>m</Message></Error></Errors>"
            b"<RequestID>r</RequestID></Response>",
        ),
        (400, b"<ErrorResponse><RequestId>r</RequestId></ErrorResponse>"),
    ],
)
def test_answers_are_read_as_botocores_query_parser_reads_them(status: int, body: bytes) -> None:
    """The parts the verifier and the classifier read: the assumed role, the credentials, the
    error's code, message and type, and the HTTP status."""
    model = botocore.session.Session().get_service_model("sts")
    theirs = botocore.parsers.QueryParser().parse(
        {"status_code": status, "headers": {}, "body": body},
        cast(Shape, model.operation_model("AssumeRole").output_shape),
    )
    ours = read_answer(status, body)
    if status < 300:
        assert ours["AssumedRoleUser"] == theirs["AssumedRoleUser"]
        keys = ("AccessKeyId", "SecretAccessKey", "SessionToken")
        assert [ours["Credentials"][k] for k in keys] == [theirs["Credentials"][k] for k in keys]
    else:
        assert ours.get("Error", {}) == theirs.get("Error", {})
    status_code = ours["ResponseMetadata"]["HTTPStatusCode"]
    assert status_code == theirs["ResponseMetadata"]["HTTPStatusCode"] == status


@pytest.mark.parametrize("status", [200, 400, 502])
def test_a_body_that_is_not_xml_is_a_parser_error_as_in_botocore(status: int) -> None:
    body = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
    model = botocore.session.Session().get_service_model("sts")
    with pytest.raises(botocore.parsers.ResponseParserError):
        botocore.parsers.QueryParser().parse(
            {"status_code": status, "headers": {}, "body": body},
            cast(Shape, model.operation_model("AssumeRole").output_shape),
        )
    with pytest.raises(botocore.parsers.ResponseParserError) as raised:
        read_answer(status, body)
    assert "upstream" not in str(raised.value)  # whatever answered is not repeated


def _role() -> RoleDetails:
    return RoleDetails(uuid.uuid4(), ACCOUNT, f"arn:aws:iam::{ACCOUNT}:role/Example", "ext-123")


def test_idp_communication_error_is_retried_as_botocores_standard_mode_does(
    canned: CannedSts,
) -> None:
    """STS's own retryable code (botocore retries it for STS only) is tried again; a refusal is
    not."""
    sts = StsVerifier(Settings(sts_max_attempts=2))
    canned.queue(
        error_answer("IDPCommunicationError", "try again"),
        assumed_answer(f"arn:aws:sts::{ACCOUNT}:assumed-role/Example/s"),
    )
    assert sts.verify(_role(), check_external_id=False).verified
    assert len(canned.requests) == 2
    canned.queue(error_answer("AccessDenied", "no", status=403))
    assert sts.verify(_role(), check_external_id=False).code == "AccessDenied"
    assert (len(canned.requests), canned.left()) == (3, 0)


def test_retries_stop_when_the_retry_quota_is_spent(canned: CannedSts) -> None:
    """botocore's client-wide retry quota: a retry after a 5xx costs 14 of it, and without
    enough left a failure is raised at once."""
    call = dataclasses.replace(
        build_assume_role_call("us-east-1", CONFIG, 3), quota=quota.RetryQuota(20)
    )
    canned.queue(*[error_answer("InternalFailure", status=500)] * 3)
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as failed:
            call.call(PLATFORM_KEYS, PARAMS[0])
        assert failed.value.response["Error"]["Code"] == "InternalFailure"
    # Two requests for the first call (one retry: 14 of 20), one for the second (6 left).
    assert (len(canned.requests), canned.left()) == (3, 0)


def test_the_platforms_credentials_are_refreshed_when_they_expire(canned: CannedSts) -> None:
    """Credentials that expire (an instance or task role's) are refreshed by botocore's provider
    chain, as a botocore client's signer would: each call signs with the current ones."""
    clock = [datetime.datetime.now(datetime.UTC)]
    hour = datetime.timedelta(hours=1)

    def refresh() -> dict[str, str]:
        return {
            "access_key": "ASIASECONDKEY0000000",
            "secret_key": "s2",
            "token": "t2",
            "expiry_time": (clock[0] + hour).isoformat(),
        }

    class Provider(botocore.credentials.CredentialProvider):
        METHOD = "test-refreshing"

        def load(self) -> botocore.credentials.Credentials:
            return botocore.credentials.RefreshableCredentials(
                "ASIAFIRSTKEY00000000",
                "s1",
                "t1",
                clock[0] + hour,
                refresh,
                self.METHOD,
                time_fetcher=lambda: clock[0],
            )

    session = botocore.session.Session()
    session.register_component(
        "credential_provider", botocore.credentials.CredentialResolver([Provider()])
    )
    sts = StsVerifier(Settings(sts_max_attempts=1), session=boto3.Session(botocore_session=session))
    arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/Example/s"
    canned.queue(assumed_answer(arn), assumed_answer(arn))
    sts._call("us-east-1", RoleArn=_role().role_arn, RoleSessionName="s1", DurationSeconds=900)
    clock[0] += hour  # the first credentials have expired
    sts._call("us-east-1", RoleArn=_role().role_arn, RoleSessionName="s2", DurationSeconds=900)
    used = [headers["Authorization"].split("Credential=")[1][:20] for _, headers in canned.requests]
    assert used == ["ASIAFIRSTKEY00000000", "ASIASECONDKEY0000000"]


def test_a_malformed_sts_endpoint_is_botocores_value_error(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "not a url")
    with pytest.raises(ValueError, match="Invalid endpoint"):
        build_assume_role_call("us-east-1", Config(), 1)
