"""The STS stand-in answers as STS does: botocore parses every behaviour like a real answer."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
from botocore.parsers import ResponseParserError

from sandbox.standin import (
    ROLE_PREFIXES,
    STS_ERRORS,
    StandInConfig,
    StsStandIn,
    draw_latency_seconds,
    role_behaviour,
)

if TYPE_CHECKING:
    from mypy_boto3_sts import STSClient

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
EXTERNAL_ID = "ext-0f1e2d3c4b5a"
PLATFORM_KEY = "AKIAPLATFORMTESTKEY1"
DENY_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]}
)
# Each test starts from this: no latency, fixed seed, short "slow" delay.
BASELINE = StandInConfig(median_ms=0, slow_seconds=2, seed=11)

ClientFactory = Callable[..., "STSClient"]


def role(name: str, account: str = ACCOUNT) -> str:
    """An IAM role ARN in the test account."""
    return f"arn:aws:iam::{account}:role/{name}"


@pytest.fixture(scope="module")
def standin() -> Iterator[StsStandIn]:
    """One stand-in for the module, on a background thread."""
    with StsStandIn(BASELINE) as sts:
        yield sts


@pytest.fixture(autouse=True)
def _fresh(standin: StsStandIn) -> None:
    """Every test starts from the baseline knobs and zeroed counters."""
    standin.replace_config(BASELINE)
    standin.reset()


@pytest.fixture
def make_client(standin: StsStandIn) -> Iterator[ClientFactory]:
    """Real boto3 STS clients on the stand-in: one attempt, short timeouts; closed afterwards."""
    clients: list[STSClient] = []

    def make(
        *, region: str = "us-east-1", key: str = PLATFORM_KEY, read_timeout: float = 2.0
    ) -> STSClient:
        client = boto3.client(
            "sts",
            endpoint_url=standin.endpoint_url,
            region_name=region,
            aws_access_key_id=key,
            aws_secret_access_key="platform-secret-for-tests-only",
            config=Config(
                # total_max_attempts counts the first call; max_attempts would count retries.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=read_timeout,
            ),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: ClientFactory) -> STSClient:
    """A client signing for us-east-1 with the platform's key."""
    return make_client()


def assume(client: STSClient, name: str, *, external_id: str | None = EXTERNAL_ID) -> str:
    """AssumeRole as the worker does it; returns the assumed-role ARN."""
    if external_id is None:
        answer = client.assume_role(RoleArn=role(name), RoleSessionName="verifier-test")
    else:
        answer = client.assume_role(
            RoleArn=role(name),
            RoleSessionName="verifier-test",
            ExternalId=external_id,
            DurationSeconds=900,
            Policy=DENY_ALL,
        )
    return answer["AssumedRoleUser"]["Arn"]


def refusal(client: STSClient, name: str, **kwargs: str | None) -> tuple[str, int, str, str]:
    """(code, HTTP status, Type, message) of the ClientError an AssumeRole raises."""
    with pytest.raises(ClientError) as caught:
        assume(client, name, **kwargs)
    response = caught.value.response
    error = cast(dict[str, str], response["Error"])
    status = response["ResponseMetadata"]["HTTPStatusCode"]
    return error["Code"], status, error["Type"], error["Message"]


