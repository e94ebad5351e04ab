"""Who is calling: the client's IP address, seen through the operator's reverse proxies.

`X-Forwarded-For` is believed only when the connection comes from a proxy the operator
named (`--trusted-proxy CIDR`, CoordinatorConfig.trusted_proxies); then the client is the
rightmost address in the header that is not itself a trusted proxy (each proxy appends the
address it saw, so everything left of that is whatever the client claimed). Anyone else
could write any address into the header, so from them it is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache

from aiohttp import web

from coordinator.http.state import CONFIG

__all__ = ["client_address", "client_ip", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) -> networks; ValueError names the bad one."""
    networks: list[Network] = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{spec!r} is not an IP address or network; write e.g. 10.0.0.0/8 or 127.0.0.1"
            ) from None
    return tuple(networks)


@lru_cache(maxsize=8)
def _networks(specs: tuple[str, ...]) -> tuple[Network, ...]:
    return parse_networks(specs)


@lru_cache(maxsize=4096)
def _address(text: str) -> Address | None:
    """An address as proxies write it ("::ffff:10.0.0.1", "[2001:db8::1]:443",
    "10.0.0.1:5000"), IPv4-mapped IPv6 as IPv4; None for anything else ("unknown").
    Remembered: the same few peers call again and again (addresses are immutable)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str, forwarded: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address, from the connection's `peer` address and the
    `X-Forwarded-For` headers (`forwarded`, in order) when `peer` is a `trusted` proxy."""
    seen = _address(peer)
    if seen is None or not any(seen in network for network in trusted):
        return str(seen) if seen is not None else peer
    hops = [hop for header in forwarded for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            # a proxy we trust passed on something that is no address: the proxy it is
            return str(seen)
        if not any(address in network for network in trusted):
            return str(address)
        seen = address
    return str(seen)  # only trusted proxies: the leftmost one made the request


def client_ip(request: web.Request) -> str:
    """The caller's IP address ("?" when the transport has none)."""
    return client_address(
        request.remote or "?",
        request.headers.getall("X-Forwarded-For", []),
        _networks(request.app[CONFIG].trusted_proxies),
    )
