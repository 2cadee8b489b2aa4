"""The AWS side: one verification attempt against STS, returned as a typed outcome.

This is the only package that imports boto3/botocore. It holds, per process and region, one STS
client (GetCallerIdentity; botocore clients are thread-safe, sessions are not) and AssumeRole's
request built once by botocore and then only re-signed (`assume_role`), both built on first use.

An attempt never raises for anything AWS or the network does: every answer, error or silence is
classified into one of four kinds (docs/design.md; each STS answer in docs/sts-errors.md):

- verified            the role was assumed, names the right account, and enforces the external ID
- customer_must_fix   the customer's role or the row is wrong; the message says what to change
- transient           nobody's fault (throttling, 5xx, timeouts, resets, unparseable answers)
- platform_fault      our own credentials or request are broken; no customer is to blame

Temporary credentials returned by AssumeRole are proof only: they are dropped at once, and the
session policy denies every action, so even a leaked copy could do nothing. When permission
probes are due (worker/permissions.py), the session policy instead allows exactly the probed
read-only actions, and the credentials live only in memory for the few concurrent probe calls.

The modules, each importing only those above it:

- `outcome`     what an attempt returns (`Outcome`, `RoleDetails`, `PermissionReport`); no boto3
- `checks`      the local checks of a connection's details, before any AWS call
- `classify`    every botocore error and STS answer turned into an outcome (docs/sts-errors.md)
- `signing`     a request built once by botocore, then only re-signed (SigV4) and sent
- `assume_role` AssumeRole that way, read and retried as a botocore client would
- `probe_calls` the permission probes' requests, built and sent that way
- `probe_preload` those requests built by a short-lived child process, before the pool forks
- `probes`      the permission probes' calls, signed with the customer's role
- `client`      the process's STS clients and AssumeRole calls, their hooks (rate limiter,
                throttle), the probes' preload
- `platform`    the platform's own accounts (GetCallerIdentity), refused before any AssumeRole
- `verifier`    one attempt: `StsVerifier.verify` (`worker.resources` builds the process's)
"""
