"""A fast, scriptable stand-in for AWS STS (and the permission probes' four calls) that answers
in the services' real wire format.

Why it exists: moto accepts every role, every external ID and every duration, so it can only
show the happy path. The worker's failure paths (a role that refuses us, throttling, 5xx, a
connection reset, a body that is not XML, our own credentials going bad) must be exercised
against answers that botocore parses exactly as it parses real STS: AWS Query protocol in,
``text/xml`` out, AWS's error envelope and HTTP statuses (see ``docs/sts-errors.md``). It is also
the STS of the throughput benchmark, so it is one asyncio event loop (protocol callbacks, no
per-request threads or coroutines) with cached parsing and string templates: a request costs
about 0.15-0.2 ms of CPU, kernel included, so 1,000 requests/s take a fifth of one core.

How a role behaves is decided by its **name** (the last segment of the role ARN), so that any
process (worker, benchmark, fault suite) can pick a behaviour without setting anything up. The
prefix is matched case-insensitively, longest first; a name matching none behaves like ``ok``.
Mind realistic names: ``ResetPasswordRole`` resets the connection, ``SlowlaneRole`` is slow.

==================  ==========================================================================
role name prefix    answer to AssumeRole
==================  ==========================================================================
``ok`` (default)    success; the role **requires** an external ID: a call without ``ExternalId``
                    gets ``AccessDenied`` (403), like a role whose trust policy has the
                    ``sts:ExternalId`` condition. With ``expected_external_ids`` set for the
                    role ARN, a different external ID is refused too.
``noext``           success even without ``ExternalId`` (the external ID is not enforced)
``otheracct``       success requiring the external ID, but the assumed-role ARN names another
                    12-digit account (role's account + 1), so the client sees an identity
                    mismatch
``deny``            ``AccessDenied`` (403) always
``throttle``        ``Throttling`` (400, "Rate exceeded")
``error500``        ``InternalFailure`` (500)
``error503``        ``ServiceUnavailable`` (503)
``slow``            success requiring the external ID, answered after ``slow_seconds``
                    (default 30 s, longer than any sane client read timeout)
``reset``           the connection is reset (TCP RST) without an answer
``garbage``         HTTP 200 with a ``text/plain`` body that is not XML (botocore raises
                    ``ResponseParserError``)
``regiondisabled``  ``RegionDisabledException`` (403) unless the request is signed for a region
                    in ``enabled_regions`` (default ``us-east-1``, which AWS never disables;
                    ``*`` enables all, which makes a whole instance the "fallback region").
                    The region is read from the SigV4 credential scope, so one instance serves
                    both the primary region and the fallback: a client with
                    ``region_name="eu-south-1"`` is refused, one with ``"us-east-1"`` succeeds.
                    Its credentials are refused by the probed services in those regions too
                    (EC2: ``AuthFailure``, others ``InvalidClientTokenId``), as an opt-in
                    region the account has not enabled refuses its tokens.
``expiredtoken``    ``ExpiredToken`` (400), as if the platform's credentials had expired
``invalidtoken``    ``InvalidClientTokenId`` (403), as if the platform's key were unknown
``badsignature``    ``SignatureDoesNotMatch`` (403), as if the platform's secret were wrong
``flaky[N]``        the first N calls for that role ARN (default ``flaky_failures`` = 2) get
                    ``flaky_error`` (default ``InternalFailure``), later calls behave like ``ok``
``noperms``         like ``ok``, but the role is allowed none of the probed permissions below
``noec2``           like ``ok``, but the role is not allowed ``ec2:DescribeRegions``
``probeerror``      like ``ok``, but every probe call gets ``ServiceUnavailable`` (503)
``bigquota``        like ``ok``, but the account's bucket quota is above 10,000: an unpaged
                    ListBuckets (no ``max-buckets``) is refused, as S3 documents (the code,
                    ``InvalidRequest`` (400), is our guess: AWS does not document it)
==================  ==========================================================================

Permission probes: the four read-only calls the worker makes with the credentials AssumeRole
issued (``iam:GetAccountSummary``, ``ec2:DescribeRegions``, ``s3:ListAllMyBuckets``,
``cloudtrail:DescribeTrails``; the request's SigV4 scope names the service) are answered in each
service's own wire format. What the credentials may do is decided when they are issued and
written into the access key id (``ASIAFAKE`` + a hex digit of allowed probes + a fault flag), so
no state is kept per credential: the role's permissions (by name, as above) intersected with the
session policy passed to AssumeRole (``Deny *`` allows nothing; no policy leaves the role's). A
call that is not allowed gets the service's AccessDenied (EC2: ``UnauthorizedOperation``, JSON
services: ``AccessDeniedException``); any other call is refused the same way. Probe calls have
the STS latency, are not rate-limited and are counted apart (``probe_requests``, ``by_probe``,
``probe_outcomes``).

Input is validated first, as STS does: RoleArn (an IAM role ARN, 20-2048 characters),
RoleSessionName (2-64, ``[\\w+=,.@-]``), ExternalId (2-1224, ``[\\w+=,.@:/-]``),
DurationSeconds (900-43200 and at most ``max_session_seconds``, default 3600), Policy (JSON,
at most 2048 characters) all answer ``ValidationError`` / ``MalformedPolicyDocument`` (400).
``GetCallerIdentity`` answers the platform's identity (``platform_arn``).

Checks before any role logic, in order: a SigV4 ``Authorization`` header is present
(``MissingAuthenticationToken``), ``platform_credentials_valid`` and ``accepted_access_keys``
(``InvalidClientTokenId``), the global token-bucket ``rate_limit`` (``Throttling``), then
``force_error`` (every matching request gets that code, or ``reset``/``garbage``/``slow``, with
probability ``force_ratio``, for ``force_seconds`` or until cleared). Every STS answer, errors
included, is delayed by a latency drawn from a seeded log-normal distribution (median
``median_ms``, default 50 ms; ``latency_sigma`` 0.65 puts p99 at about 4.5x the median;
``median_ms=0`` answers at once).

Control endpoint (JSON, never delayed, throttled or counted):

- ``GET /_standin/config`` and ``POST /_standin/config`` with a JSON object of knobs to change,
  e.g. ``{"force_error": "Throttling", "force_ratio": 0.8, "force_seconds": 30}`` or
  ``{"rate_limit": null}``; answers the whole configuration.
- ``GET /_standin/stats`` (``?roles=0`` leaves out the per-role counts): requests, by action,
  by outcome (error code, ``Success``, ``reset``, ``garbage``), throttled, rate-limited, slow,
  AssumeRole calls without an external ID, connections, per-role-ARN call counts.
- ``POST /_standin/reset``: zero the statistics and the ``flaky`` counters (not the knobs).

Use it in-process (``with StsStandIn(median_ms=0) as sts: ... sts.endpoint_url``; the loop runs
in one background thread), inside an existing event loop (``await serve(config, stop_event)``),
or as a process: ``python -m sandbox.standin --port 4566`` prints its URL on one line when
ready and exits 0 on SIGINT/SIGTERM. Point the worker at it with ``AWS_ENDPOINT_URL_STS``.
Generated credentials are random per call and obviously fake (``ASIAFAKE...``,
``FAKEstandin...``). Not emulated: signature verification, chunked request bodies, role
chaining, tags and the other STS actions (answered ``InvalidAction``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import http
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Final, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, unquote_plus, urlsplit

__all__ = [
    "PROBES",
    "ROLE_PREFIXES",
    "STS_ERRORS",
    "StandInConfig",
    "StsStandIn",
    "build_parser",
    "denied_code",
    "draw_latency_seconds",
    "main",
    "role_behaviour",
    "serve",
    "service_content_type",
    "service_error",
    "session_policy_mask",
]

_NS: Final = "https://sts.amazonaws.com/doc/2011-06-15/"
_API_VERSION: Final = "2011-06-15"
_CONTROL_PREFIX: Final = "/_standin/"
_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 1024 * 1024
_ROLE_CACHE_LIMIT: Final = 200_000

# code -> (HTTP status, <Type>, default message), as STS answers them (docs/sts-errors.md).
STS_ERRORS: Final[Mapping[str, tuple[int, str, str]]] = {
    "AccessDenied": (403, "Sender", "Access denied"),
    "RegionDisabledException": (
        403,
        "Sender",
        "STS is not activated in this region for account:{account}. Your account administrator "
        "can activate STS in this region using the IAM Console.",
    ),
    "ValidationError": (400, "Sender", "Request validation failed"),
    "MalformedPolicyDocument": (400, "Sender", "Syntax errors in policy."),
    "PackedPolicyTooLarge": (400, "Sender", "Packed policy consumes more than the allotted space."),
    "Throttling": (400, "Sender", "Rate exceeded"),
    "InternalFailure": (
        500,
        "Receiver",
        "The request processing has failed because of an unknown error, exception or failure.",
    ),
    "ServiceUnavailable": (
        503,
        "Receiver",
        "The request has failed due to a temporary failure of the server.",
    ),
    "InvalidClientTokenId": (
        403,
        "Sender",
        "The security token included in the request is invalid.",
    ),
    "ExpiredToken": (400, "Sender", "The security token included in the request is expired"),
    "SignatureDoesNotMatch": (
        403,
        "Sender",
        "The request signature we calculated does not match the signature you provided. Check "
        "your AWS Secret Access Key and signing method. Consult the service documentation for "
        "details.",
    ),
    "MissingAuthenticationToken": (403, "Sender", "Request is missing Authentication Token"),
    "IncompleteSignature": (
        400,
        "Sender",
        "Authorization header requires 'Credential' parameter.",
    ),
    "InvalidAction": (400, "Sender", "Could not find operation {action} for version {version}"),
}

# Forced faults that are not an XML error answer but something that happens to the connection.
_PSEUDO_FAULTS: Final = frozenset({"reset", "garbage", "slow"})

# The role-name prefixes, longest first so that a longer one always wins over its own prefix.
ROLE_PREFIXES: Final[tuple[str, ...]] = tuple(
    sorted(
        (
            "ok",
            "noext",
            "otheracct",
            "deny",
            "throttle",
            "error500",
            "error503",
            "slow",
            "reset",
            "garbage",
            "regiondisabled",
            "expiredtoken",
            "invalidtoken",
            "badsignature",
            "flaky",
            "noperms",
            "noec2",
            "probeerror",
            "bigquota",
        ),
        key=len,
        reverse=True,
    )
)

# The permission probes the stand-in answers: permission -> (service, operation, success body).
# Bit i of an issued access key's mask allows the i-th probe.
PROBES: Final[tuple[tuple[str, str, str], ...]] = (
    ("iam:GetAccountSummary", "iam", "GetAccountSummary"),
    ("ec2:DescribeRegions", "ec2", "DescribeRegions"),
    ("s3:ListAllMyBuckets", "s3", "ListBuckets"),
    ("cloudtrail:DescribeTrails", "cloudtrail", "DescribeTrails"),
)
_ALL_PROBES: Final = (1 << len(PROBES)) - 1
# What each role behaviour may do of the probes (the rest: all of them).
_ROLE_PROBE_MASKS: Final[Mapping[str, int]] = {"noperms": 0, "noec2": _ALL_PROBES & ~0b10}
_ISSUED_KEY_PREFIX: Final = "ASIAFAKE"
_PROBE_BODIES: Final[Mapping[str, str]] = {
    "iam:GetAccountSummary": (
        '<GetAccountSummaryResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">'
        "<GetAccountSummaryResult><SummaryMap><entry><key>Users</key><value>0</value></entry>"
        "</SummaryMap></GetAccountSummaryResult><ResponseMetadata><RequestId>{request_id}"
        "</RequestId></ResponseMetadata></GetAccountSummaryResponse>"
    ),
    "ec2:DescribeRegions": (
        '<DescribeRegionsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>{request_id}</requestId><regionInfo><item><regionName>us-east-1</regionName>"
        "<regionEndpoint>ec2.us-east-1.amazonaws.com</regionEndpoint>"
        "<optInStatus>opt-in-not-required</optInStatus></item></regionInfo>"
        "</DescribeRegionsResponse>"
    ),
    "s3:ListAllMyBuckets": (
        '<ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        "<Owner><ID>{request_id}</ID></Owner><Buckets></Buckets></ListAllMyBucketsResult>"
    ),
    "cloudtrail:DescribeTrails": '{{"trailList": []}}',
}


def service_error(service: str, status: int, code: str, message: str, request_id: str) -> bytes:
    """An error body in `service`'s own wire format (the content type is `service_content_type`).

    IAM and the other query services wrap it in ``ErrorResponse``, EC2 in ``Response/Errors``,
    S3 in a bare ``Error``, JSON services (CloudTrail) in ``{"__type", "message"}``.
    """
    text = _escape(message)
    if service == "ec2":
        return (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{text}</Message></Error>"
            f"</Errors><RequestID>{request_id}</RequestID></Response>"
        ).encode()
    if service == "s3":
        return (
            f"<Error><Code>{code}</Code><Message>{text}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
    if service in _JSON_SERVICES:
        return json.dumps({"__type": code, "message": message}).encode()
    kind = "Receiver" if status >= 500 else "Sender"
    return (
        f"<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code><Message>{text}</Message>"
        f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()


def service_content_type(service: str) -> str:
    """The Content-Type `service` answers with."""
    return "application/x-amz-json-1.1" if service in _JSON_SERVICES else "text/xml"


def denied_code(service: str) -> str:
    """How `service` spells "access denied"."""
    if service == "ec2":
        return "UnauthorizedOperation"
    return "AccessDeniedException" if service in _JSON_SERVICES else "AccessDenied"


_JSON_SERVICES: Final = frozenset({"cloudtrail"})


def session_policy_mask(policy: str | None) -> int:
    """Which probes a session policy allows (bit mask over PROBES); no policy allows all.

    Allow statements' actions (IAM wildcards, case-insensitive) add, Deny statements remove; a
    policy that is not valid JSON allows nothing.
    """
    if policy is None:
        return _ALL_PROBES
    try:
        document = json.loads(policy)
    except ValueError:
        return 0
    statements = document.get("Statement", []) if isinstance(document, dict) else []
    if isinstance(statements, dict):
        statements = [statements]
    allowed = denied = 0
    for statement in statements if isinstance(statements, list) else []:
        if not isinstance(statement, dict):
            continue
        actions = statement.get("Action", [])
        patterns = [
            a for a in (actions if isinstance(actions, list) else [actions]) if isinstance(a, str)
        ]
        mask = 0
        for index, (permission, _, _) in enumerate(PROBES):
            if any(_iam_glob(pattern, permission) for pattern in patterns):
                mask |= 1 << index
        if statement.get("Effect") == "Allow":
            allowed |= mask
        elif statement.get("Effect") == "Deny":
            denied |= mask
    return allowed & ~denied


def _iam_glob(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL) is not None


# Roles that answer a fixed error code, and the code.
_ROLE_ERRORS: Final[Mapping[str, str]] = {
    "deny": "AccessDenied",
    "throttle": "Throttling",
    "error500": "InternalFailure",
    "error503": "ServiceUnavailable",
    "expiredtoken": "ExpiredToken",
    "invalidtoken": "InvalidClientTokenId",
    "badsignature": "SignatureDoesNotMatch",
}

# botocore's STS model patterns. Java's \w (what AWS uses) is ASCII-only, hence re.ASCII.
_SESSION_NAME_RE: Final = re.compile(r"[\w+=,.@-]*", re.ASCII)
_EXTERNAL_ID_RE: Final = re.compile(r"[\w+=,.@:/-]*", re.ASCII)
_SOURCE_IDENTITY_RE: Final = _SESSION_NAME_RE
_ROLE_ARN_RE: Final = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):iam::(\d{12}):role/(?:[!-~]*/)?([\w+=,.@-]{1,64})", re.ASCII
)
_PRINCIPAL_ARN_RE: Final = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):(iam|sts)::(\d{12}):([\w+=,.@/-]+)", re.ASCII
)

_GARBAGE_BODY: Final = (
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
)


def _escape(text: str) -> str:
    """XML-escape text that may echo client input; most values need nothing, so check first."""
    if "&" in text or "<" in text or ">" in text:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def role_behaviour(role_name: str) -> tuple[str, int | None]:
    """The behaviour a role name selects (see the module table) and, for ``flakyN``, its N."""
    lowered = role_name.lower()
    for prefix in ROLE_PREFIXES:
        if lowered.startswith(prefix):
            if prefix == "flaky":
                digits = re.match(r"\d+", lowered[len(prefix) :])
                return prefix, int(digits.group()) if digits else None
            return prefix, None
    return "ok", None


def draw_latency_seconds(rng: random.Random, median_ms: float, sigma: float) -> float:
    """One latency from a log-normal distribution with the given median (ms) and shape.

    Log-normal because real service latency is: most answers near the median, a long right tail.
    The median of lognormal(mu, sigma) is e**mu; p99 is median * e**(2.326 * sigma).
    """
    if median_ms <= 0:
        return 0.0
    if sigma <= 0:
        return median_ms / 1000.0
    return rng.lognormvariate(math.log(median_ms / 1000.0), sigma)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    """Every knob of the stand-in. Immutable: a change swaps the whole object, atomically."""

    # Latency of every STS answer: log-normal, median in ms (0: none); sigma 0.65 -> p99 ~ 4.5x.
    median_ms: float = 50.0
    latency_sigma: float = 0.65
    # How long a `slow` role (or forced "slow") takes to answer.
    slow_seconds: float = 30.0
    # Global token bucket in requests/s (None: unlimited); burst defaults to one second's worth.
    rate_limit: float | None = None
    rate_burst: float | None = None
    # The platform's own credentials: False answers InvalidClientTokenId to everything.
    platform_credentials_valid: bool = True
    # Access key ids accepted from the Authorization header; None accepts any.
    accepted_access_keys: frozenset[str] | None = None
    # Who the platform is: GetCallerIdentity's answer and the "User:" of AccessDenied.
    platform_arn: str = "arn:aws:iam::111122223333:user/account-verifier"
    # Regions (from the SigV4 scope) where `regiondisabled` roles succeed; "*" means all.
    enabled_regions: frozenset[str] = frozenset({"us-east-1"})
    # `flaky` roles: how many first calls fail, and with which code.
    flaky_failures: int = 2
    flaky_error: str = "InternalFailure"
    # Every role's MaxSessionDuration.
    max_session_seconds: int = 3600
    # Role ARN -> the one external ID its trust policy accepts (other roles accept any).
    expected_external_ids: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    # Fault injection: answer this code (or reset/garbage/slow) with this probability, for this
    # long (None: until cleared with force_error=None).
    force_error: str | None = None
    force_ratio: float = 1.0
    force_seconds: float | None = None
    # Seed of latency, fault and credential randomness (None: a fresh one).
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse values that would make the stand-in lie or crash later, with a clear message."""
        # A read-only copy, so that the caller's dict cannot change a config that is in use.
        frozen = MappingProxyType(dict(self.expected_external_ids))
        object.__setattr__(self, "expected_external_ids", frozen)
        problems = []
        for name in ("median_ms", "latency_sigma", "slow_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("rate_limit", "rate_burst", "force_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 or null")
        if not 0.0 <= self.force_ratio <= 1.0:
            problems.append("force_ratio must be between 0 and 1")
        if self.flaky_failures < 0:
            problems.append("flaky_failures must be >= 0")
        if self.flaky_error not in STS_ERRORS:
            problems.append(f"flaky_error must be one of {sorted(STS_ERRORS)}")
        if self.force_error is not None and not (
            self.force_error in STS_ERRORS or self.force_error in _PSEUDO_FAULTS
        ):
            problems.append(
                f"force_error must be null or one of {sorted(STS_ERRORS) + sorted(_PSEUDO_FAULTS)}"
            )
        if not 900 <= self.max_session_seconds <= 43200:
            problems.append("max_session_seconds must be between 900 and 43200")
        if _PRINCIPAL_ARN_RE.fullmatch(self.platform_arn) is None:
            problems.append("platform_arn must be an IAM or STS principal ARN")
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, object]:
        """The configuration as JSON-ready values (sets become sorted lists)."""
        out: dict[str, object] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[item.name] = value
        return out

    def with_changes(self, changes: Mapping[str, object]) -> StandInConfig:
        """A copy with `changes` applied, each checked for type (JSON and keyword arguments)."""
        unknown = sorted(set(changes) - _FIELD_KINDS.keys())
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(_FIELD_KINDS)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        return dataclasses.replace(self, **cast("dict[str, Any]", coerced))


