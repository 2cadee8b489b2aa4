"""Which webhook URLs and addresses the worker may connect to: no server-side request forgery.

A URL is checked when it is registered (a clear error for the customer) and again at every
attempt on the addresses it resolves to at that moment; the request then goes to one of exactly
those addresses (the hostname only names the TLS server and the Host header), so a DNS answer
that changes between the check and the connection (DNS rebinding) cannot reach inside.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import SplitResult, urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# socket.getaddrinfo's signature, narrowed to what is used; tests pass the real one.
Resolver = Callable[[str, int], Sequence[str]]


class UnsafeUrlError(ValueError):
    """The URL or an address it resolves to is not allowed; the message says why."""


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, *, allow_private: bool) -> SplitResult:
    """Refuse URLs that are not https:// (http:// only with private networks allowed), have no
    host, or carry a user name or password; returns the parsed URL."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise UnsafeUrlError("the URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeUrlError("not a valid URL") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed:
        raise UnsafeUrlError("the URL must start with https://")
    if not parts.hostname:
        raise UnsafeUrlError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrlError("the URL must not contain a user name or password")
    if port == 0:
        raise UnsafeUrlError("the URL's port must not be 0")
    return parts


def address_allowed(address: IpAddress, *, allow_private: bool) -> bool:
    """Public unicast addresses only, unless private networks are allowed.

    `is_global` is False for loopback, private, shared (100.64/10), link-local (the
    169.254.169.254 metadata service), reserved, unspecified and documentation ranges, and for
    IPv6 forms that embed one (IPv4-mapped, ...); multicast is refused separately.
    """
    if allow_private:
        return not address.is_unspecified
    return address.is_global and not address.is_multicast


def resolve_allowed(
    url: str, *, allow_private: bool, resolver: Resolver = _system_resolver
) -> list[IpAddress]:
    """The addresses to connect to for `url`; UnsafeUrlError if any of them is not allowed.

    All of them must pass: a name that resolves to one public and one private address is
    refused rather than trusted to be connected to the right one.
    """
    parts = check_url(url, allow_private=allow_private)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found: list[IpAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = [ipaddress.ip_address(a.partition("%")[0]) for a in resolver(host, port)]
        except OSError:
            raise UnsafeUrlError("the host name does not resolve") from None
    if not found:
        raise UnsafeUrlError("the host name does not resolve")
    for address in found:
        if not address_allowed(address, allow_private=allow_private):
            raise UnsafeUrlError(
                f"the URL resolves to {address}, a loopback, private, link-local, multicast or "
                "reserved address"
            )
    return found
