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
session policy denies every action, so even a leaked copy could do nothing. When permission
probes are due (worker/permissions.py), the session policy instead allows exactly the probed
read-only actions, and the credentials live only in memory for the few concurrent probe calls.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.credentials
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.parsers import ResponseParserError

from models import OutcomeKind
from worker import metrics
from worker.permissions import CATALOGUE, Probe, missing_permissions_message, probe_session_policy
from worker.redact import scrub_text
from worker.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_sts.client import STSClient

__all__ = [
    "Outcome",
    "OutcomeKind",
    "PermissionReport",
    "RoleDetails",
    "StsVerifier",
    "check_role_details",
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
    """What a verification needs to know about one account connection."""

    account_id: uuid.UUID
    aws_account_id: str
    role_arn: str
    external_id: str


@dataclass(frozen=True, slots=True)
class PermissionReport:
    """What the permission probes showed: each probed permission is proven or missing."""

    proven: tuple[str, ...]
    missing: tuple[str, ...]


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
    # Set when the permission probes gave a verdict (all proven, or some missing).
    permissions: PermissionReport | None = None
    # Calls to other services than STS (the probes); they do not spend the STS budget.
    probe_calls: int = 0
    # The service whose answer made this outcome, when it was not STS (a probe's).
    service: str | None = None
    # Verified, but a probe failed transiently and no probe was denied: the error code that
    # left the permissions unknown this time (they stay as recorded, and due next attempt).
    permissions_unknown: str | None = None

    @property
    def verified(self) -> bool:
        """Whether the account may be shown as connected."""
        return self.kind is OutcomeKind.VERIFIED


def session_name_for(account_id: uuid.UUID, prefix: str, *, purpose: str = "") -> str:
    """A RoleSessionName the customer can trace in CloudTrail back to this account connection.

    `prefix-<32 hex of the account id>` (at most 20 + 1 + 2 + 32 = 55 characters), valid for
    STS's `[\\w+=,.@-]{2,64}`.
    """
    middle = f"-{purpose}" if purpose else ""
    return f"{prefix}{middle}-{account_id.hex}"


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


# --------------------------------------------------------------------------- permission probes

# A probe refused for lack of permission, by any service's spelling of it (SCP denials included).
DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"}
)
# A denial that names one of these was caused by our side, not the customer's role: our session
# policy (the probe catalogue and the policy built from it must agree) or a VPC endpoint policy
# in the platform's network. Blaming the customer would fail every account at once.
_PLATFORM_DENIALS = ("session policy", "vpc endpoint policy")


class _ThreadCredentials(botocore.credentials.Credentials):
    """Credentials that are whatever the calling thread set: one client per service serves all.

    Building a botocore client per account costs milliseconds of CPU and a new connection pool
    (so a new TCP and TLS handshake per probe); a shared client signs each request with the
    credentials of the account its thread is probing. Signers ask for `get_frozen_credentials()`
    at every request, retries included, on the calling thread.
    """

    def __init__(self) -> None:  # no super().__init__(): the attributes are per thread
        self.method = "probe"
        self._local = threading.local()

    def set(self, credentials: botocore.credentials.ReadOnlyCredentials | None) -> None:
        """Use `credentials` for this thread's requests (None: none at all)."""
        self._local.frozen = credentials

    def get_frozen_credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        """This thread's credentials; a request without any must not go out unsigned."""
        frozen: botocore.credentials.ReadOnlyCredentials | None = getattr(
            self._local, "frozen", None
        )
        if frozen is None:
            raise botocore.exceptions.NoCredentialsError
        return frozen

    def get_deferred_property(self, property_name: str) -> Callable[[], Any]:
        """Endpoint rules may ask for the account id; it is per thread too."""
        return lambda: getattr(getattr(self._local, "frozen", None), property_name, None)


