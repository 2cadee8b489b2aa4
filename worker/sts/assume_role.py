"""AssumeRole without a botocore client call: its request built once per process and region by
botocore (`worker.sts.signing`), then per call a form body, a SigV4 signature with the platform's
credentials, one request over botocore's HTTP session and the answer read as botocore reads it.

Through a botocore client, an AssumeRole cost about twice the CPU of the request itself (event
hooks, parameter validation, the endpoint rule set, serialization, generic signing and parsing),
and a first verification makes two. What botocore does that matters is kept, the same way:

- the endpoint, headers and HTTP session are botocore's own, built for the region with the
  STS clients' configuration; the body is the form botocore serializes (checked when built:
  the same bytes for the same parameters), signed as botocore's signer signs it (checked when
  built, and by a test);
- the platform's credentials are the session's (botocore's provider chain, refreshed when they
  expire); none: `NoCredentialsError`, as botocore's signer raises it;
- an answer is read as botocore's query parser reads it: the result's `AssumedRoleUser` and
  `Credentials`; an error's `Code`, `Message` and `Type` in a `ClientError` (a 5xx with an
  empty or HTML body: its status as the code); a body that is not XML: `ResponseParserError`;
- botocore's standard retry mode: its checkers (5xx, timeouts, connection errors, every
  throttling code, a 429, and STS's `IDPCommunicationError`), its backoff, and its client-wide
  retry quota, up to `STS_MAX_ATTEMPTS` calls in all; not its `x-amz-retry-after`, which STS does
  not send;
- every request is counted and timed (`worker.metrics`), and every throttled answer, retried or
  not, reported to `on_throttled` (the shared STS budget).
"""

from __future__ import annotations

import functools
import http.client
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus
from xml.etree import ElementTree

import botocore.credentials
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.parsers import ResponseParserError
from botocore.retries import quota, standard

from worker import metrics
from worker.sts.classify import THROTTLING_CODES
from worker.sts.signing import SignedCall, backoff_seconds, capture, check_signature, parts

OPERATION = "AssumeRole"
_VERSION = "2011-06-15"
# What a request is built with; each call's body is its own parameters, serialized the same way.
_SAMPLE: Mapping[str, str | int] = {
    "RoleArn": "arn:aws:iam::123456789012:role/request-template",
    "RoleSessionName": "request-template",
    "ExternalId": "request-template",
    "DurationSeconds": 900,
    "Policy": '{"Version":"2012-10-17"}',
}
# botocore's standard retry mode for STS: its transient and throttling checkers, a 429, and
# its STS-only IDPCommunicationError (whose checker reads a botocore operation model).
_THROTTLED = standard.ThrottledRetryableChecker()
_RETRYABLE = standard.OrRetryChecker([standard.TransientRetryableChecker(), _THROTTLED])
_IDP_COMMUNICATION = "IDPCommunicationError"
# botocore's RetryQuotaChecker: what a retry costs of the client's quota (500), and what an
# answered call gives back.
_RETRY_COST = 14
_THROTTLING_RETRY_COST = 5
_NO_RETRY_INCREMENT = 1

Hook = Callable[[], object]


@dataclass(frozen=True, slots=True)
class AssumeRoleCall(SignedCall):
    """AssumeRole in one region, ready to be made with any parameters."""

    quota: quota.RetryQuota

    def call(
        self,
        credentials: botocore.credentials.ReadOnlyCredentials,
        params: Mapping[str, str | int],
        *,
        on_throttled: Hook | None = None,
    ) -> dict[str, Any]:
        """The answer's `AssumedRoleUser` and `Credentials` (each present when STS gave it),
        after botocore's standard retries; raises what a botocore client raises."""
        body = form_body(params)
        attempt, acquired = 1, 0
        while True:
            metrics.record_sts_sent(OPERATION)
            started = time.perf_counter()
            try:
                response = self.send_signed(credentials, body)
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError):
                metrics.record_sts_answer(OPERATION, None, None, time.perf_counter() - started)
                if attempt >= self.max_attempts or not self.quota.acquire(_RETRY_COST):
                    raise
                acquired = _RETRY_COST
                time.sleep(backoff_seconds(attempt, throttled=False))
                attempt += 1
                continue
            status = int(response.status_code)
            # A body that is not XML raises here, as botocore's parser does: not retried, and
            # a request without an answer in the metrics.
            parsed = read_answer(status, response.content)
            code = parsed.get("Error", {}).get("Code")
            metrics.record_sts_answer(OPERATION, status, code, time.perf_counter() - started)
            too_many = status == http.HTTPStatus.TOO_MANY_REQUESTS
            if (code in THROTTLING_CODES or too_many) and on_throttled is not None:
                on_throttled()
            if status < 300:
                self.quota.release(acquired or _NO_RETRY_INCREMENT)
                return parsed
            refused: Any = parsed  # botocore's error response
            context = standard.RetryContext(
                attempt_number=attempt,
                parsed_response=parsed,
                http_response=types.SimpleNamespace(status_code=status, headers={}),
            )
            throttling = too_many or _THROTTLED.is_retryable(context)
            retryable = throttling or _RETRYABLE.is_retryable(context) or code == _IDP_COMMUNICATION
            cost = _THROTTLING_RETRY_COST if throttling else _RETRY_COST
            if attempt >= self.max_attempts or not retryable or not self.quota.acquire(cost):
                raise botocore.exceptions.ClientError(refused, OPERATION)
            acquired = cost
            time.sleep(backoff_seconds(attempt, throttled=throttling))
            attempt += 1


