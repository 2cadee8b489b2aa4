"""The account verifier worker: `celery -A worker worker` and `celery -A worker beat`.

`worker.request_verification(...)` is the call the API uses to ask for a verification.
"""

from worker.app import app
from worker.requests import UnknownAccountsError, VerificationRequest, request_verification

__all__ = ["UnknownAccountsError", "VerificationRequest", "app", "request_verification"]
