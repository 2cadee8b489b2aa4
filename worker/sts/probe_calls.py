"""The permission probes' requests: built once by botocore, then only re-signed and sent.

A probe is the same request for every account (the same URL, headers and body); only its
signature differs. A botocore client per service pays for that sameness on every call: event
hooks, parameter validation, endpoint rule sets, serialization, signing through its generic
machinery and parsing the whole answer (measured at 0.7 to 0.9 ms of CPU per call), and it keeps
the service's model in memory (the EC2 model alone is about 15 MB per process). Here botocore
builds each probe's request once per process, service and region, with its own configuration
(endpoints from AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE> and the config file, FIPS and
dual-stack settings, the protocol's serialization) and a placeholder key; the client and its
model are then dropped. Each probe then costs a SigV4 signature (checked at build time to equal
botocore's own signer's for the same request), one request over botocore's own HTTP session
(its connection pool, proxies, CA bundle and timeouts), and a look at the answer: its status,
and for a refusal the error code and message (docs/permissions.md).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import random
import threading
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.parsers import ResponseParserError
from botocore.retries import standard
from botocore.utils import normalize_url_path

from worker.permissions import Probe

__all__ = [
    "CONFIG_FIELDS",
    "ProbeCall",
    "build_probe_call",
    "check_signature",
    "keep",
    "probe_call",
]

_ALGORITHM = "AWS4-HMAC-SHA256"
_TIMESTAMP = "%Y%m%dT%H%M%SZ"
# Per-call headers: set on every send (date, token, signature) or left out (botocore's
# invocation metadata, which is per call and optional).
_PER_CALL = frozenset(
    {
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "amz-sdk-invocation-id",
        "amz-sdk-request",
    }
)
# Answers worth another attempt: botocore's standard retry mode's own checkers (5xx, timeouts,
# connection errors, every throttling code) and its 429. Not its STS-only
# RetryIDPCommunicationError: no probe goes to STS, and that checker reads the operation model
# of a botocore call, which a probe call has none of (it raised AttributeError on every refusal).
_THROTTLED = standard.ThrottledRetryableChecker()
_RETRYABLE = standard.OrRetryChecker([standard.TransientRetryableChecker(), _THROTTLED])
_PLACEHOLDER = botocore.credentials.ReadOnlyCredentials(
    "AKIDPROBETEMPLATE", "probe-template-secret", "probe-template-token"
)


# The client settings a built call depends on (with the environment: `_key`).
CONFIG_FIELDS = ("connect_timeout", "read_timeout", "max_pool_connections", "user_agent_extra")

# Every call built or kept in this process, by what it depends on. Those the worker's main
# process keeps before the pool forks (built by a child process, `worker.sts.probe_preload`) are
# inherited: no process of the worker loads a service model.
_BUILT: dict[tuple[object, ...], ProbeCall] = {}
_LOCK = threading.Lock()


class _CapturedError(Exception):
    """Raised by the capturing hook: the request is built, it must not be sent."""


@dataclass(frozen=True, slots=True)
class ProbeCall:
    """One probe's request for one service and region, ready to be signed and sent."""

    probe: Probe
    method: str
    url: str
    body: bytes
    headers: tuple[tuple[str, str], ...]  # the constant ones (no date, token or signature)
    region: str  # the signing region (IAM: us-east-1)
    signing_name: str
    json_protocol: bool
    http: Any  # botocore.httpsession.URLLib3Session
    max_attempts: int
    # The canonical request up to its headers, the constant canonical header lines, the
    # signed header names and the payload hash: everything but the date and the token.
    _prefix: str
    _signed: str
    _payload: str

    def _canonical_headers(self, stamp: str, token: str | None) -> tuple[str, str]:
        """The canonical header lines and the signed header names, for this date and token."""
        lines = {name.lower(): " ".join(value.split()) for name, value in self.headers}
        lines["host"] = lines.get("host") or _host(self.url)
        lines["x-amz-date"] = stamp
        if token:
            lines["x-amz-security-token"] = " ".join(token.split())
        names = [name for name in self._signed.split(";") if name in lines]
        return "".join(f"{name}:{lines[name]}\n" for name in names), ";".join(names)

    def signed_headers(
        self, credentials: botocore.credentials.ReadOnlyCredentials, now: datetime.datetime
    ) -> dict[str, str]:
        """The request's headers signed with `credentials` at `now` (SigV4)."""
        stamp = now.strftime(_TIMESTAMP)
        day = stamp[:8]
        lines, signed = self._canonical_headers(stamp, credentials.token)
        canonical = f"{self._prefix}{lines}\n{signed}\n{self._payload}"
        scope = f"{day}/{self.region}/{self.signing_name}/aws4_request"
        to_sign = (
            f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        key = f"AWS4{credentials.secret_key}".encode()
        for part in (day, self.region, self.signing_name, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers = dict(self.headers)
        headers["X-Amz-Date"] = stamp
        if credentials.token:
            headers["X-Amz-Security-Token"] = credentials.token
        headers["Authorization"] = (
            f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return headers

    def send(self, credentials: botocore.credentials.ReadOnlyCredentials) -> None:
        """Make the call with `credentials`; return when allowed, raise botocore's exceptions
        otherwise (ClientError for a refusal), after botocore's standard retries."""
        attempt = 1
        while True:
            try:
                self._attempt(credentials)
            except botocore.exceptions.ClientError as error:
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                context = standard.RetryContext(
                    attempt_number=attempt,
                    parsed_response=dict(error.response),
                    http_response=types.SimpleNamespace(status_code=status, headers={}),
                )
                if attempt >= self.max_attempts or not (
                    status == HTTPStatus.TOO_MANY_REQUESTS or _RETRYABLE.is_retryable(context)
                ):
                    raise
                throttled = status == HTTPStatus.TOO_MANY_REQUESTS or _THROTTLED.is_retryable(
                    context
                )
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError):
                if attempt >= self.max_attempts:
                    raise
                throttled = False
            else:
                return
            # The standard retry mode's backoff: full jitter over 1 s (throttling) or 50 ms
            # doubling with each attempt, at most 20 s (within probe_budget_seconds' bound).
            scale = 1.0 if throttled else 0.05
            time.sleep(random.random() * min(20.0, scale * 2.0 ** (attempt - 1)))
            attempt += 1

    def _attempt(self, credentials: botocore.credentials.ReadOnlyCredentials) -> None:
        headers = self.signed_headers(credentials, datetime.datetime.now(datetime.UTC))
        request = botocore.awsrequest.AWSPreparedRequest(
            self.method,
            self.url,
            headers,  # type: ignore[arg-type]  # a dict does (URLLib3Session.send)
            self.body or None,
            stream_output=False,
        )
        response = self.http.send(request)
        status = int(response.status_code)
        content: bytes = response.content
        if status < 300:
            # Allowed. An answer botocore could not have parsed is not proof.
            _parse(content, json_protocol=self.json_protocol)
            return
        # The parts of botocore's error response that classify_probe_error reads.
        parsed: Any = {
            "Error": _error(status, response.headers, content, self.json_protocol),
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        raise botocore.exceptions.ClientError(parsed, self.probe.operation)


def _host(url: str) -> str:
    """The Host header as botocore signs it: the URL's host, its port unless the default."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def _parse(content: bytes, *, json_protocol: bool) -> Any:
    if not content.strip():
        return None
    try:
        if json_protocol:
            return json.loads(content)
        return ElementTree.fromstring(content)  # noqa: S314 - AWS's answer, as botocore parses it
    except (ValueError, ElementTree.ParseError) as error:
        raise ResponseParserError(f"unparseable answer: {error}") from None


def _error(
    status: int, headers: Mapping[str, str], content: bytes, json_protocol: bool
) -> dict[str, str]:
    """The refusal's code and message, where each protocol puts them (as botocore reads them)."""
    code, message = "", ""
    try:
        parsed = _parse(content, json_protocol=json_protocol)
    except ResponseParserError:
        parsed = None
    if json_protocol:
        header = headers.get("x-amzn-ErrorType") or ""
        if isinstance(parsed, dict):
            code = str(parsed.get("__type") or parsed.get("code") or "")
            message = str(parsed.get("message") or parsed.get("Message") or "")
        code = (header or code).split(":")[0].rpartition("#")[2]
    elif parsed is not None:
        # Query: ErrorResponse/Error/Code; EC2: Response/Errors/Error/Code; S3: Error/Code.
        for element in parsed.iter():
            name = element.tag.rpartition("}")[2]
            if name == "Code" and not code:
                code = (element.text or "").strip()
            elif name == "Message" and not message:
                message = (element.text or "").strip()
    return {"Code": code or str(status), "Message": message}


def _capture(service: str, region: str, config: Config, probe: Probe) -> tuple[Any, Any]:
    """The probe's request as botocore would send it, and botocore's HTTP session for it."""
    session = botocore.session.Session()
    client = session.create_client(
        service,
        region_name=region,
        config=config.merge(Config(retries={"total_max_attempts": 1})),
        aws_access_key_id=_PLACEHOLDER.access_key,
        aws_secret_access_key=_PLACEHOLDER.secret_key,
        aws_session_token=_PLACEHOLDER.token,
    )
    captured: list[Any] = []

    def hold(request: Any, **_: Any) -> None:
        captured.append(request)
        raise _CapturedError

    client.meta.events.register_first("before-send", hold)
    with contextlib.suppress(_CapturedError):
        getattr(client, probe.operation)(**probe.kwargs)
    if not captured:
        raise ValueError(f"botocore sent no {service} request to capture")
    # The HTTP session botocore configured for this client (pool, proxies, CA bundle,
    # timeouts) is kept; the client and its service model are not.
    http = client._endpoint.http_session  # type: ignore[attr-defined]
    return captured[0], http


def build_probe_call(probe: Probe, region: str, config: Config, max_attempts: int) -> ProbeCall:
    """The probe's request in `region`, built by botocore with its configuration.

    Raises what botocore raises for a configuration it cannot build a client from (ValueError
    for a malformed AWS_ENDPOINT_URL_<SERVICE>), and ValueError if the signature this module
    computes differs from botocore's own signer's for the same request.
    """
    request, http = _capture(probe.service, region, config, probe)
    headers = tuple(
        (str(name), value.decode() if isinstance(value, bytes) else str(value))
        for name, value in request.headers.items()
    )
    authorization = dict(headers).get("Authorization", "")
    scope = authorization.partition("Credential=")[2].partition(",")[0].split("/")
    if len(scope) != 5 or not authorization.startswith(_ALGORITHM):
        raise ValueError(f"botocore did not sign the {probe.service} request with SigV4")
    signing_region, signing_name = scope[2], scope[3]
    # The headers botocore signed, as it chose them (Content-Length, added later, is not one).
    signed = authorization.partition("SignedHeaders=")[2].partition(",")[0]
    headers = tuple((name, value) for name, value in headers if name.lower() not in _PER_CALL)
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        raise TypeError(f"the {probe.service} request's body is not bytes")
    parts = urlsplit(request.url)
    path = parts.path or "/"
    uri = path if signing_name == "s3" else quote(normalize_url_path(path), safe="/~")
    pairs = sorted(pair.partition("=")[::2] for pair in parts.query.split("&") if parts.query)
    query = "&".join(f"{key}={value}" for key, value in pairs)
    lowered = {name.lower(): value for name, value in headers}
    payload = lowered.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
    call = ProbeCall(
        probe=probe,
        method=request.method,
        url=request.url,
        body=body,
        headers=headers,
        region=signing_region,
        signing_name=signing_name,
        json_protocol="x-amz-target" in lowered,
        http=http,
        max_attempts=max_attempts,
        _prefix=f"{request.method.upper()}\n{uri}\n{query}\n",
        _signed=signed,
        _payload=payload,
    )
    check_signature(call)
    return call


def check_signature(call: ProbeCall) -> None:
    """The signature computed here must be botocore's own signer's, for the same request."""
    signer = botocore.auth.S3SigV4Auth if call.signing_name == "s3" else botocore.auth.SigV4Auth
    signed = call._signed.split(";")
    request = botocore.awsrequest.AWSRequest(
        call.method,
        call.url,
        headers={name: value for name, value in call.headers if name.lower() in signed},
        data=call.body,
    )
    signer(_PLACEHOLDER, call.signing_name, call.region).add_auth(request)
    stamp = str(request.headers["X-Amz-Date"])
    now = datetime.datetime.strptime(stamp, _TIMESTAMP).replace(tzinfo=datetime.UTC)
    ours = call.signed_headers(_PLACEHOLDER, now)["Authorization"]
    if ours != request.headers["Authorization"]:
        raise ValueError(f"the {call.signing_name} probe's signature differs from botocore's")


def _key(probe: Probe, region: str, config: Config, max_attempts: int) -> tuple[object, ...]:
    """What a built call depends on: the client settings and the environment that botocore
    reads for endpoints, proxies and certificates (never a secret)."""
    environment = tuple(
        sorted(
            (name, value)
            for name, value in os.environ.items()
            if (name.startswith("AWS_") or "PROXY" in name.upper())
            and not any(word in name for word in ("SECRET", "TOKEN", "ACCESS_KEY"))
        )
    )
    settings = tuple(getattr(config, name, None) for name in CONFIG_FIELDS)
    return (probe.permission, region, max_attempts, settings, environment)


def keep(call: ProbeCall, region: str, config: Config) -> None:
    """Keep a call built elsewhere (`worker.sts.probe_preload`), for `probe_call` to find."""
    with _LOCK:
        _BUILT[_key(call.probe, region, config, call.max_attempts)] = call


def probe_call(probe: Probe, region: str, config: Config, max_attempts: int) -> ProbeCall:
    """The call kept for this configuration (built before the fork: `worker.sts.probe_preload`),
    or one built now and kept."""
    key = _key(probe, region, config, max_attempts)
    with _LOCK:
        call = _BUILT.get(key)
        if call is None:
            call = _BUILT[key] = build_probe_call(probe, region, config, max_attempts)
    return call
