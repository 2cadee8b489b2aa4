"""The permission probes' requests: built once by botocore, then only re-signed and sent.

A probe is the same request for every account (the same URL, headers and body); only its
signature differs. A botocore client per service pays for that sameness on every call (measured
at 0.7 to 0.9 ms of CPU per call), and it keeps the service's model in memory (the EC2 model
alone is about 15 MB per process). Here botocore builds each probe's request once per process,
service and region (`worker.sts.signing`: the same configuration, a placeholder key); the client
and its model are then dropped. Each probe then costs a SigV4 signature, one request over
botocore's own HTTP session, and a look at the answer: its status, and for a refusal the error
code and message (docs/permissions.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from xml.etree import ElementTree

import botocore.credentials
import botocore.exceptions
from botocore.config import Config
from botocore.parsers import ResponseParserError
from botocore.retries import standard

from worker.permissions import Probe
from worker.sts.signing import SignedCall, backoff_seconds, capture, check_signature, parts

__all__ = [
    "CONFIG_FIELDS",
    "ProbeCall",
    "build_probe_call",
    "check_signature",
    "keep",
    "probe_call",
]

# Answers worth another attempt: botocore's standard retry mode's own checkers (5xx, timeouts,
# connection errors, every throttling code) and its 429. Not its STS-only
# RetryIDPCommunicationError: no probe goes to STS, and that checker reads the operation model
# of a botocore call, which a probe call has none of (it raised AttributeError on every refusal).
_THROTTLED = standard.ThrottledRetryableChecker()
_RETRYABLE = standard.OrRetryChecker([standard.TransientRetryableChecker(), _THROTTLED])

# The client settings a built call depends on (with the environment: `_key`).
CONFIG_FIELDS = ("connect_timeout", "read_timeout", "max_pool_connections", "user_agent_extra")

# Every call built or kept in this process, by what it depends on. Those the worker's main
# process keeps before the pool forks (built by a child process, `worker.sts.probe_preload`) are
# inherited: no process of the worker loads a service model.
_BUILT: dict[tuple[object, ...], ProbeCall] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class ProbeCall(SignedCall):
    """One probe's request for one service and region, ready to be signed and sent."""

    probe: Probe
    json_protocol: bool

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
            # The standard retry mode's backoff (within probe_budget_seconds' bound).
            time.sleep(backoff_seconds(attempt, throttled=throttled))
            attempt += 1

    def _attempt(self, credentials: botocore.credentials.ReadOnlyCredentials) -> None:
        response = self.send_signed(credentials)
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


def build_probe_call(probe: Probe, region: str, config: Config, max_attempts: int) -> ProbeCall:
    """The probe's request in `region`, built by botocore with its configuration.

    Raises what botocore raises for a configuration it cannot build a client from (ValueError
    for a malformed AWS_ENDPOINT_URL_<SERVICE>), and ValueError if the signature this module
    computes differs from botocore's own signer's for the same request.
    """
    request, http = capture(probe.service, region, config, probe.operation, probe.kwargs)
    found = parts(request, probe.service)
    lowered = {name.lower() for name, _ in found["headers"]}
    call = ProbeCall(
        probe=probe,
        json_protocol="x-amz-target" in lowered,
        http=http,
        max_attempts=max_attempts,
        **found,
    )
    check_signature(call)
    return call


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