@functools.lru_cache(maxsize=16)
def _quoted_policy(policy: str) -> str:
    # The session policies are a few fixed documents (deny-all, the probes'); quoting one
    # character by character was the body's largest cost.
    return quote_plus(policy)


def form_body(params: Mapping[str, str | int]) -> bytes:
    """The form botocore's query serializer sends: Action, Version, then the parameters in the
    order given, each `quote_plus`-encoded (what `urlencode` does)."""
    fields = [f"Action={OPERATION}", f"Version={_VERSION}"]
    for name, value in params.items():
        text = str(value)
        fields.append(f"{name}={_quoted_policy(text) if name == 'Policy' else quote_plus(text)}")
    return "&".join(fields).encode()


def _children(element: ElementTree.Element) -> dict[str, ElementTree.Element]:
    return {child.tag.rpartition("}")[2]: child for child in element}


def _texts(element: ElementTree.Element | None) -> dict[str, str | None]:
    return {} if element is None else {k: v.text for k, v in _children(element).items()}


def read_answer(status: int, content: bytes) -> dict[str, Any]:
    """An STS answer as botocore's query parser reads what the verifier uses of it."""
    metadata: dict[str, Any] = {"HTTPStatusCode": status}
    if status >= 500 and (not content.strip() or content.strip().startswith(b"<html>")):
        # A proxy's or load balancer's page: its status is all there is (botocore's
        # generic error).
        error = {"Code": str(status), "Message": http.client.responses.get(status, "")}
        return {"Error": error, "ResponseMetadata": metadata}
    try:
        root = ElementTree.fromstring(content)  # noqa: S314 - STS's answer, as botocore parses it
    except ElementTree.ParseError as failure:
        # Not the body itself: it may be anything, from anyone on the path.
        raise ResponseParserError(
            f"Unable to parse response ({failure}), invalid XML received ({len(content)} bytes, "
            f"HTTP {status}). Further retries may succeed."
        ) from None
    found = _children(root)
    request_id = found.get("RequestId")
    if status >= 300:
        errors = found.get("Errors")
        where = _children(errors).get("Error") if errors is not None else found.get("Error")
        if request_id is not None:
            metadata["RequestId"] = request_id.text
        return {"Error": _texts(where), "ResponseMetadata": metadata}
    result = found.get(f"{OPERATION}Result")
    parsed: dict[str, Any] = {"ResponseMetadata": metadata}
    if result is not None:
        fields = _children(result)
        for name in ("AssumedRoleUser", "Credentials"):
            if name in fields:
                parsed[name] = _texts(fields[name])
    return parsed


def build_assume_role_call(
    region: str,
    config: Config,
    max_attempts: int,
    session: botocore.session.Session | None = None,
) -> AssumeRoleCall:
    """AssumeRole in `region`, built by botocore with the STS clients' configuration (and
    `session`, whose loaded STS model is then not loaded again).

    Raises what botocore raises for a configuration it cannot build a client from (ValueError
    for a malformed AWS_ENDPOINT_URL_STS), and ValueError if the body or signature made here
    differ from botocore's for the same parameters.
    """
    request, http_session = capture("sts", region, config, "assume_role", _SAMPLE, session=session)
    found = parts(request, "sts", any_body=True)
    call = AssumeRoleCall(
        http=http_session, max_attempts=max_attempts, quota=quota.RetryQuota(), **found
    )
    if form_body(_SAMPLE) != call.body:
        raise ValueError("the AssumeRole body made here differs from botocore's")
    check_signature(call, form_body({**_SAMPLE, "RoleSessionName": "another-one"}))
    return call


class AssumeRoleCalls:
    """The process's AssumeRole calls, one per region (built on first use), and the platform's
    credentials they are signed with."""

    def __init__(self, config: Config, max_attempts: int, session: Any) -> None:
        self._config = config
        self._max_attempts = max_attempts
        self._session = session  # a boto3 Session: its credentials are the platform's
        self._calls: dict[str, AssumeRoleCall] = {}
        self._credentials: botocore.credentials.Credentials | None = None
        self._looked_up = False
        self._lock = threading.Lock()

    def credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        """The platform's credentials now (refreshed if they expire); NoCredentialsError when
        there are none, as botocore's signer raises it."""
        if not self._looked_up:
            with self._lock:
                if not self._looked_up:
                    # Once, like a botocore client: the chain is not searched again per call.
                    self._credentials = self._session.get_credentials()
                    self._looked_up = True
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError
        return self._credentials.get_frozen_credentials()

    def region(self, region: str) -> AssumeRoleCall:
        """The call for `region`, built now if it is the first."""
        call = self._calls.get(region)
        if call is None:
            with self._lock:
                call = self._calls.get(region)
                if call is None:
                    # The session of the STS clients: its loader has the model already.
                    call = build_assume_role_call(
                        region, self._config, self._max_attempts, self._session._session
                    )
                    self._calls[region] = call
        return call
