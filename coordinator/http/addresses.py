"""Who is calling: the client's IP address, seen through the operator's reverse proxies.

`X-Forwarded-For` is believed only when the connection comes from a proxy the operator
named (`--trusted-proxy CIDR`, CoordinatorConfig.trusted_proxies); then the client is the
rightmost address in the header that is not itself a trusted proxy. Anyone else could write
any address into the header, so from them it is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from aiohttp import web

from coordinator.http.state import CONFIG

__all__ = ["client_ip", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(request: web.Request) -> str:
    """The caller's IP address ("?" when the transport has none)."""
    peer = request.remote or "?"
    networks = _networks(request.app[CONFIG].trusted_proxies)
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a proxy we trust passed garbage on: fall back to it
    return hops[0] if hops else peer
