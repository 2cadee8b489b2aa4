"""Which webhook URLs and addresses the worker may connect to: no server-side request forgery.

A URL is checked when it is registered (a clear error for the customer) and again at every
attempt on the addresses it resolves to at that moment; the request then goes to one of exactly
those addresses (the hostname only names the TLS server and the Host header), so a DNS answer
that changes between the check and the connection (DNS rebinding) cannot reach inside.

A URL is parsed once, by httpx (the request is built from its parse): the stored URL is its
normalized form and the host is always the ASCII (punycode) one, so the check and the request
can never read two different hosts out of one string.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError

import httpx

from worker.logging import get_logger

log = get_logger("worker.webhooks")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# socket.getaddrinfo's signature, narrowed to what is used; tests pass their own.
Resolver = Callable[[str, int], Sequence[str]]

# Shown to the customer: never which address a name resolved to (that would map the platform's
# internal DNS for them); the address goes to the server log only.
REFUSED_ADDRESS = (
    "the URL resolves to an address that is not allowed (loopback, private, link-local, "
    "multicast or reserved)"
)

# getaddrinfo has no timeout of its own: it runs on these threads and is given up waiting for
# after the attempt's limit. A resolution stuck longer than that only holds one of them.
_DNS_THREADS = 4
_dns_pool: ThreadPoolExecutor | None = None


class UnsafeUrlError(ValueError):
    """The URL or an address it resolves to is not allowed; the message says why."""


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, *, allow_private: bool) -> httpx.URL:
    """Refuse URLs that are not https:// (http:// only with private networks allowed), have no
    host, or carry a user name or password; returns the URL as httpx parsed it."""
    return _checked_url(url, allow_private)


# Every attempt checks its endpoint's URL: the verdict (a pure function of the string) is kept
# for the URLs used last rather than parsed again each time. A refused URL raises, and is not kept.
@functools.lru_cache(maxsize=1024)
def _checked_url(url: str, allow_private: bool) -> httpx.URL:
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise UnsafeUrlError("the URL contains spaces or control characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise UnsafeUrlError("not a valid URL") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in allowed:
        raise UnsafeUrlError("the URL must start with https://")
    if not host:
        raise UnsafeUrlError("the URL has no host")
    if parsed.userinfo:
        raise UnsafeUrlError("the URL must not contain a user name or password")
    if parsed.port == 0:
        raise UnsafeUrlError("the URL's port must not be 0")
    return parsed


def normalized_url(url: str, *, allow_private: bool) -> str:
    """The form of `url` stored at registration (punycode host, httpx's normalization)."""
    return str(check_url(url, allow_private=allow_private))


@functools.lru_cache(maxsize=1024)  # every recorded attempt logs its host
def url_host(url: str) -> str:
    """The ASCII host of a stored URL for logs; never raises."""
    try:
        return httpx.URL(url).raw_host.decode("ascii", errors="replace")
    except (httpx.InvalidURL, ValueError):
        return "?"


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Listed here rather than left to `is_global` alone, whose answers changed between Python
# versions (NAT64, 6to4, IPv4-compatible and site-local IPv6 were "global" on some).
_DENIED_V4 = _networks(
    "0.0.0.0/8",  # this network
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared (carrier-grade NAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, the cloud metadata service
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.88.99.0/24",  # 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)
# IPv6: only global unicast (2000::/3) is allowed at all, which already excludes loopback,
# IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96, 64:ff9b:1::/48), unique local, link- and
# site-local and multicast. Inside 2000::/3 these are special:
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_DENIED_V6 = _networks(
    "2001::/23",  # IETF protocol assignments, Teredo (2001::/32) among them
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4: the IPv4 address inside is what gets reached
    "3fff::/20",  # documentation
)
# Where an IPv6 address carries an IPv4 one, the IPv4 one is what a relay or translator reaches.
_NAT64_V6 = _networks("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64_V6):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _ipv4_allowed(address: ipaddress.IPv4Address) -> bool:
    return address.is_global and not any(address in net for net in _DENIED_V4)


def address_allowed(address: IpAddress, *, allow_private: bool) -> bool:
    """Public unicast addresses only, unless private networks are allowed.

    IPv4: not in the explicit deny list (private, loopback, link-local, shared, documentation,
    multicast, reserved, ...) and `is_global`. IPv6: an IPv4-mapped address is judged as its
    IPv4 address; any other must be in 2000::/3, outside the special ranges above, carry no
    refused IPv4 address, and be `is_global`.
    """
    if allow_private:
        return not address.is_unspecified
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_allowed(address)
    inner = embedded_ipv4(address)
    if address.ipv4_mapped is not None:
        return _ipv4_allowed(address.ipv4_mapped)
    if inner is not None and not _ipv4_allowed(inner):
        return False
    return (
        address in _GLOBAL_UNICAST_V6
        and not any(address in net for net in _DENIED_V6)
        and address.is_global
    )


def _resolve(resolver: Resolver, host: str, port: int, timeout: float | None) -> Sequence[str]:
    global _dns_pool  # noqa: PLW0603 - one per process, made on first use
    if timeout is None:
        return resolver(host, port)
    if _dns_pool is None:
        _dns_pool = ThreadPoolExecutor(_DNS_THREADS, thread_name_prefix="webhook-dns")
    future = _dns_pool.submit(resolver, host, port)
    try:
        return future.result(timeout=timeout)
    except FutureTimeoutError:
        future.cancel()  # if it has not started yet
        raise UnsafeUrlError(f"the host name did not resolve within {timeout:g} s") from None


def resolve_allowed(
    url: str | httpx.URL,
    *,
    allow_private: bool,
    resolver: Resolver = _system_resolver,
    timeout: float | None = None,
) -> list[IpAddress]:
    """The addresses to connect to for `url`; UnsafeUrlError if any of them is not allowed.

    All of them must pass: a name that resolves to one public and one private address is
    refused rather than trusted to be connected to the right one. `timeout` bounds the name's
    resolution (UnsafeUrlError when exceeded).
    """
    parsed = check_url(str(url), allow_private=allow_private)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        found: list[IpAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = [
                ipaddress.ip_address(a.partition("%")[0])
                for a in _resolve(resolver, host, port, timeout)
            ]
        except (OSError, UnicodeError):
            raise UnsafeUrlError("the host name does not resolve") from None
    if not found:
        raise UnsafeUrlError("the host name does not resolve")
    for address in found:
        if not address_allowed(address, allow_private=allow_private):
            log.warning("webhook.address_refused", host=host, address=str(address))
            raise UnsafeUrlError(REFUSED_ADDRESS)
    return found