def control(
    standin: StsStandIn, method: str, path: str, payload: object = None
) -> tuple[int, object]:
    """Call the control endpoint; (HTTP status, decoded JSON)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(  # noqa: S310 - a local http:// URL we built
        f"{standin.endpoint_url}{path}", data=data, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - ditto
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


# --- success answers ------------------------------------------------------------------------


def test_assume_role_answer_is_parsed_into_every_field(client: STSClient) -> None:
    """A successful AssumeRole parses into credentials, the assumed role and the request id."""
    before = datetime.now(UTC)
    answer = client.assume_role(
        RoleArn=role("okReader"),
        RoleSessionName="verifier-abc",
        ExternalId=EXTERNAL_ID,
        DurationSeconds=900,
        Policy=DENY_ALL,
        SourceIdentity="account-verifier",
    )
    after = datetime.now(UTC)
    credentials = answer["Credentials"]
    assert credentials["AccessKeyId"].startswith("ASIAFAKE")
    assert len(credentials["AccessKeyId"]) == 20
    assert credentials["SecretAccessKey"].startswith("FAKEstandin")
    assert len(credentials["SecretAccessKey"]) == 40
    assert credentials["SessionToken"].startswith("FAKE//sts-standin//")
    expiration = credentials["Expiration"]
    assert expiration.tzinfo is not None
    # 900 s from when the stand-in answered (whole seconds), however long the call took.
    assert before + timedelta(seconds=899) <= expiration <= after + timedelta(seconds=901)
    user = answer["AssumedRoleUser"]
    assert user["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/okReader/verifier-abc"
    assert user["AssumedRoleId"].startswith("AROA")
    assert user["AssumedRoleId"].endswith(":verifier-abc")
    assert 0 < answer["PackedPolicySize"] <= 100
    assert answer["SourceIdentity"] == "account-verifier"
    metadata = answer["ResponseMetadata"]
    assert metadata["HTTPStatusCode"] == 200
    assert metadata["HTTPHeaders"]["content-type"] == "text/xml"
    assert metadata["RequestId"] == metadata["HTTPHeaders"]["x-amzn-requestid"]


def test_role_path_is_left_out_of_the_assumed_role_arn(client: STSClient) -> None:
    """Like AWS, the assumed-role ARN names the role without its path; the role id is stable."""
    first = client.assume_role(
        RoleArn=role("team/app/okPathRole"), RoleSessionName="s-1", ExternalId=EXTERNAL_ID
    )
    second = client.assume_role(
        RoleArn=role("team/app/okPathRole"), RoleSessionName="s-1", ExternalId=EXTERNAL_ID
    )
    assert first["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/okPathRole/s-1"
    assert first["AssumedRoleUser"]["AssumedRoleId"] == second["AssumedRoleUser"]["AssumedRoleId"]
    assert "PackedPolicySize" not in first


def test_credentials_are_new_on_every_call(client: STSClient) -> None:
    """Two calls never share credentials or request ids."""
    answers = [
        client.assume_role(RoleArn=role("ok"), RoleSessionName="s-1", ExternalId=EXTERNAL_ID)
        for _ in range(2)
    ]
    first, second = (answer["Credentials"] for answer in answers)
    assert first["AccessKeyId"] != second["AccessKeyId"]
    assert first["SecretAccessKey"] != second["SecretAccessKey"]
    assert first["SessionToken"] != second["SessionToken"]
    ids = {answer["ResponseMetadata"]["RequestId"] for answer in answers}
    assert len(ids) == 2


def test_get_caller_identity_answers_the_platform_principal(
    standin: StsStandIn, client: STSClient
) -> None:
    """GetCallerIdentity names the configured platform principal, user or assumed role."""
    identity = client.get_caller_identity()
    assert identity["Arn"] == BASELINE.platform_arn
    assert identity["Account"] == "111122223333"
    assert identity["UserId"].startswith("AIDA")

    standin.configure(platform_arn="arn:aws:sts::444455556666:assumed-role/Verifier/worker-1")
    identity = client.get_caller_identity()
    assert identity["Account"] == "444455556666"
    assert identity["Arn"] == "arn:aws:sts::444455556666:assumed-role/Verifier/worker-1"
    assert identity["UserId"].startswith("AROA")
    assert identity["UserId"].endswith(":worker-1")


# --- behaviour by role name -----------------------------------------------------------------


def test_role_name_prefixes_select_behaviours() -> None:
    """Prefixes match case-insensitively, longest first; flakyN carries its N; others are ok."""
    assert role_behaviour("Error500-Role") == ("error500", None)
    assert role_behaviour("DenyEverything") == ("deny", None)
    assert role_behaviour("flaky5-abc") == ("flaky", 5)
    assert role_behaviour("flaky") == ("flaky", None)
    assert role_behaviour("FeguraRole-abc123") == ("ok", None)
    assert list(ROLE_PREFIXES) == sorted(ROLE_PREFIXES, key=len, reverse=True)


def test_role_that_requires_the_external_id_refuses_a_call_without_it(
    standin: StsStandIn, client: STSClient
) -> None:
    """Without ExternalId a default role answers AccessDenied 403 naming both principals."""
    code, status, kind, message = refusal(client, "FeguraRole-abc123", external_id=None)
    assert (code, status, kind) == ("AccessDenied", 403, "Sender")
    assert message == (
        f"User: {BASELINE.platform_arn} is not authorized to perform: sts:AssumeRole "
        f"on resource: {role('FeguraRole-abc123')}"
    )
    assert assume(client, "FeguraRole-abc123").endswith("/FeguraRole-abc123/verifier-test")
    assert standin.stats()["assume_role_without_external_id"] == 1


def test_noext_role_can_be_assumed_without_the_external_id(client: STSClient) -> None:
    """A `noext` role does not enforce the external ID: both calls succeed."""
    assert assume(client, "noextLegacy", external_id=None).endswith("/noextLegacy/verifier-test")
    assert assume(client, "noextLegacy").endswith("/noextLegacy/verifier-test")


def test_expected_external_id_refuses_any_other(standin: StsStandIn, client: STSClient) -> None:
    """With an expected external ID registered, a different one gets AccessDenied."""
    standin.configure(expected_external_ids={role("okStrict"): "the-right-one"})
    assert refusal(client, "okStrict", external_id="a-wrong-one")[0] == "AccessDenied"
    assert assume(client, "okStrict", external_id="the-right-one").endswith(
        "/okStrict/verifier-test"
    )


@pytest.mark.parametrize(
    ("name", "code", "status", "kind"),
    [
        ("deny-1", "AccessDenied", 403, "Sender"),
        ("throttle-1", "Throttling", 400, "Sender"),
        ("error500-1", "InternalFailure", 500, "Receiver"),
        ("error503-1", "ServiceUnavailable", 503, "Receiver"),
        ("regiondisabled-1", "RegionDisabledException", 403, "Sender"),
        ("expiredtoken-1", "ExpiredToken", 400, "Sender"),
        ("invalidtoken-1", "InvalidClientTokenId", 403, "Sender"),
        ("badsignature-1", "SignatureDoesNotMatch", 403, "Sender"),
    ],
)
def test_error_roles_answer_sts_error_codes_and_statuses(
    make_client: ClientFactory, name: str, code: str, status: int, kind: str
) -> None:
    """Each error role's answer parses into STS's code, HTTP status and error type."""
    client = make_client(region="eu-south-1")  # an opt-in region, where STS can be disabled
    got = refusal(client, name)
    assert got[:3] == (code, status, kind)
    assert got[3]
    assert (STS_ERRORS[code][0], STS_ERRORS[code][1]) == (status, kind)


def test_throttling_message_is_rate_exceeded(client: STSClient) -> None:
    """Throttling says "Rate exceeded", as STS does."""
    assert refusal(client, "throttle-1")[3] == "Rate exceeded"


def test_region_disabled_role_succeeds_in_an_enabled_region(
    standin: StsStandIn, make_client: ClientFactory
) -> None:
    """`regiondisabled` fails where signed for eu-south-1 and succeeds for us-east-1 or '*'."""
    code, _, _, message = refusal(make_client(region="eu-south-1"), "regiondisabledRole")
    assert code == "RegionDisabledException"
    assert f"account:{ACCOUNT}" in message
    assert assume(make_client(region="us-east-1"), "regiondisabledRole").endswith(
        "/regiondisabledRole/verifier-test"
    )
    standin.configure(enabled_regions=["*"])
    assert assume(make_client(region="eu-south-1"), "regiondisabledRole")


def test_other_account_role_reports_a_different_account(client: STSClient) -> None:
    """`otheracct` succeeds, but the assumed-role ARN names another 12-digit account."""
    arn = assume(client, "otheracctRole")
    account = arn.split(":")[4]
    assert account != ACCOUNT
    assert len(account) == 12
    assert account.isdigit()


def test_flaky_role_fails_its_first_calls_then_succeeds(
    standin: StsStandIn, client: STSClient
) -> None:
    """`flaky3` fails three times with the transient code, then succeeds; counts are per role."""
    codes = [refusal(client, "flaky3-x")[:2] for _ in range(3)]
    assert codes == [("InternalFailure", 500)] * 3
    assert assume(client, "flaky3-x")
    standin.configure(flaky_error="Throttling", flaky_failures=1)
    assert refusal(client, "flaky-y")[:2] == ("Throttling", 400)
    assert assume(client, "flaky-y")
    standin.reset()
    assert refusal(client, "flaky-y")[0] == "Throttling"


def test_slow_role_outlasts_the_read_timeout(
    standin: StsStandIn, make_client: ClientFactory
) -> None:
    """`slow` answers after slow_seconds, so a client with a shorter read timeout gives up."""
    client = make_client(read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        assume(client, "slowRole")
    assert time.monotonic() - started < 10  # the read timeout, not the role's 30 s
    assert standin.stats()["slow"] == 1


def test_reset_role_resets_the_connection(client: STSClient) -> None:
    """`reset` drops the connection unanswered: botocore raises ConnectionClosedError."""
    with pytest.raises(ConnectionClosedError):
        assume(client, "resetRole")
    assert assume(client, "okAfterReset")  # the client recovers on a new connection


def test_garbage_role_answers_a_body_that_is_not_xml(client: STSClient) -> None:
    """`garbage` answers 200 with a non-XML body: botocore raises ResponseParserError."""
    with pytest.raises(ResponseParserError):
        assume(client, "garbageRole")


# --- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ({"DurationSeconds": 7200}, "ValidationError"),
        ({"RoleSessionName": "has a space"}, "ValidationError"),
        ({"ExternalId": "has a space"}, "ValidationError"),
        ({"RoleArn": f"arn:aws:iam::{ACCOUNT}:user/someone"}, "ValidationError"),
        ({"Policy": "{not json"}, "MalformedPolicyDocument"),
    ],
)
def test_invalid_input_is_refused_like_sts(
    client: STSClient, arguments: dict[str, str | int], code: str
) -> None:
    """What botocore lets through but STS refuses answers ValidationError-style 400s."""
    call: dict[str, str | int] = {
        "RoleArn": role("okRole"),
        "RoleSessionName": "verifier-1",
        "ExternalId": EXTERNAL_ID,
        **arguments,
    }
    with pytest.raises(ClientError) as caught:
        client.assume_role(**call)  # type: ignore[arg-type]
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_duration_above_max_session_names_the_limit(client: STSClient) -> None:
    """A DurationSeconds over the role's MaxSessionDuration gets STS's own message."""
    with pytest.raises(ClientError) as caught:
        client.assume_role(
            RoleArn=role("okRole"),
            RoleSessionName="s-1",
            ExternalId=EXTERNAL_ID,
            DurationSeconds=3601,
        )
    assert "exceeds the MaxSessionDuration" in caught.value.response["Error"]["Message"]


# --- platform credentials -------------------------------------------------------------------


def test_invalid_platform_credentials_refuse_every_action(
    standin: StsStandIn, client: STSClient
) -> None:
    """platform_credentials_valid=False answers InvalidClientTokenId 403 to every action."""
    standin.configure(platform_credentials_valid=False)
    assert refusal(client, "okRole")[:2] == ("InvalidClientTokenId", 403)
    with pytest.raises(ClientError) as caught:
        client.get_caller_identity()
    assert caught.value.response["Error"]["Code"] == "InvalidClientTokenId"


def test_only_accepted_access_keys_are_let_in(
    standin: StsStandIn, make_client: ClientFactory
) -> None:
    """With accepted_access_keys set, another key id gets InvalidClientTokenId."""
    standin.configure(accepted_access_keys=[PLATFORM_KEY])
    assert assume(make_client(key=PLATFORM_KEY), "okRole")
    assert refusal(make_client(key="AKIASOMEONEELSE00000"), "okRole")[0] == "InvalidClientTokenId"


# --- global knobs ---------------------------------------------------------------------------


def test_rate_limit_throttles_above_the_rate(standin: StsStandIn, client: STSClient) -> None:
    """Above rate_limit (token bucket) requests get Throttling; the bucket refills over time."""
    standin.configure(rate_limit=20, rate_burst=5)
    started = time.monotonic()
    outcomes = []
    for _ in range(40):
        try:
            assume(client, "okRole")
            outcomes.append("ok")
        except ClientError as error:
            outcomes.append(error.response["Error"]["Code"])
    elapsed = time.monotonic() - started
    allowed = 5 + 20 * elapsed
    assert 5 <= outcomes.count("ok") <= allowed + 1
    assert set(outcomes) == {"ok", "Throttling"}
    stats = standin.stats()
    assert stats["rate_limited"] == outcomes.count("Throttling")
    assert stats["throttled"] == outcomes.count("Throttling")
    time.sleep(0.3)  # 6 tokens back
    assert assume(client, "okRole")


def test_forced_error_lasts_for_its_window(standin: StsStandIn, client: STSClient) -> None:
    """force_error answers its code to every request until force_seconds have passed."""
    # The window is wide enough that two calls land inside it even on a loaded CI machine
    # (0.4 s was not: one run's second call came after it had closed).
    window = 3.0
    configured = time.monotonic()
    standin.configure(force_error="ServiceUnavailable", force_seconds=window)
    assert refusal(client, "okRole")[:2] == ("ServiceUnavailable", 503)
    with pytest.raises(ClientError):
        client.get_caller_identity()
    time.sleep(max(0.0, configured + window + 0.05 - time.monotonic()))
    assert assume(client, "okRole")


def test_forced_error_ratio_hits_about_that_fraction(
    standin: StsStandIn, client: STSClient
) -> None:
    """force_ratio=0.5 makes roughly half of the requests fail with the forced code."""
    standin.configure(force_error="Throttling", force_ratio=0.5)
    codes = []
    for _ in range(200):
        try:
            client.get_caller_identity()
            codes.append("ok")
        except ClientError as error:
            codes.append(error.response["Error"]["Code"])
    assert set(codes) == {"ok", "Throttling"}
    assert 70 <= codes.count("Throttling") <= 130


@pytest.mark.parametrize(
    ("fault", "exception"),
    [("reset", ConnectionClosedError), ("garbage", ResponseParserError)],
)
def test_forced_connection_faults(
    standin: StsStandIn, client: STSClient, fault: str, exception: type[Exception]
) -> None:
    """force_error also takes the connection faults `reset` and `garbage`."""
    standin.configure(force_error=fault)
    with pytest.raises(exception):
        client.get_caller_identity()


def test_latency_delays_every_answer(standin: StsStandIn, client: STSClient) -> None:
    """median_ms delays answers (errors too); with latency_sigma=0 exactly by the median."""
    standin.configure(median_ms=60, latency_sigma=0)
    started = time.monotonic()
    assume(client, "okRole")
    refusal(client, "denyRole")
    assert time.monotonic() - started >= 0.12


def test_latency_distribution_has_the_configured_median_and_tail() -> None:
    """The default log-normal has the configured median and a p99 of about 4-5x the median."""
    rng = random.Random(5)
    sigma = StandInConfig().latency_sigma
    draws = sorted(draw_latency_seconds(rng, 50, sigma) for _ in range(20_000))
    median, p99 = draws[len(draws) // 2], draws[int(len(draws) * 0.99)]
    assert 0.047 <= median <= 0.053
    assert 4.0 <= p99 / median <= 5.0
    assert draw_latency_seconds(rng, 0, sigma) == 0.0


def test_config_refuses_bad_values(standin: StsStandIn) -> None:
    """Unknown knobs, wrong types and out-of-range values are refused with a message."""
    with pytest.raises(ValueError, match="force_ratio"):
        StandInConfig(force_ratio=2)
    with pytest.raises(ValueError, match="unknown setting"):
        standin.configure(median=5)
    with pytest.raises(ValueError, match="rate_limit"):
        standin.configure(rate_limit="fast")
    with pytest.raises(ValueError, match="force_error"):
        standin.configure(force_error="NoSuchCode")
    assert standin.config == BASELINE


# --- control endpoint and statistics --------------------------------------------------------


def test_control_endpoint_reads_and_changes_the_configuration(
    standin: StsStandIn, client: STSClient
) -> None:
    """POST /_standin/config changes knobs at run time; GET shows them; bad input is a 400."""
    status, body = control(standin, "GET", "/_standin/config")
    assert status == 200
    assert cast(dict[str, object], body)["median_ms"] == 0

    status, body = control(
        standin,
        "POST",
        "/_standin/config",
        {"force_error": "Throttling", "force_ratio": 1, "force_seconds": 30},
    )
    view = cast(dict[str, object], body)
    assert status == 200
    assert view["force_error"] == "Throttling"
    assert 29 < cast(float, view["force_remaining_seconds"]) <= 30
    assert refusal(client, "okRole")[0] == "Throttling"

    assert control(standin, "POST", "/_standin/config", {"force_error": None})[0] == 200
    assert assume(client, "okRole")

    status, body = control(standin, "POST", "/_standin/config", {"median": 5})
    assert status == 400
    assert "unknown setting" in cast(dict[str, str], body)["error"]
    assert control(standin, "POST", "/_standin/config", [1, 2])[0] == 400
    assert control(standin, "GET", "/_standin/nothing")[0] == 404


def test_stats_count_requests_by_action_outcome_and_role(
    standin: StsStandIn, client: STSClient
) -> None:
    """Stats count requests, actions, outcomes and calls per role ARN; reset zeroes them."""
    assume(client, "okRole")
    assume(client, "okRole")
    refusal(client, "denyRole")
    client.get_caller_identity()

    status, body = control(standin, "GET", "/_standin/stats")
    stats = cast(dict[str, object], body)
    assert status == 200
    assert stats["requests"] == 4
    assert stats["by_action"] == {"AssumeRole": 3, "GetCallerIdentity": 1}
    assert stats["by_outcome"] == {"Success": 3, "AccessDenied": 1}
    assert stats["by_role"] == {role("okRole"): 2, role("denyRole"): 1}
    same = standin.stats()
    # Only connections_open may differ: the control call's own connection is closing.
    assert {k: v for k, v in stats.items() if k != "connections_open"} == {
        k: v for k, v in same.items() if k != "connections_open"
    }
    assert "by_role" not in cast(
        dict[str, object], control(standin, "GET", "/_standin/stats?roles=0")[1]
    )

    status, body = control(standin, "POST", "/_standin/reset")
    assert cast(dict[str, object], body)["requests"] == 0
    assert standin.stats()["requests"] == 0


# --- HTTP -----------------------------------------------------------------------------------


def test_keep_alive_serves_many_calls_on_one_connection(
    standin: StsStandIn, client: STSClient
) -> None:
    """A client's sequential calls all travel on one kept-alive TCP connection."""
    for _ in range(10):
        assume(client, "okRole")
    stats = standin.stats()
    assert stats["connections_opened"] == 1
    assert cast(int, stats["connections_open"]) >= 1


