"""STS's wire format as the stand-in speaks it: error codes, XML escaping, form parsing, the
SigV4 credential scope, the input patterns and IAM-style unique ids.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote_plus

_NS: Final = "https://sts.amazonaws.com/doc/2011-06-15/"
_API_VERSION: Final = "2011-06-15"

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


def _credential_scope(authorization: str) -> str:
    """`AKID/date/region/sts/aws4_request` from a SigV4 Authorization header, or ''."""
    start = authorization.find("Credential=")
    if start < 0:
        return ""
    start += len("Credential=")
    end = authorization.find(",", start)
    return (authorization[start:] if end < 0 else authorization[start:end]).strip()


def _unique_id(prefix: str, seed: str) -> str:
    """A stable IAM-style unique id (AROA/AIDA + 17 characters) for a principal ARN."""
    return prefix + hashlib.blake2b(seed.encode(), digest_size=9).hexdigest()[:17].upper()
