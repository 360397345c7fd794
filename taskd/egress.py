"""The egress policy: which addresses callbacks and http handlers may connect to."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from taskd.config import CallbacksConfig, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not the public internet: the daemon's own host, its private networks and the cloud
# metadata service (169.254.169.254) are what a submitter must not reach through us.
REFUSED_BY_DEFAULT: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, with the cloud metadata service
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",
        "::1/128",
        "fc00::/7",  # unique-local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed by some)
        "ff00::/8",  # multicast
    )
)
# IPv6 addresses that carry an IPv4 one the connection reaches: the mapped form (a dual
# stack socket connects to the IPv4 address) and NAT64's well-known prefix.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOOPBACK = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
# What inet_aton reads as an IPv4 address besides a.b.c.d: "127.1", "2130706433",
# "0x7f.0.0.1", "0177.0.0.1". getaddrinfo reads them so too, without asking DNS.
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")
_RULE = "[callbacks] allow/deny"


class Refused(Exception):
    """A destination the egress policy refuses; str() says which and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Public addresses are permitted, REFUSED_BY_DEFAULT is not; `allow` permits networks
    despite that, `deny` refuses networks whatever else says (deny wins over allow)."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, config: CallbacksConfig) -> Policy:
        return cls(allow=config.allow, deny=config.deny)

    def permits(self, address: Address) -> bool:
        """Whether a connection to this address is allowed."""
        forms = _forms(address)
        if _within(forms, self.deny):
            return False
        return _within(forms, self.allow) or not _within(forms, REFUSED_BY_DEFAULT)

    def check_resolved(self, host: str, addresses: Iterable[str]) -> None:
        """Raise Refused unless every address the name resolved to is permitted: one
        refused address is enough to send the connection there."""
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                message = f"destination {host} ({text}) is not an address taskd can check"
                raise Refused(message) from None
            if not self.permits(address):
                raise Refused(f"destination {host} ({_shown(address)}) refused by {_RULE}")

    def check_url(self, url: str | URL, *, credentials: bool = False) -> None:
        """Raise Refused for what is refused without asking DNS: a literal address the
        policy refuses, a localhost name, and (unless `credentials`) a user or password
        in the URL, which would go to the endpoint in clear. Other names are checked by
        Resolver when the connection is made."""
        try:
            parsed = URL(url) if isinstance(url, str) else url
        except ValueError as exc:
            raise Refused(f"not a URL taskd can check: {exc}") from None
        if not credentials and (parsed.raw_user is not None or parsed.raw_password is not None):
            raise Refused("a user name or password in the URL is refused: it would be sent along")
        host = (parsed.host or "").rstrip(".").lower()
        if host == "localhost" or host.endswith(".localhost"):
            # Loopback by definition (RFC 6761), whatever a resolver would say.
            if not all(self.permits(address) for address in _LOOPBACK):
                raise Refused(f"destination {host} (loopback) refused by {_RULE}")
            return
        address = _literal(host)
        if address is not None and not self.permits(address):
            raise Refused(f"destination {_shown(address)} refused by {_RULE}")


class Resolver(AbstractResolver):
    """aiohttp's resolver (the event loop's getaddrinfo) that refuses a name unless the
    policy permits every address it resolves to.

    aiohttp connects to the very addresses this returns, so the check and the connection
    cannot disagree: a name re-pointed between the two (DNS rebinding) gains nothing.
    aiohttp does not ask a resolver about literal addresses: see Policy.check_url.
    """

    def __init__(self, *, policy: Policy) -> None:
        self._policy = policy
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        self._policy.check_resolved(host, [result["host"] for result in found])
        return found

    async def close(self) -> None:
        await self._resolver.close()


# Public addresses only: what a component given no policy enforces.
DEFAULT_POLICY = Policy()


def connector(policy: Policy) -> aiohttp.TCPConnector:
    """A connector whose every name is resolved through the policy (see Resolver)."""
    return aiohttp.TCPConnector(resolver=Resolver(policy=policy))


def _literal(host: str) -> Address | None:
    """The address a URL's host names literally, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if ":" in host:
        # Nothing a resolver would take for a name: refuse what cannot be checked.
        raise Refused(f"destination {host} is not an address taskd can check")
    return None


def _forms(address: Address) -> tuple[Address, ...]:
    """The address, and the IPv4 address it leads to if it embeds one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address, address.ipv4_mapped
        if address in _NAT64:
            return address, ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return (address,)


def _within(addresses: tuple[Address, ...], networks: tuple[Network, ...]) -> bool:
    return any(
        address.version == network.version and address in network
        for address in addresses
        for network in networks
    )


def _shown(address: Address) -> str:
    forms = _forms(address)
    return str(address) if len(forms) == 1 else f"{address} (IPv4 {forms[1]})"