def _raw_exchange(standin: StsStandIn, payload: bytes, answers: int) -> list[bytes]:
    """Send raw bytes on one connection and read `answers` HTTP responses (Content-Length)."""
    with socket.create_connection(("127.0.0.1", standin.port), timeout=3) as sock:
        sock.sendall(payload)
        data = b""
        responses: list[bytes] = []
        while len(responses) < answers:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                head = data[:head_end].decode("latin-1").lower()
                length = int(head.split("content-length:")[1].split("\r\n")[0])
                total = head_end + 4 + length
                if len(data) >= total:
                    responses.append(data[:total])
                    data = data[total:]
                    continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return responses


def _raw_request(body: str, *, authorization: bool = True) -> bytes:
    auth = (
        f"Authorization: AWS4-HMAC-SHA256 Credential={PLATFORM_KEY}/20260101/us-east-1/sts/"
        "aws4_request, SignedHeaders=host, Signature=00\r\n"
        if authorization
        else ""
    )
    return (
        f"POST / HTTP/1.1\r\nHost: sts\r\n{auth}"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def test_pipelined_requests_are_answered_in_order(standin: StsStandIn) -> None:
    """Requests sent back to back on one connection are answered in order, despite latency."""
    standin.configure(median_ms=20)
    identity = "Action=GetCallerIdentity&Version=2011-06-15"
    assume_role = (
        "Action=AssumeRole&Version=2011-06-15&RoleSessionName=s-1&ExternalId=ext-1"
        f"&RoleArn={role('okPipelined').replace(':', '%3A').replace('/', '%2F')}"
    )
    responses = _raw_exchange(
        standin, _raw_request(assume_role) + _raw_request(identity) + _raw_request(assume_role), 3
    )
    assert [b"<AssumeRoleResponse" in r for r in responses] == [True, False, True]
    assert b"<GetCallerIdentityResponse" in responses[1]
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in responses)


