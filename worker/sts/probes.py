"""The permission probes' calls: each probed permission proven or missing, with the customer's
role's credentials (worker.permissions holds the catalogue and decides when probes are due)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import botocore.credentials
import botocore.exceptions
from botocore.config import Config

from models import OutcomeKind
from worker.permissions import Probe, missing_permissions_message
from worker.settings import Settings
from worker.sts.classify import OTHER_ERRORS, classify_probe_error, probe_client_fault
from worker.sts.outcome import Observer, Outcome, PermissionReport, RoleDetails, customer
from worker.sts.probe_calls import ProbeCall, probe_call


@dataclass(frozen=True, slots=True)
class _ProbeResult:
    probe: Probe
    outcome: Outcome | None  # None: allowed


class PermissionProber:
    """Runs the probe calls of one account concurrently, with that account's credentials.

    Each probe's request is built once per process and region by botocore
    (`worker.sts.probe_calls`), then signed with the account's credentials, passed in for each
    call (never the platform's), and sent. Endpoints follow botocore's standard configuration
    (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>, the config file).
    """

    def __init__(self, settings: Settings, config: Config) -> None:
        self._config = config
        self._max_attempts = settings.sts_max_attempts
        self._calls: dict[tuple[str, str], ProbeCall] = {}
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

    def _call(self, probe: Probe, region: str) -> ProbeCall:
        key = (probe.permission, region)
        call = self._calls.get(key)
        if call is None:
            with self._lock:
                call = self._calls.get(key)
                if call is None:
                    call = probe_call(probe, region, self._config, self._max_attempts)
                    self._calls[key] = call
        return call

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
            call = self._call(probe, region)
        except Exception as error:  # noqa: BLE001 - whatever building raises is ours
            # A malformed AWS_ENDPOINT_URL_<SERVICE> (botocore raises ValueError) or a service
            # botocore cannot build (BotoCoreError, TypeError, KeyError): our configuration, so
            # the platform's fault, never an exception out of verify() (the lease would churn).
            return _ProbeResult(probe, probe_client_fault(probe, error))
        try:
            call.send(credentials)
        except botocore.exceptions.ClientError as error:
            return _ProbeResult(probe, classify_probe_error(probe, error))
        except OTHER_ERRORS as error:
            return _ProbeResult(probe, classify_probe_error(probe, error))
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
