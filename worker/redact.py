"""Keeping secrets out of output (URLs with passwords, external IDs, AWS credentials), and
terminal control characters out of what a terminal shows; and the one helper for URLs' spelling
(`libpq_url`)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_MASK = "***"


def mask_url(url: str) -> str:
    """Return `url` with any password replaced by `***` (`redis://:pw@h` -> `redis://:***@h`).

    Malformed URLs are masked too: they are exactly the ones shown in a settings error.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # Not even splittable (an unclosed IPv6 bracket): mask whatever looks like a password.
        return scrub_text(url)
    if parts.password is None:
        return url
    # Host and port as written, not re-parsed: a port that is not a number must not raise here.
    host_and_port = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:{_MASK}@{host_and_port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_database(url: str, name: str) -> str:
    """The libpq URL of database `name` on `url`'s server (user, password and query kept)."""
    parts = urlsplit(libpq_url(url))
    return urlunsplit(parts._replace(path=f"/{name}"))


def mask_external_id(external_id: str) -> str:
    """Show enough of an external ID to tell two apart, never enough to reuse it."""
    if len(external_id) <= 8:
        return _MASK
    return f"{external_id[:3]}{_MASK}{external_id[-2:]}"


# Passwords in any URL inside free text: scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)")
# AWS access key ids (long-term AKIA, temporary ASIA, and the other documented prefixes).
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b")


def scrub_text(text: str) -> str:
    """Mask URL passwords and AWS access key ids wherever they appear in free text."""
    if "://" in text:  # every URL with a password has one; most text has none
        text = _URL_PASSWORD.sub(lambda m: m.group("prefix") + _MASK, text)
    return _ACCESS_KEY_ID.sub(_MASK, text)


# Characters that change what a terminal shows rather than being shown: every control character
# (C0, DEL and C1: ESC starts an ANSI sequence, C1's CSI starts one by itself on some terminals),
# the line and paragraph separators, and the bidirectional controls that reorder the text around
# them.
_TERMINAL_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """Render control characters as visible escapes (`\\x1b`, `\\u202e`), so that customer text
    shown on a terminal cannot move the cursor, recolour, retitle or reorder anything."""
    return _TERMINAL_CONTROL.sub(_escape, text)


def libpq_url(url: str) -> str:
    """A PostgreSQL URL as libpq (psycopg) takes it: `postgresql://`, whatever PostgreSQL scheme
    it has (SQLAlchemy's `postgresql+psycopg://` too); any other URL unchanged."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgres") else url
