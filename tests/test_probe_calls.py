"""The probes' requests: built by botocore once, signed per account as botocore signs them,
answered through the stand-in, refusals read in each protocol's format."""

from __future__ import annotations

import datetime
import importlib
from typing import cast

import botocore.auth
import botocore.awsrequest
import botocore.exceptions
import botocore.loaders
import pytest
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials

from sandbox.standin import StsStandIn
from worker.permissions import CATALOGUE, DEFAULT_PROBES
from worker.settings import Settings
from worker.sts import probe_preload
from worker.sts.client import client_config
from worker.sts.probe_calls import (
    _BUILT,
    ProbeCall,
    _error,
    _key,
    build_probe_call,
    probe_call,
)
from worker.sts.probe_preload import preload

ACCOUNT_KEYS = ReadOnlyCredentials("ASIAFAKEF0EXAMPLE000", "the-accounts-secret", "the-token")
SETTINGS = Settings(sts_max_attempts=2)
CONFIG = client_config(SETTINGS)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform's keys in the environment; no endpoint override (AWS's own endpoints)."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLATFORMTESTKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "platform-secret")


@pytest.mark.parametrize("permission", DEFAULT_PROBES)
def test_each_probe_is_signed_exactly_as_botocores_signer_signs_it(
    aws_env: None, permission: str
) -> None:
    """The account's key, token and a fixed time: the Authorization header is the one
    botocore's own SigV4 signer computes for the same request."""
    call = build_probe_call(CATALOGUE[permission], "eu-west-1", CONFIG, 1)
    now = datetime.datetime(2026, 12, 1, 16, 0, 5, tzinfo=datetime.UTC)
    ours = call.signed_headers(ACCOUNT_KEYS, now)
    signed = [name.lower() for name, _ in call.headers if name.lower() != "content-length"]
    request = botocore.awsrequest.AWSRequest(
        call.method,
        call.url,
        headers={name: value for name, value in call.headers if name.lower() in signed},
        data=call.body,
    )
    signer = botocore.auth.S3SigV4Auth if call.signing_name == "s3" else botocore.auth.SigV4Auth
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
        signer(ACCOUNT_KEYS, call.signing_name, call.region).add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCOUNT_KEYS.access_key}/20261201/"
    )
    assert ours["X-Amz-Security-Token"] == "the-token"


def test_the_built_requests_hold_no_credentials(aws_env: None) -> None:
    """Built with a placeholder key and kept unsigned: neither the platform's keys nor any
    signature, date or token is part of what a process keeps."""
    for permission in DEFAULT_PROBES:
        call = build_probe_call(CATALOGUE[permission], "us-east-1", CONFIG, 1)
        names = {name.lower() for name, _ in call.headers}
        assert not names & {"authorization", "x-amz-date", "x-amz-security-token"}
        assert "AKIAPLATFORMTESTKEY1" not in repr(call)
        assert "platform-secret" not in repr(call)


