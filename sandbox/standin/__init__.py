"""A fast, scriptable stand-in for AWS STS (and the permission probes' four calls) that answers
in the services' real wire format.

Why it exists: moto accepts every role, every external ID and every duration, so it can only
show the happy path. The worker's failure paths (a role that refuses us, throttling, 5xx, a
connection reset, a body that is not XML, our own credentials going bad) must be exercised
against answers that botocore parses exactly as it parses real STS: AWS Query protocol in,
``text/xml`` out, AWS's error envelope and HTTP statuses (see ``docs/sts-errors.md``). It is also
the STS of the throughput benchmark, so it is one asyncio event loop (protocol callbacks, no
per-request threads or coroutines) with cached parsing and string templates: a request costs
about 0.15-0.2 ms of CPU, kernel included, so 1,000 requests/s take a fifth of one core.

How a role behaves is decided by its **name** (the last segment of the role ARN), so that any
process (worker, benchmark, fault suite) can pick a behaviour without setting anything up. The
prefix is matched case-insensitively, longest first; a name matching none behaves like ``ok``.
Mind realistic names: ``ResetPasswordRole`` resets the connection, ``SlowlaneRole`` is slow.

==================  ==========================================================================
role name prefix    answer to AssumeRole
==================  ==========================================================================
``ok`` (default)    success; the role **requires** an external ID: a call without ``ExternalId``
                    gets ``AccessDenied`` (403), like a role whose trust policy has the
                    ``sts:ExternalId`` condition. With ``expected_external_ids`` set for the
                    role ARN, a different external ID is refused too.
``noext``           success even without ``ExternalId`` (the external ID is not enforced)
``otheracct``       success requiring the external ID, but the assumed-role ARN names another
                    12-digit account (role's account + 1), so the client sees an identity
                    mismatch
``deny``            ``AccessDenied`` (403) always
``throttle``        ``Throttling`` (400, "Rate exceeded")
``error500``        ``InternalFailure`` (500)
``error503``        ``ServiceUnavailable`` (503)
``slow``            success requiring the external ID, answered after ``slow_seconds``
                    (default 30 s, longer than any sane client read timeout)
``reset``           the connection is reset (TCP RST) without an answer
``garbage``         HTTP 200 with a ``text/plain`` body that is not XML (botocore raises
                    ``ResponseParserError``)
``regiondisabled``  ``RegionDisabledException`` (403) unless the request is signed for a region
                    in ``enabled_regions`` (default ``us-east-1``, which AWS never disables;
                    ``*`` enables all, which makes a whole instance the "fallback region").
                    The region is read from the SigV4 credential scope, so one instance serves
                    both the primary region and the fallback: a client with
                    ``region_name="eu-south-1"`` is refused, one with ``"us-east-1"`` succeeds.
                    Its credentials are refused by the probed services in those regions too
                    (EC2: ``AuthFailure``, others ``InvalidClientTokenId``), as an opt-in
                    region the account has not enabled refuses its tokens.
``expiredtoken``    ``ExpiredToken`` (400), as if the platform's credentials had expired
``invalidtoken``    ``InvalidClientTokenId`` (403), as if the platform's key were unknown
``badsignature``    ``SignatureDoesNotMatch`` (403), as if the platform's secret were wrong
``flaky[N]``        the first N calls for that role ARN (default ``flaky_failures`` = 2) get
                    ``flaky_error`` (default ``InternalFailure``), later calls behave like ``ok``
``noperms``         like ``ok``, but the role is allowed none of the probed permissions below
``noec2``           like ``ok``, but the role is not allowed ``ec2:DescribeRegions``
``probeerror``      like ``ok``, but every probe call gets ``ServiceUnavailable`` (503)
``bigquota``        like ``ok``, but the account's bucket quota is above 10,000: an unpaged
                    ListBuckets (no ``max-buckets``) is refused, as S3 documents (the code,
                    ``InvalidRequest`` (400), is our guess: AWS does not document it)
==================  ==========================================================================

Permission probes: the four read-only calls the worker makes with the credentials AssumeRole
issued (``iam:GetAccountSummary``, ``ec2:DescribeRegions``, ``s3:ListAllMyBuckets``,
``cloudtrail:DescribeTrails``; the request's SigV4 scope names the service) are answered in each
service's own wire format. What the credentials may do is decided when they are issued and
written into the access key id (``ASIAFAKE`` + a hex digit of allowed probes + a fault flag), so
no state is kept per credential: the role's permissions (by name, as above) intersected with the
session policy passed to AssumeRole (``Deny *`` allows nothing; no policy leaves the role's). A
call that is not allowed gets the service's AccessDenied (EC2: ``UnauthorizedOperation``, JSON
services: ``AccessDeniedException``); any other call is refused the same way. Probe calls have
the STS latency, are not rate-limited and are counted apart (``probe_requests``, ``by_probe``,
``probe_outcomes``).

Input is validated first, as STS does: RoleArn (an IAM role ARN, 20-2048 characters),
RoleSessionName (2-64, ``[\\w+=,.@-]``), ExternalId (2-1224, ``[\\w+=,.@:/-]``),
DurationSeconds (900-43200 and at most ``max_session_seconds``, default 3600), Policy (JSON,
at most 2048 characters) all answer ``ValidationError`` / ``MalformedPolicyDocument`` (400).
``GetCallerIdentity`` answers the platform's identity (``platform_arn``).

Checks before any role logic, in order: a SigV4 ``Authorization`` header is present
(``MissingAuthenticationToken``), ``platform_credentials_valid`` and ``accepted_access_keys``
(``InvalidClientTokenId``), the global token-bucket ``rate_limit`` (``Throttling``), then
``force_error`` (every matching request gets that code, or ``reset``/``garbage``/``slow``, with
probability ``force_ratio``, for ``force_seconds`` or until cleared). Every STS answer, errors
included, is delayed by a latency drawn from a seeded log-normal distribution (median
``median_ms``, default 50 ms; ``latency_sigma`` 0.65 puts p99 at about 4.5x the median;
``median_ms=0`` answers at once).

Control endpoint (JSON, never delayed, throttled or counted):

- ``GET /_standin/config`` and ``POST /_standin/config`` with a JSON object of knobs to change,
  e.g. ``{"force_error": "Throttling", "force_ratio": 0.8, "force_seconds": 30}`` or
  ``{"rate_limit": null}``; answers the whole configuration.
- ``GET /_standin/stats`` (``?roles=0`` leaves out the per-role counts): requests, by action,
  by outcome (error code, ``Success``, ``reset``, ``garbage``), throttled, rate-limited, slow,
  AssumeRole calls without an external ID, connections, per-role-ARN call counts.
- ``POST /_standin/reset``: zero the statistics and the ``flaky`` counters (not the knobs).

Use it in-process (``with StsStandIn(median_ms=0) as sts: ... sts.endpoint_url``; the loop runs
in one background thread), inside an existing event loop (``await serve(config, stop_event)``),
or as a process: ``python -m sandbox.standin --port 4566`` prints its URL on one line when
ready and exits 0 on SIGINT/SIGTERM. Point the worker at it with ``AWS_ENDPOINT_URL_STS``.
Generated credentials are random per call and obviously fake (``ASIAFAKE...``,
``FAKEstandin...``). Not emulated: signature verification, chunked request bodies, role
chaining, tags and the other STS actions (answered ``InvalidAction``).

The package's modules: `wire` (STS's error codes, escaping, form parsing), `behaviours` (role-name
prefixes, latency), `config` (`StandInConfig`), `base` (state, counters, STS answers), `probes`
(the permission probes' answers), `assume_role`, `core` (dispatch and the control endpoint),
`server` (HTTP over asyncio, `serve`, `StsStandIn`) and `cli` (``python -m sandbox.standin``).
"""

from sandbox.standin.behaviours import ROLE_PREFIXES, draw_latency_seconds, role_behaviour
from sandbox.standin.cli import build_parser, main
from sandbox.standin.config import StandInConfig
from sandbox.standin.probes import (
    PROBES,
    denied_code,
    service_content_type,
    service_error,
    session_policy_mask,
)
from sandbox.standin.server import StsStandIn, serve
from sandbox.standin.wire import STS_ERRORS

__all__ = [
    "PROBES",
    "ROLE_PREFIXES",
    "STS_ERRORS",
    "StandInConfig",
    "StsStandIn",
    "build_parser",
    "denied_code",
    "draw_latency_seconds",
    "main",
    "role_behaviour",
    "serve",
    "service_content_type",
    "service_error",
    "session_policy_mask",
]
