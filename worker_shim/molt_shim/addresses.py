"""IP addresses read from what a client or a proxy wrote, and written as every engine writes them.

The native engine writes a peer's address with inet_ntop(): an IPv4-mapped IPv6 address is
`::ffff:192.0.2.1`, where Python 3.11's ipaddress writes `::ffff:c000:201`. A zone
(`fe80::1%eth0`) names an interface of the sender's machine and is text anyone can write: it
is refused, as inet_pton() refuses it.
"""
from __future__ import annotations

import ipaddress
from typing import Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_ip(text: str) -> Address:
    """The address `text` names; ValueError for anything else, a zone included."""
    if "%" in text:
        raise ValueError("%r has a zone" % text[:60])
    return ipaddress.ip_address(text)


def ip_text(ip: Address) -> str:
    """inet_ntop()'s text for `ip`."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "::ffff:%s" % ip.ipv4_mapped
    return str(ip)