_FIELD_KINDS: Final[Mapping[str, str]] = {
    "median_ms": "float",
    "latency_sigma": "float",
    "slow_seconds": "float",
    "rate_limit": "float?",
    "rate_burst": "float?",
    "platform_credentials_valid": "bool",
    "accepted_access_keys": "strset?",
    "platform_arn": "str",
    "enabled_regions": "strset",
    "flaky_failures": "int",
    "flaky_error": "str",
    "max_session_seconds": "int",
    "expected_external_ids": "strmap",
    "force_error": "str?",
    "force_ratio": "float",
    "force_seconds": "float?",
    "seed": "int?",
}


def _coerce(name: str, value: object) -> object:
    """Check one setting's type; JSON has no sets, so lists/tuples are accepted for sets."""
    kind = _FIELD_KINDS[name]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    ok: bool
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        result: object = float(cast(float, value)) if ok else None
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        result = value
    elif kind == "bool":
        ok = isinstance(value, bool)
        result = value
    elif kind == "str":
        ok = isinstance(value, str)
        result = value
    elif kind == "strset":
        ok = isinstance(value, list | tuple | set | frozenset) and all(
            isinstance(item, str) for item in cast(Iterable[object], value)
        )
        result = frozenset(cast(Iterable[str], value)) if ok else None
    else:  # strmap
        ok = isinstance(value, Mapping) and all(
            isinstance(key, str) and isinstance(item, str)
            for key, item in cast(Mapping[object, object], value).items()
        )
        result = dict(cast(Mapping[str, str], value)) if ok else None
    if not ok:
        raise ValueError(f"{name}: expected {_FIELD_KINDS[name]}, got {value!r}")
    return result