class _ThreadCredentialProvider(botocore.credentials.CredentialProvider):
    METHOD = "probe"

    def __init__(self, credentials: _ThreadCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> botocore.credentials.Credentials:
        return self._credentials


@dataclass(frozen=True, slots=True)
class _ProbeResult:
    probe: Probe
    outcome: Outcome | None  # None: allowed


class PermissionProber:
    """Runs the probe calls of one account concurrently, with that account's credentials.

    One client per service and region per process, built lazily from a botocore session of its
    own whose only credentials are the calling thread's (never the platform's): a probe can only
    ever be signed by the customer's role. Endpoints follow botocore's standard configuration
    (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>, the config file).
    """

    def __init__(self, settings: Settings, config: Config) -> None:
        self._config = config
        self._credentials = _ThreadCredentials()
        self._session = botocore.session.Session()
        self._session.register_component(
            "credential_provider",
            botocore.credentials.CredentialResolver([_ThreadCredentialProvider(self._credentials)]),
        )
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        # Probes are a few per account while a verification thread waits: enough threads that
        # every verification thread of the process can have all its probes in flight at once
        # (the settings bound the product; threads start only when needed).
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=probe_threads(settings), thread_name_prefix="probe"
        )
        #: How long a verification waits for its probes: every attempt botocore may make, each
        #: at its connect and read limits, the standard retry mode's longest backoffs between
        #: them, and a second's margin. A probe still running then is given up on (ProbeTimeout).
        self.budget_seconds = probe_budget_seconds(settings)

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        client = self._clients.get(key)
        if client is None:
            with self._lock:  # botocore sessions are not thread-safe; clients are
                client = self._clients.get(key)
                if client is None:
                    client = self._session.create_client(
                        service, region_name=region, config=self._config
                    )
                    self._clients[key] = client
        return client

    def start(
        self,
        probes: Sequence[Probe],
        credentials: botocore.credentials.ReadOnlyCredentials,
        region: str,
    ) -> list[concurrent.futures.Future[_ProbeResult]]:
        """Send every probe now, to `region`; the caller collects the answers with `finish`."""
        return [self._pool.submit(self._run, probe, credentials, region) for probe in probes]

    def finish(
        self,
        probes: Sequence[Probe],
        pending: Sequence[concurrent.futures.Future[_ProbeResult]],
        started: float,
    ) -> list[_ProbeResult]:
        """Every probe's answer, waiting at most the budget from `started` (a monotonic time);
        a probe not answered by then is a transient ProbeTimeout."""
        remaining = max(0.0, started + self.budget_seconds - time.monotonic())
        concurrent.futures.wait(pending, timeout=remaining)
        results = []
        for probe, future in zip(probes, pending, strict=True):
            if future.done() and not future.cancelled():
                results.append(future.result())
                continue
            # Cancelled if still queued; a running one ends by botocore's own limits.
            future.cancel()
            results.append(
                _ProbeResult(
                    probe,
                    Outcome(
                        OutcomeKind.TRANSIENT,
                        "ProbeTimeout",
                        f"probe {probe.permission}: no answer from {probe.service_name} within "
                        f"{self.budget_seconds:g} s",
                        service=probe.service_name,
                    ),
                )
            )
        return results

    def _run(
        self, probe: Probe, credentials: botocore.credentials.ReadOnlyCredentials, region: str
    ) -> _ProbeResult:
        try:
            client = self._client(probe.service, region)
        except (*_OTHER_ERRORS, ValueError) as error:
            # A malformed AWS_ENDPOINT_URL_<SERVICE> (botocore raises ValueError) or a service
            # botocore cannot build: our configuration, so the platform's fault, never an
            # exception out of verify() (the lease would churn).
            return _ProbeResult(probe, probe_client_fault(probe, error))
        self._credentials.set(credentials)
        try:
            getattr(client, probe.operation)(**probe.kwargs)
        except botocore.exceptions.ClientError as error:
            return _ProbeResult(probe, classify_probe_error(probe, error))
        except _OTHER_ERRORS as error:
            return _ProbeResult(probe, classify_probe_error(probe, error))
        finally:
            self._credentials.set(None)
        return _ProbeResult(probe, None)


def probe_threads(settings: Settings) -> int:
    """Threads for the probes of a process: every verification thread's probes at once."""
    return settings.worker_concurrency * max(1, len(settings.permission_probes))


def probe_budget_seconds(settings: Settings) -> float:
    """The longest a probe can take within botocore's own limits, plus a second's margin."""
    attempts = settings.sts_max_attempts
    per_attempt = settings.sts_connect_timeout_seconds + settings.sts_read_timeout_seconds
    # botocore's standard retry mode sleeps at most min(20, 2 ** n) seconds before retry n + 1.
    backoff = sum(min(20.0, 2.0**n) for n in range(attempts - 1))
    return attempts * per_attempt + backoff + 1.0


def probe_client_fault(probe: Probe, error: BaseException) -> Outcome:
    """No client for a probe's service: the platform's configuration is wrong."""
    return Outcome(
        OutcomeKind.PLATFORM_FAULT,
        "ProbeClientError",
        scrub_text(
            f"probe {probe.permission}: no {probe.service} client "
            f"({type(error).__name__}: {_shorten(str(error), 200)}); check the endpoint settings"
        ),
        service=probe.service_name,
    )


