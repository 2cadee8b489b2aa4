"""The stand-in's state: requests, replies, counters, the configuration in force, the HTTP
framing and STS's answers (errors, successes, faults). Runs only on the event loop's thread.
"""

from __future__ import annotations

import dataclasses
import http
import json
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, NamedTuple, cast

from sandbox.standin.config import StandInConfig
from sandbox.standin.wire import (
    _GARBAGE_BODY,
    _NS,
    _PRINCIPAL_ARN_RE,
    STS_ERRORS,
    _escape,
    _unique_id,
)

if TYPE_CHECKING:
    from sandbox.standin.server import _HttpConnection


class _Request(NamedTuple):
    method: str
    target: str
    authorization: str
    body: bytes
    close: bool
    amz_target: str = ""  # X-Amz-Target: the operation of a JSON-protocol request


@dataclasses.dataclass(slots=True)
class _Reply:
    """What to do with one request: send `data` after `delay` seconds, or reset the connection."""

    data: bytes
    delay: float = 0.0
    close: bool = False
    reset: bool = False


class _Role(NamedTuple):
    partition: str
    account: str
    name: str
    behaviour: str
    flaky_failures: int | None
    role_id: str


class _Stats:
    """Counters of what the stand-in answered; plain ints and dicts, touched by the loop only."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_action: dict[str, int] = {}
        self.by_outcome: dict[str, int] = {}
        self.by_role: dict[str, int] = {}
        self.throttled = 0
        self.rate_limited = 0
        self.slow = 0
        self.assume_role_without_external_id = 0
        self.connections_opened = 0
        self.probe_requests = 0
        self.by_probe: dict[str, int] = {}
        self.probe_outcomes: dict[str, int] = {}

    def probe_outcome(self, key: str) -> None:
        self.probe_outcomes[key] = self.probe_outcomes.get(key, 0) + 1

    def outcome(self, key: str) -> None:
        self.by_outcome[key] = self.by_outcome.get(key, 0) + 1


_HTTP_PHRASES: Final = {status.value: status.phrase for status in http.HTTPStatus}


class _CoreBase:
    """The stand-in's state, configuration, counters and STS answers, without any networking
    (easy to reason about). Answers to AssumeRole, the probes and the dispatch build on it.
    """

    def __init__(self, config: StandInConfig) -> None:
        self.connections: set[_HttpConnection] = set()
        self.stats = _Stats()
        self._flaky_calls: dict[str, int] = {}
        self._roles: dict[str, _Role | None] = {}
        self._policies: dict[str, str] = {}
        self._policy_masks: dict[str, int] = {}
        self._date_second = -1
        self._date = ""
        self._config = config
        self._rng = random.Random(config.seed)
        self._tokens = 0.0
        self._bucket_time = 0.0
        self._force_deadline: float | None = None
        self._apply(config, initial=True)

    # -- configuration -------------------------------------------------------------------------

    @property
    def config(self) -> StandInConfig:
        return self._config

    def _apply(self, config: StandInConfig, *, initial: bool = False) -> None:
        old = self._config
        self._config = config
        if initial or config.seed != old.seed:
            self._rng.seed(config.seed)
        if initial or (config.rate_limit, config.rate_burst) != (old.rate_limit, old.rate_burst):
            self._tokens = self._burst(config)
            self._bucket_time = time.monotonic()
        forced = (config.force_error, config.force_ratio, config.force_seconds)
        if initial or forced != (old.force_error, old.force_ratio, old.force_seconds):
            # The "for a while" window starts when a force setting changes, not at other edits.
            self._force_deadline = (
                time.monotonic() + config.force_seconds
                if config.force_error is not None and config.force_seconds is not None
                else None
            )
        platform = _PRINCIPAL_ARN_RE.fullmatch(config.platform_arn)
        if platform is None:  # StandInConfig refuses these; kept for a config built otherwise
            raise ValueError(f"platform_arn {config.platform_arn!r} is not a principal ARN")
        self._platform_account = platform.group(3)
        parts = platform.group(4).split("/")
        if platform.group(2) == "sts" and parts[0] == "assumed-role" and len(parts) >= 3:
            role_arn = f"arn:{platform.group(1)}:iam::{self._platform_account}:role/{parts[1]}"
            user_id = f"{_unique_id('AROA', role_arn)}:{parts[-1]}"
        else:
            user_id = _unique_id("AIDA", config.platform_arn)
        self._caller_identity = (
            f"<Arn>{_escape(config.platform_arn)}</Arn>"
            f"<UserId>{_escape(user_id)}</UserId><Account>{self._platform_account}</Account>"
        )

    def replace_config(self, config: StandInConfig) -> StandInConfig:
        self._apply(config)
        return config

    def change_config(self, changes: Mapping[str, object]) -> StandInConfig:
        return self.replace_config(self._config.with_changes(changes))

    @staticmethod
    def _burst(config: StandInConfig) -> float:
        if config.rate_limit is None:
            return 0.0
        return max(1.0, config.rate_burst if config.rate_burst is not None else config.rate_limit)

    def reset(self) -> None:
        self.stats = _Stats()
        self._flaky_calls.clear()

    def snapshot(self, *, roles: bool = True) -> dict[str, object]:
        st = self.stats
        out: dict[str, object] = {
            "requests": st.requests,
            "by_action": dict(st.by_action),
            "by_outcome": dict(st.by_outcome),
            "throttled": st.throttled,
            "rate_limited": st.rate_limited,
            "slow": st.slow,
            "assume_role_without_external_id": st.assume_role_without_external_id,
            "connections_opened": st.connections_opened,
            "connections_open": len(self.connections),
            "probe_requests": st.probe_requests,
            "by_probe": dict(st.by_probe),
            "probe_outcomes": dict(st.probe_outcomes),
        }
        if roles:
            out["by_role"] = dict(st.by_role)
        return out

    # -- HTTP framing ----------------------------------------------------------------------------

    def _http(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/xml",
        request_id: str | None = None,
        close: bool = False,
    ) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        head = (
            f"HTTP/1.1 {status} {_HTTP_PHRASES.get(status, 'Unknown')}\r\n"
            + (f"x-amzn-RequestId: {request_id}\r\n" if request_id else "")
            + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + f"Date: {self._date}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        return head.encode("ascii") + body

    def plain(self, status: int, text: str, *, close: bool = True) -> _Reply:
        """A non-STS answer for a request that is not even valid HTTP."""
        data = self._http(status, text.encode(), content_type="text/plain", close=close)
        return _Reply(data, close=close)

    def _json(self, status: int, payload: object) -> _Reply:
        body = json.dumps(payload, sort_keys=True).encode()
        return _Reply(self._http(status, body, content_type="application/json"))

    def _request_id(self) -> str:
        h = f"{self._rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _error(
        self, code: str, request_id: str, message: str | None = None, **fields: str
    ) -> _Reply:
        status, kind, default = STS_ERRORS.get(code, (400, "Sender", code))
        text = message if message is not None else default.format(**fields) if fields else default
        body = (
            f'<ErrorResponse xmlns="{_NS}">\n  <Error>\n    <Type>{kind}</Type>\n'
            f"    <Code>{code}</Code>\n    <Message>{_escape(text)}</Message>\n  </Error>\n"
            f"  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
        ).encode()
        self.stats.outcome(code)
        if code == "Throttling":
            self.stats.throttled += 1
        return _Reply(self._http(status, body, request_id=request_id))

    def _success(self, action: str, result: str, request_id: str) -> _Reply:
        body = (
            f'<{action}Response xmlns="{_NS}">\n  <{action}Result>\n{result}  </{action}Result>\n'
            f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n"
            f"  </ResponseMetadata>\n</{action}Response>\n"
        ).encode()
        self.stats.outcome("Success")
        return _Reply(self._http(200, body, request_id=request_id))

    def _fault(self, fault: str, request_id: str) -> _Reply:
        """A `reset` or `garbage` answer: something other than an STS answer."""
        self.stats.outcome(fault)
        if fault == "reset":
            return _Reply(b"", reset=True)
        return _Reply(
            self._http(200, _GARBAGE_BODY, content_type="text/plain", request_id=request_id)
        )

    def _forcing(self, config: StandInConfig) -> bool:
        deadline = self._force_deadline
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return config.force_ratio >= 1.0 or self._rng.random() < config.force_ratio

    def _forced_error(
        self, config: StandInConfig, code: str, params: Mapping[str, str], request_id: str
    ) -> _Reply:
        role_arn = params.get("RoleArn", "")
        if code == "AccessDenied":
            return self._error(code, request_id, _access_denied(config, role_arn))
        if code == "RegionDisabledException":
            account = role_arn.split(":")[4] if role_arn.count(":") >= 5 else ""
            return self._error(code, request_id, account=account)
        if code == "InvalidAction":
            return self._error(code, request_id, action=params.get("Action", ""), version="")
        return self._error(code, request_id)

    def _take_token(self, config: StandInConfig) -> bool:
        now = time.monotonic()
        rate = cast(float, config.rate_limit)
        tokens = min(self._burst(config), self._tokens + (now - self._bucket_time) * rate)
        self._bucket_time = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


def _access_denied(config: StandInConfig, role_arn: str) -> str:
    return (
        f"User: {config.platform_arn} is not authorized to perform: sts:AssumeRole "
        f"on resource: {role_arn}"
    )
