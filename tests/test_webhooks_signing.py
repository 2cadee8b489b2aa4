"""Signing secrets and signatures, checked against the independent `standardwebhooks` package."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.webhooks.signing import SecretBox, SecretKeyError, generate_key, generate_secret, sign


def test_signatures_verify_with_the_reference_library() -> None:
    """`standardwebhooks` accepts our `v1,` signature over id.timestamp.body."""
    secret = generate_secret()
    body = b'{"type":"account.status_changed","data":{"alias":"Prod \xc3\xa9"}}'
    now = int(time.time())
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": str(now),
        "webhook-signature": sign("msg_abc", now, body, [secret]),
    }
    assert Webhook(secret).verify(body, headers)["type"] == "account.status_changed"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)


def test_several_secrets_give_several_signatures() -> None:
    """During a rotation the header carries one signature per secret; either verifies."""
    old, new = generate_secret(), generate_secret()
    now = int(time.time())
    header = sign("msg_x", now, b"{}", [new, old])
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(
            b"{}",
            {"webhook-id": "msg_x", "webhook-timestamp": str(now), "webhook-signature": header},
        )


def test_secrets_have_the_spec_format() -> None:
    """`whsec_` and 32 random bytes in base64, different every time."""
    one, two = generate_secret(), generate_secret()
    assert one.startswith("whsec_")
    assert len(one) == len("whsec_") + 44
    assert one != two


def test_the_box_needs_the_right_key() -> None:
    """A stored secret decrypts with its key only; a bad key is refused without echoing it."""
    key = generate_key()
    stored = SecretBox(key).encrypt("whsec_c2VjcmV0")
    assert SecretBox(key).decrypt(stored) == "whsec_c2VjcmV0"
    with pytest.raises(SecretKeyError):
        SecretBox(generate_key()).decrypt(stored)
    with pytest.raises(SecretKeyError) as raised:
        SecretBox("not-a-key-at-all")
    assert "not-a-key-at-all" not in str(raised.value)


def test_a_stored_secret_is_decrypted_once_per_box(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempts reuse a secret decrypted before (by its stored form); a new stored form — a
    rotation — is decrypted, and one that does not decrypt fails every time."""
    key = generate_key()
    box = SecretBox(key)
    decrypted: list[bytes] = []
    fernet = box._fernet  # counting the decryptions it does
    real_decrypt = fernet.decrypt

    def counting(token: bytes | str, ttl: int | None = None) -> bytes:
        decrypted.append(bytes(token, "ascii") if isinstance(token, str) else token)
        return real_decrypt(token, ttl)

    monkeypatch.setattr(fernet, "decrypt", counting)
    stored = box.encrypt("whsec_b25l")
    rotated = box.encrypt("whsec_dHdv")
    assert [box.decrypt(stored) for _ in range(3)] == ["whsec_b25l"] * 3
    assert box.decrypt(rotated) == "whsec_dHdv"
    assert decrypted == [stored, rotated]
    unreadable = SecretBox(generate_key()).encrypt("whsec_dGhyZWU=")
    for _ in range(2):
        with pytest.raises(SecretKeyError):
            box.decrypt(unreadable)
    assert decrypted[2:] == [unreadable, unreadable]
