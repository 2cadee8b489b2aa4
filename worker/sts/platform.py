"""The platform's own AWS accounts, which no customer may connect: the configured ones, and the
account of the worker's own credentials, learned from GetCallerIdentity once per process (the
circuit breaker's probe asks it again). A connection to one of them is refused before any
AssumeRole: a role there may well trust the platform."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import boto3
import botocore.exceptions

from models import OutcomeKind
from worker.settings import Settings
from worker.sts.checks import check_role_details
from worker.sts.classify import OTHER_ERRORS, classify_error
from worker.sts.client import StsClients
from worker.sts.outcome import Observer, Outcome, RoleDetails, customer, with_calls

PLATFORM_ACCOUNT_CODE = "PlatformAccount"


def _platform_account_message(details: RoleDetails) -> str:
    # Says nothing about the platform's roles (whether any exists or could be assumed): only
    # that this account is not one a customer can connect.
    return (
        f"AWS account {details.aws_account_id} cannot be connected: it is one of this "
        "service's own AWS accounts, not a customer account. Connect a role in an AWS account "
        "that your organization owns."
    )


class PlatformAccounts(StsClients):
    """The STS clients, and the platform's accounts they learn and refuse."""

    def __init__(
        self,
        settings: Settings,
        *,
        before_call: Callable[[], object] | None = None,
        on_throttled: Callable[[], object] | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        super().__init__(
            settings, before_call=before_call, on_throttled=on_throttled, session=session
        )
        # The platform's own AWS accounts, which no customer may connect: the configured ones
        # now, the worker's own credentials' account once GetCallerIdentity has named it.
        self._configured_platform_accounts = frozenset(settings.platform_account_ids)
        self._own_account: str | None = None
        self._platform_accounts_known = self._configured_platform_accounts
        self._identity_lock = threading.Lock()

    def _refuse_before_calling(self, details: RoleDetails, say: Observer) -> Outcome | None:
        """The checks made before any AssumeRole: the row's own details, then the platform's
        accounts (a role there may well trust the platform: a customer must never get it)."""
        problem = check_role_details(details)
        if problem is not None:
            say("input check", f"FAILED {problem.code}: {problem.message}")
            return problem
        say("input check", "ok")
        platform = self.platform_accounts()
        if isinstance(platform, Outcome):
            say(
                "platform check",
                f"FAILED {platform.code} ({platform.kind.value}): {platform.message}",
            )
            return platform
        if details.aws_account_id in platform:
            say("platform check", f"FAILED {PLATFORM_ACCOUNT_CODE}: the platform's own account")
            return customer(
                PLATFORM_ACCOUNT_CODE, _platform_account_message(details), decisive=True
            )
        say("platform check", "ok")
        return None

    def platform_accounts(self) -> frozenset[str] | Outcome:
        """The platform's own AWS accounts, or the outcome of failing to learn them.

        The worker's own account comes from GetCallerIdentity, asked once per process (the
        circuit breaker's probe refreshes it). Until it is known no role is assumed: the check
        must not be skipped because the answer is late.
        """
        if self._own_account is None:
            with self._identity_lock:
                # One call for all the threads that arrive together, not one each.
                if self._own_account is None:
                    outcome = self.probe()
                    if not outcome.verified:
                        return outcome
        return self._platform_accounts_known

    def probe(self) -> Outcome:
        """Check the platform's own credentials (GetCallerIdentity): the circuit breaker's probe.

        Also learns the account those credentials belong to (see `platform_accounts`).
        """
        try:
            if self._before_call is not None:
                self._before_call()
            identity = self.client().get_caller_identity()
        except (botocore.exceptions.ClientError, *OTHER_ERRORS) as error:
            return with_calls(classify_error(error, None, None), 1, self._settings.aws_region)
        account = identity.get("Account")
        if isinstance(account, str) and re.fullmatch(r"\d{12}", account, re.ASCII):
            # Built once: every verification tests membership in it.
            self._platform_accounts_known = self._configured_platform_accounts | {account}
            self._own_account = account
        else:
            return Outcome(
                OutcomeKind.TRANSIENT,
                "UnparseableResponse",
                "GetCallerIdentity answered without a usable Account",
                region=self._settings.aws_region,
                sts_calls=1,
            )
        return Outcome(
            OutcomeKind.VERIFIED,
            "verified",
            f"platform identity {identity.get('Arn', '?')}",
            region=self._settings.aws_region,
            sts_calls=1,
        )