# --------------------------------------------------------------------------------------------
# The STS logic: one request in, one reply out. Runs only on the event loop's thread.
# --------------------------------------------------------------------------------------------


class _Request(NamedTuple):
    method: str
    target: str
    authorization: str
    body: bytes
    close: bool
    amz_target: str = ""  # X-Amz-Target: the operation of a JSON-protocol request


@dataclasses.dataclass(slots=True)
class _Reply:
    """What to do with one request: send `data` after `delay` seconds, or reset the connection."""

    data: bytes
    delay: float = 0.0
    close: bool = False
    reset: bool = False


class _Role(NamedTuple):
    partition: str
    account: str
    name: str
    behaviour: str
    flaky_failures: int | None
    role_id: str


class _Stats:
    """Counters of what the stand-in answered; plain ints and dicts, touched by the loop only."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_action: dict[str, int] = {}
        self.by_outcome: dict[str, int] = {}
        self.by_role: dict[str, int] = {}
        self.throttled = 0
        self.rate_limited = 0
        self.slow = 0
        self.assume_role_without_external_id = 0
        self.connections_opened = 0
        self.probe_requests = 0
        self.by_probe: dict[str, int] = {}
        self.probe_outcomes: dict[str, int] = {}

    def probe_outcome(self, key: str) -> None:
        self.probe_outcomes[key] = self.probe_outcomes.get(key, 0) + 1

    def outcome(self, key: str) -> None:
        self.by_outcome[key] = self.by_outcome.get(key, 0) + 1


_HTTP_PHRASES: Final = {status.value: status.phrase for status in http.HTTPStatus}


class _Core:
    """The stand-in's state and answers, without any networking (easy to reason about)."""

    def __init__(self, config: StandInConfig) -> None:
        self.connections: set[_HttpConnection] = set()
        self.stats = _Stats()
        self._flaky_calls: dict[str, int] = {}
        self._roles: dict[str, _Role | None] = {}
        self._policies: dict[str, str] = {}
        self._policy_masks: dict[str, int] = {}
        self._date_second = -1
        self._date = ""
        self._config = config
        self._rng = random.Random(config.seed)
        self._tokens = 0.0
        self._bucket_time = 0.0
        self._force_deadline: float | None = None
        self._apply(config, initial=True)

    # -- configuration -------------------------------------------------------------------------

    @property
    def config(self) -> StandInConfig:
        return self._config

    def _apply(self, config: StandInConfig, *, initial: bool = False) -> None:
        old = self._config
        self._config = config
        if initial or config.seed != old.seed:
            self._rng.seed(config.seed)
        if initial or (config.rate_limit, config.rate_burst) != (old.rate_limit, old.rate_burst):
            self._tokens = self._burst(config)
            self._bucket_time = time.monotonic()
        forced = (config.force_error, config.force_ratio, config.force_seconds)
        if initial or forced != (old.force_error, old.force_ratio, old.force_seconds):
            # The "for a while" window starts when a force setting changes, not at other edits.
            self._force_deadline = (
                time.monotonic() + config.force_seconds
                if config.force_error is not None and config.force_seconds is not None
                else None
            )
        platform = _PRINCIPAL_ARN_RE.fullmatch(config.platform_arn)
        if platform is None:  # StandInConfig refuses these; kept for a config built otherwise
            raise ValueError(f"platform_arn {config.platform_arn!r} is not a principal ARN")
        self._platform_account = platform.group(3)
        parts = platform.group(4).split("/")
        if platform.group(2) == "sts" and parts[0] == "assumed-role" and len(parts) >= 3:
            role_arn = f"arn:{platform.group(1)}:iam::{self._platform_account}:role/{parts[1]}"
            user_id = f"{_unique_id('AROA', role_arn)}:{parts[-1]}"
        else:
            user_id = _unique_id("AIDA", config.platform_arn)
        self._caller_identity = (
            f"<Arn>{_escape(config.platform_arn)}</Arn>"
            f"<UserId>{_escape(user_id)}</UserId><Account>{self._platform_account}</Account>"
        )

    def replace_config(self, config: StandInConfig) -> StandInConfig:
        self._apply(config)
        return config

    def change_config(self, changes: Mapping[str, object]) -> StandInConfig:
        return self.replace_config(self._config.with_changes(changes))

    @staticmethod
    def _burst(config: StandInConfig) -> float:
        if config.rate_limit is None:
            return 0.0
        return max(1.0, config.rate_burst if config.rate_burst is not None else config.rate_limit)

    def reset(self) -> None:
        self.stats = _Stats()
        self._flaky_calls.clear()

    def snapshot(self, *, roles: bool = True) -> dict[str, object]:
        st = self.stats
        out: dict[str, object] = {
            "requests": st.requests,
            "by_action": dict(st.by_action),
            "by_outcome": dict(st.by_outcome),
            "throttled": st.throttled,
            "rate_limited": st.rate_limited,
            "slow": st.slow,
            "assume_role_without_external_id": st.assume_role_without_external_id,
            "connections_opened": st.connections_opened,
            "connections_open": len(self.connections),
            "probe_requests": st.probe_requests,
            "by_probe": dict(st.by_probe),
            "probe_outcomes": dict(st.probe_outcomes),
        }
        if roles:
            out["by_role"] = dict(st.by_role)
        return out

    # -- HTTP framing ----------------------------------------------------------------------------

    def _http(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/xml",
        request_id: str | None = None,
        close: bool = False,
    ) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        head = (
            f"HTTP/1.1 {status} {_HTTP_PHRASES.get(status, 'Unknown')}\r\n"
            + (f"x-amzn-RequestId: {request_id}\r\n" if request_id else "")
            + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + f"Date: {self._date}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        return head.encode("ascii") + body

    def plain(self, status: int, text: str, *, close: bool = True) -> _Reply:
        """A non-STS answer for a request that is not even valid HTTP."""
        data = self._http(status, text.encode(), content_type="text/plain", close=close)
        return _Reply(data, close=close)

    def _json(self, status: int, payload: object) -> _Reply:
        body = json.dumps(payload, sort_keys=True).encode()
        return _Reply(self._http(status, body, content_type="application/json"))

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Reply:
        if request.target.startswith(_CONTROL_PREFIX):
            return self._control(request)
        scope = _credential_scope(request.authorization).split("/")
        if len(scope) == 5 and scope[3] != "sts":
            reply = self._probe(request, scope[0], scope[3], scope[2])
        else:
            reply = self._sts(request)
        if request.close:
            reply.close = True
        return reply

    def _control(self, request: _Request) -> _Reply:
        parts = urlsplit(request.target)
        route = (request.method, parts.path.rstrip("/"))
        if route == ("GET", "/_standin/stats"):
            query = dict(parse_qsl(parts.query))
            return self._json(
                200, self.snapshot(roles=query.get("roles", "1") not in {"0", "false"})
            )
        if route == ("POST", "/_standin/reset"):
            self.reset()
            return self._json(200, self.snapshot())
        if route == ("GET", "/_standin/config"):
            return self._json(200, self._config_view())
        if route == ("POST", "/_standin/config"):
            try:
                changes = json.loads(request.body or b"{}")
            except ValueError as error:
                return self._json(400, {"error": f"the body is not JSON: {error}"})
            if not isinstance(changes, dict):
                return self._json(400, {"error": "the body must be a JSON object of settings"})
            try:
                self.change_config(changes)
            except ValueError as error:
                return self._json(400, {"error": str(error)})
            return self._json(200, self._config_view())
        return self._json(404, {"error": f"no control route {request.method} {parts.path}"})

    def _config_view(self) -> dict[str, object]:
        view = self._config.to_json()
        deadline = self._force_deadline
        view["force_remaining_seconds"] = (
            None if deadline is None else max(0.0, round(deadline - time.monotonic(), 3))
        )
        return view

    def _request_id(self) -> str:
        h = f"{self._rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _error(
        self, code: str, request_id: str, message: str | None = None, **fields: str
    ) -> _Reply:
        status, kind, default = STS_ERRORS.get(code, (400, "Sender", code))
        text = message if message is not None else default.format(**fields) if fields else default
        body = (
            f'<ErrorResponse xmlns="{_NS}">\n  <Error>\n    <Type>{kind}</Type>\n'
            f"    <Code>{code}</Code>\n    <Message>{_escape(text)}</Message>\n  </Error>\n"
            f"  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
        ).encode()
        self.stats.outcome(code)
        if code == "Throttling":
            self.stats.throttled += 1
        return _Reply(self._http(status, body, request_id=request_id))

    def _success(self, action: str, result: str, request_id: str) -> _Reply:
        body = (
            f'<{action}Response xmlns="{_NS}">\n  <{action}Result>\n{result}  </{action}Result>\n'
            f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n"
            f"  </ResponseMetadata>\n</{action}Response>\n"
        ).encode()
        self.stats.outcome("Success")
        return _Reply(self._http(200, body, request_id=request_id))

    def _fault(self, fault: str, request_id: str) -> _Reply:
        """A `reset` or `garbage` answer: something other than an STS answer."""
        self.stats.outcome(fault)
        if fault == "reset":
            return _Reply(b"", reset=True)
        return _Reply(
            self._http(200, _GARBAGE_BODY, content_type="text/plain", request_id=request_id)
        )

    def _sts(self, request: _Request) -> _Reply:
        config = self._config
        st = self.stats
        st.requests += 1
        if request.method == "POST":
            text = request.body.decode("utf-8", "replace")
        else:
            text = request.target.partition("?")[2]
        params = _parse_form(text)
        action = params.get("Action", "")
        st.by_action[action] = st.by_action.get(action, 0) + 1
        role_arn = params.get("RoleArn") if action == "AssumeRole" else None
        if role_arn is not None:
            st.by_role[role_arn] = st.by_role.get(role_arn, 0) + 1
            if "ExternalId" not in params:
                st.assume_role_without_external_id += 1
        request_id = self._request_id()
        reply = self._decide(config, request, params, action, request_id)
        if reply.delay == 0.0:
            reply.delay = draw_latency_seconds(self._rng, config.median_ms, config.latency_sigma)
        return reply

    def _decide(
        self,
        config: StandInConfig,
        request: _Request,
        params: dict[str, str],
        action: str,
        request_id: str,
    ) -> _Reply:
        if action not in {"AssumeRole", "GetCallerIdentity"} or params.get("Version") != (
            _API_VERSION
        ):
            return self._error(
                "InvalidAction",
                request_id,
                action=action,
                version=params.get("Version", ""),
            )
        scope = _credential_scope(request.authorization) or params.get("X-Amz-Credential", "")
        if not request.authorization and not scope:
            return self._error("MissingAuthenticationToken", request_id)
        scope_parts = scope.split("/")
        if len(scope_parts) != 5:
            return self._error("IncompleteSignature", request_id)
        access_key, region = scope_parts[0], scope_parts[2]
        if not config.platform_credentials_valid or (
            config.accepted_access_keys is not None
            and access_key not in config.accepted_access_keys
        ):
            return self._error("InvalidClientTokenId", request_id)
        if config.rate_limit is not None and not self._take_token(config):
            self.stats.rate_limited += 1
            return self._error("Throttling", request_id)
        slow = False
        if config.force_error is not None and self._forcing(config):
            if config.force_error == "slow":
                slow = True
            elif config.force_error in _PSEUDO_FAULTS:
                return self._fault(config.force_error, request_id)
            else:
                return self._forced_error(config, config.force_error, params, request_id)
        if action == "GetCallerIdentity":
            reply = self._success(action, f"    {self._caller_identity}\n", request_id)
        else:
            reply = self._assume_role(config, params, region, request_id)
        if slow and not reply.reset:
            self.stats.slow += 1
            reply.delay = config.slow_seconds
        return reply

    def _forcing(self, config: StandInConfig) -> bool:
        deadline = self._force_deadline
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return config.force_ratio >= 1.0 or self._rng.random() < config.force_ratio

    def _forced_error(
        self, config: StandInConfig, code: str, params: Mapping[str, str], request_id: str
    ) -> _Reply:
        role_arn = params.get("RoleArn", "")
        if code == "AccessDenied":
            return self._error(code, request_id, _access_denied(config, role_arn))
        if code == "RegionDisabledException":
            account = role_arn.split(":")[4] if role_arn.count(":") >= 5 else ""
            return self._error(code, request_id, account=account)
        if code == "InvalidAction":
            return self._error(code, request_id, action=params.get("Action", ""), version="")
        return self._error(code, request_id)

    def _take_token(self, config: StandInConfig) -> bool:
        now = time.monotonic()
        rate = cast(float, config.rate_limit)
        tokens = min(self._burst(config), self._tokens + (now - self._bucket_time) * rate)
        self._bucket_time = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    # -- permission probes ------------------------------------------------------------------------

    def _probe(self, request: _Request, access_key: str, service: str, region: str) -> _Reply:
        """A call to another service with credentials this stand-in issued (module docstring)."""
        config = self._config
        st = self.stats
        st.probe_requests += 1
        request_id = self._request_id()
        permission = _probe_permission(request, service)
        st.by_probe[permission] = st.by_probe.get(permission, 0) + 1
        if (
            len(access_key) != 20
            or not access_key.startswith(_ISSUED_KEY_PREFIX)
            or (
                access_key[9] == "R"
                and not (region in config.enabled_regions or "*" in config.enabled_regions)
            )
        ):
            code = "AuthFailure" if service == "ec2" else "InvalidClientTokenId"
            reply = self._service_error(
                service,
                403,
                code,
                "The security token included in the request is invalid.",
                request_id,
            )
        elif access_key[9] == "E":
            reply = self._service_error(
                service, 503, "ServiceUnavailable", "Service is unavailable.", request_id
            )
        elif (
            access_key[9] == "Q"
            and permission == "s3:ListAllMyBuckets"
            and "max-buckets=" not in request.target.partition("?")[2]
        ):
            reply = self._service_error(
                service,
                400,
                "InvalidRequest",
                "Unpaginated ListBuckets requests are not supported for accounts with a general "
                "purpose bucket quota above 10,000.",
                request_id,
            )
        else:
            mask = int(access_key[8], 16)
            index = next((i for i, probe in enumerate(PROBES) if probe[0] == permission), None)
            if index is None or not mask & (1 << index):
                reply = self._service_error(
                    service,
                    403 if service != "cloudtrail" else 400,
                    denied_code(service),
                    f"User is not authorized to perform: {permission} on resource: *",
                    request_id,
                )
            else:
                st.probe_outcome("Success")
                body = _PROBE_BODIES[permission].format(request_id=request_id).encode()
                reply = _Reply(
                    self._http(
                        200,
                        body,
                        content_type=service_content_type(service),
                        request_id=request_id,
                    )
                )
        reply.delay = draw_latency_seconds(self._rng, config.median_ms, config.latency_sigma)
        return reply

    def _service_error(
        self, service: str, status: int, code: str, message: str, request_id: str
    ) -> _Reply:
        self.stats.probe_outcome(code)
        body = service_error(service, status, code, message, request_id)
        return _Reply(
            self._http(
                status, body, content_type=service_content_type(service), request_id=request_id
            )
        )

    def _issued_key(self, role: _Role, policy: str | None) -> str:
        """A fake access key id that carries what the credentials may do (module docstring)."""
        mask = _ROLE_PROBE_MASKS.get(role.behaviour, _ALL_PROBES) & self._policy_mask(policy)
        fault = {"probeerror": "E", "bigquota": "Q", "regiondisabled": "R"}.get(role.behaviour, "0")
        return f"{_ISSUED_KEY_PREFIX}{mask:X}{fault}{self._rng.getrandbits(40):010X}"

    def _policy_mask(self, policy: str | None) -> int:
        if policy is None:
            return _ALL_PROBES
        known = self._policy_masks.get(policy)
        if known is None:
            known = session_policy_mask(policy)
            if len(self._policy_masks) >= 1024:
                self._policy_masks.clear()
            self._policy_masks[policy] = known
        return known

    # -- AssumeRole -------------------------------------------------------------------------------

    def _role(self, arn: str) -> _Role | None:
        """The parsed role ARN, cached: the benchmark asks about the same 20,000 roles again."""
        try:
            return self._roles[arn]
        except KeyError:
            pass
        match = _ROLE_ARN_RE.fullmatch(arn)
        role: _Role | None = None
        if match is not None:
            partition, account, name = match.groups()
            behaviour, flaky = role_behaviour(name)
            role = _Role(partition, account, name, behaviour, flaky, _unique_id("AROA", arn))
        if len(self._roles) >= _ROLE_CACHE_LIMIT:
            self._roles.clear()
        self._roles[arn] = role
        return role

    def _checked_input(
        self, config: StandInConfig, params: Mapping[str, str], request_id: str
    ) -> tuple[_Role, int, str | None] | _Reply:
        """The role, duration and packed policy size of a valid request, or STS's refusal."""
        problems = _validate_assume_role(params)
        if problems:
            count = len(problems)
            plural = "error" if count == 1 else "errors"
            message = f"{count} validation {plural} detected: " + "; ".join(problems)
            return self._error("ValidationError", request_id, message)
        role_arn = params["RoleArn"]
        role = self._role(role_arn)
        if role is None:
            return self._error("ValidationError", request_id, f"{role_arn} is invalid")
        duration = int(params.get("DurationSeconds", "3600"))
        if duration > config.max_session_seconds:
            return self._error(
                "ValidationError",
                request_id,
                "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
            )
        policy = params.get("Policy")
        packed = None
        if policy is not None:
            code_or_size = self._packed_policy(policy)
            if not code_or_size.isdigit():
                return self._error(code_or_size, request_id)
            packed = code_or_size
        elif any(key.startswith(("PolicyArns.", "Tags.")) for key in params):
            packed = "1"
        return role, duration, packed

    def _assume_role(
        self, config: StandInConfig, params: Mapping[str, str], region: str, request_id: str
    ) -> _Reply:
        checked = self._checked_input(config, params, request_id)
        if isinstance(checked, _Reply):
            return checked
        role, duration, packed = checked
        role_arn = params["RoleArn"]
        behaviour = role.behaviour
        error = _ROLE_ERRORS.get(behaviour)
        if error == "AccessDenied":
            return self._error(error, request_id, _access_denied(config, role_arn))
        if error is not None:
            return self._error(error, request_id)
        if behaviour in {"reset", "garbage"}:
            return self._fault(behaviour, request_id)
        if behaviour == "regiondisabled" and not (
            region in config.enabled_regions or "*" in config.enabled_regions
        ):
            return self._error("RegionDisabledException", request_id, account=role.account)
        if behaviour == "flaky":
            calls = self._flaky_calls.get(role_arn, 0) + 1
            self._flaky_calls[role_arn] = calls
            failures = role.flaky_failures
            if calls <= (config.flaky_failures if failures is None else failures):
                return self._forced_error(config, config.flaky_error, params, request_id)

        external_id = params.get("ExternalId")
        if behaviour != "noext":
            expected = config.expected_external_ids.get(role_arn)
            if external_id is None or (expected is not None and external_id != expected):
                return self._error("AccessDenied", request_id, _access_denied(config, role_arn))

        reply = self._success(
            "AssumeRole", self._assume_role_result(role, params, duration, packed), request_id
        )
        if behaviour == "slow":
            self.stats.slow += 1
            reply.delay = config.slow_seconds
        return reply

    def _assume_role_result(
        self, role: _Role, params: Mapping[str, str], duration: int, packed: str | None
    ) -> str:
        session = params["RoleSessionName"]
        account = role.account
        if role.behaviour == "otheracct":
            account = f"{(int(account) + 1) % 10**12:012d}"
        bits = self._rng.getrandbits
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + duration))
        source = params.get("SourceIdentity")
        return (
            (f"    <SourceIdentity>{source}</SourceIdentity>\n" if source else "")
            + "    <AssumedRoleUser>\n"
            f"      <AssumedRoleId>{role.role_id}:{session}</AssumedRoleId>\n"
            f"      <Arn>arn:{role.partition}:sts::{account}:assumed-role/{role.name}/{session}"
            "</Arn>\n    </AssumedRoleUser>\n    <Credentials>\n"
            f"      <AccessKeyId>{self._issued_key(role, params.get('Policy'))}</AccessKeyId>\n"
            f"      <SecretAccessKey>FAKEstandin{bits(116):029x}</SecretAccessKey>\n"
            f"      <SessionToken>FAKE//sts-standin//session-token//{bits(256):064x}"
            "</SessionToken>\n"
            f"      <Expiration>{expiration}</Expiration>\n    </Credentials>\n"
            + (f"    <PackedPolicySize>{packed}</PackedPolicySize>\n" if packed else "")
        )

    def _packed_policy(self, policy: str) -> str:
        """PackedPolicySize (a percentage, as digits) or the error code; cached by policy text.

        AWS packs (compresses) the policy; the percentage here is an approximation from the
        compact JSON length, good enough for a client that only reads it.
        """
        known = self._policies.get(policy)
        if known is not None:
            return known
        try:
            document = json.loads(policy)
        except ValueError:
            result = "MalformedPolicyDocument"
        else:
            if isinstance(document, dict):
                compact = json.dumps(document, separators=(",", ":"))
                size = max(1, math.ceil(len(compact) * 100 / 2048))
                result = str(size) if size <= 100 else "PackedPolicyTooLarge"
            else:
                result = "MalformedPolicyDocument"
        if len(self._policies) >= 1024:
            self._policies.clear()
        self._policies[policy] = result
        return result


