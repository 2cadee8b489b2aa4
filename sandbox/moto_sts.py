"""A sandbox STS: moto's server behind a layer that enforces IAM role trust policies as AWS does.

moto answers every ``AssumeRole`` with credentials, whatever the role's trust policy says and
whatever external ID is sent, so on its own it can only show the happy path. This module wraps
moto's WSGI application (the one ``moto.server.ThreadedMotoServer`` serves) in a middleware that,
for STS requests:

* accepts only the platform's configured access key ids (plus credentials moto itself issued)
  and otherwise answers AWS's real ``InvalidClientTokenId``; the platform's credentials can be
  revoked and restored at run time, from Python or over HTTP, to show the platform-fault path;
* evaluates the target role's trust policy (stored in moto's IAM backend for the role's account)
  against the caller and the request's ``ExternalId``, and answers AWS's real ``AccessDenied``
  when it does not allow the call (missing role, untrusted principal, wrong or missing external
  ID, explicit deny) — the same answer for all of them, as AWS gives;
* refuses a ``DurationSeconds`` beyond the role's ``MaxSessionDuration`` (or beyond an hour for
  role chaining) with AWS's ``ValidationError``, which moto does not check either;
* answers ``GetCallerIdentity`` for the platform principal itself, because moto would name a
  made-up ``user/moto`` in its default account;
* authorizes every request to another service made with an assumed role's credentials, as IAM
  does: the role's policies (inline and attached) must allow the action, the session policy
  passed to AssumeRole (if any) must allow it too, and an explicit deny in either wins. A refusal
  is the service's own AccessDenied in its own wire format (see `evaluate_permission`), so the
  worker's permission probes meet what AWS would answer. A probe fault (say, EC2 answering 503)
  can be switched on per service, from Python or over HTTP.

Customer roles are created through the real IAM API over HTTP with a dedicated admin access key
that the layer passes through to moto untouched; the admin client names the customer's account in
moto's ``x-moto-account-id`` header, which is how moto 5 serves several accounts from one server.
The admin key is refused by STS, so a worker misconfigured with it fails loudly instead of seeing
every role as trusted.

moto keeps its state in module-level dictionaries, so every sandbox in one process shares the same
roles; tests use distinct account ids or role names rather than resetting.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import hashlib
import html
import io
import json
import logging
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import boto3
import botocore.exceptions
import botocore.session
from moto.core.utils import utcnow
from moto.iam.models import iam_backends
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.sts.models import sts_backends
from werkzeug.serving import BaseWSGIServer, get_sockaddr, make_server, select_address_family
from werkzeug.wrappers import Response

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient

__all__ = [
    "ADMIN_ACCESS_KEY_ID",
    "ADMIN_SECRET_ACCESS_KEY",
    "CONTROL_PREFIX",
    "DEFAULT_REGION",
    "PLATFORM_ACCESS_KEY_ID",
    "PLATFORM_ACCOUNT_ID",
    "PLATFORM_PRINCIPAL_ARN",
    "PLATFORM_SECRET_ACCESS_KEY",
    "SCANNER_ACTIONS",
    "Caller",
    "SandboxSts",
    "TrustDecision",
    "TrustPolicyMiddleware",
    "create_customer_role",
    "delete_customer_role",
    "evaluate_permission",
    "evaluate_trust_policy",
    "get_platform_credentials_valid",
    "iam_client",
    "permissions_policy",
    "security_audit_document",
    "set_platform_credentials_valid",
    "set_probe_fault",
    "sts_calls",
    "trust_policy",
]

logger = logging.getLogger(__name__)

#: The platform's AWS account: the account the worker's own credentials belong to.
PLATFORM_ACCOUNT_ID = "111122223333"
#: The principal the worker calls STS as; customer roles must trust it (or its account).
PLATFORM_PRINCIPAL_ARN = f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:user/verifier"
#: The access key id the worker signs with. Obviously fake; the sandbox never checks signatures.
PLATFORM_ACCESS_KEY_ID = "AKIASANDBOXPLATFORM0"
#: Any secret is accepted; this one is only a convenient default for clients.
PLATFORM_SECRET_ACCESS_KEY = "sandbox-platform-secret"  # noqa: S105 - fake, never checked
#: The key that administers customer accounts (IAM) through moto, bypassing the trust layer.
ADMIN_ACCESS_KEY_ID = "AKIASANDBOXADMIN0000"
ADMIN_SECRET_ACCESS_KEY = "sandbox-admin-secret"  # noqa: S105 - fake, never checked
#: The region clients sign for; moto serves IAM and STS from any.
DEFAULT_REGION = "us-east-1"
#: What the worker's default permission probes need (worker/permissions.py; a test keeps the two
#: equal): the policy a well-configured demo or test role carries.
SCANNER_ACTIONS = (
    "iam:GetAccountSummary",
    "ec2:DescribeRegions",
    "s3:ListAllMyBuckets",
    "cloudtrail:DescribeTrails",
)
#: Path prefix of the sandbox's own HTTP control endpoints (never forwarded to moto).
CONTROL_PREFIX = "/_sandbox/"

_STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
_MOTO_ACCOUNT_HEADER = "x-moto-account-id"
_MOTO_ACCOUNT_ENVIRON = "HTTP_X_MOTO_ACCOUNT_ID"
_ASSUME_ROLE_ACTION = "sts:AssumeRole"
_DEFAULT_SESSION_SECONDS = 3600
_INVALID_KEY_MESSAGE = "The security token included in the request is invalid."

_CREDENTIAL_RE = re.compile(r"Credential=([^/\s,]+)/[^/\s,]*/([^/\s,]*)/([^/\s,]*)/aws4_request")
_QUERY_CREDENTIAL_RE = re.compile(r"^([^/]+)/[^/]*/([^/]*)/([^/]*)/aws4_request$")
_ROLE_ARN_RE = re.compile(r"^arn:([a-z-]+):iam::(\d{12}):role/(?:[\x21-\x7e]*/)?([\w+=,.@-]+)$")
_USER_ARN_RE = re.compile(r"^arn:([a-z-]+):iam::(\d{12}):user/(?:[\x21-\x7e]*/)?[\w+=,.@-]+$")
_ROOT_ARN_RE = re.compile(r"^arn:[a-z-]+:iam::(\d{12}):root$")
_ACCOUNT_ID_RE = re.compile(r"^\d{12}$")


@dataclass(frozen=True)
class Caller:
    """Who signed an STS request, as far as trust-policy evaluation needs to know.

    `role_arn` is set for an assumed-role session: a trust policy that names the role's IAM ARN
    trusts every session of that role, so matching needs both ARNs.
    """

    arn: str
    account_id: str
    role_arn: str | None = None
    is_platform: bool = False
    # The session policy the assumed-role session was created with (None: none was passed).
    session_policy: str | None = None

    @property
    def user_id(self) -> str:
        """A stable IAM-style unique id (``AIDA...``) for the principal, derived from its ARN."""
        digest = base64.b32encode(hashlib.sha256(self.arn.encode()).digest()).decode()
        return f"AIDA{digest[:17]}"


class TrustDecision(enum.Enum):
    """The outcome of evaluating a role's trust policy for one AssumeRole request."""

    ALLOWED = "allowed"
    IMPLICITLY_DENIED = "implicitly_denied"
    EXPLICITLY_DENIED = "explicitly_denied"


