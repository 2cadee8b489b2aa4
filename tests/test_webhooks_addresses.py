"""Which webhook URLs the worker may call: no server-side request forgery."""

from __future__ import annotations

import pytest

from worker.webhooks.addresses import UnsafeUrlError, check_url, resolve_allowed


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://172.16.0.1/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[fd00::1]/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://100.64.0.1/hook",
        "https://240.0.0.1/hook",
        "https://localhost/hook",
        "https://localhost.:8443/hook",
    ],
)
def test_internal_addresses_are_refused(url: str) -> None:
    """Loopback, private, link-local (the metadata service), multicast, reserved, unspecified,
    and a name resolving to loopback are refused with private networks off."""
    with pytest.raises(UnsafeUrlError):
        resolve_allowed(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.215.14/hook",
        "ftp://93.184.215.14/hook",
        "https://user:pw@93.184.215.14/hook",
        "https:///hook",
        "https://93.184.215.14/ho\nok",
        "not a url",
    ],
)
def test_urls_that_are_not_plain_https_are_refused(url: str) -> None:
    """Only https:// with a host and no credentials or control characters."""
    with pytest.raises(UnsafeUrlError):
        check_url(url, allow_private=False)


def test_public_addresses_are_allowed() -> None:
    """A public IPv4 or IPv6 literal passes as it is."""
    assert [str(a) for a in resolve_allowed("https://93.184.215.14/h", allow_private=False)] == [
        "93.184.215.14"
    ]
    assert [
        str(a) for a in resolve_allowed("https://[2606:4700::1111]/h", allow_private=False)
    ] == ["2606:4700::1111"]


def test_one_private_answer_among_public_ones_is_refused() -> None:
    """Every address a name resolves to must pass, not just the first."""

    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.5"]

    with pytest.raises(UnsafeUrlError, match=r"10\.0\.0\.5"):
        resolve_allowed("https://hooks.example.com/h", allow_private=False, resolver=resolver)


def test_private_networks_allowed_for_tests_and_the_demo() -> None:
    """With WEBHOOK_ALLOW_PRIVATE_NETWORKS loopback and http:// pass; 0.0.0.0 never does."""
    assert [str(a) for a in resolve_allowed("http://127.0.0.1:8080/h", allow_private=True)] == [
        "127.0.0.1"
    ]
    with pytest.raises(UnsafeUrlError):
        resolve_allowed("http://0.0.0.0:8080/h", allow_private=True)