def test_requests_sts_cannot_authenticate_or_route_are_refused(standin: StsStandIn) -> None:
    """No Authorization: MissingAuthenticationToken 403; an unknown action: InvalidAction 400."""
    (missing,) = _raw_exchange(
        standin, _raw_request("Action=GetCallerIdentity&Version=2011-06-15", authorization=False), 1
    )
    assert missing.startswith(b"HTTP/1.1 403 ")
    assert b"<Code>MissingAuthenticationToken</Code>" in missing
    (unknown,) = _raw_exchange(
        standin, _raw_request("Action=GetFederationToken&Version=2011-06-15"), 1
    )
    assert unknown.startswith(b"HTTP/1.1 400 ")
    assert b"<Code>InvalidAction</Code>" in unknown


def test_malformed_http_is_answered_400_and_closed(standin: StsStandIn) -> None:
    """A request line that is not HTTP gets a plain 400 and the connection is closed."""
    (answer,) = _raw_exchange(standin, b"HELLO THERE\r\n\r\n", 1)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in answer


def test_second_instance_runs_alongside_and_stops_cleanly() -> None:
    """Instances are independent; after stop() the port is closed and endpoint_url unusable."""
    with StsStandIn(median_ms=0, enabled_regions=["*"]) as other:
        port = other.port
        assert other.config.enabled_regions == frozenset({"*"})
    with pytest.raises(RuntimeError):
        _ = other.endpoint_url
    with pytest.raises(OSError):  # noqa: PT011 - refused connection; errno varies
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- as a process ---------------------------------------------------------------------------


