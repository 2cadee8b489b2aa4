"""The sandbox's fixed names: who the platform and the admin are, the region clients sign for,
what a demo or test role may do, and where the control endpoints and moto's account header are.
"""

from __future__ import annotations

import re

#: The platform's AWS account: the account the worker's own credentials belong to.
PLATFORM_ACCOUNT_ID = "111122223333"
#: The principal the worker calls STS as; customer roles must trust it (or its account).
PLATFORM_PRINCIPAL_ARN = f"arn:aws:iam::{PLATFORM_ACCOUNT_ID}:user/verifier"
#: The access key id the worker signs with. Obviously fake; the sandbox never checks signatures.
PLATFORM_ACCESS_KEY_ID = "AKIASANDBOXPLATFORM0"
#: Any secret is accepted; this one is only a convenient default for clients.
PLATFORM_SECRET_ACCESS_KEY = "sandbox-platform-secret"  # noqa: S105 - fake, never checked
#: The key that administers customer accounts (IAM) through moto, bypassing the trust layer.
ADMIN_ACCESS_KEY_ID = "AKIASANDBOXADMIN0000"
ADMIN_SECRET_ACCESS_KEY = "sandbox-admin-secret"  # noqa: S105 - fake, never checked
#: The region clients sign for; moto serves IAM and STS from any.
DEFAULT_REGION = "us-east-1"
#: What the worker's default permission probes need (worker/permissions.py; a test keeps the two
#: equal): the policy a well-configured demo or test role carries.
SCANNER_ACTIONS = (
    "iam:GetAccountSummary",
    "ec2:DescribeRegions",
    "s3:ListAllMyBuckets",
    "cloudtrail:DescribeTrails",
)
#: Path prefix of the sandbox's own HTTP control endpoints (never forwarded to moto).
CONTROL_PREFIX = "/_sandbox/"

_MOTO_ACCOUNT_HEADER = "x-moto-account-id"
_MOTO_ACCOUNT_ENVIRON = "HTTP_X_MOTO_ACCOUNT_ID"

_ACCOUNT_ID_RE = re.compile(r"^\d{12}$")