# "%3A" -> ":" for every ASCII byte, in both hex cases.
_ASCII_ESCAPES: Final[Mapping[str, str]] = {
    **{f"{code:02X}": chr(code) for code in range(128)},
    **{f"{code:02x}": chr(code) for code in range(128)},
}


@functools.lru_cache(maxsize=65536)
def _unquote(value: str) -> str:
    """`unquote_plus`, fast for the usual all-ASCII escapes (its own decoder is pure Python)."""
    parts = value.replace("+", " ").split("%")
    out = [parts[0]]
    for part in parts[1:]:
        char = _ASCII_ESCAPES.get(part[:2])
        if char is None:  # a UTF-8 sequence or a stray "%": the exact, slower decoder
            return unquote_plus(value)
        out.append(char)
        out.append(part[2:])
    return "".join(out)


def _parse_form(text: str) -> dict[str, str]:
    """A form-encoded body as a dict (last value wins, like ``dict(parse_qsl(...))``).

    parse_qsl was half of a request's CPU. Most keys and many values need no unquoting; the
    ones that do (RoleArn, Policy) repeat across requests, so their unquoting is cached.
    """
    out: dict[str, str] = {}
    for pair in text.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        if "%" in key or "+" in key:
            key = _unquote(key)
        if "%" in value or "+" in value:
            value = _unquote(value)
        out[key] = value
    return out


