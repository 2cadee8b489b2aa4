"""The permission probes' calls: each probed permission proven or missing, with the customer's
role's credentials (worker.permissions holds the catalogue and decides when probes are due)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import botocore.credentials
import botocore.exceptions
import botocore.session
from botocore.config import Config

from models import OutcomeKind
from worker.permissions import Probe, missing_permissions_message
from worker.settings import Settings
from worker.sts.classify import OTHER_ERRORS, classify_probe_error, probe_client_fault
from worker.sts.outcome import Observer, Outcome, PermissionReport, RoleDetails, customer


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
        except (*OTHER_ERRORS, ValueError) as error:
            # A malformed AWS_ENDPOINT_URL_<SERVICE> (botocore raises ValueError) or a service
            # botocore cannot build: our configuration, so the platform's fault, never an
            # exception out of verify() (the lease would churn).
            return _ProbeResult(probe, probe_client_fault(probe, error))
        self._credentials.set(credentials)
        try:
            getattr(client, probe.operation)(**probe.kwargs)
        except botocore.exceptions.ClientError as error:
            return _ProbeResult(probe, classify_probe_error(probe, error))
        except OTHER_ERRORS as error:
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
        return customer(
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
