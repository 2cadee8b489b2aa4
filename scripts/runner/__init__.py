"""The modules of `scripts/run` (its command line and documentation are scripts/run.py):
`console` (terminal, signals), `supervisor` (children, their registry, the data directory's
lock), `servers` (embedded PostgreSQL and Redis, ports), `stack` (the whole stack), `schedule`
(what happens next), `commands` (`services` and `exec`). Processes and services themselves are
scripts.services'.

Only the standard library is imported at module level, here and in what these modules import:
`scripts/run --help` works on a fresh machine before the virtual environment exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The virtual environment's bin (celery, alembic), next to the interpreter running scripts/run.
VENV_BIN = Path(sys.executable).parent
