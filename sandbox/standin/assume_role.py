"""AssumeRole: input validated as STS does, the role's behaviour (by its name), the issued
credentials and the packed policy size.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Final

from sandbox.standin.base import _access_denied, _Reply, _Role
from sandbox.standin.behaviours import _ROLE_ERRORS, role_behaviour
from sandbox.standin.config import StandInConfig
from sandbox.standin.probes import _ProbeAnswers
from sandbox.standin.wire import (
    _EXTERNAL_ID_RE,
    _ROLE_ARN_RE,
    _SESSION_NAME_RE,
    _SOURCE_IDENTITY_RE,
    _escape,
    _unique_id,
)

_ROLE_CACHE_LIMIT: Final = 200_000


class _AssumeRoleAnswers(_ProbeAnswers):
    """AssumeRole: the input checks, the role's behaviour and the credentials it issues."""

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