# --------------------------------------------------------------------------- trust policies


def trust_policy(trusted_principal_arn: str, external_id: str | None) -> dict[str, Any]:
    """The trust policy a customer is told to attach: trust the principal, require the ID.

    Without `external_id` the policy has no ``sts:ExternalId`` condition, which is the
    confused-deputy mistake the worker must detect and refuse.
    """
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": trusted_principal_arn},
        "Action": _ASSUME_ROLE_ACTION,
    }
    if external_id is not None:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
    return {"Version": "2012-10-17", "Statement": [statement]}


def evaluate_trust_policy(
    document: str | Mapping[str, Any],
    *,
    caller: Caller,
    external_id: str | None,
    session_name: str | None = None,
) -> TrustDecision:
    """Decide an ``sts:AssumeRole`` call against a role's trust policy, as IAM does.

    An explicit ``Deny`` that applies wins; otherwise an applying ``Allow`` is needed. A
    document that is not valid JSON trusts nobody. Conditions support the ``String*`` operators
    (with ``IfExists``) and ``Null`` on ``sts:ExternalId``, ``sts:RoleSessionName``,
    ``aws:PrincipalArn``, ``aws:PrincipalAccount`` and ``aws:PrincipalType``; a key the request
    does not carry is absent, exactly as in AWS, so a request without ``ExternalId`` never
    satisfies ``StringEquals`` on it. A statement this evaluator cannot understand (an unknown
    operator) is treated as not allowing and as denying, so the sandbox errs towards refusing.
    """
    if isinstance(document, str):
        try:
            parsed: Any = json.loads(document)
        except ValueError:
            return TrustDecision.IMPLICITLY_DENIED
    else:
        parsed = document
    if not isinstance(parsed, Mapping):
        return TrustDecision.IMPLICITLY_DENIED
    statements = parsed.get("Statement", [])
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list):
        return TrustDecision.IMPLICITLY_DENIED

    context = _request_context(caller, external_id, session_name)
    allowed = False
    for statement in statements:
        if not isinstance(statement, Mapping):
            continue
        effect = statement.get("Effect")
        applies = _statement_applies(statement, caller, context)
        if effect == "Deny" and applies is not False:
            return TrustDecision.EXPLICITLY_DENIED
        if effect == "Allow" and applies is True:
            allowed = True
    return TrustDecision.ALLOWED if allowed else TrustDecision.IMPLICITLY_DENIED


