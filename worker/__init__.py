"""The account verifier worker: `celery -A worker worker` and `celery -A worker beat`.

`worker.request_verification(...)` is the call the API uses to ask for a verification.

Its names load on first use (PEP 562): importing a submodule (`scripts/status` reads
`worker.fleet`) does not load the Celery app, its tasks and boto3, about a second of imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app import app
    from worker.requests import UnknownAccountsError, VerificationRequest, request_verification

__all__ = ["UnknownAccountsError", "VerificationRequest", "app", "request_verification"]

# name -> the module that defines it. `celery`: Celery's `-A worker` looks for `worker.app`,
# then `worker.celery`; once the submodule `worker.app` is imported, the attribute `app` is that
# module, and Celery finds the app under `celery`.
_LAZY = {
    "app": ("worker.app", "app"),
    "celery": ("worker.app", "app"),
    "UnknownAccountsError": ("worker.requests", "UnknownAccountsError"),
    "VerificationRequest": ("worker.requests", "VerificationRequest"),
    "request_verification": ("worker.requests", "request_verification"),
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0]), where[1])
    # Importing `worker.app` set the attribute `app` to the submodule: the Celery app wins, as
    # it did when this module imported it eagerly.
    globals()[name] = value
    return value
