"""Which network addresses a webhook may be sent to (SSRF guard).

Only public unicast addresses, unless the configuration allows private ones
(``STEPCAST_WEBHOOK_ALLOW_PRIVATE``, for a receiver on the same network). The
resolved address is what is checked — and then connected to — never the name.
"""

from __future__ import annotations

import ipaddress


def refused(address: str, *, allow_private: bool = False) -> str | None:
    """Why ``address`` (an IP literal) may not receive webhooks, or None if it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
