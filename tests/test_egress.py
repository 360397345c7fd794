"""The egress policy: which addresses outbound requests may reach, checked after DNS."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from taskd.egress import DEFAULT_POLICY, Policy, Refused, Resolver, connector


def networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


LOOPBACK = Policy(allow=networks("127.0.0.0/8"))

REFUSED = [
    "127.0.0.1",
    "127.255.0.9",
    "::1",
    "169.254.169.254",  # the cloud metadata service
    "169.254.0.1",
    "fe80::1",
    "fe80::1%1",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "fc00::1",
    "fd12:3456::1",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "::ffff:127.0.0.1",  # IPv4-mapped: a dual-stack socket connects to 127.0.0.1
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
]
PERMITTED = [
    "8.8.8.8",
    "93.184.216.34",
    "172.32.0.1",  # just past 172.16.0.0/12
    "100.128.0.1",  # just past 100.64.0.0/10
    "169.255.0.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize("address", REFUSED)
def test_the_default_refuses_the_host_and_its_networks(address: str) -> None:
    assert not DEFAULT_POLICY.permits(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PERMITTED)
def test_the_default_permits_public_addresses(address: str) -> None:
    assert DEFAULT_POLICY.permits(ipaddress.ip_address(address))


def test_allow_permits_a_refused_network_and_deny_wins_over_it() -> None:
    policy = Policy(allow=networks("10.0.0.0/8"), deny=networks("10.9.0.0/16", "8.8.8.0/24"))
    ip = ipaddress.ip_address
    assert policy.permits(ip("10.1.2.3"))
    assert policy.permits(ip("::ffff:10.1.2.3"))  # the same destination, mapped
    assert not policy.permits(ip("10.9.0.1"))
    assert not policy.permits(ip("::ffff:10.9.0.1"))
    assert not policy.permits(ip("8.8.8.8"))
    assert not policy.permits(ip("192.168.0.1"))  # refused by default, not allowed


def test_every_address_a_name_resolves_to_must_pass() -> None:
    DEFAULT_POLICY.check_resolved("two.example", ["8.8.8.8", "2606:4700:4700::1111"])
    with pytest.raises(Refused, match=r"two\.example \(127\.0\.0\.1\) refused by \[callbacks\]"):
        DEFAULT_POLICY.check_resolved("two.example", ["8.8.8.8", "127.0.0.1"])


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/hook", "destination 127.0.0.1 refused by [callbacks] allow/deny"),
        ("http://169.254.169.254/latest/meta-data/", "destination 169.254.169.254 refused"),
        ("http://[::ffff:127.0.0.1]:9/", "destination ::ffff:7f00:1 (IPv4 127.0.0.1) refused"),
        ("http://[::1]/", "destination ::1 refused"),
        ("http://[fe80::1%25eth0]/", "destination fe80::1%eth0 refused"),
        ("http://0.0.0.0:80/", "destination 0.0.0.0 refused"),
        ("http://127.0.0.1./", "destination 127.0.0.1 refused"),
        # Forms getaddrinfo reads as 127.0.0.1 without asking DNS.
        ("http://2130706433/", "destination 127.0.0.1 refused"),
        ("http://127.1/", "destination 127.0.0.1 refused"),
        ("http://0x7f.0.0.1/", "destination 127.0.0.1 refused"),
        ("http://0177.0.0.1/", "destination 127.0.0.1 refused"),
        ("http://localhost:8080/", "destination localhost (loopback) refused"),
        ("http://LocalHost./", "destination localhost (loopback) refused"),
        ("http://api.localhost/", "destination api.localhost (loopback) refused"),
        ("https://user:secret@example.com/", "a user name or password in the URL is refused"),
        ("https://token@example.com/", "a user name or password in the URL is refused"),
    ],
)
def test_urls_refused_without_dns(url: str, message: str) -> None:
    with pytest.raises(Refused) as info:
        DEFAULT_POLICY.check_url(url)
    assert message in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://93.184.216.34:8080/x",
        "http://[2606:4700:4700::1111]/",
        "http://internal.example/",  # a name: checked when connecting, not here
        "http://localhost.example.com/",
    ],
)
def test_urls_left_to_the_resolver_or_public(url: str) -> None:
    DEFAULT_POLICY.check_url(url)


def test_allow_permits_literals_and_localhost_follows_both_loopbacks() -> None:
    LOOPBACK.check_url("http://127.0.0.1:9/")
    LOOPBACK.check_url("http://[::ffff:127.0.0.1]:9/")
    # localhost may be ::1 as well: with only 127.0.0.0/8 allowed, it is refused.
    with pytest.raises(Refused):
        LOOPBACK.check_url("http://localhost:9/")
    Policy(allow=networks("127.0.0.0/8", "::1/128")).check_url("http://localhost:9/")


def test_credentials_may_be_allowed_for_urls_the_operator_wrote() -> None:
    DEFAULT_POLICY.check_url("https://user:secret@example.com/", credentials=True)


async def test_the_resolver_checks_what_getaddrinfo_answers() -> None:
    with pytest.raises(Refused, match=r"destination localhost \(127\.0\.0\.1\) refused"):
        await Resolver(policy=DEFAULT_POLICY).resolve("localhost", 80)
    found = await Resolver(policy=LOOPBACK).resolve("localhost", 80)
    assert "127.0.0.1" in {result["host"] for result in found}


@pytest.fixture
async def local_site() -> AsyncIterator[tuple[str, list[str]]]:
    """A real server on 127.0.0.1: its port and the paths it was asked for."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield str(runner.addresses[0][1]), seen
    finally:
        await runner.cleanup()


async def test_a_session_connects_only_where_the_resolver_permits(
    local_site: tuple[str, list[str]],
) -> None:
    port, seen = local_site
    # A name the policy refuses after resolution: no connection is made.
    async with aiohttp.ClientSession(connector=connector(DEFAULT_POLICY)) as session:
        with pytest.raises(Refused, match="localhost"):
            await session.get(f"http://localhost:{port}/refused")
    async with (
        aiohttp.ClientSession(connector=connector(LOOPBACK)) as session,
        session.get(f"http://localhost:{port}/permitted") as response,
    ):
        assert response.status == 200
    assert seen == ["/permitted"]