def _request_context(
    caller: Caller, external_id: str | None, session_name: str | None
) -> dict[str, str]:
    """The condition keys an AssumeRole request carries, lower-cased (keys are case-insensitive)."""
    context = {
        "aws:principalarn": caller.role_arn or caller.arn,
        "aws:principalaccount": caller.account_id,
        "aws:principaltype": "AssumedRole" if caller.role_arn else "User",
    }
    if external_id is not None:
        context["sts:externalid"] = external_id
    if session_name is not None:
        context["sts:rolesessionname"] = session_name
    return context


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_string(value: Any) -> str:
    """Policy values may be JSON booleans or numbers; IAM compares their string forms."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _glob(pattern: str, value: str, *, ignore_case: bool) -> bool:
    """IAM wildcard matching: ``*`` is any run of characters, ``?`` is one character."""
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.fullmatch(regex, value, flags) is not None


def _statement_applies(
    statement: Mapping[str, Any], caller: Caller, context: Mapping[str, str]
) -> bool | None:
    """Whether a statement covers this request; None when it cannot be evaluated."""
    if "Action" in statement:
        action_match = _matches_action(statement["Action"])
    elif "NotAction" in statement:
        action_match = not _matches_action(statement["NotAction"])
    else:
        return False
    if "Principal" in statement:
        principal_match = _matches_principal(statement["Principal"], caller)
    elif "NotPrincipal" in statement:
        principal_match = not _matches_principal(statement["NotPrincipal"], caller)
    else:
        return False
    if not (action_match and principal_match):
        return False
    return _conditions_hold(statement.get("Condition", {}), context)


def _matches_action(actions: Any) -> bool:
    return any(
        isinstance(action, str) and _glob(action, _ASSUME_ROLE_ACTION, ignore_case=True)
        for action in _as_list(actions)
    )


def _matches_principal(principal: Any, caller: Caller) -> bool:
    """``"*"``, or an ``AWS`` entry naming everyone, the caller's account, or the caller."""
    if principal == "*":
        return True
    if not isinstance(principal, Mapping) or "AWS" not in principal:
        return False
    for entry in _as_list(principal["AWS"]):
        if not isinstance(entry, str):
            continue
        if entry in ("*", caller.arn, caller.role_arn):
            return True
        if _ACCOUNT_ID_RE.match(entry) and entry == caller.account_id:
            return True
        root = _ROOT_ARN_RE.match(entry)
        if root is not None and root.group(1) == caller.account_id:
            return True
    return False


def _conditions_hold(conditions: Any, context: Mapping[str, str]) -> bool | None:
    """All operators and all keys must hold (AND); the values of one key are alternatives (OR)."""
    if not isinstance(conditions, Mapping):
        return None
    for operator, block in conditions.items():
        if not isinstance(block, Mapping):
            return None
        for key, values in block.items():
            outcome = _condition_holds(
                str(operator), context.get(str(key).lower()), _as_list(values)
            )
            if outcome is not True:
                return outcome
    return True


_STRING_OPERATORS: dict[str, tuple[bool, bool, bool]] = {
    # operator: (negated, ignore_case, wildcards)
    "StringEquals": (False, False, False),
    "StringNotEquals": (True, False, False),
    "StringEqualsIgnoreCase": (False, True, False),
    "StringNotEqualsIgnoreCase": (True, True, False),
    "StringLike": (False, False, True),
    "StringNotLike": (True, False, True),
}


def _condition_holds(operator: str, actual: str | None, values: list[Any]) -> bool | None:
    expected = [_condition_string(value) for value in values]
    if operator == "Null":
        return any((value.lower() == "true") == (actual is None) for value in expected)
    base = operator.removesuffix("IfExists")
    if base not in _STRING_OPERATORS:
        return None
    negated, ignore_case, wildcards = _STRING_OPERATORS[base]
    if actual is None:
        # An absent key satisfies only negated operators and ...IfExists ones, as in IAM.
        return negated or operator.endswith("IfExists")
    if wildcards:
        matched = any(_glob(value, actual, ignore_case=ignore_case) for value in expected)
    elif ignore_case:
        matched = any(value.casefold() == actual.casefold() for value in expected)
    else:
        matched = actual in expected
    return not matched if negated else matched


# --------------------------------------------------------------------------- permission policies


def evaluate_permission(documents: Iterable[str | Mapping[str, Any]], action: str) -> TrustDecision:
    """Decide one action against a set of identity policies (or one session policy), as IAM does.

    An applying ``Deny`` wins; otherwise an applying ``Allow`` is needed. Actions match with IAM's
    wildcards, case-insensitively. Resources are not evaluated beyond this: an ``Allow`` applies
    only if its ``Resource`` includes ``"*"`` (the probed actions have no resource), and a
    ``Deny`` applies whatever its resources and conditions say; an ``Allow`` with a condition does
    not apply. Each simplification makes the sandbox refuse more than AWS, never less.
    """
    allowed = False
    for document in documents:
        for statement in _statements(document):
            if "Action" in statement:
                matches = _action_in(statement["Action"], action)
            elif "NotAction" in statement:
                matches = not _action_in(statement["NotAction"], action)
            else:
                continue
            if not matches:
                continue
            effect = statement.get("Effect")
            if effect == "Deny":
                return TrustDecision.EXPLICITLY_DENIED
            if (
                effect == "Allow"
                and "*" in _as_list(statement.get("Resource"))
                and not statement.get("Condition")
            ):
                allowed = True
    return TrustDecision.ALLOWED if allowed else TrustDecision.IMPLICITLY_DENIED


def _statements(document: str | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if isinstance(document, str):
        try:
            document = json.loads(urllib.parse.unquote(document) if "%" in document else document)
        except ValueError:
            return []
    if not isinstance(document, Mapping):
        return []
    statements = document.get("Statement", [])
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list):
        return []
    return [statement for statement in statements if isinstance(statement, Mapping)]


def _action_in(patterns: Any, action: str) -> bool:
    return any(
        isinstance(pattern, str) and _glob(pattern, action, ignore_case=True)
        for pattern in _as_list(patterns)
    )


def _role_policy_documents(role: Any) -> list[str]:
    """A moto role's inline policies and the default versions of its attached managed ones."""
    documents = [str(document) for document in list(role.policies.values())]
    for policy in list(role.managed_policies.values()):
        documents.extend(
            str(version.document)
            for version in list(policy.versions)
            if version.is_default and version.document
        )
    return documents


