"""Who the client is, for the limits on accounts: its address, taken from X-Forwarded-For
only when the TCP peer is a trusted proxy (FORWARDED_ALLOW_IPS), and grouped so that one
IPv6 client counts once: a /64 is what one subscriber gets, and it holds more addresses
than anyone can exhaust."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from aiohttp import web

from api.appkeys import SETTINGS
from shared.settings import IPNetwork, ip_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
UNKNOWN = "unknown"  # a peer with no IP address (a unix socket)


def parse_address(text: str) -> IPAddress | None:
    """An address as a header or a socket gives it: `1.2.3.4`, `1.2.3.4:5678`, `::1`,
    `[::1]:5678`, with the zone of a link-local address dropped; None if it is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_client(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The client's address: the TCP peer, or, while the address in hand is a trusted
    proxy, the hop it names (X-Forwarded-For read right to left: each proxy appends the peer
    it saw, and only the hops appended by trusted proxies are facts). A hop that is not an
    address ends the walk at the proxy that passed it on."""
    current = parse_address(peer or "")
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    while current is not None and hops and any(current in net for net in trusted):
        hop = parse_address(hops.pop())
        if hop is None:
            break
        current = hop
    return current


def address_group(address: IPAddress | None) -> str:
    """What the limits count by: an IPv4 address, or an IPv6 address's /64."""
    if address is None:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@functools.cache
def _trusted(text: str) -> tuple[IPNetwork, ...]:
    return ip_networks(text)  # checked at start-up (Settings.check)


def client_of(request: web.Request) -> str:
    """The request's client, as the limits count it."""
    trusted = _trusted(request.app[SETTINGS].forwarded_allow_ips)
    forwarded = request.headers.getall("X-Forwarded-For", []) if trusted else []
    return address_group(forwarded_client(request.remote, forwarded, trusted))