def _probe_permission(request: _Request, service: str) -> str:
    """The IAM action a probe call asks for (``service:Action``; S3 knows only ListBuckets)."""
    if request.amz_target:
        return f"{service}:{request.amz_target.rpartition('.')[2]}"
    if service == "s3":
        path = urlsplit(request.target).path
        return (
            "s3:ListAllMyBuckets"
            if request.method == "GET" and path in ("", "/")
            else (f"s3:{request.method}{path}")
        )
    if request.method == "POST":
        text = request.body.decode("utf-8", "replace")
    else:
        text = request.target.partition("?")[2]
    return f"{service}:{_parse_form(text).get('Action', 'Unknown')}"


def _credential_scope(authorization: str) -> str:
    """`AKID/date/region/sts/aws4_request` from a SigV4 Authorization header, or ''."""
    start = authorization.find("Credential=")
    if start < 0:
        return ""
    start += len("Credential=")
    end = authorization.find(",", start)
    return (authorization[start:] if end < 0 else authorization[start:end]).strip()


def _access_denied(config: StandInConfig, role_arn: str) -> str:
    return (
        f"User: {config.platform_arn} is not authorized to perform: sts:AssumeRole "
        f"on resource: {role_arn}"
    )


def _unique_id(prefix: str, seed: str) -> str:
    """A stable IAM-style unique id (AROA/AIDA + 17 characters) for a principal ARN."""
    return prefix + hashlib.blake2b(seed.encode(), digest_size=9).hexdigest()[:17].upper()