def test_endpoints_and_signing_regions_are_botocores(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS's own endpoints by default (IAM global, signed for us-east-1); AWS_ENDPOINT_URL_<SERVICE>
    moves one service only, AWS_ENDPOINT_URL the rest."""
    got = {p: build_probe_call(CATALOGUE[p], "eu-west-1", CONFIG, 1) for p in DEFAULT_PROBES}
    assert {p: (c.url, c.region, c.signing_name) for p, c in got.items()} == {
        "iam:GetAccountSummary": ("https://iam.amazonaws.com/", "us-east-1", "iam"),
        "ec2:DescribeRegions": ("https://ec2.eu-west-1.amazonaws.com/", "eu-west-1", "ec2"),
        "s3:ListAllMyBuckets": (
            "https://s3.eu-west-1.amazonaws.com/?max-buckets=1",
            "eu-west-1",
            "s3",
        ),
        "cloudtrail:DescribeTrails": (
            "https://cloudtrail.eu-west-1.amazonaws.com/",
            "eu-west-1",
            "cloudtrail",
        ),
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.2:9")
    ec2 = build_probe_call(CATALOGUE["ec2:DescribeRegions"], "eu-west-1", CONFIG, 1)
    iam = build_probe_call(CATALOGUE["iam:GetAccountSummary"], "eu-west-1", CONFIG, 1)
    assert (ec2.url, iam.url) == ("http://127.0.0.2:9/", "http://127.0.0.1:9/")


def test_preloaded_calls_are_reused_only_for_the_same_configuration(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the main process kept before forking (built by a child process) is what a process
    finds; a changed endpoint setting builds anew."""
    probe = CATALOGUE["s3:ListAllMyBuckets"]
    preload([probe], ["ap-south-1"], CONFIG, 1)
    first = probe_call(probe, "ap-south-1", CONFIG, 1)
    assert probe_call(probe, "ap-south-1", CONFIG, 1) is first
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.3:9")
    moved = probe_call(probe, "ap-south-1", CONFIG, 1)
    assert moved is not first
    assert moved.url == "http://127.0.0.3:9/?max-buckets=1"


@pytest.mark.parametrize("max_attempts", [1, Settings.model_fields["sts_max_attempts"].default, 3])
def test_calls_are_answered_and_refusals_raise_botocores_client_error(
    sts_standin: StsStandIn, monkeypatch: pytest.MonkeyPatch, max_attempts: int
) -> None:
    """Through the stand-in: an allowed call returns, a denied one raises ClientError with the
    service's code, as a botocore client would, after one request however many attempts are
    allowed (a refusal is not worth another)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_standin.endpoint_url)
    allowed = ReadOnlyCredentials("ASIAFAKEF0" + "0" * 10, "s", "t")  # mask F: every probe
    denied = ReadOnlyCredentials("ASIAFAKE00" + "0" * 10, "s", "t")  # mask 0: none
    codes = {}
    for permission in DEFAULT_PROBES:
        call = build_probe_call(CATALOGUE[permission], "us-east-1", CONFIG, max_attempts)
        call.send(allowed)
        before = sts_standin.stats(roles=False)["probe_requests"]
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            call.send(denied)
        assert sts_standin.stats(roles=False)["probe_requests"] == cast(int, before) + 1
        codes[permission] = refused.value.response["Error"]["Code"]
    assert codes == {
        "iam:GetAccountSummary": "AccessDenied",
        "ec2:DescribeRegions": "UnauthorizedOperation",
        "s3:ListAllMyBuckets": "AccessDenied",
        "cloudtrail:DescribeTrails": "AccessDeniedException",
    }


def test_a_service_error_is_retried_as_botocores_standard_mode_does(
    sts_standin: StsStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 is tried again up to the attempts allowed, then raised."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", sts_standin.endpoint_url)
    probe = CATALOGUE["iam:GetAccountSummary"]
    failing = ReadOnlyCredentials("ASIAFAKEFE" + "0" * 10, "s", "t")  # a probeerror role's key
    before = sts_standin.stats(roles=False)["probe_requests"]
    call = build_probe_call(probe, "us-east-1", CONFIG, 2)
    with pytest.raises(botocore.exceptions.ClientError) as failed:
        call.send(failing)
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert sts_standin.stats(roles=False)["probe_requests"] == before + 2  # type: ignore[operator]


@pytest.mark.parametrize(
    ("body", "headers", "json_protocol", "expected"),
    [
        (
            b'<ErrorResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/"><Error>'
            b"<Type>Sender</Type><Code>AccessDenied</Code><Message>no</Message></Error>"
            b"<RequestId>r</RequestId></ErrorResponse>",
            {},
            False,
            ("AccessDenied", "no"),
        ),
        (
            b"<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>m</Message>"
            b"</Error></Errors><RequestID>r</RequestID></Response>",
            {},
            False,
            ("UnauthorizedOperation", "m"),
        ),
        (b"<Error><Code>SlowDown</Code><Message>s</Message></Error>", {}, False, ("SlowDown", "s")),
        (
            b'{"__type": "com.amazonaws#AccessDeniedException", "message": "j"}',
            {},
            True,
            ("AccessDeniedException", "j"),
        ),
        (
            b'{"message": "h"}',
            {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/"},
            True,
            ("ThrottlingException", "h"),
        ),
        (b"<html>bad gateway", {}, False, ("502", "")),
    ],
)
def test_refusals_are_read_in_each_protocols_format(
    body: bytes, headers: dict[str, str], json_protocol: bool, expected: tuple[str, str]
) -> None:
    """Query, EC2 and S3 XML, JSON by body or header; an unreadable body is its status."""
    status = 502 if expected[0] == "502" else 403
    error = _error(status, headers, body, json_protocol)
    assert (error["Code"], error["Message"]) == expected


def test_a_malformed_endpoint_is_refused_when_built(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's own ValueError, which the prober reports as ProbeClientError."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "not a url")
    with pytest.raises(ValueError, match="Invalid endpoint"):
        build_probe_call(CATALOGUE["s3:ListAllMyBuckets"], "us-east-1", Config(), 1)


def test_the_worker_builds_the_probes_before_its_pool_forks(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process's worker_init hook builds every configured probe for both regions
    AssumeRole may answer in; a process then finds them instead of loading a model."""
    from worker.settings import get_settings  # noqa: PLC0415

    # The module (the package's `app` attribute is the Celery app itself).
    hooks = importlib.import_module("worker.app")

    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("STS_FALLBACK_REGION", "us-east-1")
    monkeypatch.setenv("PERMISSION_PROBES", "ec2:DescribeRegions")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        hooks._preload_probe_calls()
        probe, config = CATALOGUE["ec2:DescribeRegions"], client_config(settings)
        for region in ("eu-central-1", "us-east-1"):
            key = _key(probe, region, config, settings.sts_max_attempts)
            assert key in _BUILT, region
            assert _BUILT[key].url == f"https://ec2.{region}.amazonaws.com/"
    finally:
        get_settings.cache_clear()


def _comparable(call: ProbeCall) -> dict[str, object]:
    """A call's plain parts; the User-Agent (not signed) lists botocore's features in any order."""
    plain = probe_preload._plain(call)
    headers = plain["parts"]["headers"]
    plain["parts"]["headers"] = [
        [name, _features_sorted(value) if name == "User-Agent" else value]
        for name, value in headers
    ]
    return plain


def _features_sorted(user_agent: str) -> list[tuple[str, list[str]]]:
    return [(k, sorted(v.split(","))) for k, _, v in (t.partition("/") for t in user_agent.split())]


def test_the_calls_built_in_a_child_process_are_those_built_here(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every probe, built by `python -m worker.sts.probe_preload` and kept here, has the same
    request and the same HTTP session settings as when built in this process."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.2:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.4:3128")
    probes = [CATALOGUE[permission] for permission in DEFAULT_PROBES]
    preload(probes, ["sa-east-1"], CONFIG, 3)
    for probe in probes:
        kept = _BUILT[_key(probe, "sa-east-1", CONFIG, 3)]
        here = build_probe_call(probe, "sa-east-1", CONFIG, 3)
        assert _comparable(kept) == _comparable(here), probe.permission
        assert (kept.probe, kept.max_attempts) == (probe, 3)
    assert _BUILT[_key(probes[1], "sa-east-1", CONFIG, 3)].url == "http://127.0.0.2:9/"
    http = probe_preload._plain(kept)["http"]
    assert http["proxies"].get("https") == "http://127.0.0.4:3128"
    timeouts = [SETTINGS.sts_connect_timeout_seconds, SETTINGS.sts_read_timeout_seconds]
    assert http["timeout"] == timeouts


def test_the_main_process_loads_no_service_model(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requests are built by a child process: here, loading a model would fail."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a service model was loaded in the main process")

    monkeypatch.setattr(botocore.loaders.Loader, "load_service_model", refuse)
    probe = CATALOGUE["cloudtrail:DescribeTrails"]
    preload([probe], ["ca-central-1"], CONFIG, 1)
    assert probe_call(probe, "ca-central-1", CONFIG, 1).url == (
        "https://cloudtrail.ca-central-1.amazonaws.com/"
    )


def test_a_call_the_child_cannot_build_is_named_and_the_others_kept(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "not a url")
    s3, iam = CATALOGUE["s3:ListAllMyBuckets"], CATALOGUE["iam:GetAccountSummary"]
    with pytest.raises(RuntimeError, match=r"^s3:ListAllMyBuckets: ValueError$"):
        preload([s3, iam], ["eu-north-1"], CONFIG, 1)
    assert _key(iam, "eu-north-1", CONFIG, 1) in _BUILT
    assert _key(s3, "eu-north-1", CONFIG, 1) not in _BUILT
