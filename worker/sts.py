"""The AWS side: one verification attempt against STS, returned as a typed outcome.

This is the only module that imports boto3/botocore. It holds one STS client per region per
process (botocore clients are thread-safe; sessions are not), built lazily on first use.

An attempt never raises for anything AWS or the network does: every answer, error or silence is
classified into one of four kinds (docs/design.md; each STS answer in docs/sts-errors.md):

- verified            the role was assumed, names the right account, and enforces the external ID
- customer_must_fix   the customer's role or the row is wrong; the message says what to change
- transient           nobody's fault (throttling, 5xx, timeouts, resets, unparseable answers)
- platform_fault      our own credentials or request are broken; no customer is to blame

Temporary credentials returned by AssumeRole are proof only: they are dropped at once, and the
session policy denies every action, so even a leaked copy could do nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
from botocore.config import Config
from botocore.parsers import ResponseParserError

from models import OutcomeKind
from worker import metrics
from worker.redact import scrub_text
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from mypy_boto3_sts.client import STSClient

__all__ = [
    "Outcome",
    "OutcomeKind",
    "RoleDetails",
    "StsVerifier",
    "check_role_details",
    "get_verifier",
    "session_name_for",
]

# IAM role ARN: partition, 12-digit account, optional path, role name (IAM: 1-64 of [\w+=,.@-]).
# STS's own patterns are ASCII: re.ASCII keeps \w and \d from accepting "é" or "٣", and
# fullmatch() (unlike match(...$)) does not let a trailing newline through.
_ROLE_ARN = re.compile(
    r"arn:(?P<partition>[a-z][a-z0-9-]*):iam::(?P<account>\d{12}):role/"
    r"(?P<path>(?:[\x21-\x7e]{1,511}/)?)(?P<name>[\w+=,.@-]{1,64})",
    re.ASCII,
)
_ASSUMED_ROLE_ARN = re.compile(
    r"arn:[a-z][a-z0-9-]*:sts::(?P<account>\d{12}):assumed-role/(?P<name>[^/]+)/(?P<session>.+)",
    re.ASCII,
)
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)
# Partitions the platform's own credentials can reach: cross-partition AssumeRole does not exist.
SUPPORTED_PARTITIONS = frozenset({"aws"})
SESSION_DURATION_SECONDS = 900  # the minimum STS allows: the credentials are never used
# A session policy intersects with the role's permissions; one that denies everything leaves the
# temporary credentials unable to do anything at all.
DENY_ALL_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}],
    },
    separators=(",", ":"),
)

# STS asking us to slow down (the global rate limiter listens for these).
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)
_TRANSIENT_CODES = THROTTLING_CODES | frozenset(
    {
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "IDPCommunicationError",
    }
)
_PLATFORM_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "UnrecognizedClientException",
        "InvalidAccessKeyId",
        "AuthFailure",
        # Our own session policy or tags were refused: a bug on our side, not the customer's.
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "OptInRequired",
    }
)


# Everything botocore raises besides ClientError. ResponseParserError (a body that is not XML)
# is not a BotoCoreError.
_OTHER_ERRORS = (botocore.exceptions.BotoCoreError, ResponseParserError)


# (step, detail): told each step of an attempt as it happens.
Observer = Callable[[str, str], None]


def _silent(_step: str, _detail: str) -> None:
    """The default observer."""


@dataclass(frozen=True, slots=True)
class RoleDetails:
    """What a verification needs to know about one connection."""

    connection_id: uuid.UUID
    aws_account_id: str
    role_arn: str
    external_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt.

    `code` is stable and machine-readable ("verified", an AWS error code, or one of our own checks
    such as "InvalidRoleArn"). `message` is written for the customer when `kind` is
    customer_must_fix, and for the operator otherwise. Neither ever holds a credential, a request
    id or a stack trace.
    """

    kind: OutcomeKind
    code: str
    message: str
    # True: shown to refuse AssumeRole without the external ID in this attempt; None: not checked.
    external_id_enforced: bool | None = None
    assumed_role_arn: str | None = None
    region: str | None = None
    sts_calls: int = 0
    # An error code this module does not know (classified transient to be safe): worth a look.
    unclassified: bool = False
    # Decided without asking AWS, and no IAM propagation or odd answer can change it: the state
    # rules fail the account at once (no grace window, no confirming re-attempt, no wave hold).
    decisive: bool = False

    @property
    def verified(self) -> bool:
        """Whether the account may be shown as connected."""
        return self.kind is OutcomeKind.VERIFIED


