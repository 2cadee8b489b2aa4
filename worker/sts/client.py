"""The process's STS clients: one per region, shared by every thread, built on first use, for
GetCallerIdentity; AssumeRole's requests (`worker.sts.assume_role`), one per region too; their
botocore configuration (also the probes'), and the probes' requests built before the pool forks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from worker import metrics
from worker.permissions import CATALOGUE
from worker.settings import Settings
from worker.sts.assume_role import AssumeRoleCalls
from worker.sts.classify import THROTTLING_CODES
from worker.sts.probe_preload import preload
from worker.sts.probes import PermissionProber

if TYPE_CHECKING:
    from mypy_boto3_sts.client import STSClient


def client_config(settings: Settings) -> Config:
    """The botocore configuration of the STS clients and the probes' requests."""
    return Config(
        connect_timeout=settings.sts_connect_timeout_seconds,
        read_timeout=settings.sts_read_timeout_seconds,
        # total_max_attempts counts the first call too (botocore's max_attempts counts retries).
        retries={"mode": "standard", "total_max_attempts": settings.sts_max_attempts},
        # One connection per worker thread, so threads never queue for a socket.
        max_pool_connections=max(10, settings.worker_concurrency),  # threads per process
        user_agent_extra="account-verifier",
    )


def preload_probe_calls(settings: Settings) -> None:
    """Keep the probes' requests in the worker's main process, before the pool forks: built by a
    short-lived child process, so that neither this process nor the pool's, which inherit them,
    loads the services' models (tens of MB each)."""
    regions = dict.fromkeys([settings.aws_region, settings.sts_fallback_region])
    probes = [CATALOGUE[name] for name in settings.permission_probes]
    preload(probes, regions, client_config(settings), settings.sts_max_attempts)


class StsClients:
    """One STS client per region (botocore clients are thread-safe; sessions are not), and
    AssumeRole's requests per region, signed with the same session's credentials.

    `before_call` runs before every STS call (AssumeRole, GetCallerIdentity); the worker passes
    its global rate limiter. `on_throttled` runs for every answer that says Throttling, retried
    ones included (the worker's limiter then slows every worker down).
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
        self._config = client_config(settings)
        self._prober: PermissionProber | None = None
        self._assume_role = AssumeRoleCalls(self._config, settings.sts_max_attempts, self._session)

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
        """AssumeRole in `region` with these parameters: the answer's AssumedRoleUser and
        Credentials; raises what a botocore client raises."""
        if self._before_call is not None:
            self._before_call()
        calls = self._assume_role
        return calls.region(region).call(
            calls.credentials(), params, on_throttled=self._on_throttled
        )
