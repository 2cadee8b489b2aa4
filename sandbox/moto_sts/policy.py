"""IAM policy evaluation as the sandbox needs it: a role's trust policy against an AssumeRole
call, and identity and session policies against a service call.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.moto_sts.names import _ACCOUNT_ID_RE

_ASSUME_ROLE_ACTION = "sts:AssumeRole"
_ROOT_ARN_RE = re.compile(r"^arn:[a-z-]+:iam::(\d{12}):root$")


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