def session_name_for(connection_id: uuid.UUID, prefix: str, *, purpose: str = "") -> str:
    """A RoleSessionName the customer can trace in CloudTrail back to this connection.

    `prefix-<32 hex of the connection id>` (at most 20 + 1 + 2 + 32 = 55 characters), valid for
    STS's `[\\w+=,.@-]{2,64}`.
    """
    middle = f"-{purpose}" if purpose else ""
    return f"{prefix}{middle}-{connection_id.hex}"


def _shorten(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _customer(code: str, message: str, **extra: Any) -> Outcome:
    return Outcome(OutcomeKind.CUSTOMER_MUST_FIX, code, message, **extra)


def check_role_details(details: RoleDetails) -> Outcome | None:
    """Local checks before any AWS call; an outcome for the first problem, or None if all good."""
    match = _ROLE_ARN.fullmatch(details.role_arn)
    if match is None:
        return _customer(
            "InvalidRoleArn",
            f"The role ARN {_shorten(details.role_arn)!r} is not a valid IAM role ARN. "
            "Copy the role's ARN from the IAM console; it looks like "
            "arn:aws:iam::123456789012:role/RoleName.",
        )
    if match["partition"] not in SUPPORTED_PARTITIONS:
        return _customer(
            "UnsupportedPartition",
            f"The role ARN {_shorten(details.role_arn)} is in the {match['partition']!r} "
            "partition, which this service cannot reach. Create the role in a standard AWS "
            "account (ARNs starting with arn:aws:).",
        )
    if match["account"] != details.aws_account_id:
        return _customer(
            "RoleAccountMismatch",
            f"The role ARN {_shorten(details.role_arn)} belongs to AWS account "
            f"{match['account']}, but this connection is for AWS account "
            f"{details.aws_account_id}. Use a role in account {details.aws_account_id}, or "
            "correct the AWS account ID.",
        )
    if not _EXTERNAL_ID.fullmatch(details.external_id):
        return _customer(
            "InvalidExternalId",
            "This connection's external ID is not one STS accepts (2 to 1224 characters: "
            "letters, digits and +=,.@:/-). Recreate the connection to get a new external ID, "
            "then update the role's trust policy with it.",
        )
    return None


PLATFORM_ACCOUNT_CODE = "PlatformAccount"


def _platform_account_message(details: RoleDetails) -> str:
    # Says nothing about the platform's roles (whether any exists or could be assumed): only
    # that this account is not one a customer can connect.
    return (
        f"AWS account {details.aws_account_id} cannot be connected: it is one of this "
        "service's own AWS accounts, not a customer account. Connect a role in an AWS account "
        "that your organization owns."
    )


def _access_denied_message(details: RoleDetails, aws_message: str, principal: str | None) -> str:
    if "service control policy" in aws_message:
        return (
            f"Could not assume role {details.role_arn}: a service control policy in your AWS "
            "organization explicitly denies sts:AssumeRole on it. Ask your organization's "
            "administrator to allow it for this role."
        )
    who = f"the principal {principal}" if principal else "this service's AWS account"
    return (
        f"Could not assume role {details.role_arn} in AWS account {details.aws_account_id}: "
        "access denied. Check that the role exists, that its trust policy allows "
        f"{who} to call sts:AssumeRole, and that it requires this connection's external ID "
        "in an sts:ExternalId StringEquals condition. Changes to IAM can take a few minutes "
        "to take effect."
    )


def _not_enforced_message(details: RoleDetails) -> str:
    return (
        f"Role {details.role_arn} can be assumed without an external ID, so another "
        "customer of this service could use it too. Add a condition to the role's trust "
        'policy: "Condition": {"StringEquals": {"sts:ExternalId": "<this connection\'s '
        'external ID>"}}, then verify again.'
    )


def _region_disabled_message(details: RoleDetails, regions: list[str]) -> str:
    return (
        f"AWS STS is not activated for AWS account {details.aws_account_id} in "
        f"{' or '.join(regions)}. Activate STS for one of these regions in the IAM console "
        "(Account settings, Security Token Service endpoints), then verify again."
    )


def _identity_mismatch_message(details: RoleDetails, actual: str) -> str:
    return (
        f"Role {details.role_arn} was assumed, but it belongs to AWS account {actual}, not "
        f"{details.aws_account_id}. Connect a role from account {details.aws_account_id}, "
        "or correct the AWS account ID."
    )


MAX_CODE_LENGTH = 128


def classify_error(
    error: BaseException, details: RoleDetails | None, principal: str | None
) -> Outcome:
    """Turn whatever botocore raised into an outcome. Never raises for botocore's exceptions."""
    if isinstance(error, botocore.exceptions.ClientError):
        body = error.response.get("Error", {})
        # Stored as the account's last error code and an audit event's reason (128 characters).
        code = str(body.get("Code") or "Unknown")[:MAX_CODE_LENGTH]
        aws_message = str(body.get("Message") or "")
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        operator_detail = scrub_text(f"{code} (HTTP {status}): {_shorten(aws_message, 300)}")
        if code == "AccessDenied":
            # AWS gives this one answer for a missing role, an untrusting policy and a wrong
            # external ID, on purpose; only the root-credentials variant is ours.
            if "root accounts" in aws_message:
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, operator_detail)
            if details is None:
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, operator_detail)
            return _customer(code, _access_denied_message(details, aws_message, principal))
        if code in _PLATFORM_CODES:
            return Outcome(OutcomeKind.PLATFORM_FAULT, code, operator_detail)
        if code in _TRANSIENT_CODES or status >= 500:
            return Outcome(OutcomeKind.TRANSIENT, code, operator_detail)
        if code == "ValidationError" and details is not None:
            # Our local checks mirror STS's patterns, so this is the customer's data tripping a
            # rule we do not know about. AWS's text quotes the offending value, which may be the
            # external ID: only the name of the field it complains about is shown.
            field = re.search(r"at '(\w+)'", aws_message)
            what = f" (STS rejected the {field.group(1)})" if field else ""
            return _customer(
                code,
                f"AWS STS refused the details of role {_shorten(details.role_arn)} as "
                f"invalid{what}. Check the role ARN; if it is right, recreate the connection "
                "to get a new external ID, then verify again.",
            )
        # An error code we have never seen. Transient is the safe class: customer_must_fix
        # could mark a working connection failed on a signal we do not understand, and
        # platform_fault would pause verification for every customer over one odd answer.
        # Transient changes no status, retries with backoff, and logs the code so it can be
        # classified properly.
        return Outcome(
            OutcomeKind.TRANSIENT, code, f"unclassified error {operator_detail}", unclassified=True
        )
    if isinstance(
        error,
        botocore.exceptions.NoCredentialsError
        | botocore.exceptions.PartialCredentialsError
        | botocore.exceptions.CredentialRetrievalError
        | botocore.exceptions.ProfileNotFound
        | botocore.exceptions.TokenRetrievalError
        | botocore.exceptions.SSOError
        | botocore.exceptions.NoRegionError,
    ):
        return Outcome(
            OutcomeKind.PLATFORM_FAULT,
            type(error).__name__,
            scrub_text(f"the worker's own AWS configuration is unusable: {error}"),
        )
    if isinstance(error, botocore.exceptions.ParamValidationError) and details is not None:
        return _customer(
            "InvalidRoleDetails",
            f"The role details of role {_shorten(details.role_arn)} are not valid for STS. "
            "Correct the role ARN and verify again.",
        )
    if isinstance(
        error,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | ResponseParserError,
    ):
        return Outcome(OutcomeKind.TRANSIENT, type(error).__name__, scrub_text(str(error)))
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return Outcome(OutcomeKind.TRANSIENT, type(error).__name__, scrub_text(str(error)))
    raise error


