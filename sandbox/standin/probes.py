"""The permission probes' four calls (IAM, EC2, S3, CloudTrail), answered in each service's own
wire format to credentials the stand-in issued (the package docstring says how).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from sandbox.standin.base import _CoreBase, _Reply, _Request, _Role
from sandbox.standin.behaviours import draw_latency_seconds
from sandbox.standin.wire import _escape, _parse_form

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


class _ProbeAnswers(_CoreBase):
    """The permission probes' answers, and the access key ids that carry what they may do."""

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
