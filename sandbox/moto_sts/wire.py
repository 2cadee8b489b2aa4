"""Requests and responses on the wire: the SigV4 scope and Query parameters of a request, and
answers in STS's and the other services' own formats.
"""

from __future__ import annotations

import html
import io
import json
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any
from wsgiref.types import WSGIEnvironment

import botocore.exceptions
from werkzeug.wrappers import Response

from sandbox.moto_sts.admin import _botocore_session
from sandbox.moto_sts.policy import Caller

_STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
_DEFAULT_SESSION_SECONDS = 3600

_CREDENTIAL_RE = re.compile(r"Credential=([^/\s,]+)/[^/\s,]*/([^/\s,]*)/([^/\s,]*)/aws4_request")
_QUERY_CREDENTIAL_RE = re.compile(r"^([^/]+)/[^/]*/([^/]*)/([^/]*)/aws4_request$")


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
