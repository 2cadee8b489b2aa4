"""Every knob of the stand-in (`StandInConfig`), checked for type and range."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, cast

from sandbox.standin.wire import _PRINCIPAL_ARN_RE, _PSEUDO_FAULTS, STS_ERRORS

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    """Every knob of the stand-in. Immutable: a change swaps the whole object, atomically."""

    # Latency of every STS answer: log-normal, median in ms (0: none); sigma 0.65 -> p99 ~ 4.5x.
    median_ms: float = 50.0
    latency_sigma: float = 0.65
    # How long a `slow` role (or forced "slow") takes to answer.
    slow_seconds: float = 30.0
    # Global token bucket in requests/s (None: unlimited); burst defaults to one second's worth.
    rate_limit: float | None = None
    rate_burst: float | None = None
    # The platform's own credentials: False answers InvalidClientTokenId to everything.
    platform_credentials_valid: bool = True
    # Access key ids accepted from the Authorization header; None accepts any.
    accepted_access_keys: frozenset[str] | None = None
    # Who the platform is: GetCallerIdentity's answer and the "User:" of AccessDenied.
    platform_arn: str = "arn:aws:iam::111122223333:user/account-verifier"
    # Regions (from the SigV4 scope) where `regiondisabled` roles succeed; "*" means all.
    enabled_regions: frozenset[str] = frozenset({"us-east-1"})
    # `flaky` roles: how many first calls fail, and with which code.
    flaky_failures: int = 2
    flaky_error: str = "InternalFailure"
    # Every role's MaxSessionDuration.
    max_session_seconds: int = 3600
    # Role ARN -> the one external ID its trust policy accepts (other roles accept any).
    expected_external_ids: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    # Fault injection: answer this code (or reset/garbage/slow) with this probability, for this
    # long (None: until cleared with force_error=None).
    force_error: str | None = None
    force_ratio: float = 1.0
    force_seconds: float | None = None
    # Seed of latency, fault and credential randomness (None: a fresh one).
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse values that would make the stand-in lie or crash later, with a clear message."""
        # A read-only copy, so that the caller's dict cannot change a config that is in use.
        frozen = MappingProxyType(dict(self.expected_external_ids))
        object.__setattr__(self, "expected_external_ids", frozen)
        problems = []
        for name in ("median_ms", "latency_sigma", "slow_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("rate_limit", "rate_burst", "force_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 or null")
        if not 0.0 <= self.force_ratio <= 1.0:
            problems.append("force_ratio must be between 0 and 1")
        if self.flaky_failures < 0:
            problems.append("flaky_failures must be >= 0")
        if self.flaky_error not in STS_ERRORS:
            problems.append(f"flaky_error must be one of {sorted(STS_ERRORS)}")
        if self.force_error is not None and not (
            self.force_error in STS_ERRORS or self.force_error in _PSEUDO_FAULTS
        ):
            problems.append(
                f"force_error must be null or one of {sorted(STS_ERRORS) + sorted(_PSEUDO_FAULTS)}"
            )
        if not 900 <= self.max_session_seconds <= 43200:
            problems.append("max_session_seconds must be between 900 and 43200")
        if _PRINCIPAL_ARN_RE.fullmatch(self.platform_arn) is None:
            problems.append("platform_arn must be an IAM or STS principal ARN")
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, object]:
        """The configuration as JSON-ready values (sets become sorted lists)."""
        out: dict[str, object] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[item.name] = value
        return out

    def with_changes(self, changes: Mapping[str, object]) -> StandInConfig:
        """A copy with `changes` applied, each checked for type (JSON and keyword arguments)."""
        unknown = sorted(set(changes) - _FIELD_KINDS.keys())
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(_FIELD_KINDS)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        return dataclasses.replace(self, **cast("dict[str, Any]", coerced))


_FIELD_KINDS: Final[Mapping[str, str]] = {
    "median_ms": "float",
    "latency_sigma": "float",
    "slow_seconds": "float",
    "rate_limit": "float?",
    "rate_burst": "float?",
    "platform_credentials_valid": "bool",
    "accepted_access_keys": "strset?",
    "platform_arn": "str",
    "enabled_regions": "strset",
    "flaky_failures": "int",
    "flaky_error": "str",
    "max_session_seconds": "int",
    "expected_external_ids": "strmap",
    "force_error": "str?",
    "force_ratio": "float",
    "force_seconds": "float?",
    "seed": "int?",
}


def _coerce(name: str, value: object) -> object:
    """Check one setting's type; JSON has no sets, so lists/tuples are accepted for sets."""
    kind = _FIELD_KINDS[name]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    ok: bool
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        result: object = float(cast(float, value)) if ok else None
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        result = value
    elif kind == "bool":
        ok = isinstance(value, bool)
        result = value
    elif kind == "str":
        ok = isinstance(value, str)
        result = value
    elif kind == "strset":
        ok = isinstance(value, list | tuple | set | frozenset) and all(
            isinstance(item, str) for item in cast(Iterable[object], value)
        )
        result = frozenset(cast(Iterable[str], value)) if ok else None
    else:  # strmap
        ok = isinstance(value, Mapping) and all(
            isinstance(key, str) and isinstance(item, str)
            for key, item in cast(Mapping[object, object], value).items()
        )
        result = dict(cast(Mapping[str, str], value)) if ok else None
    if not ok:
        raise ValueError(f"{name}: expected {_FIELD_KINDS[name]}, got {value!r}")
    return result


# --------------------------------------------------------------------------------------------
# The STS logic: one request in, one reply out. Runs only on the event loop's thread.
# --------------------------------------------------------------------------------------------
