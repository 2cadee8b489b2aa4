"""The environment of a running `scripts/run`, kept in DATA_DIR/stack.env for other terminals.

`scripts/run` writes the settings it made up for its children (the embedded servers' URLs, the
sandbox STS's endpoint and its fake credentials) to DATA_DIR/stack.env while it runs and removes
the file when it stops. `scripts/reverify` reads it when DATABASE_URL is not set, and
`scripts/run exec -- COMMAND` runs a command with it, so the README's commands reach the stack that
is running rather than whatever the defaults point at.

What is never written: a password (a DATABASE_URL or REDIS_URL the operator gave with one is left
out) and any AWS setting the operator gave (real credentials stay in the operator's environment).
The file is created with mode 0600 all the same: it is the stack's access, and the data directory
itself is readable by others (PostgreSQL may run as `nobody`).

Only the standard library: `scripts/run` imports this before the virtual environment exists.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
FILE_NAME = "stack.env"

# Any of these in the environment means "the operator configured AWS": scripts/run then starts no
# sandbox, and reverify then takes none of the file's AWS settings (a mix of the operator's profile
# and the sandbox's keys would be neither).
REAL_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

# What another terminal needs to reach the stack, in the order written.
STACK_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "PLATFORM_PRINCIPAL_ARN",
)
# The operator's own values that are settings, not secrets: written even though they were given.
_NOT_SECRET = frozenset({"AWS_REGION", "AWS_DEFAULT_REGION", "PLATFORM_PRINCIPAL_ARN"})

_OWNER_PREFIX = "# owner: "


def default_data_dir() -> Path:
    """DATA_DIR as scripts/run chooses it without --data-dir: $VERIFIER_DATA_DIR, else .data."""
    raw = os.environ.get("VERIFIER_DATA_DIR") or str(ROOT / ".data")
    return Path(raw).expanduser().resolve()


def stack_values(
    stack: Mapping[str, str], given: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """What of the children's environment `stack` goes in the file, and what is left out (names).

    `given` is scripts/run's own environment: a value the operator gave is theirs, and is written
    only when it is a plain setting, or a URL without a password.
    """
    values: dict[str, str] = {}
    left_out: list[str] = []
    for name in STACK_VARIABLES:
        value = stack.get(name)
        if not value:
            continue
        operators = given.get(name) == value and name not in _NOT_SECRET
        if operators and (name.startswith("AWS_") or _has_password(value)):
            left_out.append(name)
            continue
        values[name] = value
    return values, left_out


def _has_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return True  # unparseable: do not risk writing a secret


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a recycled pid is not taken for the owner."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _owner_tag(pid: int) -> str:
    return f"{pid} {_process_start_time(pid) or '-'}"


def _owner_alive(tag: str) -> bool:
    pid_text, _, started = tag.partition(" ")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if started not in ("", "-"):
        return _process_start_time(pid) == started
    try:  # no /proc (macOS): a live pid is the best evidence there is
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_stack_env(
    data_dir: Path, values: Mapping[str, str], *, left_out: list[str], owner_pid: int
) -> Path:
    """Write DATA_DIR/stack.env (mode 0600, atomically); `sh` can source it too."""
    path = data_dir / FILE_NAME
    lines = [
        "# The environment of the scripts/run using this data directory; removed when it stops.",
        "# Read by scripts/reverify (when DATABASE_URL is not set) and scripts/run exec.",
        f"{_OWNER_PREFIX}{_owner_tag(owner_pid)}",
    ]
    if left_out:
        lines.append(
            "# Not written (given to scripts/run, with a password or AWS credentials): "
            + ", ".join(left_out)
        )
    lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    temporary = path.with_name(f".{FILE_NAME}.{owner_pid}")
    temporary.unlink(missing_ok=True)
    # Created 0600 from the start: no moment at which another user could open it.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    temporary.replace(path)
    return path


def remove_stack_env(data_dir: Path) -> None:
    """Remove the file (scripts/run stopping)."""
    with contextlib.suppress(OSError):
        (data_dir / FILE_NAME).unlink()


def read_stack_env(data_dir: Path | None = None) -> tuple[Path, dict[str, str]] | None:
    """The file and its values, or None when there is none or its scripts/run is gone."""
    path = (data_dir or default_data_dir()) / FILE_NAME
    try:
        text = path.read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    owner = ""
    for line in text.splitlines():
        if line.startswith(_OWNER_PREFIX):
            owner = line.removeprefix(_OWNER_PREFIX).strip()
            continue
        name, sep, raw = line.partition("=")
        if line.startswith("#") or not sep:
            continue
        try:
            parts = shlex.split(raw)
        except ValueError:
            continue
        values[name.strip()] = parts[0] if parts else ""
    # A scripts/run killed with SIGKILL leaves the file behind: its URLs lead nowhere.
    if not _owner_alive(owner):
        return None
    return path, values


def apply_stack_env(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Fill `environ` (os.environ) from the running scripts/run's stack.env; returns the file used.

    Only when DATABASE_URL is not set: a database given explicitly says which system is meant.
    A variable set in the environment wins over the file, and the file's AWS settings are taken
    only when the environment configures no AWS of its own (any of REAL_AWS_VARIABLES).
    """
    environ = os.environ if environ is None else environ
    if environ.get("DATABASE_URL"):
        return None
    found = read_stack_env()
    if found is None:
        return None
    path, values = found
    if "DATABASE_URL" not in values:
        return None  # the stack's database was given with a password: the operator has it
    own_aws = any(environ.get(name) for name in REAL_AWS_VARIABLES)
    for name, value in values.items():
        if environ.get(name) or (own_aws and name.startswith("AWS_")):
            continue
        environ[name] = value
    return path