def _length_problem(field: str, value: str, low: int, high: int) -> str | None:
    shown = _escape(value[:64])
    if len(value) < low:
        return (
            f"Value '{shown}' at '{field}' failed to satisfy constraint: "
            f"Member must have length greater than or equal to {low}"
        )
    if len(value) > high:
        return (
            f"Value '{shown}' at '{field}' failed to satisfy constraint: "
            f"Member must have length less than or equal to {high}"
        )
    return None


def _validate_assume_role(params: Mapping[str, str]) -> list[str]:
    """AWS's own checks of AssumeRole input, worded as AWS words them."""
    problems: list[str] = []
    checks: tuple[tuple[str, str, int, int, re.Pattern[str] | None, bool], ...] = (
        ("RoleArn", "roleArn", 20, 2048, None, True),
        ("RoleSessionName", "roleSessionName", 2, 64, _SESSION_NAME_RE, True),
        ("ExternalId", "externalId", 2, 1224, _EXTERNAL_ID_RE, False),
        ("Policy", "policy", 1, 2048, None, False),
        ("SourceIdentity", "sourceIdentity", 2, 64, _SOURCE_IDENTITY_RE, False),
    )
    for param, field, low, high, pattern, required in checks:
        value = params.get(param)
        if value is None:
            if required:
                problems.append(
                    f"Value null at '{field}' failed to satisfy constraint: Member must not be null"
                )
            continue
        problem = _length_problem(field, value, low, high)
        if problem is None and pattern is not None and pattern.fullmatch(value) is None:
            problem = (
                f"Value '{_escape(value[:64])}' at '{field}' failed to satisfy constraint: "
                f"Member must satisfy regular expression pattern: {pattern.pattern}"
            )
        if problem is not None:
            problems.append(problem)
    duration = params.get("DurationSeconds")
    if duration is not None:
        number = int(duration) if duration.isdigit() else -1
        if not 900 <= number <= 43200:
            bound = (
                "greater than or equal to 900" if number < 900 else "less than or equal to 43200"
            )
            problems.append(
                f"Value '{_escape(duration[:20])}' at 'durationSeconds' failed to satisfy "
                f"constraint: Member must have value {bound}"
            )
    return problems


