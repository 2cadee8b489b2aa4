"""One request in, one reply out: the dispatch between STS, the probes and the control
endpoint (``/_standin/``). Runs only on the event loop's thread.
"""

from __future__ import annotations

import json
import time
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from sandbox.standin.assume_role import _AssumeRoleAnswers
from sandbox.standin.base import _Reply, _Request
from sandbox.standin.behaviours import draw_latency_seconds
from sandbox.standin.config import StandInConfig
from sandbox.standin.wire import _API_VERSION, _PSEUDO_FAULTS, _credential_scope, _parse_form

_CONTROL_PREFIX: Final = "/_standin/"


class _Core(_AssumeRoleAnswers):
    """The stand-in's state and answers, without any networking (easy to reason about)."""

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Reply:
        if request.target.startswith(_CONTROL_PREFIX):
            return self._control(request)
        scope = _credential_scope(request.authorization).split("/")
        if len(scope) == 5 and scope[3] != "sts":
            reply = self._probe(request, scope[0], scope[3], scope[2])
        else:
            reply = self._sts(request)
        if request.close:
            reply.close = True
        return reply

    def _control(self, request: _Request) -> _Reply:
        parts = urlsplit(request.target)
        route = (request.method, parts.path.rstrip("/"))
        if route == ("GET", "/_standin/stats"):
            query = dict(parse_qsl(parts.query))
            return self._json(
                200, self.snapshot(roles=query.get("roles", "1") not in {"0", "false"})
            )
        if route == ("POST", "/_standin/reset"):
            self.reset()
            return self._json(200, self.snapshot())
        if route == ("GET", "/_standin/config"):
            return self._json(200, self._config_view())
        if route == ("POST", "/_standin/config"):
            try:
                changes = json.loads(request.body or b"{}")
            except ValueError as error:
                return self._json(400, {"error": f"the body is not JSON: {error}"})
            if not isinstance(changes, dict):
                return self._json(400, {"error": "the body must be a JSON object of settings"})
            try:
                self.change_config(changes)
            except ValueError as error:
                return self._json(400, {"error": str(error)})
            return self._json(200, self._config_view())
        return self._json(404, {"error": f"no control route {request.method} {parts.path}"})

    def _config_view(self) -> dict[str, object]:
        view = self._config.to_json()
        deadline = self._force_deadline
        view["force_remaining_seconds"] = (
            None if deadline is None else max(0.0, round(deadline - time.monotonic(), 3))
        )
        return view

    def _sts(self, request: _Request) -> _Reply:
        config = self._config
        st = self.stats
        st.requests += 1
        if request.method == "POST":
            text = request.body.decode("utf-8", "replace")
        else:
            text = request.target.partition("?")[2]
        params = _parse_form(text)
        action = params.get("Action", "")
        st.by_action[action] = st.by_action.get(action, 0) + 1
        role_arn = params.get("RoleArn") if action == "AssumeRole" else None
        if role_arn is not None:
            st.by_role[role_arn] = st.by_role.get(role_arn, 0) + 1
            if "ExternalId" not in params:
                st.assume_role_without_external_id += 1
        request_id = self._request_id()
        reply = self._decide(config, request, params, action, request_id)
        if reply.delay == 0.0:
            reply.delay = draw_latency_seconds(self._rng, config.median_ms, config.latency_sigma)
        return reply

    def _decide(
        self,
        config: StandInConfig,
        request: _Request,
        params: dict[str, str],
        action: str,
        request_id: str,
    ) -> _Reply:
        if action not in {"AssumeRole", "GetCallerIdentity"} or params.get("Version") != (
            _API_VERSION
        ):
            return self._error(
                "InvalidAction",
                request_id,
                action=action,
                version=params.get("Version", ""),
            )
        scope = _credential_scope(request.authorization) or params.get("X-Amz-Credential", "")
        if not request.authorization and not scope:
            return self._error("MissingAuthenticationToken", request_id)
        scope_parts = scope.split("/")
        if len(scope_parts) != 5:
            return self._error("IncompleteSignature", request_id)
        access_key, region = scope_parts[0], scope_parts[2]
        if not config.platform_credentials_valid or (
            config.accepted_access_keys is not None
            and access_key not in config.accepted_access_keys
        ):
            return self._error("InvalidClientTokenId", request_id)
        if config.rate_limit is not None and not self._take_token(config):
            self.stats.rate_limited += 1
            return self._error("Throttling", request_id)
        slow = False
        if config.force_error is not None and self._forcing(config):
            if config.force_error == "slow":
                slow = True
            elif config.force_error in _PSEUDO_FAULTS:
                return self._fault(config.force_error, request_id)
            else:
                return self._forced_error(config, config.force_error, params, request_id)
        if action == "GetCallerIdentity":
            reply = self._success(action, f"    {self._caller_identity}\n", request_id)
        else:
            reply = self._assume_role(config, params, region, request_id)
        if slow and not reply.reset:
            self.stats.slow += 1
            reply.delay = config.slow_seconds
        return reply
