"""A sandbox STS: moto's server behind a layer that enforces IAM role trust policies as AWS does.

moto answers every ``AssumeRole`` with credentials, whatever the role's trust policy says and
whatever external ID is sent, so on its own it can only show the happy path. This module wraps
moto's WSGI application (the one ``moto.server.ThreadedMotoServer`` serves) in a middleware that,
for STS requests:

* accepts only the platform's configured access key ids (plus credentials moto itself issued)
  and otherwise answers AWS's real ``InvalidClientTokenId``; the platform's credentials can be
  revoked and restored at run time, from Python or over HTTP, to show the platform-fault path;
* evaluates the target role's trust policy (stored in moto's IAM backend for the role's account)
  against the caller and the request's ``ExternalId``, and answers AWS's real ``AccessDenied``
  when it does not allow the call (missing role, untrusted principal, wrong or missing external
  ID, explicit deny) — the same answer for all of them, as AWS gives;
* refuses a ``DurationSeconds`` beyond the role's ``MaxSessionDuration`` (or beyond an hour for
  role chaining) with AWS's ``ValidationError``, which moto does not check either;
* answers ``GetCallerIdentity`` for the platform principal itself, because moto would name a
  made-up ``user/moto`` in its default account;
* authorizes every request to another service made with an assumed role's credentials, as IAM
  does: the role's policies (inline and attached) must allow the action, the session policy
  passed to AssumeRole (if any) must allow it too, and an explicit deny in either wins. A refusal
  is the service's own AccessDenied in its own wire format (see `evaluate_permission`), so the
  worker's permission probes meet what AWS would answer. A probe fault (say, EC2 answering 503)
  can be switched on per service, from Python or over HTTP.

Customer roles are created through the real IAM API over HTTP with a dedicated admin access key
that the layer passes through to moto untouched; the admin client names the customer's account in
moto's ``x-moto-account-id`` header, which is how moto 5 serves several accounts from one server.
The admin key is refused by STS, so a worker misconfigured with it fails loudly instead of seeing
every role as trusted.

moto keeps its state in module-level dictionaries, so every sandbox in one process shares the same
roles; tests use distinct account ids or role names rather than resetting.

The package's modules: `names` (the platform's and the admin's keys, the region, the control
path), `policy` (trust and permission policy evaluation), `wire` (request parsing, answers in
each service's format), `authorization` (`TrustPolicyMiddleware`), `server` (`SandboxSts`) and
`admin` (IAM clients, customer roles, the control endpoints over HTTP).
"""

from sandbox.moto_sts.admin import (
    create_customer_role,
    delete_customer_role,
    get_platform_credentials_valid,
    iam_client,
    permissions_policy,
    security_audit_document,
    set_platform_credentials_valid,
    set_probe_fault,
    sts_calls,
)
from sandbox.moto_sts.authorization import TrustPolicyMiddleware
from sandbox.moto_sts.names import (
    ADMIN_ACCESS_KEY_ID,
    ADMIN_SECRET_ACCESS_KEY,
    CONTROL_PREFIX,
    DEFAULT_REGION,
    PLATFORM_ACCESS_KEY_ID,
    PLATFORM_ACCOUNT_ID,
    PLATFORM_PRINCIPAL_ARN,
    PLATFORM_SECRET_ACCESS_KEY,
    SCANNER_ACTIONS,
)
from sandbox.moto_sts.policy import (
    Caller,
    TrustDecision,
    evaluate_permission,
    evaluate_trust_policy,
    trust_policy,
)
from sandbox.moto_sts.server import SandboxSts

__all__ = [
    "ADMIN_ACCESS_KEY_ID",
    "ADMIN_SECRET_ACCESS_KEY",
    "CONTROL_PREFIX",
    "DEFAULT_REGION",
    "PLATFORM_ACCESS_KEY_ID",
    "PLATFORM_ACCOUNT_ID",
    "PLATFORM_PRINCIPAL_ARN",
    "PLATFORM_SECRET_ACCESS_KEY",
    "SCANNER_ACTIONS",
    "Caller",
    "SandboxSts",
    "TrustDecision",
    "TrustPolicyMiddleware",
    "create_customer_role",
    "delete_customer_role",
    "evaluate_permission",
    "evaluate_trust_policy",
    "get_platform_credentials_valid",
    "iam_client",
    "permissions_policy",
    "security_audit_document",
    "set_platform_credentials_valid",
    "set_probe_fault",
    "sts_calls",
    "trust_policy",
]
