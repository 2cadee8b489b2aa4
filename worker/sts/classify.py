"""Every error botocore raises and every STS answer, turned into an `Outcome` of one of the four
kinds (worker.sts; each STS answer and its kind is in docs/sts-errors.md). The probes' errors
too: a denial is the customer's to fix unless our side caused it.
"""

from __future__ import annotations

import re

import botocore.exceptions
from botocore.parsers import ResponseParserError

from models import OutcomeKind
from worker.permissions import Probe
from worker.redact import scrub_text
from worker.sts.outcome import Outcome, RoleDetails, customer, shorten

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
OTHER_ERRORS = (botocore.exceptions.BotoCoreError, ResponseParserError)


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
        operator_detail = scrub_text(f"{code} (HTTP {status}): {shorten(aws_message, 300)}")
        if code == "AccessDenied":
            # AWS gives this one answer for a missing role, an untrusting policy and a wrong
            # external ID, on purpose; only the root-credentials variant is ours.
            if "root accounts" in aws_message:
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, operator_detail)
            if details is None:
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, operator_detail)
            return customer(code, _access_denied_message(details, aws_message, principal))
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
            return customer(
                code,
                f"AWS STS refused the details of role {shorten(details.role_arn)} as "
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
        return customer(
            "InvalidRoleDetails",
            f"The role details of role {shorten(details.role_arn)} are not valid for STS. "
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


# A probe refused for lack of permission, by any service's spelling of it (SCP denials included).
DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"}
)
# A denial that names one of these was caused by our side, not the customer's role: our session
# policy (the probe catalogue and the policy built from it must agree) or a VPC endpoint policy
# in the platform's network. Blaming the customer would fail every account at once.
_PLATFORM_DENIALS = ("session policy", "vpc endpoint policy")


def probe_client_fault(probe: Probe, error: BaseException) -> Outcome:
    """No client for a probe's service: the platform's configuration is wrong."""
    return Outcome(
        OutcomeKind.PLATFORM_FAULT,
        "ProbeClientError",
        scrub_text(
            f"probe {probe.permission}: no {probe.service} client "
            f"({type(error).__name__}: {shorten(str(error), 200)}); check the endpoint settings"
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
            f"{shorten(str(body.get('Message') or ''), 300)}"
        )
        if code in DENIED_CODES:
            text = str(body.get("Message") or "").lower()
            if any(words in text for words in _PLATFORM_DENIALS):
                return Outcome(OutcomeKind.PLATFORM_FAULT, code, detail, service=service)
            return customer(code, detail, service=service)
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
