"""Signing secrets: made, encrypted at rest, and used for Standard Webhooks signatures.

Signing is a few lines of the standard library (HMAC-SHA256 over `id.timestamp.body`); the tests
and the sandbox receiver verify it with the independent `standardwebhooks` package.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from worker.settings import Settings

SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's prefix, not a secret
# The spec asks for 24 to 64 random bytes.
_SECRET_BYTES = 32
# Secrets a box keeps decrypted (in memory only), by their stored form.
_DECRYPTED_KEPT = 4096


class SecretKeyError(RuntimeError):
    """WEBHOOK_SECRET_KEY is missing or cannot decrypt a stored secret (the key changed)."""


def generate_secret() -> str:
    """A new `whsec_<base64>` signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def generate_key() -> str:
    """A new WEBHOOK_SECRET_KEY (a Fernet key)."""
    return Fernet.generate_key().decode()


def _fernet(key: str, variable: str) -> Fernet:
    try:
        return Fernet(key.strip().encode())
    except ValueError:
        # The message never repeats the key.
        raise SecretKeyError(
            f"{variable} is not a Fernet key (32 url-safe base64-encoded bytes; "
            "`scripts/webhooks new-key` makes one)"
        ) from None


class SecretBox:
    """Encrypts signing secrets for the database with WEBHOOK_SECRET_KEY (Fernet: AES + HMAC).

    Decryption also tries WEBHOOK_PREVIOUS_SECRET_KEYS, so the key can be changed without
    losing the secrets stored under the old one (re-encrypted with the current key when rotated).

    Every attempt needs its endpoint's secrets, and decrypting (an HMAC check and AES) costs more
    than the rest of signing: the box keeps the `_DECRYPTED_KEPT` secrets it decrypted last, in
    memory only, keyed by the stored form (which a rotation changes). A stored form that does not
    decrypt is tried again each time.
    """

    def __init__(self, key: str, previous: Sequence[str] = ()) -> None:
        self._fernet = MultiFernet(
            [
                _fernet(key, "WEBHOOK_SECRET_KEY"),
                *(_fernet(k, "WEBHOOK_PREVIOUS_SECRET_KEYS") for k in previous),
            ]
        )
        self._decrypted = functools.lru_cache(maxsize=_DECRYPTED_KEPT)(self._decrypt)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for the configured keys; SecretKeyError when there is none."""
        if settings.webhook_secret_key is None:
            raise SecretKeyError("WEBHOOK_SECRET_KEY is not set: webhook secrets cannot be used")
        previous = settings.webhook_previous_secret_keys
        return cls(
            settings.webhook_secret_key.get_secret_value(),
            [] if previous is None else [k for k in previous.get_secret_value().split(",") if k],
        )

    def encrypt(self, secret: str) -> bytes:
        """The stored form of a secret (always with the current key)."""
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, stored: bytes) -> str:
        """The secret back from its stored form."""
        return self._decrypted(bytes(stored))

    def _decrypt(self, stored: bytes) -> str:
        try:
            return self._fernet.decrypt(stored).decode()
        except InvalidToken:
            raise SecretKeyError(
                "a webhook secret cannot be decrypted with WEBHOOK_SECRET_KEY or "
                "WEBHOOK_PREVIOUS_SECRET_KEYS (was the key changed?)"
            ) from None


def _secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(message_id: str, timestamp: int, body: bytes, secrets_: Iterable[str]) -> str:
    """The `webhook-signature` header: `v1,<base64>` per secret, space-separated."""
    content = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return " ".join(
        "v1,"
        + base64.b64encode(hmac.new(_secret_bytes(s), content, hashlib.sha256).digest()).decode()
        for s in secrets_
    )