def classify_probe_error(probe: Probe, error: BaseException) -> Outcome:
    """A probe's failure: denied (the customer's to fix), our side's denial (platform fault), or
    transient (nobody's fault, and inconclusive: see `probe_verdict`).

    A denial that blames a session policy or a VPC endpoint policy is ours: the session policy
    is built from the probe catalogue, and VPC endpoints are in the platform's network. A token
    a service refuses is transient: probes are signed with the customer's role (the platform's
    own credentials were proven by AssumeRole a moment ago), and in a region the account has not
    opted into STS tokens are not valid.
    """
    service = probe.service_name
    if isinstance(error, botocore.exceptions.ClientError):
        body = error.response.get("Error", {})
        code = str(body.get("Code") or "Unknown")[:MAX_CODE_LENGTH]
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = scrub_text(
            f"probe {probe.permission}: {code} (HTTP {status}) from {service}: "
            f"{_shorten(str(body.get('Message') or ''), 300)}"
        )
        if code in DENIED_CODES:
            text = str(body.get("Message") or "").lower()
            if any(words in text for words in _PLATFORM_DENIALS):
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, detail, service=service)
            return _customer(code, detail, service=service)
        known = code in _TRANSIENT_CODES or code in _PLATFORM_CODES or status >= 500
        return Outcome(
            OutcomeKind.TRANSIENT,
            code,
            detail if known else f"unclassified error {detail}",
            unclassified=not known,
            service=service,
        )
    detail = scrub_text(f"probe {probe.permission}: {type(error).__name__} from {service}: {error}")
    return Outcome(OutcomeKind.TRANSIENT, type(error).__name__, detail, service=service)


def probe_verdict(
    details: RoleDetails, results: Sequence[_ProbeResult], observe: Observer
) -> Outcome | PermissionReport:
    """Every probe's answer: the report when each was allowed, else the outcome that decides.

    Our side's fault (platform_fault) comes first: it says nothing about the customer's role. A
    denial is definite whatever the other services did, so denied permissions fail the account
    (naming each of them) even if another probe met a transient error. Otherwise the first
    transient error is returned as it is; the caller takes it as inconclusive.
    """
    missing = [result.probe.permission for result in results if _denied(result)]
    failed: Outcome | None = None
    ours: Outcome | None = None
    for result in results:
        if result.outcome is None:
            observe("probe", f"{result.probe.permission} ok")
        elif _denied(result):
            observe("probe", f"{result.probe.permission} DENIED ({result.outcome.code})")
        else:
            if result.outcome.kind is OutcomeKind.PLATFORM_FAULT:
                ours = ours or result.outcome
            failed = failed or result.outcome
            observe(
                "probe",
                f"{result.probe.permission} FAILED {result.outcome.code} "
                f"({result.outcome.kind.value}): {result.outcome.message}",
            )
    report = PermissionReport(
        proven=tuple(r.probe.permission for r in results if r.outcome is None),
        missing=tuple(missing),
    )
    if ours is not None:
        return dataclasses.replace(ours, probe_calls=len(results))
    if missing:
        return _customer(
            "MissingPermissions",
            missing_permissions_message(details.role_arn, missing),
            permissions=report,
            probe_calls=len(results),
        )
    if failed is not None:
        return dataclasses.replace(failed, probe_calls=len(results))
    return report


