# Shared by scripts/test and scripts/run. Sourced, not executed, from the repository root.

step() { printf '\n==> %s\n' "$*" >&2; }

_python_ok() {  # interpreter -> success when it is a Python the project supports (3.11 to 3.13)
  "$1" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))' >/dev/null 2>&1
}

# Print the interpreter to build .venv with: $PYTHON, else the first of python3.12, python3.11,
# python3 that is a supported version. 3.12 and 3.11 come first: the embedded PostgreSQL and Redis
# (the `embedded` extra) have no wheels for 3.13 yet.
find_python() {
  local candidate found=() candidates=(python3.12 python3.11 python3)
  if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); fi
  for candidate in "${candidates[@]}"; do
    if ! command -v "$candidate" >/dev/null 2>&1; then
      found+=("$candidate: not found")
      continue
    fi
    if _python_ok "$candidate"; then echo "$candidate"; return 0; fi
    found+=("$candidate: $("$candidate" --version 2>&1 | head -1)")
  done
  {
    echo "error: Python 3.11 or 3.12 is required${found:+ (found ${found[*]})}."
    echo "Install one (e.g. apt-get install python3.11, or pyenv), or set PYTHON=/path/to/python3.12."
  } >&2
  return 2
}

# uv installs the locked dependencies several times faster than pip; it is itself installed from
# the package index into .venv (pinned), and pip is the fallback when it cannot be had.
UV_VERSION=0.13.9

# Create .venv with the locked dependencies of the project's dev and embedded extras
# (requirements/dev.txt, hashes checked) and the project itself in editable mode, or refresh it
# when the lock or pyproject.toml changed. The lock is made from pyproject.toml with
# scripts/lock (uv pip compile); nothing unlocked is installed.
ensure_venv() {
  local python lock=requirements/dev.txt
  if [ -x .venv/bin/python ] && ! _python_ok .venv/bin/python; then
    echo "error: .venv was made with $(.venv/bin/python --version 2>&1); delete it (rm -rf .venv) to rebuild with Python 3.11 or 3.12" >&2
    exit 2
  fi
  if [ ! -x .venv/bin/python ]; then
    python="$(find_python)" || exit 2
    step "creating .venv with $("$python" --version 2>&1)"
    if ! "$python" -m venv .venv; then
      rm -rf .venv
      echo "error: could not create .venv with $python (on Debian or Ubuntu: apt-get install python3-venv)" >&2
      exit 2
    fi
  fi
  # The stamp names what was installed: a change of the lock or of pyproject.toml reinstalls.
  # (v2: installs compile bytecode.)
  local stamp=".venv/.installed-$( (echo v2; cat "$lock" pyproject.toml) | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    step "installing the locked dependencies and the project into .venv ($lock)"
    if [ -x .venv/bin/uv ] || .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        "uv==$UV_VERSION" >/dev/null 2>&1; then
      # Bytecode compiled now: where PYTHONDONTWRITEBYTECODE is set (this project's CI machines),
      # Python would otherwise compile every module from source in every process it starts.
      VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip sync --quiet --require-hashes --compile-bytecode "$lock"
      VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install --quiet --no-deps -e .
    else
      .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock"
      .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
  # The project's own modules too (only those changed since their last compile).
  .venv/bin/python -m compileall -q models worker scripts sandbox tests >/dev/null || true
}

# try_postgres URL: succeed when PostgreSQL answers at URL's host and port, starting the machine's
# own cluster first when the URL is local and one is installed but stopped. try_redis URL: the
# same for Redis, with the machine's redis-server. ensure_*: the same, or exit 3 with an error.
# (scripts/services/machine.py; needs .venv.)
try_postgres() { .venv/bin/python -m scripts.services.machine --try postgres "$1"; }
try_redis() { .venv/bin/python -m scripts.services.machine --try redis "$1"; }
ensure_postgres() { .venv/bin/python -m scripts.services.machine postgres "$1" || exit $?; }
ensure_redis() { .venv/bin/python -m scripts.services.machine redis "$1" || exit $?; }
