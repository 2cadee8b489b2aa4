"""Requests built once by botocore, then only re-signed (SigV4) and sent: what the permission
probes' calls (`worker.sts.probe_calls`) and AssumeRole (`worker.sts.assume_role`) share.

A botocore client pays on every call for what is the same on every call: event hooks,
parameter validation, endpoint rule sets, serialization, signing through its generic machinery
and parsing the whole answer. Here a throw-away botocore client, with a placeholder key, builds a
call's request once (its endpoint from AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE> and the config
file, FIPS and dual-stack settings, the protocol's serialization, its headers) and a hook catches
it before it is sent. What is kept is the request without its date, token and signature, the
canonical request's constant parts, and botocore's HTTP session for it (its connection pool,
proxies, CA bundle and timeouts). Each call then costs a SigV4 signature, computed from those
parts (and checked, when built, to equal botocore's own signer's for the same request), and one
request over that HTTP session.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.session
from botocore.config import Config
from botocore.utils import normalize_url_path

from worker.sts.transport import fast_session

__all__ = ["PLACEHOLDER", "SignedCall", "backoff_seconds", "capture", "check_signature", "parts"]

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
#: The key a request is built (and its signature checked) with: never a real one.
PLACEHOLDER = botocore.credentials.ReadOnlyCredentials(
    "AKIDPROBETEMPLATE", "probe-template-secret", "probe-template-token"
)


class _CapturedError(Exception):
    """Raised by the capturing hook: the request is built, it must not be sent."""


@dataclass(frozen=True, slots=True)
class SignedCall:
    """One call's request for one service and region, ready to be signed and sent."""

    method: str
    url: str
    body: bytes  # the body it was built with (the same on every call for a probe)
    headers: tuple[tuple[str, str], ...]  # the constant ones (no date, token or signature)
    region: str  # the signing region (IAM: us-east-1)
    signing_name: str
    http: Any  # worker.sts.transport.FastSession (or botocore's URLLib3Session)
    max_attempts: int
    # The canonical request up to its headers, the signed header names and the payload hash of
    # `body`: everything but the date, the token (and, for another body, its hash).
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
        self,
        credentials: botocore.credentials.ReadOnlyCredentials,
        now: datetime.datetime,
        payload: str | None = None,
    ) -> dict[str, str]:
        """The request's headers signed with `credentials` at `now` (SigV4), for a body whose
        SHA-256 is `payload` (default: the body it was built with)."""
        stamp = now.strftime(_TIMESTAMP)
        day = stamp[:8]
        lines, signed = self._canonical_headers(stamp, credentials.token)
        canonical = f"{self._prefix}{lines}\n{signed}\n{payload or self._payload}"
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

    def send_signed(
        self, credentials: botocore.credentials.ReadOnlyCredentials, body: bytes | None = None
    ) -> Any:
        """One request, signed now with `credentials`, with `body` (default: the built one);
        botocore's AWSResponse, or its exceptions for a connection that failed."""
        payload = None if body is None else hashlib.sha256(body).hexdigest()
        headers = self.signed_headers(credentials, datetime.datetime.now(datetime.UTC), payload)
        if body is not None:
            # A call built for other bodies keeps no Content-Length of its own (`parts`).
            headers["Content-Length"] = str(len(body))
        request = botocore.awsrequest.AWSPreparedRequest(
            self.method,
            self.url,
            headers,  # type: ignore[arg-type]  # a dict does (URLLib3Session.send)
            (self.body if body is None else body) or None,
            stream_output=False,
        )
        return self.http.send(request)


def _host(url: str) -> str:
    """The Host header as botocore signs it: the URL's host, its port unless the default."""
    split = urlsplit(url)
    default = {"http": 80, "https": 443}.get(split.scheme)
    host = split.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if split.port in (None, default) else f"{host}:{split.port}"