def _denied(result: _ProbeResult) -> bool:
    return result.outcome is not None and result.outcome.kind is OutcomeKind.CUSTOMER_MUST_FIX


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
        self._platform_accounts_known = self._configured_platform_accounts
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
        self._prober: PermissionProber | None = None

    def prober(self) -> PermissionProber:
        """The process's permission prober, built on first use (its threads start lazily)."""
        if self._prober is None:
            with self._lock:
                if self._prober is None:
                    self._prober = PermissionProber(self._settings, self._config)
        return self._prober

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
        probe: Sequence[str] = (),
        observe: Observer | None = None,
    ) -> Outcome:
        """One attempt: local checks, AssumeRole, identity, (if asked) enforcement, and (if any
        are named in `probe`) the permission probes.

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
                    RoleSessionName=session_name_for(details.account_id, prefix),
                    ExternalId=details.external_id,
                    DurationSeconds=SESSION_DURATION_SECONDS,
                    Policy=probe_session_policy(probe) if probe else DENY_ALL_POLICY,
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
        # The response holds live credentials; keep only the role's ARN from it, and the
        # credentials (in memory, for the probes' calls) only when probes are due.
        assumed_arn = _assumed_role_arn(response)
        credentials = _credentials(response) if probe else None
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
        return self._after_identity(
            details,
            assumed_arn,
            region,
            calls,
            check_external_id=check_external_id,
            probe=probe,
            credentials=credentials,
            say=say,
        )

    def _after_identity(
        self,
        details: RoleDetails,
        assumed_arn: str,
        region: str,
        calls: int,
        *,
        check_external_id: bool,
        probe: Sequence[str],
        credentials: botocore.credentials.ReadOnlyCredentials | None,
        say: Observer,
    ) -> Outcome:
        """The steps after the role is known to be the right one: the enforcement check and the
        permission probes, which run at the same time."""
        prefix = self._settings.session_name_prefix
        principal = self._settings.platform_principal_arn
        # The probes go out now and run while the enforcement check waits on STS. They ask the
        # region AssumeRole answered in: when STS is off in the configured region for this
        # account (it may be an opt-in region it has not enabled), other services there refuse
        # its tokens too, and the fallback region is the one known to work.
        probes = [CATALOGUE[name] for name in probe]
        started = time.monotonic()
        pending = (
            self.prober().start(probes, credentials, region) if credentials is not None else []
        )
        del credentials
        enforced: bool | None = None
        if check_external_id:
            calls += 1
            enforcement = self._check_enforcement(details, region, prefix, principal)
            if enforcement is not None:
                for future in pending:
                    future.cancel()
                say("external-ID check", f"FAILED {enforcement.code}: {enforcement.message}")
                return _with_calls(enforcement, calls, region)
            say("external-ID check", "ok: refused without the external ID")
            enforced = True
        else:
            say("external-ID check", "skipped: checked recently")
        report: PermissionReport | None = None
        unknown: Outcome | None = None
        if pending:
            results = self.prober().finish(probes, pending, started)
            verdict = probe_verdict(details, results, say)
            if isinstance(verdict, PermissionReport):
                report = verdict
            elif verdict.kind is OutcomeKind.TRANSIENT:
                # STS verified the account and nothing was denied: a probe that could not get
                # an answer (an opt-in region's AuthFailure, an outage, a timeout) leaves the
                # permissions unknown, not the connection. Retrying the whole verification
                # would keep a pending account from ever connecting, and AssumeRole and the
                # external-ID check with it; the probes stay due on the next attempt.
                unknown = verdict
                say("probe", f"inconclusive: {verdict.code} from {verdict.service}")
            else:
                return dataclasses.replace(
                    verdict,
                    assumed_role_arn=assumed_arn,
                    sts_calls=calls,
                    region=region,
                    external_id_enforced=enforced,
                )
        elif probe:
            say("probe", "FAILED: AssumeRole answered without credentials")
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "AssumeRole answered without usable Credentials",
                sts_calls=calls,
                region=region,
                external_id_enforced=enforced,
            )
        else:
            say("probe", "skipped: not due, or probing is off")
        return Outcome(
            OutcomeKind.VERIFIED,
            "verified",
            f"assumed {assumed_arn}",
            external_id_enforced=enforced,
            assumed_role_arn=assumed_arn,
            region=region,
            sts_calls=calls,
            permissions=report,
            probe_calls=len(pending),
            service=unknown.service if unknown else None,
            permissions_unknown=unknown.code if unknown else None,
            unclassified=unknown.unclassified if unknown else False,
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
                RoleSessionName=session_name_for(details.account_id, prefix, purpose="x"),
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
        return self._platform_accounts_known

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
            # Built once: every verification tests membership in it.
            self._platform_accounts_known = self._configured_platform_accounts | {account}
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


def _credentials(response: dict[str, Any]) -> botocore.credentials.ReadOnlyCredentials | None:
    found = response.get("Credentials")
    if not isinstance(found, dict):
        return None
    parts = [found.get(key) for key in ("AccessKeyId", "SecretAccessKey", "SessionToken")]
    if not all(isinstance(part, str) and part for part in parts):
        return None
    return botocore.credentials.ReadOnlyCredentials(*parts)


def _with_calls(outcome: Outcome, calls: int, region: str) -> Outcome:
    return dataclasses.replace(outcome, sts_calls=calls, region=region)
