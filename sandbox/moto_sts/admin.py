"""Administering the sandbox from outside: IAM clients acting in a customer's account, customer
roles with their trust and permission policies, and the control endpoints over HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import boto3
import botocore.session

from sandbox.moto_sts.names import (
    _ACCOUNT_ID_RE,
    _MOTO_ACCOUNT_HEADER,
    ADMIN_ACCESS_KEY_ID,
    ADMIN_SECRET_ACCESS_KEY,
    CONTROL_PREFIX,
    DEFAULT_REGION,
    SCANNER_ACTIONS,
)
from sandbox.moto_sts.policy import trust_policy

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient

# --------------------------------------------------------------------------- admin helpers


# botocore sessions are not thread-safe; creating clients under a lock is enough (clients are).
_client_lock = threading.Lock()


@functools.cache
def _botocore_session() -> botocore.session.Session:
    """The botocore session behind every admin client.

    Shared, so service models load once and a client costs milliseconds rather than ~70 ms. It
    reads no AWS profile or config file: an ``AWS_PROFILE`` naming a profile this machine lacks
    would otherwise break the sandbox's own clients, whose settings are all explicit.
    """
    return botocore.session.Session(
        session_vars={
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        }
    )


def iam_client(endpoint_url: str, account_id: str, *, region: str = DEFAULT_REGION) -> IAMClient:
    """An IAM client that administers `account_id` inside the sandbox at `endpoint_url`.

    It signs with the admin key (passed through to moto untouched) and names the account in
    moto's ``x-moto-account-id`` header. Region, endpoint and credentials are explicit and no
    AWS profile or config file is read, so the machine's AWS setup plays no part.
    """
    if not _ACCOUNT_ID_RE.match(account_id):
        raise ValueError(f"an AWS account id is 12 digits, not {account_id!r}")
    with _client_lock:
        client = boto3.session.Session(botocore_session=_botocore_session()).client(
            "iam",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=ADMIN_ACCESS_KEY_ID,
            aws_secret_access_key=ADMIN_SECRET_ACCESS_KEY,
        )

    def name_account(request: Any, **_: Any) -> None:
        request.headers[_MOTO_ACCOUNT_HEADER] = account_id

    client.meta.events.register("before-sign.iam.*", name_account)
    return client


def permissions_policy(actions: Iterable[str]) -> dict[str, Any]:
    """An identity policy allowing `actions` on every resource."""
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": sorted(actions), "Resource": "*"}],
    }


@functools.cache
def security_audit_document() -> str:
    """The AWS managed policy SecurityAudit's document, from the copy moto ships."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data  # noqa: PLC0415 - 2 MB

    return json.dumps(json.loads(aws_managed_policies_data)["SecurityAudit"]["Document"])


def create_customer_role(
    endpoint_url: str,
    account_id: str,
    role_name: str,
    trusted_principal_arn: str,
    external_id: str | None,
    *,
    permissions: Iterable[str] | None = SCANNER_ACTIONS,
    security_audit: bool = False,
) -> str:
    """Create (or re-point) a customer's role trusting a principal; returns the role's ARN.

    The trust policy requires `external_id` through ``sts:ExternalId`` when given and has no
    condition when it is None. An existing role of that name gets the new trust policy, so
    seeding twice is harmless. The role gets an inline policy ``ScannerReadOnly`` allowing
    `permissions` (by default what the worker's permission probes check; None or empty: no such
    policy), and with `security_audit` a copy of the AWS managed policy SecurityAudit, attached
    as a customer-managed policy (moto loads AWS managed policies only for every account at
    once, which costs seconds per account).
    """
    client = iam_client(endpoint_url, account_id)
    document = json.dumps(trust_policy(trusted_principal_arn, external_id))
    try:
        arn = client.create_role(RoleName=role_name, AssumeRolePolicyDocument=document)["Role"][
            "Arn"
        ]
    except client.exceptions.EntityAlreadyExistsException:
        client.update_assume_role_policy(RoleName=role_name, PolicyDocument=document)
        arn = client.get_role(RoleName=role_name)["Role"]["Arn"]
    actions = list(permissions or ())
    if actions:
        client.put_role_policy(
            RoleName=role_name,
            PolicyName="ScannerReadOnly",
            PolicyDocument=json.dumps(permissions_policy(actions)),
        )
    if security_audit:
        policy_arn = f"arn:aws:iam::{account_id}:policy/sandbox/SecurityAudit"
        with contextlib.suppress(client.exceptions.EntityAlreadyExistsException):
            client.create_policy(
                PolicyName="SecurityAudit",
                Path="/sandbox/",
                PolicyDocument=security_audit_document(),
            )
        client.attach_role_policy(RoleName=role_name, PolicyArn=policy_arn)
    return arn


def delete_customer_role(endpoint_url: str, account_id: str, role_name: str) -> bool:
    """Delete a customer's role; returns False when it did not exist."""
    client = iam_client(endpoint_url, account_id)
    try:
        # IAM refuses to delete a role that still has policies, as AWS does.
        for name in client.list_role_policies(RoleName=role_name)["PolicyNames"]:
            client.delete_role_policy(RoleName=role_name, PolicyName=name)
        for attached in client.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
            client.detach_role_policy(RoleName=role_name, PolicyArn=attached["PolicyArn"])
        client.delete_role(RoleName=role_name)
    except client.exceptions.NoSuchEntityException:
        return False
    return True


def _control_request(
    endpoint_url: str, payload: Mapping[str, Any] | None, path: str = "platform-credentials"
) -> dict[str, Any]:
    url = endpoint_url.rstrip("/") + CONTROL_PREFIX + path
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) endpoint: {endpoint_url!r}")
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method="GET" if data is None else "POST"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - scheme checked
        result: dict[str, Any] = json.load(response)
    return result


def set_platform_credentials_valid(endpoint_url: str, valid: bool) -> None:
    """Revoke (False) or restore (True) the platform's credentials of a sandbox over HTTP."""
    _control_request(endpoint_url, {"valid": valid})


def sts_calls(endpoint_url: str) -> dict[str, Any]:
    """STS calls a sandbox reached over HTTP has received: ``by_action`` and ``assume_role``
    (AssumeRole by role ARN)."""
    return _control_request(endpoint_url, None, "calls")


def get_platform_credentials_valid(endpoint_url: str) -> bool:
    """Whether a sandbox reached over HTTP currently accepts the platform's credentials."""
    return bool(_control_request(endpoint_url, None)["valid"])


def set_probe_fault(endpoint_url: str, service: str, code: str | None) -> None:
    """Make a sandbox reached over HTTP answer `service` with a 503 `code` (None: stop)."""
    _control_request(endpoint_url, {service: code}, "probe-faults")
