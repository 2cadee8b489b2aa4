"""Secrets are masked before they can reach output."""

from __future__ import annotations

from worker.redact import escape_controls, libpq_url, mask_external_id, mask_url, scrub_text


def test_mask_url_hides_the_password() -> None:
    """The password is replaced; user, host, port and path stay."""
    assert mask_url("postgresql://app:s3cret@db:5432/main") == "postgresql://app:***@db:5432/main"


def test_mask_url_leaves_urls_without_password_alone() -> None:
    """Nothing to hide, nothing changed."""
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_mask_url_handles_a_password_only_redis_url() -> None:
    """`redis://:pw@host` keeps its shape."""
    assert mask_url("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"


def test_libpq_url_takes_every_postgresql_spelling() -> None:
    """SQLAlchemy's `postgresql+psycopg://` and `postgres://` become `postgresql://`, the rest of
    the URL kept; any other URL is left alone."""
    assert libpq_url("postgresql+psycopg://app:pw@db:5432/main?sslmode=require") == (
        "postgresql://app:pw@db:5432/main?sslmode=require"
    )
    assert libpq_url("postgres://db/main") == "postgresql://db/main"
    assert libpq_url("postgresql://db/main") == "postgresql://db/main"
    assert libpq_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_mask_external_id_keeps_only_a_hint() -> None:
    """Long ids keep three leading and two trailing characters; short ones vanish."""
    assert mask_external_id("abc123-def456-ghi789") == "abc***89"
    assert mask_external_id("short") == "***"


def test_scrub_text_masks_urls_and_access_keys() -> None:
    """Free text loses URL passwords and AWS access key ids."""
    text = "connect redis://:hunter2@h:6379 with AKIAIOSFODNN7EXAMPLE"
    assert scrub_text(text) == "connect redis://:***@h:6379 with ***"


def test_escape_controls_makes_terminal_controls_visible() -> None:
    """C0, DEL, C1, line separators and bidirectional overrides become escapes; the rest stays."""
    assert escape_controls("a\x1b[31mb\tc\nd\x7fe\x9bf\u2028g\u202eh") == (
        "a\\x1b[31mb\\x09c\\x0ad\\x7fe\\x9bf\\u2028g\\u202eh"
    )
    assert escape_controls("Produção 本番 👍 arn:aws:iam::123456789012:role/R") == (
        "Produção 本番 👍 arn:aws:iam::123456789012:role/R"
    )


def test_mask_url_masks_a_url_whose_port_is_not_a_number() -> None:
    """A malformed port (the URL a settings error shows) keeps the rest and hides the password."""
    assert mask_url("postgresql://app:s3cret@db:notaport/main") == (
        "postgresql://app:***@db:notaport/main"
    )


def test_mask_url_masks_a_url_that_cannot_be_split() -> None:
    """An unclosed IPv6 bracket makes the URL unparseable; its password is still hidden."""
    masked = mask_url("postgresql://app:s3cret@[::1/main")
    assert "s3cret" not in masked
    assert masked == "postgresql://app:***@[::1/main"
