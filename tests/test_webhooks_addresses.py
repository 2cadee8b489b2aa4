"""Which webhook URLs the worker may call: no server-side request forgery."""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest
from structlog.testing import capture_logs

from worker.webhooks.addresses import (
    UnsafeUrlError,
    address_allowed,
    check_url,
    normalized_url,
    resolve_allowed,
)


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

    with pytest.raises(UnsafeUrlError):
        resolve_allowed("https://hooks.example.com/h", allow_private=False, resolver=resolver)


def test_the_refused_address_is_logged_not_told_to_the_customer() -> None:
    """The message names no address (it would map internal DNS for the customer); the server
    log has it."""

    def resolver(host: str, port: int) -> list[str]:
        return ["10.0.3.7"]

    with capture_logs() as logs, pytest.raises(UnsafeUrlError) as caught:
        resolve_allowed("https://hooks.example.com/h", allow_private=False, resolver=resolver)
    assert "10.0.3.7" not in str(caught.value)
    assert "not allowed" in str(caught.value)
    assert [(e["event"], e["host"], e["address"]) for e in logs] == [
        ("webhook.address_refused", "hooks.example.com", "10.0.3.7")
    ]


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::5db8:d70e",  # NAT64, even of a public address: a translator inside
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:5db8:d70e::1",  # 6to4 of a public address: reached through a relay
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo (client 10.0.0.1)
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "::5db8:d70e",  # IPv4-compatible, public
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::ffff:169.254.169.254",  # IPv4-mapped metadata service
        "fec0::1",  # site-local
        "fc00::1",  # unique local
        "2001:db8::1",  # documentation
        "3fff::1",  # documentation (RFC 9637)
        "100::1",  # discard-only
        "ff02::1",  # multicast
        "192.0.0.8",  # IETF protocol assignments
        "192.88.99.1",  # 6to4 relay anycast
        "198.18.0.1",  # benchmarking
    ],
)
def test_special_and_embedding_ipv6_addresses_are_refused(address: str) -> None:
    """NAT64, 6to4, Teredo, IPv4-compatible and -mapped, site-local and the other special
    ranges are refused whatever this Python's `is_global` says about them."""
    assert not address_allowed(ipaddress.ip_address(address), allow_private=False)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "::ffff:93.184.215.14"])
def test_global_unicast_addresses_are_allowed(address: str) -> None:
    """Public IPv4, global unicast IPv6 and an IPv4-mapped public address pass."""
    assert address_allowed(ipaddress.ip_address(address), allow_private=False)


def test_a_host_that_httpx_cannot_send_to_is_refused_at_registration() -> None:
    """The URL is parsed by the parser that sends it: a host httpx refuses (not valid IDNA)
    fails the check rather than passing it and failing every attempt."""
    with pytest.raises(UnsafeUrlError, match="not a valid URL"):
        check_url("https://\N{SNOWMAN}.attacker.com/", allow_private=False)


def test_an_international_host_is_stored_and_resolved_in_punycode() -> None:
    """The stored URL is httpx's normalized form; the resolver gets the ASCII host."""
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["93.184.215.14"]

    url = normalized_url(
        "https://B\N{LATIN SMALL LETTER U WITH DIAERESIS}cher.example/h", allow_private=False
    )
    assert url == "https://xn--bcher-kva.example/h"
    resolve_allowed(url, allow_private=False, resolver=resolver)
    assert asked == ["xn--bcher-kva.example"]


def test_a_resolution_that_hangs_is_given_up() -> None:
    """getaddrinfo has no timeout of its own: resolution is given up after its limit."""

    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["93.184.215.14"]

    started = time.monotonic()
    try:
        with pytest.raises(UnsafeUrlError, match="did not resolve within"):
            resolve_allowed(
                "https://slow.example/h", allow_private=False, resolver=resolver, timeout=0.3
            )
        assert time.monotonic() - started < 10  # the limit, not the resolver's 30 s
    finally:
        release.set()


def test_private_networks_allowed_for_tests_and_the_demo() -> None:
    """With WEBHOOK_ALLOW_PRIVATE_NETWORKS loopback and http:// pass; 0.0.0.0 never does."""
    assert [str(a) for a in resolve_allowed("http://127.0.0.1:8080/h", allow_private=True)] == [
        "127.0.0.1"
    ]
    with pytest.raises(UnsafeUrlError):
        resolve_allowed("http://0.0.0.0:8080/h", allow_private=True)