# --------------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio protocols (cheaper than streams: no coroutine per request).
# --------------------------------------------------------------------------------------------


def _header(head: str, lowered: str, name: str) -> str | None:
    """The value of header `name` (lower case) in a request head, or None."""
    start = lowered.find(f"\r\n{name}:")
    if start < 0:
        return None
    start += len(name) + 3
    end = head.find("\r\n", start)
    return (head[start:] if end < 0 else head[start:end]).strip()


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection. Requests are answered strictly in order (HTTP pipelining)."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # A parsed head whose body is still arriving: method, target, Authorization, close,
        # where the body starts in the buffer, its length, and X-Amz-Target.
        self._head: tuple[str, str, str, bool, int, int, str] | None = None
        self._continue_sent = False
        self._busy = False  # an answer is pending; later requests wait in the buffer
        self._processing = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._core.connections.add(self)
        self._core.stats.connections_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._core.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Close from the server side (shutdown)."""
        if self._transport is not None and not self._closed:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _MAX_HEAD + _MAX_BODY:
            self._abort()
        elif not self._busy and not self._processing:
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while not self._busy and not self._closed and self._buffer:
                request = self._parse()
                if request is None:
                    return
                self._busy = True
                try:
                    reply = self._core.handle(request)
                except Exception as error:  # noqa: BLE001 - a stand-in bug must not hang clients
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "sts stand-in failed to answer", "exception": error}
                    )
                    reply = self._core.plain(500, f"sts stand-in bug: {error!r}")
                self._dispatch(reply)
        finally:
            self._processing = False

    def _parse(self) -> _Request | None:
        """The next complete request from the buffer, or None (incomplete, or answered 4xx)."""
        buf = self._buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._reject(431, "request header too large")
                return None
            head = self._parse_head(buf[:end].decode("latin-1"), end + 4)
            if head is None:
                return None
            self._head = head
        method, target, authorization, close, body_start, length, amz_target = self._head
        if len(buf) < body_start + length:
            if not self._continue_sent and self._transport is not None:
                self._continue_sent = True  # harmless if the client did not wait for it
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buf[body_start : body_start + length])
        del buf[: body_start + length]
        self._head = None
        self._continue_sent = False
        return _Request(method, target, authorization, body, close, amz_target)

    def _parse_head(
        self, head: str, body_start: int
    ) -> tuple[str, str, str, bool, int, int, str] | None:
        line_end = head.find("\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._reject(400, "malformed request line")
            return None
        method, target, version = parts
        # Only five headers matter. Finding them in a lower-cased copy (same length: latin-1)
        # costs a third of splitting and lower-casing every header line.
        lowered = head.lower()
        length_text = _header(head, lowered, "content-length") or "0"
        if not length_text.isdigit():
            self._reject(400, "bad Content-Length")
            return None
        if _header(head, lowered, "transfer-encoding") is not None:
            self._reject(501, "chunked request bodies are not supported")
            return None
        length = int(length_text)
        option = (_header(head, lowered, "connection") or "").lower()
        close = option == "close" or (version != "HTTP/1.1" and option != "keep-alive")
        authorization = _header(head, lowered, "authorization") or ""
        expect = (_header(head, lowered, "expect") or "").lower() == "100-continue"
        if length > _MAX_BODY:
            self._reject(413, "request body too large")
            return None
        self._continue_sent = not expect
        amz_target = _header(head, lowered, "x-amz-target") or ""
        return method, target, authorization, close, body_start, length, amz_target

    def _reject(self, status: int, text: str) -> None:
        self._busy = True
        self._buffer.clear()
        self._dispatch(self._core.plain(status, text))

    def _dispatch(self, reply: _Reply) -> None:
        if reply.delay > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(reply.delay, self._deliver, reply)
        else:
            self._deliver(reply)

    def _deliver(self, reply: _Reply) -> None:
        self._timer = None
        if self._closed or self._transport is None:
            return
        if reply.reset:
            self._abort()
            return
        self._transport.write(reply.data)
        if reply.close:
            self._closed = True
            self._transport.close()
            return
        self._busy = False
        if not self._processing and self._buffer:
            self._process()

    def _abort(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
        self._closed = True
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()


async def serve(
    config: StandInConfig,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve on the running loop until `stop` is set; `on_ready(port)` once listening.

    For embedding in an existing asyncio program; `StsStandIn` and `main` are built on it.
    """
    await _serve(_Core(config), stop, host=host, port=port, on_ready=on_ready)