def capture(
    service: str,
    region: str,
    config: Config,
    operation: str,
    kwargs: Mapping[str, object],
    *,
    session: botocore.session.Session | None = None,
) -> tuple[Any, Any]:
    """The call's request as botocore would send it, and botocore's HTTP session for it; built
    with `session` (default: a new one, whose models are dropped with it)."""
    session = session or botocore.session.Session()
    client = session.create_client(
        service,
        region_name=region,
        config=config.merge(Config(retries={"total_max_attempts": 1})),
        aws_access_key_id=PLACEHOLDER.access_key,
        aws_secret_access_key=PLACEHOLDER.secret_key,
        aws_session_token=PLACEHOLDER.token,
    )
    captured: list[Any] = []

    def hold(request: Any, **_: Any) -> None:
        captured.append(request)
        raise _CapturedError

    client.meta.events.register_first("before-send", hold)
    with contextlib.suppress(_CapturedError):
        getattr(client, operation)(**kwargs)
    if not captured:
        raise ValueError(f"botocore sent no {service} request to capture")
    # The HTTP session botocore configured for this client (pool, proxies, CA bundle,
    # timeouts) is kept, to send with http.client (worker.sts.transport); the client and its
    # service model are not.
    http = client._endpoint.http_session  # type: ignore[attr-defined]
    return captured[0], fast_session(http)


def parts(request: Any, service: str, *, any_body: bool = False) -> dict[str, Any]:
    """A captured request's parts, as `SignedCall`'s fields (but `http` and `max_attempts`);
    `any_body`: without its Content-Length (the call is sent with other bodies).

    Raises ValueError when botocore did not sign it with SigV4.
    """
    headers = tuple(
        (str(name), value.decode() if isinstance(value, bytes) else str(value))
        for name, value in request.headers.items()
    )
    authorization = dict(headers).get("Authorization", "")
    scope = authorization.partition("Credential=")[2].partition(",")[0].split("/")
    if len(scope) != 5 or not authorization.startswith(_ALGORITHM):
        raise ValueError(f"botocore did not sign the {service} request with SigV4")
    signing_region, signing_name = scope[2], scope[3]
    # The headers botocore signed, as it chose them (Content-Length, added later, is not one).
    signed = authorization.partition("SignedHeaders=")[2].partition(",")[0]
    dropped = _PER_CALL | {"content-length"} if any_body else _PER_CALL
    headers = tuple((name, value) for name, value in headers if name.lower() not in dropped)
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        raise TypeError(f"the {service} request's body is not bytes")
    split = urlsplit(request.url)
    path = split.path or "/"
    uri = path if signing_name == "s3" else quote(normalize_url_path(path), safe="/~")
    pairs = sorted(pair.partition("=")[::2] for pair in split.query.split("&") if split.query)
    query = "&".join(f"{key}={value}" for key, value in pairs)
    lowered = {name.lower(): value for name, value in headers}
    return {
        "method": request.method,
        "url": request.url,
        "body": body,
        "headers": headers,
        "region": signing_region,
        "signing_name": signing_name,
        "_prefix": f"{request.method.upper()}\n{uri}\n{query}\n",
        "_signed": signed,
        "_payload": lowered.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest(),
    }


def check_signature(call: SignedCall, body: bytes | None = None) -> None:
    """The signature computed here must be botocore's own signer's, for the same request (with
    `body` instead of the built one, if given)."""
    signer = botocore.auth.S3SigV4Auth if call.signing_name == "s3" else botocore.auth.SigV4Auth
    signed = call._signed.split(";")
    data = call.body if body is None else body
    request = botocore.awsrequest.AWSRequest(
        call.method,
        call.url,
        headers={name: value for name, value in call.headers if name.lower() in signed},
        data=data,
    )
    signer(PLACEHOLDER, call.signing_name, call.region).add_auth(request)
    stamp = str(request.headers["X-Amz-Date"])
    now = datetime.datetime.strptime(stamp, _TIMESTAMP).replace(tzinfo=datetime.UTC)
    payload = None if body is None else hashlib.sha256(body).hexdigest()
    ours = call.signed_headers(PLACEHOLDER, now, payload)["Authorization"]
    if ours != request.headers["Authorization"]:
        raise ValueError(f"the {call.signing_name} request's signature differs from botocore's")


def backoff_seconds(attempt: int, *, throttled: bool) -> float:
    """botocore's standard retry mode's backoff before attempt `attempt + 1`: full jitter over
    1 s (throttling) or 50 ms doubling with each attempt, at most 20 s."""
    scale = 1.0 if throttled else 0.05
    return random.random() * min(20.0, scale * 2.0 ** (attempt - 1))
