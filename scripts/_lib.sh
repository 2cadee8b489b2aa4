# Shared by scripts/test and scripts/run. Sourced, not executed.

step() { printf '\n==> %s\n' "$*" >&2; }

# Create .venv with the project and its dev extra, or refresh it when pyproject.toml changed.
ensure_venv() {
  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3.12 python3.11 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
  fi
  [ -n "$python" ] || { echo "error: Python 3.11 or 3.12 is required" >&2; exit 2; }
  if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $($python --version)"
    "$python" -m venv .venv
  fi
  local stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    step "installing the project into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev${EXTRA_EXTRAS:-}]"
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
}

_host_port() {  # URL -> "host port" (defaults given as $2)
  .venv/bin/python - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PY
}

_is_local() { case "$1" in 127.0.0.1|localhost|::1) return 0 ;; *) return 1 ;; esac; }

_wait_port() {  # host port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

ensure_postgres() {
  local host port
  read -r host port < <(_host_port "$1" 5432)
  if _wait_port "$host" "$port" 1; then return 0; fi
  if _is_local "$host" && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    step "starting the machine's PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  _wait_port "$host" "$port" 30 || { echo "error: PostgreSQL is not reachable at $host:$port" >&2; exit 3; }
}

ensure_redis() {
  local host port
  read -r host port < <(_host_port "$1" 6379)
  if _wait_port "$host" "$port" 1; then return 0; fi
  if _is_local "$host" && command -v redis-server >/dev/null 2>&1; then
    step "starting the machine's Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no
  fi
  _wait_port "$host" "$port" 30 || { echo "error: Redis is not reachable at $host:$port" >&2; exit 3; }
}