async def _serve(
    core: _Core,
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    on_ready: Callable[[int], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpConnection(core), host, port)
    try:
        if on_ready is not None:
            on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        for connection in list(core.connections):
            connection.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop goes


# --------------------------------------------------------------------------------------------
# In-process use: the loop in a background thread.
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class StsStandIn:
    """The stand-in on a background thread of this process: ``with StsStandIn() as sts: ...``.

    Knobs are either a ``StandInConfig`` or keyword arguments with the same names, checked at
    run time (``StsStandIn(median_ms=0, rate_limit=100)``).
    """

    def __init__(
        self,
        config: StandInConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **knobs: object,
    ) -> None:
        base = config if config is not None else StandInConfig()
        self._core = _Core(base.with_changes(knobs) if knobs else base)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StsStandIn:
        """Listen, on a daemon thread; return once connections are accepted (or raise)."""
        if self._thread is not None:
            raise RuntimeError("the stand-in is already running")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="sts-standin", daemon=True
        )
        self._thread.start()
        try:
            self._port = ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        return self

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(
                self._core,
                self._stop,
                host=self._host,
                port=self._requested_port,
                on_ready=ready.set_result,
            )

        try:
            asyncio.run(main())
        except BaseException as error:
            if ready.done():
                raise  # after start-up: let threading's excepthook report it
            ready.set_exception(error)  # during start-up: start() re-raises it

    def stop(self) -> None:
        """Close every connection (pending answers are dropped) and join the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        self._thread = self._loop = self._stop = None
        self._port = None

    def __enter__(self) -> StsStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the stand-in is not running; call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """What to give boto3 as ``endpoint_url`` (or ``AWS_ENDPOINT_URL_STS``)."""
        return f"http://{self._host}:{self.port}"

    # -- knobs and statistics (thread-safe: they run on the loop's thread) -----------------------

    def _on_loop(self, function: Callable[[], _T]) -> _T:
        """Run `function` on the loop thread (state is only touched there) and return its result."""
        loop = self._loop
        if loop is None or self._thread is None or threading.current_thread() is self._thread:
            return function()
        result: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                result.set_result(function())
            except Exception as error:  # noqa: BLE001 - re-raised in the calling thread
                result.set_exception(error)

        loop.call_soon_threadsafe(call)
        return result.result(timeout=10)

    @property
    def config(self) -> StandInConfig:
        return self._core.config

    def configure(self, **changes: object) -> StandInConfig:
        """Change some knobs (same names and JSON types as ``POST /_standin/config``)."""
        return self._on_loop(lambda: self._core.change_config(changes))

    def replace_config(self, config: StandInConfig) -> StandInConfig:
        """Replace every knob at once (e.g. back to a test's baseline)."""
        return self._on_loop(lambda: self._core.replace_config(config))

    def stats(self, *, roles: bool = True) -> dict[str, object]:
        """A snapshot of the counters, as ``GET /_standin/stats`` answers them."""
        return self._on_loop(lambda: self._core.snapshot(roles=roles))

    def reset(self) -> None:
        """Zero the counters and the ``flaky`` roles' call counts."""
        self._on_loop(self._core.reset)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `python -m sandbox.standin` arguments; defaults are StandInConfig's."""
    d = StandInConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.standin",
        description=(
            "A fast STS stand-in speaking AWS's real wire format. Prints its URL on one line "
            "when ready; exits on SIGINT/SIGTERM. Role behaviour follows the role name prefix "
            "(ok, noext, otheracct, deny, throttle, error500, error503, slow, reset, garbage, "
            "regiondisabled, expiredtoken, invalidtoken, badsignature, flakyN, noperms, noec2, "
            "probeerror, bigquota); the four permission-probe calls (IAM, EC2, S3, CloudTrail) are "
            "answered too; see the module docstring. Knobs can be changed later with "
            "POST /_standin/config."
        ),
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    add("--port", type=int, default=0, help="port to listen on (default: a free one)")
    add("--seed", type=int, help="seed of latency, faults and fake credentials")
    add("--median-ms", type=float, help=f"median latency, 0 for none (default {d.median_ms})")
    add("--latency-sigma", type=float, help=f"log-normal shape (default {d.latency_sigma})")
    add("--slow-seconds", type=float, help=f"delay of 'slow' roles (default {d.slow_seconds})")
    add("--rate-limit", type=float, help="global requests/s above which Throttling is answered")
    add("--rate-burst", type=float, help="token bucket size (default: one second of rate)")
    add("--platform-arn", help=f"the platform's identity (default {d.platform_arn})")
    add(
        "--platform-credentials-invalid",
        action="store_true",
        help="answer InvalidClientTokenId to every request",
    )
    add(
        "--accept-access-key",
        action="append",
        metavar="AKID",
        help="accept only these access key ids (repeatable; default: any)",
    )
    add(
        "--enabled-region",
        action="append",
        metavar="REGION",
        help="regions where 'regiondisabled' roles succeed (repeatable; '*' for all; "
        "default us-east-1)",
    )
    add(
        "--flaky-failures", type=int, help=f"failures of 'flaky' roles (default {d.flaky_failures})"
    )
    add("--flaky-error", help=f"error code of 'flaky' failures (default {d.flaky_error})")
    add(
        "--max-session-seconds",
        type=int,
        help=f"every role's MaxSessionDuration (default {d.max_session_seconds})",
    )
    add("--force-error", help="answer this code (or reset/garbage/slow) to every request")
    add("--force-ratio", type=float, help="fraction of requests that get --force-error (1.0)")
    add("--force-seconds", type=float, help="how long --force-error lasts (default: forever)")
    return parser


def _config_from_args(args: argparse.Namespace) -> StandInConfig:
    changes: dict[str, object] = {}
    for name in _FIELD_KINDS:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.platform_credentials_invalid:
        changes["platform_credentials_valid"] = False
    if args.accept_access_key:
        changes["accepted_access_keys"] = args.accept_access_key
    if args.enabled_region:
        changes["enabled_regions"] = args.enabled_region
    return StandInConfig().with_changes(changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in as a process until SIGINT or SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    def ready(port: int) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        sys.stdout.write(f"http://{host}:{port}\n")
        sys.stdout.flush()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop, host=args.host, port=args.port, on_ready=ready)

    try:
        asyncio.run(run())
    except OSError as error:
        sys.stderr.write(f"sts stand-in: cannot listen on {args.host}:{args.port}: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