class StsVerifier:
    """Verifies role details with a shared STS client per region.

    `before_call` runs before every STS request; the worker passes its global rate limiter.
    `on_throttled` runs for every answer that says Throttling, retried ones included (the
    worker's limiter then slows every worker down).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        before_call: Callable[[], object] | None = None,
        on_throttled: Callable[[], object] | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        self._settings = settings
        self._before_call = before_call
        self._on_throttled = on_throttled
        self._session = session or boto3.session.Session()
        self._clients: dict[str, STSClient] = {}
        self._lock = threading.Lock()
        # The platform's own AWS accounts, which no customer may connect: the configured ones
        # now, the worker's own credentials' account once GetCallerIdentity has named it.
        self._configured_platform_accounts = frozenset(settings.platform_account_ids)
        self._own_account: str | None = None
        self._identity_lock = threading.Lock()
        self._config = Config(
            connect_timeout=settings.sts_connect_timeout_seconds,
            read_timeout=settings.sts_read_timeout_seconds,
            # total_max_attempts counts the first call too (botocore's max_attempts counts retries).
            retries={"mode": "standard", "total_max_attempts": settings.sts_max_attempts},
            # One connection per worker thread, so threads never queue for a socket.
            max_pool_connections=max(10, settings.worker_concurrency),  # threads per process
            user_agent_extra="account-verifier",
        )

    def client(self, region: str | None = None) -> STSClient:
        """The process's STS client for `region` (default: the configured region)."""
        region = region or self._settings.aws_region
        client = self._clients.get(region)
        if client is None:
            with self._lock:
                client = self._clients.get(region)
                if client is None:
                    # botocore itself honours AWS_ENDPOINT_URL_STS, AWS_PROFILE, credentials
                    # and regional endpoints.
                    client = self._session.client("sts", region_name=region, config=self._config)
                    metrics.instrument_sts_client(client)
                    if self._on_throttled is not None:
                        # Every attempt's answer passes here before botocore decides on a retry,
                        # so a throttle retried successfully is still heard.
                        client.meta.events.register("needs-retry.sts", self._see_answer)
                    self._clients[region] = client
        return client

    def _see_answer(self, response: Any = None, **_: Any) -> None:
        # Returns None, always: botocore takes any other value as its retry decision.
        if self._on_throttled is None or not isinstance(response, tuple):
            return
        http, parsed = response
        code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
        if code in THROTTLING_CODES or getattr(http, "status_code", None) == 429:
            self._on_throttled()

    def _call(self, region: str, **params: Any) -> dict[str, Any]:
        if self._before_call is not None:
            self._before_call()
        response: dict[str, Any] = dict(self.client(region).assume_role(**params))
        return response

    def verify(
        self,
        details: RoleDetails,
        *,
        check_external_id: bool,
        observe: Observer | None = None,
    ) -> Outcome:
        """One attempt: local checks, AssumeRole, identity, and (if asked) enforcement.

        `observe(step, detail)` is told each step's result as it happens (`reverify --inline`).
        """
        say = observe or _silent
        refused = self._refuse_before_calling(details, say)
        if refused is not None:
            return refused
        prefix = self._settings.session_name_prefix
        principal = self._settings.platform_principal_arn
        regions = list(
            dict.fromkeys([self._settings.aws_region, self._settings.sts_fallback_region])
        )
        calls = 0
        response: dict[str, Any] | None = None
        region = regions[0]
        for region in regions:
            calls += 1
            try:
                response = self._call(
                    region,
                    RoleArn=details.role_arn,
                    RoleSessionName=session_name_for(details.connection_id, prefix),
                    ExternalId=details.external_id,
                    DurationSeconds=SESSION_DURATION_SECONDS,
                    Policy=DENY_ALL_POLICY,
                )
                break
            except botocore.exceptions.ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code == "RegionDisabledException":
                    say("AssumeRole", f"STS is not activated in {region} for this account")
                    continue
                outcome = _with_calls(classify_error(error, details, principal), calls, region)
            except _OTHER_ERRORS as error:
                outcome = _with_calls(classify_error(error, details, principal), calls, region)
            say("AssumeRole", f"FAILED {outcome.code} ({outcome.kind.value}): {outcome.message}")
            return outcome
        if response is None:
            say("AssumeRole", "FAILED: STS is not activated in any region tried")
            return _customer(
                "RegionDisabledException",
                _region_disabled_message(details, regions),
                sts_calls=calls,
                region=region,
            )
        # The response holds live credentials; keep only the role's ARN from it.
        assumed_arn = _assumed_role_arn(response)
        del response
        assumed = _ASSUMED_ROLE_ARN.fullmatch(assumed_arn or "")
        if assumed_arn is None or assumed is None:
            say("AssumeRole", "FAILED: the answer has no usable AssumedRoleUser.Arn")
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "AssumeRole answered without a usable AssumedRoleUser.Arn",
                sts_calls=calls,
                region=region,
            )
        say("AssumeRole", f"ok in {region}: {assumed_arn}")
        if assumed["account"] != details.aws_account_id:
            say("identity", f"FAILED: the role is in account {assumed['account']}")
            return _customer(
                "IdentityMismatch",
                _identity_mismatch_message(details, assumed["account"]),
                assumed_role_arn=assumed_arn,
                sts_calls=calls,
                region=region,
            )
        say("identity", f"ok: account {details.aws_account_id}")
        enforced: bool | None = None
        if check_external_id:
            calls += 1
            enforcement = self._check_enforcement(details, region, prefix, principal)
            if enforcement is not None:
                say("external-ID check", f"FAILED {enforcement.code}: {enforcement.message}")
                return _with_calls(enforcement, calls, region)
            say("external-ID check", "ok: refused without the external ID")
            enforced = True
        else:
            say("external-ID check", "skipped: checked recently")
        return Outcome(
            OutcomeKind.VERIFIED,
            "verified",
            f"assumed {assumed_arn}",
            external_id_enforced=enforced,
            assumed_role_arn=assumed_arn,
            region=region,
            sts_calls=calls,
        )

    def _refuse_before_calling(self, details: RoleDetails, say: Observer) -> Outcome | None:
        """The checks made before any AssumeRole: the row's own details, then the platform's
        accounts (a role there may well trust the platform: a customer must never get it)."""
        problem = check_role_details(details)
        if problem is not None:
            say("input check", f"FAILED {problem.code}: {problem.message}")
            return problem
        say("input check", "ok")
        platform = self.platform_accounts()
        if isinstance(platform, Outcome):
            say(
                "platform check",
                f"FAILED {platform.code} ({platform.kind.value}): {platform.message}",
            )
            return platform
        if details.aws_account_id in platform:
            say("platform check", f"FAILED {PLATFORM_ACCOUNT_CODE}: the platform's own account")
            return _customer(
                PLATFORM_ACCOUNT_CODE, _platform_account_message(details), decisive=True
            )
        say("platform check", "ok")
        return None

    def _check_enforcement(
        self, details: RoleDetails, region: str, prefix: str, principal: str | None
    ) -> Outcome | None:
        """AssumeRole without the external ID must be refused (AWS's confused-deputy advice)."""
        try:
            response = self._call(
                region,
                RoleArn=details.role_arn,
                RoleSessionName=session_name_for(details.connection_id, prefix, purpose="x"),
                DurationSeconds=SESSION_DURATION_SECONDS,
                Policy=DENY_ALL_POLICY,
            )
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") == "AccessDenied":
                return None  # refused: the external ID is enforced
            return classify_error(error, None, principal)
        except _OTHER_ERRORS as error:
            return classify_error(error, None, principal)
        del response
        return _customer("ExternalIdNotEnforced", _not_enforced_message(details))

    def platform_accounts(self) -> frozenset[str] | Outcome:
        """The platform's own AWS accounts, or the outcome of failing to learn them.

        The worker's own account comes from GetCallerIdentity, asked once per process (the
        circuit breaker's probe refreshes it). Until it is known no role is assumed: the check
        must not be skipped because the answer is late.
        """
        if self._own_account is None:
            with self._identity_lock:
                # One call for all the threads that arrive together, not one each.
                if self._own_account is None:
                    outcome = self.probe()
                    if not outcome.verified:
                        return outcome
        return self._configured_platform_accounts | {self._own_account or ""}

    def probe(self) -> Outcome:
        """Check the platform's own credentials (GetCallerIdentity): the circuit breaker's probe.

        Also learns the account those credentials belong to (see `platform_accounts`).
        """
        try:
            if self._before_call is not None:
                self._before_call()
            identity = self.client().get_caller_identity()
        except (botocore.exceptions.ClientError, *_OTHER_ERRORS) as error:
            return _with_calls(classify_error(error, None, None), 1, self._settings.aws_region)
        account = identity.get("Account")
        if isinstance(account, str) and re.fullmatch(r"\d{12}", account, re.ASCII):
            self._own_account = account
        else:
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "GetCallerIdentity answered without a usable Account",
                region=self._settings.aws_region,
                sts_calls=1,
            )
        return Outcome(
            OutcomeKind.VERIFIED,
            "verified",
            f"platform identity {identity.get('Arn', '?')}",
            region=self._settings.aws_region,
            sts_calls=1,
        )


def _assumed_role_arn(response: dict[str, Any]) -> str | None:
    user = response.get("AssumedRoleUser")
    if not isinstance(user, dict):
        return None
    arn = user.get("Arn")
    return arn if isinstance(arn, str) else None


def _with_calls(outcome: Outcome, calls: int, region: str) -> Outcome:
    return dataclasses.replace(outcome, sts_calls=calls, region=region)


_verifier: StsVerifier | None = None
_verifier_lock = threading.Lock()


def get_verifier(
    before_call: Callable[[], object] | None = None,
    on_throttled: Callable[[], object] | None = None,
) -> StsVerifier:
    """The process's verifier, built on first use (never at import)."""
    global _verifier  # noqa: PLW0603 - one client set per process is the point
    if _verifier is None:
        with _verifier_lock:
            if _verifier is None:
                _verifier = StsVerifier(
                    get_settings(), before_call=before_call, on_throttled=on_throttled
                )
    return _verifier
