"""The authorization layer in front of moto (`TrustPolicyMiddleware`): trust policies, external
IDs, session durations and policies, the platform's credentials, and the control endpoints.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from moto.core.utils import utcnow
from moto.iam.models import iam_backends
from moto.sts.models import sts_backends
from werkzeug.wrappers import Response

from sandbox.moto_sts.names import (
    _MOTO_ACCOUNT_ENVIRON,
    ADMIN_ACCESS_KEY_ID,
    CONTROL_PREFIX,
    PLATFORM_ACCESS_KEY_ID,
    PLATFORM_PRINCIPAL_ARN,
)
from sandbox.moto_sts.policy import (
    Caller,
    TrustDecision,
    evaluate_permission,
    evaluate_trust_policy,
)
from sandbox.moto_sts.wire import (
    _caller_identity,
    _duration_error,
    _json_body,
    _json_response,
    _query_parameters,
    _request_action,
    _service_error,
    _signature_scope,
    _sts_error,
    _unauthenticated,
)

# The name the module had before it became a package: log lines keep their logger's name.
logger = logging.getLogger("sandbox.moto_sts")

_INVALID_KEY_MESSAGE = "The security token included in the request is invalid."

_ROLE_ARN_RE = re.compile(r"^arn:([a-z-]+):iam::(\d{12}):role/(?:[\x21-\x7e]*/)?([\w+=,.@-]+)$")
_USER_ARN_RE = re.compile(r"^arn:([a-z-]+):iam::(\d{12}):user/(?:[\x21-\x7e]*/)?[\w+=,.@-]+$")


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