# --------------------------------------------------------------------------- moto lookups
# BackendDict and its per-account dicts create backends on item access; reading them through
# dict.get keeps a lookup (say, for a mistyped account id) from creating state moto then keeps.
# list(...) snapshots guard against another request thread changing the dicts mid-iteration.


def _moto_iam_backend(account_id: str, partition: str) -> Any:
    account = dict.get(iam_backends, account_id)
    return None if account is None else dict.get(account, partition)


def _find_role(role_arn: str) -> Any:
    """moto's Role for an ARN, or None; the lookup is by exact ARN, path included."""
    match = _ROLE_ARN_RE.match(role_arn)
    if match is None:
        return None
    backend = _moto_iam_backend(match.group(2), match.group(1))
    if backend is None:
        return None
    return next((role for role in list(backend.roles.values()) if role.arn == role_arn), None)


def _moto_caller(access_key_id: str) -> Caller | None:
    """The principal behind credentials moto issued (an assumed-role session or a user's key)."""
    for account_id, account in list(dict.items(iam_backends)):
        for partition, backend in list(dict.items(account)):
            key = backend.access_keys.get(access_key_id)
            if key is None:
                continue
            if key.role_arn:
                sts = dict.get(dict.get(sts_backends, account_id) or {}, partition)
                session = sts.get_assumed_role_from_access_key(access_key_id) if sts else None
                if session is None:
                    return None
                return Caller(
                    arn=session.arn,
                    account_id=account_id,
                    role_arn=key.role_arn,
                    session_policy=session.policy or None,
                )
            user = dict.get(backend.users, key.user_name) if key.user_name else None
            return None if user is None else Caller(arn=user.arn, account_id=account_id)
    return None


# --------------------------------------------------------------------------- request parsing


def _signature_scope(environ: WSGIEnvironment) -> tuple[str | None, str | None]:
    """(access key id, signing service) from a SigV4 Authorization header or presigned query."""
    match = _CREDENTIAL_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if match is not None:
        return match.group(1), match.group(3).lower()
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    for credential in query.get("X-Amz-Credential", []):
        match = _QUERY_CREDENTIAL_RE.match(credential)
        if match is not None:
            return match.group(1), match.group(3).lower()
    return None, None


def _query_parameters(environ: WSGIEnvironment) -> dict[str, str]:
    """The Query-protocol parameters of a request (URL and form body), leaving the body readable.

    moto reads the body after us, so it is put back as a fresh stream.
    """
    params: dict[str, str] = {}
    for key, values in urllib.parse.parse_qs(
        environ.get("QUERY_STRING", ""), keep_blank_values=True
    ).items():
        params[key] = values[0]
    content_type = environ.get("CONTENT_TYPE", "")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > 0:
        body: bytes = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            for key, values in form.items():
                params[key] = values[0]
    return params


# --------------------------------------------------------------------------- responses


def _request_id() -> str:
    return str(uuid.uuid4())


def _xml_response(body: str, status: int, request_id: str) -> Response:
    return Response(
        body,
        status=status,
        content_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )


def _sts_error(status: int, code: str, message: str) -> Response:
    """An error in STS's real wire format (Query protocol, ``ErrorResponse`` envelope)."""
    request_id = _request_id()
    body = (
        f'<ErrorResponse xmlns="{_STS_NAMESPACE}">\n'
        "  <Error>\n"
        "    <Type>Sender</Type>\n"
        f"    <Code>{html.escape(code, quote=False)}</Code>\n"
        f"    <Message>{html.escape(message, quote=False)}</Message>\n"
        "  </Error>\n"
        f"  <RequestId>{request_id}</RequestId>\n"
        "</ErrorResponse>\n"
    )
    return _xml_response(body, status, request_id)


def _caller_identity(caller: Caller) -> Response:
    request_id = _request_id()
    body = (
        f'<GetCallerIdentityResponse xmlns="{_STS_NAMESPACE}">\n'
        "  <GetCallerIdentityResult>\n"
        f"    <Arn>{html.escape(caller.arn, quote=False)}</Arn>\n"
        f"    <UserId>{caller.user_id}</UserId>\n"
        f"    <Account>{caller.account_id}</Account>\n"
        "  </GetCallerIdentityResult>\n"
        "  <ResponseMetadata>\n"
        f"    <RequestId>{request_id}</RequestId>\n"
        "  </ResponseMetadata>\n"
        "</GetCallerIdentityResponse>\n"
    )
    return _xml_response(body, 200, request_id)


def _duration_error(requested: str | None, role: Any, caller: Caller) -> Response | None:
    """AWS's ValidationError for a session longer than the role allows (moto accepts any).

    AWS checks this only once the caller may assume the role, so it comes after the trust
    policy; an unparseable value is left to moto.
    """
    try:
        duration = int(requested) if requested else _DEFAULT_SESSION_SECONDS
    except ValueError:
        return None
    if caller.role_arn is not None and duration > _DEFAULT_SESSION_SECONDS:
        message = (
            "The requested DurationSeconds exceeds the 1 hour session limit "
            "for roles assumed by role chaining."
        )
    elif duration > int(role.max_session_duration or _DEFAULT_SESSION_SECONDS):
        message = "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
    else:
        return None
    return _sts_error(400, "ValidationError", message)


