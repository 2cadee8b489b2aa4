"""The probes' requests built in a short-lived process, so the worker's main process never
loads a service model.

Building a request loads its service's model (the EC2 model alone is tens of MB of parsed
JSON); freed afterwards, that memory stays in the process's heap, and a worker's main process
would hand it to every process of its pool. Here `python -m worker.sts.probe_preload` builds
them (`worker.sts.probe_calls.build_probe_call`, with the same environment) and prints only their
plain parts: method, URL, headers without any signature, body, the canonical request's constant
parts, and the arguments of botocore's HTTP session (proxies, CA bundle, client certificate,
socket options). No credentials are in them: the requests are built with a placeholder key.
The main process then makes the same `ProbeCall`s, checks each signature against botocore's
signer again, and keeps them for `probe_call` to find.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from botocore.config import Config
from botocore.httpsession import URLLib3Session

from worker.permissions import CATALOGUE, Probe
from worker.sts.probe_calls import CONFIG_FIELDS, ProbeCall, build_probe_call, check_signature, keep
from worker.sts.transport import botocore_session, fast_session

# The parts of a ProbeCall that are plain data (the rest: the probe, the HTTP session, retries).
_PLAIN = tuple(
    field.name
    for field in dataclasses.fields(ProbeCall)
    if field.name not in ("probe", "http", "max_attempts")
)
_TIMEOUT_SECONDS = 60


def _http_arguments(http: Any) -> dict[str, Any]:
    """The arguments botocore built this URLLib3Session with (its own attributes)."""
    cert = http._cert_file if http._key_file is None else [http._cert_file, http._key_file]
    return {
        "verify": http._verify,
        "proxies": http._proxy_config._proxies,
        "proxies_config": http._proxy_config._proxies_settings,
        "timeout": [http._timeout.connect_timeout, http._timeout.read_timeout],
        "max_pool_connections": http._max_pool_connections,
        "socket_options": http._socket_options,
        "client_cert": cert,
    }


def _http_session(arguments: dict[str, Any]) -> URLLib3Session:
    """botocore's HTTP session with these arguments (JSON's lists back to tuples)."""
    cert = arguments["client_cert"]
    tuples: dict[str, Any] = {
        "timeout": tuple(arguments["timeout"]),
        "socket_options": [tuple(option) for option in arguments["socket_options"]],
        "client_cert": tuple(cert) if isinstance(cert, list) else cert,
    }
    return URLLib3Session(**{**arguments, **tuples})


def _plain(call: ProbeCall) -> dict[str, Any]:
    parts = {name: getattr(call, name) for name in _PLAIN}
    parts["body"] = base64.b64encode(call.body).decode()
    parts["headers"] = [list(pair) for pair in call.headers]
    return {"parts": parts, "http": _http_arguments(botocore_session(call.http))}


def _from_plain(probe: Probe, built: dict[str, Any], max_attempts: int) -> ProbeCall:
    parts = dict(built["parts"])
    parts["body"] = base64.b64decode(parts["body"])
    parts["headers"] = tuple((str(name), str(value)) for name, value in parts["headers"])
    call = ProbeCall(
        probe=probe,
        http=fast_session(_http_session(built["http"])),
        max_attempts=max_attempts,
        **parts,
    )
    check_signature(call)
    return call


def preload(
    probes: Iterable[Probe], regions: Iterable[str], config: Config, max_attempts: int
) -> None:
    """Build these calls in a child process and keep them here, for `probe_call` to find.

    Raises RuntimeError naming the errors of the calls the child could not build (those are
    built again, and fail again, where they are used).
    """
    order = {
        "probes": [probe.permission for probe in probes],
        "regions": list(regions),
        "config": {name: getattr(config, name, None) for name in CONFIG_FIELDS},
        "max_attempts": max_attempts,
    }
    done = subprocess.run(  # noqa: S603 - this interpreter, this module
        [sys.executable, "-m", __name__],
        input=json.dumps(order),
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the probes' requests were not built (exit {done.returncode})")
    errors = []
    for built in json.loads(done.stdout):
        if "error" in built:
            errors.append(f"{built['permission']}: {built['error']}")
            continue
        probe = CATALOGUE[built["permission"]]
        keep(_from_plain(probe, built, max_attempts), built["region"], config)
    if errors:
        raise RuntimeError("; ".join(errors))


def main() -> None:
    """Read the order on stdin, print the built calls' plain parts (or each one's error)."""
    order = json.load(sys.stdin)
    config = Config(**order["config"])
    out: list[dict[str, Any]] = []
    for region in order["regions"]:
        for permission in order["probes"]:
            where = {"permission": permission, "region": region}
            try:
                call = build_probe_call(CATALOGUE[permission], region, config, 1)
            except Exception as error:  # noqa: BLE001 - reported by name, met again where used
                out.append({**where, "error": type(error).__name__})
            else:
                out.append({**where, **_plain(call)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