def test_command_line_prints_its_url_serves_and_exits_on_sigterm() -> None:
    """`python -m sandbox.standin` prints its URL, serves STS, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helped = subprocess.run(
        [sys.executable, "-m", "sandbox.standin", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "--median-ms" in helped.stdout
    with subprocess.Popen(
        [sys.executable, "-m", "sandbox.standin", "--median-ms", "0", "--rate-limit", "100"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            client = boto3.client(
                "sts",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id=PLATFORM_KEY,
                aws_secret_access_key="secret",
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
            )
            try:
                assert client.get_caller_identity()["Account"] == "111122223333"
            finally:
                client.close()
            with urllib.request.urlopen(f"{url}/_standin/config", timeout=5) as answer:  # noqa: S310 - local
                assert json.loads(answer.read())["rate_limit"] == 100
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


# --- permission probes -------------------------------------------------------------------------

PROBE_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["iam:GetAccountSummary", "s3:ListAllMyBuckets"],
                "Resource": "*",
            }
        ],
    }
)


def probe_client(standin: StsStandIn, client: STSClient, name: str, policy: str | None) -> Any:
    """An IAM, EC2, S3 or CloudTrail client factory signing with credentials for role `name`."""
    params: dict[str, Any] = {
        "RoleArn": role(name),
        "RoleSessionName": "verifier-test",
        "ExternalId": EXTERNAL_ID,
    }
    if policy is not None:
        params["Policy"] = policy
    credentials = client.assume_role(**params)["Credentials"]
    session: Any = boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name="us-east-1",
    )

    def make(service: str) -> Any:
        return session.client(
            service,
            endpoint_url=standin.endpoint_url,
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    return make


def probe_error(call: Any) -> str:
    """The error code of a probe call that must be refused."""
    with pytest.raises(ClientError) as error:
        call()
    return str(error.value.response["Error"]["Code"])


def test_the_four_probe_calls_are_answered_in_their_services_formats(
    standin: StsStandIn, client: STSClient
) -> None:
    """Without a session policy an `ok` role may make all four; boto3 parses every answer."""
    make = probe_client(standin, client, "ok-Probed", None)
    assert make("iam").get_account_summary()["SummaryMap"] == {"Users": 0}
    assert make("ec2").describe_regions()["Regions"][0]["RegionName"] == "us-east-1"
    assert make("s3").list_buckets()["Buckets"] == []
    assert make("cloudtrail").describe_trails()["trailList"] == []
    stats = standin.stats(roles=False)
    # Counted apart: STS requests (and the STS rate limit) see only the AssumeRole.
    assert (stats["requests"], stats["probe_requests"]) == (1, 4)


def test_the_session_policy_and_the_role_name_decide_what_a_probe_may_do(
    standin: StsStandIn, client: STSClient
) -> None:
    """Only what both the role (by name) and the session policy allow is answered; the rest
    gets each service's own refusal; a deny-all policy allows nothing."""
    make = probe_client(standin, client, "ok-Narrowed", PROBE_POLICY)
    make("iam").get_account_summary()
    make("s3").list_buckets()
    assert probe_error(make("ec2").describe_regions) == "UnauthorizedOperation"
    assert probe_error(make("cloudtrail").describe_trails) == "AccessDeniedException"
    assert probe_error(make("iam").list_users) == "AccessDenied"  # outside the four
    bare = probe_client(standin, client, "noperms-Bare", PROBE_POLICY)
    assert probe_error(bare("iam").get_account_summary) == "AccessDenied"
    denied = probe_client(standin, client, "ok-DenyAll", DENY_ALL)
    assert probe_error(denied("s3").list_buckets) == "AccessDenied"
    lacking = probe_client(standin, client, "noec2-Partial", None)
    lacking("cloudtrail").describe_trails()
    assert probe_error(lacking("ec2").describe_regions) == "UnauthorizedOperation"


def test_credentials_the_stand_in_did_not_issue_are_refused(standin: StsStandIn) -> None:
    """A probe signed with any other key is InvalidClientTokenId (EC2: AuthFailure)."""
    session: Any = boto3.session.Session(
        aws_access_key_id=PLATFORM_KEY,
        aws_secret_access_key="x",
        region_name="us-east-1",
    )
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"})
    iam = session.client("iam", endpoint_url=standin.endpoint_url, config=config)
    ec2 = session.client("ec2", endpoint_url=standin.endpoint_url, config=config)
    assert probe_error(iam.get_account_summary) == "InvalidClientTokenId"
    assert probe_error(ec2.describe_regions) == "AuthFailure"


def test_probeerror_roles_get_503_from_every_probed_service(
    standin: StsStandIn, client: STSClient
) -> None:
    """The transient path of the probes: ServiceUnavailable, HTTP 503."""
    make = probe_client(standin, client, "probeerror-Down", None)
    with pytest.raises(ClientError) as error:
        make("s3").list_buckets()
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert probe_error(make("cloudtrail").describe_trails) == "ServiceUnavailable"