def _json_response(payload: Mapping[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


def _json_body(environ: WSGIEnvironment) -> Any:
    """A control request's JSON body; None when it is missing or not JSON."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        return json.loads(environ["wsgi.input"].read(length) or b"null")
    except ValueError:
        return None


def _request_action(environ: WSGIEnvironment, service: str) -> str:
    """The IAM action a request asks for, as ``service:Action``.

    Query and EC2 protocols name it in ``Action``, JSON ones in ``X-Amz-Target``; of S3's REST
    operations only ListBuckets (``GET /``) is recognised, any other is an action no policy names
    but ``s3:*`` (or ``*``), so the sandbox refuses it unless everything is allowed.
    """
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return f"{service}:{target.rpartition('.')[2]}"
    if service == "s3":
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "GET" and environ.get("PATH_INFO", "/") in ("", "/"):
            return "s3:ListAllMyBuckets"
        return f"s3:{method}{environ.get('PATH_INFO', '/')}"
    action = _query_parameters(environ).get("Action")
    return f"{service}:{action or 'Unknown'}"


def _unauthenticated(service: str | None, message: str) -> Response:
    """A service's own answer to credentials it does not know (or none at all)."""
    try:
        protocol = _botocore_session().get_service_model(service).protocol if service else ""
    except botocore.exceptions.UnknownServiceError:
        protocol = ""  # a signing name botocore does not know: answered like IAM or STS
    if protocol == "ec2":
        return _service_error(
            "ec2",
            401,
            "AuthFailure",
            "AWS was not able to validate the provided access credentials",
        )
    if protocol == "rest-xml":
        return _service_error(
            service or "s3",
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        )
    if protocol in ("json", "rest-json"):
        return _service_error(service or "sts", 400, "UnrecognizedClientException", message)
    return _service_error(service or "sts", 403, "InvalidClientTokenId", message)


def _service_error(service: str, status: int, code: str, message: str) -> Response:
    """An error in `service`'s own wire format; an empty `code` means the service's access-denied
    code (EC2: UnauthorizedOperation, JSON services: AccessDeniedException, others AccessDenied).
    """
    request_id = _request_id()
    text = html.escape(message, quote=False)
    protocol = _botocore_session().get_service_model(service).protocol
    if protocol == "ec2":
        body = (
            f"<Response><Errors><Error><Code>{code or 'UnauthorizedOperation'}</Code>"
            f"<Message>{'' if code else 'You are not authorized to perform this operation. '}"
            f"{text}</Message>"
            f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
        )
        return _xml_response(body, status, request_id)
    if protocol == "rest-xml":
        body = (
            f"<Error><Code>{code or 'AccessDenied'}</Code><Message>{text}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        )
        return _xml_response(body, status, request_id)
    if protocol in ("json", "rest-json"):
        payload = {"__type": code or "AccessDeniedException", "message": message}
        response = _json_response(payload, 400 if status == 403 else status)
        response.headers["x-amzn-RequestId"] = request_id
        response.content_type = "application/x-amz-json-1.1"
        return response
    body = (
        "<ErrorResponse><Error><Type>Sender</Type>"
        f"<Code>{code or 'AccessDenied'}</Code><Message>{text}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return _xml_response(body, status, request_id)


# --------------------------------------------------------------------------- the middleware


class TrustPolicyMiddleware:
    """WSGI middleware in front of moto that makes STS behave like AWS for the platform.

    `platform_principals` maps each access key id the platform may sign with to the IAM user ARN
    it stands for. `propagation_delay` imitates IAM's eventual consistency: a role younger than
    that is not yet visible to STS, so AssumeRole on it is denied as if it did not exist.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        platform_principals: Mapping[str, str] | None = None,
        propagation_delay: float = 0.0,
    ) -> None:
        principals = dict(platform_principals or {PLATFORM_ACCESS_KEY_ID: PLATFORM_PRINCIPAL_ARN})
        callers: dict[str, Caller] = {}
        for key_id, arn in principals.items():
            match = _USER_ARN_RE.match(arn)
            if match is None:
                raise ValueError(f"platform principal {arn!r} is not an IAM user ARN")
            if key_id == ADMIN_ACCESS_KEY_ID:
                raise ValueError("the admin access key id cannot be a platform key")
            callers[key_id] = Caller(arn=arn, account_id=match.group(2), is_platform=True)
        if propagation_delay < 0:
            raise ValueError("propagation_delay must not be negative")
        self._app = app
        self._platform = callers
        self._propagation_delay = timedelta(seconds=propagation_delay)
        self._lock = threading.Lock()
        self._platform_valid = True
        # STS calls by action and, for AssumeRole, by role ARN: what tests count ("no STS call
        # was made for this row"), whatever the answer was.
        self._calls: dict[str, int] = {}
        self._assume_role_calls: dict[str, int] = {}
        self._probe_faults: dict[str, str] = {}

    @property
    def platform_credentials_valid(self) -> bool:
        """Whether STS currently accepts the platform's access keys."""
        with self._lock:
            return self._platform_valid

    def set_platform_credentials_valid(self, valid: bool) -> None:
        """Accept (True) or refuse with ``InvalidClientTokenId`` (False) the platform's keys."""
        with self._lock:
            self._platform_valid = valid

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Route one request: control endpoint, admin pass-through, or enforced STS."""
        if environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX):
            return self._control(environ)(environ, start_response)
        access_key_id, service = _signature_scope(environ)
        if service != "sts":
            if access_key_id != ADMIN_ACCESS_KEY_ID:
                # Only the admin may pick the moto account explicitly; anyone else acts as moto
                # decides from their key, so a client cannot act inside a customer's account.
                environ.pop(_MOTO_ACCOUNT_ENVIRON, None)
                refused = self._authorize(environ, access_key_id, service)
                if refused is not None:
                    return refused(environ, start_response)
            return self._app(environ, start_response)
        environ.pop(_MOTO_ACCOUNT_ENVIRON, None)
        response = self._sts(environ, access_key_id)
        if response is not None:
            return response(environ, start_response)
        return self._app(environ, start_response)

    def set_probe_fault(self, service: str, code: str | None) -> None:
        """Answer every request to `service` made with a role's credentials with `code` (a 503),
        or stop doing so (None)."""
        with self._lock:
            if code is None:
                self._probe_faults.pop(service, None)
            else:
                self._probe_faults[service] = code

    def _authorize(
        self, environ: WSGIEnvironment, access_key_id: str | None, service: str | None
    ) -> Response | None:
        """IAM's answer for a request to a service other than STS: None to let moto serve it.

        Only credentials moto issued (an assumed role's, judged by its policies, or an IAM
        user's) are served. Unsigned requests, the platform's own keys and keys nobody issued
        get the service's authentication error, as AWS would answer: moto alone would serve
        them, so a worker signing its probes with the platform's credentials would pass.
        """
        if access_key_id is None or service is None:
            return _unauthenticated(service, "Request is missing Authentication Token")
        if access_key_id in self._platform:
            # The platform's keys are STS's business only (it has no account in the sandbox).
            return _unauthenticated(service, _INVALID_KEY_MESSAGE)
        caller = _moto_caller(access_key_id)
        if caller is None:
            return _unauthenticated(service, _INVALID_KEY_MESSAGE)
        if caller.role_arn is None:
            return None
        with self._lock:
            fault = self._probe_faults.get(service)
        if fault is not None:
            return _service_error(service, 503, fault, "Service unavailable (sandbox fault)")
        action = _request_action(environ, service)
        role = _find_role(caller.role_arn)
        identity = evaluate_permission(_role_policy_documents(role) if role else [], action)
        session = (
            TrustDecision.ALLOWED
            if caller.session_policy is None
            else evaluate_permission([caller.session_policy], action)
        )
        if identity is TrustDecision.ALLOWED and session is TrustDecision.ALLOWED:
            return None
        if TrustDecision.EXPLICITLY_DENIED in (identity, session):
            why = "with an explicit deny in " + (
                "a session policy"
                if session is TrustDecision.EXPLICITLY_DENIED
                else "an identity-based policy"
            )
        elif identity is not TrustDecision.ALLOWED:
            why = "because no identity-based policy allows the " + action + " action"
        else:
            why = "because no session policy allows the " + action + " action"
        return _service_error(
            service,
            403,
            "",
            f"User: {caller.arn} is not authorized to perform: {action} on resource: * {why}",
        )

    def _caller(self, access_key_id: str | None) -> Caller | None:
        if access_key_id is None:
            return None
        platform = self._platform.get(access_key_id)
        if platform is not None:
            return platform if self.platform_credentials_valid else None
        return _moto_caller(access_key_id)

    def calls(self) -> dict[str, Any]:
        """STS calls received so far: by action, and AssumeRole by role ARN."""
        with self._lock:
            return {"by_action": dict(self._calls), "assume_role": dict(self._assume_role_calls)}

    def _count(self, action: str | None, role_arn: str | None) -> None:
        with self._lock:
            self._calls[action or "?"] = self._calls.get(action or "?", 0) + 1
            if action == "AssumeRole" and role_arn is not None:
                self._assume_role_calls[role_arn] = self._assume_role_calls.get(role_arn, 0) + 1

    def _sts(self, environ: WSGIEnvironment, access_key_id: str | None) -> Response | None:
        """Our own answer to an STS request, or None to let moto answer it."""
        params = _query_parameters(environ)
        action = params.get("Action")
        self._count(action, params.get("RoleArn"))
        caller = self._caller(access_key_id)
        if caller is None:
            return _sts_error(403, "InvalidClientTokenId", _INVALID_KEY_MESSAGE)
        if caller.is_platform:
            # moto's bookkeeping (the visit, the session's home) then sits in the platform account.
            environ[_MOTO_ACCOUNT_ENVIRON] = caller.account_id
            if action == "GetCallerIdentity":
                return _caller_identity(caller)
        if action != "AssumeRole":
            return None
        role_arn = params.get("RoleArn", "")
        role = self._visible_role(role_arn)
        decision = (
            TrustDecision.IMPLICITLY_DENIED
            if role is None
            else evaluate_trust_policy(
                role.assume_role_policy_document,
                caller=caller,
                external_id=params.get("ExternalId"),
                session_name=params.get("RoleSessionName"),
            )
        )
        if decision is not TrustDecision.ALLOWED:
            return _sts_error(
                403,
                "AccessDenied",
                f"User: {caller.arn} is not authorized to perform: sts:AssumeRole "
                f"on resource: {role_arn}",
            )
        return _duration_error(params.get("DurationSeconds"), role, caller)

    def _visible_role(self, role_arn: str) -> Any:
        """The role STS can see: it exists and is older than the propagation delay."""
        role = _find_role(role_arn)
        if role is None:
            return None
        if self._propagation_delay and utcnow() - role.create_date < self._propagation_delay:
            return None
        return role

    def _control(self, environ: WSGIEnvironment) -> Response:
        """The sandbox's own endpoints, so another process (a test, a demo) can steer it."""
        path = environ.get("PATH_INFO", "")[len(CONTROL_PREFIX) :]
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "health" and method == "GET":
            return _json_response({"status": "ok"})
        if path == "calls" and method == "GET":
            return _json_response(self.calls())
        if path == "probe-faults" and method == "POST":
            payload = _json_body(environ)
            if not isinstance(payload, dict) or not all(
                isinstance(key, str) and (value is None or isinstance(value, str))
                for key, value in payload.items()
            ):
                return _json_response({"error": 'expected {"<service>": "<code>" | null}'}, 400)
            for service, code in payload.items():
                self.set_probe_fault(service, code)
            with self._lock:
                return _json_response(dict(self._probe_faults))
        if path != "platform-credentials":
            return _json_response({"error": f"no such sandbox endpoint: {path}"}, 404)
        if method == "POST":
            payload = _json_body(environ)
            if not isinstance(payload, dict) or not isinstance(payload.get("valid"), bool):
                return _json_response({"error": 'expected {"valid": true|false}'}, 400)
            self.set_platform_credentials_valid(payload["valid"])
            logger.info("platform credentials set %s", "valid" if payload["valid"] else "invalid")
        elif method != "GET":
            return _json_response({"error": f"method {method} not allowed"}, 405)
        return _json_response({"valid": self.platform_credentials_valid})


# --------------------------------------------------------------------------- the server


class _RequestHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's per-request access log line."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Drop the access log; errors still go through werkzeug's logger."""


class SandboxSts:
    """moto's server plus the trust-policy layer, served by werkzeug in a background thread.

    Use as a context manager, or call `start()` and `stop()`. Port 0 picks a free port;
    `endpoint_url` tells the one in use. Binding happens in `start()`, so a port in use raises
    `OSError` there rather than disappearing into the server thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        platform_principals: Mapping[str, str] | None = None,
        propagation_delay: float = 0.0,
        verbose: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._verbose = verbose
        self.middleware = TrustPolicyMiddleware(
            DomainDispatcherApplication(create_backend_app),
            platform_principals=platform_principals,
            propagation_delay=propagation_delay,
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self once requests can be answered."""
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        if "MOTO_ACCOUNT_ID" in os.environ:
            # moto would put every request, admin or not, in that one account.
            raise RuntimeError("unset MOTO_ACCOUNT_ID: the sandbox serves several accounts")
        # moto builds an EC2 backend per account on its first EC2 call (a permission probe's
        # DescribeRegions) and by default loads hundreds of sample AMIs into it: about a second
        # of CPU per customer account, enough to time a probe out. Nothing here needs them.
        os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        # Bind here rather than in werkzeug: on a port in use werkzeug prints to stderr and calls
        # sys.exit(1), which a test or an embedding program cannot handle as an OSError.
        family = select_address_family(self._host, self._port)
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(get_sockaddr(self._host, self._port, family))
            listener.listen(128)
            # werkzeug duplicates the descriptor, so ours can be closed once it has its own.
            server = make_server(
                self._host,
                self._port,
                self.middleware,
                threaded=True,
                request_handler=MotoRequestHandler if self._verbose else _RequestHandler,
                fd=listener.fileno(),
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            # A short poll makes stop() (and so test teardown and Ctrl-C) quick.
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-sts-{server.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port being served (the chosen one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the sandbox is not running")
        return int(self._server.port)

    @property
    def endpoint_url(self) -> str:
        """The URL clients use for both STS and IAM, e.g. ``http://127.0.0.1:5000``."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host  # noqa: S104 - compared, not bound
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def revoke_platform_credentials(self) -> None:
        """Make STS answer ``InvalidClientTokenId`` to the platform, as for a deleted key."""
        self.middleware.set_platform_credentials_valid(False)

    def restore_platform_credentials(self) -> None:
        """Accept the platform's credentials again."""
        self.middleware.set_platform_credentials_valid(True)

    def set_probe_fault(self, service: str, code: str | None) -> None:
        """Make `service` answer role credentials with a 503 `code` (None: answer normally)."""
        self.middleware.set_probe_fault(service, code)

    def iam_client_for(self, account_id: str) -> IAMClient:
        """An admin IAM client acting inside `account_id` (see `iam_client`)."""
        return iam_client(self.endpoint_url, account_id)


# --------------------------------------------------------------------------- admin helpers


# botocore sessions are not thread-safe; creating clients under a lock is enough (clients are).
_client_lock = threading.Lock()


@functools.cache
def _botocore_session() -> botocore.session.Session:
    """The botocore session behind every admin client.

    Shared, so service models load once and a client costs milliseconds rather than ~70 ms. It
    reads no AWS profile or config file: an ``AWS_PROFILE`` naming a profile this machine lacks
    would otherwise break the sandbox's own clients, whose settings are all explicit.
    """
    return botocore.session.Session(
        session_vars={
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        }
    )


def iam_client(endpoint_url: str, account_id: str, *, region: str = DEFAULT_REGION) -> IAMClient:
    """An IAM client that administers `account_id` inside the sandbox at `endpoint_url`.

    It signs with the admin key (passed through to moto untouched) and names the account in
    moto's ``x-moto-account-id`` header. Region, endpoint and credentials are explicit and no
    AWS profile or config file is read, so the machine's AWS setup plays no part.
    """
    if not _ACCOUNT_ID_RE.match(account_id):
        raise ValueError(f"an AWS account id is 12 digits, not {account_id!r}")
    with _client_lock:
        client = boto3.session.Session(botocore_session=_botocore_session()).client(
            "iam",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=ADMIN_ACCESS_KEY_ID,
            aws_secret_access_key=ADMIN_SECRET_ACCESS_KEY,
        )

    def name_account(request: Any, **_: Any) -> None:
        request.headers[_MOTO_ACCOUNT_HEADER] = account_id

    client.meta.events.register("before-sign.iam.*", name_account)
    return client


def permissions_policy(actions: Iterable[str]) -> dict[str, Any]:
    """An identity policy allowing `actions` on every resource."""
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": sorted(actions), "Resource": "*"}],
    }


@functools.cache
def security_audit_document() -> str:
    """The AWS managed policy SecurityAudit's document, from the copy moto ships."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data  # noqa: PLC0415 - 2 MB

    return json.dumps(json.loads(aws_managed_policies_data)["SecurityAudit"]["Document"])


def create_customer_role(
    endpoint_url: str,
    account_id: str,
    role_name: str,
    trusted_principal_arn: str,
    external_id: str | None,
    *,
    permissions: Iterable[str] | None = SCANNER_ACTIONS,
    security_audit: bool = False,
) -> str:
    """Create (or re-point) a customer's role trusting a principal; returns the role's ARN.

    The trust policy requires `external_id` through ``sts:ExternalId`` when given and has no
    condition when it is None. An existing role of that name gets the new trust policy, so
    seeding twice is harmless. The role gets an inline policy ``ScannerReadOnly`` allowing
    `permissions` (by default what the worker's permission probes check; None or empty: no such
    policy), and with `security_audit` a copy of the AWS managed policy SecurityAudit, attached
    as a customer-managed policy (moto loads AWS managed policies only for every account at
    once, which costs seconds per account).
    """
    client = iam_client(endpoint_url, account_id)
    document = json.dumps(trust_policy(trusted_principal_arn, external_id))
    try:
        arn = client.create_role(RoleName=role_name, AssumeRolePolicyDocument=document)["Role"][
            "Arn"
        ]
    except client.exceptions.EntityAlreadyExistsException:
        client.update_assume_role_policy(RoleName=role_name, PolicyDocument=document)
        arn = client.get_role(RoleName=role_name)["Role"]["Arn"]
    actions = list(permissions or ())
    if actions:
        client.put_role_policy(
            RoleName=role_name,
            PolicyName="ScannerReadOnly",
            PolicyDocument=json.dumps(permissions_policy(actions)),
        )
    if security_audit:
        policy_arn = f"arn:aws:iam::{account_id}:policy/sandbox/SecurityAudit"
        with contextlib.suppress(client.exceptions.EntityAlreadyExistsException):
            client.create_policy(
                PolicyName="SecurityAudit",
                Path="/sandbox/",
                PolicyDocument=security_audit_document(),
            )
        client.attach_role_policy(RoleName=role_name, PolicyArn=policy_arn)
    return arn


def delete_customer_role(endpoint_url: str, account_id: str, role_name: str) -> bool:
    """Delete a customer's role; returns False when it did not exist."""
    client = iam_client(endpoint_url, account_id)
    try:
        # IAM refuses to delete a role that still has policies, as AWS does.
        for name in client.list_role_policies(RoleName=role_name)["PolicyNames"]:
            client.delete_role_policy(RoleName=role_name, PolicyName=name)
        for attached in client.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
            client.detach_role_policy(RoleName=role_name, PolicyArn=attached["PolicyArn"])
        client.delete_role(RoleName=role_name)
    except client.exceptions.NoSuchEntityException:
        return False
    return True


def _control_request(
    endpoint_url: str, payload: Mapping[str, Any] | None, path: str = "platform-credentials"
) -> dict[str, Any]:
    url = endpoint_url.rstrip("/") + CONTROL_PREFIX + path
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method="GET" if data is None else "POST"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - scheme checked
        result: dict[str, Any] = json.load(response)
    return result


def set_platform_credentials_valid(endpoint_url: str, valid: bool) -> None:
    """Revoke (False) or restore (True) the platform's credentials of a sandbox over HTTP."""
    _control_request(endpoint_url, {"valid": valid})


def sts_calls(endpoint_url: str) -> dict[str, Any]:
    """STS calls a sandbox reached over HTTP has received: ``by_action`` and ``assume_role``
    (AssumeRole by role ARN)."""
    return _control_request(endpoint_url, None, "calls")


def get_platform_credentials_valid(endpoint_url: str) -> bool:
    """Whether a sandbox reached over HTTP currently accepts the platform's credentials."""
    return bool(_control_request(endpoint_url, None)["valid"])


def set_probe_fault(endpoint_url: str, service: str, code: str | None) -> None:
    """Make a sandbox reached over HTTP answer `service` with a 503 `code` (None: stop)."""
    _control_request(endpoint_url, {service: code}, "probe-faults")
