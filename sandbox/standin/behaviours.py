"""How a role behaves, from its name (the table in the package docstring), and the latency
every answer waits.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from typing import Final

# The role-name prefixes, longest first so that a longer one always wins over its own prefix.
ROLE_PREFIXES: Final[tuple[str, ...]] = tuple(
    sorted(
        (
            "ok",
            "noext",
            "otheracct",
            "deny",
            "throttle",
            "error500",
            "error503",
            "slow",
            "reset",
            "garbage",
            "regiondisabled",
            "expiredtoken",
            "invalidtoken",
            "badsignature",
            "flaky",
            "noperms",
            "noec2",
            "probeerror",
            "bigquota",
        ),
        key=len,
        reverse=True,
    )
)


# Roles that answer a fixed error code, and the code.
_ROLE_ERRORS: Final[Mapping[str, str]] = {
    "deny": "AccessDenied",
    "throttle": "Throttling",
    "error500": "InternalFailure",
    "error503": "ServiceUnavailable",
    "expiredtoken": "ExpiredToken",
    "invalidtoken": "InvalidClientTokenId",
    "badsignature": "SignatureDoesNotMatch",
}


def role_behaviour(role_name: str) -> tuple[str, int | None]:
    """The behaviour a role name selects (see the module table) and, for ``flakyN``, its N."""
    lowered = role_name.lower()
    for prefix in ROLE_PREFIXES:
        if lowered.startswith(prefix):
            if prefix == "flaky":
                digits = re.match(r"\d+", lowered[len(prefix) :])
                return prefix, int(digits.group()) if digits else None
            return prefix, None
    return "ok", None


def draw_latency_seconds(rng: random.Random, median_ms: float, sigma: float) -> float:
    """One latency from a log-normal distribution with the given median (ms) and shape.

    Log-normal because real service latency is: most answers near the median, a long right tail.
    The median of lognormal(mu, sigma) is e**mu; p99 is median * e**(2.326 * sigma).
    """
    if median_ms <= 0:
        return 0.0
    if sigma <= 0:
        return median_ms / 1000.0
    return rng.lognormvariate(math.log(median_ms / 1000.0), sigma)
