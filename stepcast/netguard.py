"""Which network addresses a webhook may be sent to (SSRF guard).

Only public unicast addresses, unless ``STEPCAST_WEBHOOK_ALLOW_PRIVATE`` allows private ones. The
resolved address is judged, then connected to, never the name; an IPv6 address that carries an
IPv4 one (mapped, compatible, NAT64, 6to4) is judged by that IPv4 address. docs/webhooks.md.
"""

from __future__ import annotations

import ipaddress

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 address sits varies


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):  # NAT64, or IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refused(address: str, *, allow_private: bool = False) -> str | None:
    """Why ``address`` (an IP literal) may not receive webhooks, or None if it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in LOCAL_NAT64 and not allow_private:
            return f"{ip} is a local-use NAT64 address (the IPv4 address behind it cannot be told)"
        if (ipv4 := _embedded_ipv4(ip)) is not None:
            reason = refused(str(ipv4), allow_private=allow_private)
            return None if reason is None else f"{ip} carries {ipv4}: {reason}"
    if ip.is_multicast or ip.is_unspecified:
        return f"{ip} is a multicast or unspecified address"
    if allow_private:
        return None
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address (cloud metadata lives there)"
    if not ip.is_global:
        return f"{ip} is a private or reserved address"
    return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
