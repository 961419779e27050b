"""The limits on accounts: who the client is (trusted proxies, IPv6 /64), registrations per
address and in all, the bound on password hashing, and logins that strangers cannot lock."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.clients import address_group, forwarded_client, parse_address
from api.limits import Slots
from shared import errors
from shared.settings import Settings, ip_networks
from tests.conftest import AiohttpClient

SECRET = "accounts-" + "k" * 40
PASSWORD = "correct horse battery"
LOOPBACK = ip_networks("127.0.0.1,::1")

# --- who the client is: pure, no server ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7:5678 ", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack socket
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("[2001:db8::1", None),
    ],
)
def test_addresses_are_read_as_headers_and_sockets_give_them(
    text: str, expected: str | None
) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == expected


def client(peer: str | None, *forwarded_for: str, trusted: str = "127.0.0.1,::1") -> str:
    return address_group(forwarded_client(peer, forwarded_for, ip_networks(trusted)))


def test_forwarded_for_counts_only_from_a_trusted_peer() -> None:
    assert client("198.51.100.1", "203.0.113.7") == "198.51.100.1"  # anyone can send it
    assert client("127.0.0.1", "203.0.113.7") == "203.0.113.7"
    assert client("127.0.0.1", "203.0.113.7", trusted="") == "127.0.0.1"
    assert client("10.1.2.3", "203.0.113.7", trusted="10.0.0.0/8") == "203.0.113.7"
    assert client("10.1.2.3", "203.0.113.7", trusted="*") == "203.0.113.7"


def test_the_right_most_untrusted_hop_is_the_client() -> None:
    # What the client wrote itself is on the left, and is not believed.
    assert client("127.0.0.1", "1.1.1.1, 203.0.113.7") == "203.0.113.7"
    assert client("127.0.0.1", "1.1.1.1", "203.0.113.7") == "203.0.113.7"  # two headers
    # A chain of trusted proxies is walked through.
    trusted = "127.0.0.1,10.0.0.0/8"
    assert client("127.0.0.1", "1.1.1.1, 203.0.113.7, 10.0.0.5", trusted=trusted) == ("203.0.113.7")
    # All trusted: the left-most of them (a request from a proxy itself).
    assert client("127.0.0.1", "10.0.0.9, 10.0.0.5", trusted=trusted) == "10.0.0.9"
    # A hop that is not an address ends the walk at the proxy that passed it.
    assert client("127.0.0.1", "203.0.113.7, garbage", trusted=trusted) == "127.0.0.1"
    assert client("127.0.0.1", "", trusted=trusted) == "127.0.0.1"
    assert client(None, "203.0.113.7") == "unknown"


def test_an_ipv6_client_counts_as_its_64() -> None:
    one = client("2001:db8:1:2::1")
    assert one == "2001:db8:1:2::/64"
    assert client("2001:db8:1:2:ffff:ffff:ffff:ffff") == one
    assert client("2001:db8:1:3::1") != one
    assert client("::1", "2001:db8:1:2::99") == one
    assert client("::ffff:203.0.113.7") == "203.0.113.7"  # IPv4 stays one address
    assert ipaddress.ip_network(one).prefixlen == 64


async def test_slots_let_so_many_hold_so_many_wait_and_refuse_the_rest() -> None:
    slots = Slots(size=1, waiting=1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str) -> None:
        async with slots.slot():
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)  # let it take the slot
    second = asyncio.create_task(hold("second"))
    await asyncio.sleep(0)  # it waits in line
    assert (order, slots.held_or_waiting) == (["first"], 2)
    with pytest.raises(errors.Busy):
        async with slots.slot():
            pass
    release.set()
    await asyncio.gather(first, second)
    assert (order, slots.held_or_waiting) == (["first", "second"], 0)
    async with slots.slot():  # free again
        pass


# --- over HTTP, with authentication on ---


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    # The test client connects from loopback: trusted, so X-Forwarded-For plays the clients.
    return dataclasses.replace(
        settings, auth_enabled=True, jwt_secret=SECRET, forwarded_allow_ips="127.0.0.1,::1"
    )


async def app_with(
    aiohttp_client: AiohttpClient, settings: Settings, **changes: Any
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(dataclasses.replace(settings, **changes)))


def new_name() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


async def register(http: TestClient[Any, Any], name: str, address: str = "192.0.2.1") -> Any:
    return await http.post(
        "/api/auth/users",
        json={"username": name, "password": PASSWORD},
        headers={"X-Forwarded-For": address},
    )


async def login(
    http: TestClient[Any, Any], name: str, address: str, password: str = PASSWORD
) -> Any:
    return await http.post(
        "/api/auth/token",
        json={"username": name, "password": password},
        headers={"X-Forwarded-For": address},
    )


async def test_registrations_are_limited_per_address_and_in_all(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    http = await app_with(
        aiohttp_client,
        auth_settings,
        registration_address_limit=2,
        registration_total_limit=5,
        registration_window=600,
    )
    assert [(await register(http, new_name(), "203.0.113.1")).status for _ in range(2)] == [
        201,
        201,
    ]
    refused = await register(http, new_name(), "203.0.113.1")
    assert refused.status == 429
    assert 590 <= int(refused.headers["Retry-After"]) <= 600
    assert (await refused.json())["type"] == "urn:wallet-service:problem:too-many-attempts"
    # One IPv6 client is its /64, whichever address of it it uses.
    assert (await register(http, new_name(), "2001:db8:7::1")).status == 201
    assert (await register(http, new_name(), "2001:db8:7::2")).status == 201
    assert (await register(http, new_name(), "2001:db8:7:0:ffff::3")).status == 429
    # Five registered in all: a newcomer from anywhere waits for the window too.
    assert (await register(http, new_name(), "198.51.100.1")).status == 201
    assert (await register(http, new_name(), "198.51.100.2")).status == 429


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    http = await app_with(
        aiohttp_client, auth_settings, forwarded_allow_ips="", registration_address_limit=2
    )
    statuses = [(await register(http, new_name(), f"203.0.113.{n}")).status for n in range(4)]
    assert statuses == [201, 201, 429, 429]  # all counted on the peer, 127.0.0.1


async def test_strangers_cannot_lock_out_a_correct_password(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    http = await app_with(aiohttp_client, auth_settings, login_user_limit=3)
    name = new_name()
    assert (await register(http, name)).status == 201

    # Strangers from eight addresses guess until each is refused.
    async def stranger(n: int) -> list[int]:
        wrong = "a wrong password"
        return [(await login(http, name, f"203.0.113.{n}", wrong)).status for _ in range(5)]

    for statuses in await asyncio.gather(*(stranger(n) for n in range(8))):
        assert statuses == [401] * 3 + [429] * 2
    # The owner, from an address of their own, gets in; and again, as a success does not
    # count against anyone.
    for _ in range(5):
        assert (await login(http, name, "198.51.100.7")).status == 200
    # A stranger's address over its limit is refused even with the right password.
    assert (await login(http, name, "203.0.113.1")).status == 429


async def test_failed_logins_from_one_address_are_limited_across_usernames(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    http = await app_with(aiohttp_client, auth_settings, login_address_limit=4)
    names = [new_name() for _ in range(2)]
    for name in names:
        assert (await register(http, name)).status == 201
    sprayed = [
        (await login(http, new_name(), "2001:db8:9::1", "a wrong password")).status
        for _ in range(4)
    ]
    assert sprayed == [401] * 4
    # The same /64, another address in it: over its limit, whatever the username.
    assert (await login(http, names[0], "2001:db8:9::2")).status == 429
    # The rest of the world is not.
    assert (await login(http, names[0], "2001:db8:10::1")).status == 200


async def test_password_hashing_is_bounded_and_over_the_bound_is_503(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    http = await app_with(
        aiohttp_client,
        auth_settings,
        password_hash_concurrency=1,
        password_hash_queue=0,
        registration_address_limit=100,
        login_user_limit=1,
    )
    answers = await asyncio.gather(
        *(register(http, new_name(), f"203.0.113.{n}") for n in range(12))
    )
    statuses = sorted(r.status for r in answers)
    assert set(statuses) == {201, 503}, statuses
    busy = next(r for r in answers if r.status == 503)
    assert busy.headers["Retry-After"] == "1"
    assert (await busy.json())["type"] == "urn:wallet-service:problem:busy"

    name = new_name()
    assert (await register(http, name)).status == 201  # the slot is free again
    addresses = [f"198.51.100.{n}" for n in range(12)]
    answers = await asyncio.gather(*(login(http, name, a) for a in addresses))
    by_status = {r.status: a for r, a in zip(answers, addresses, strict=True)}
    assert set(by_status) == {200, 503}
    # Neither a success nor a login turned away busy counts as a failure: with a limit of
    # one, a wrong password from either address is still judged, and then the limit holds.
    for address in by_status.values():
        assert (await login(http, name, address, "a wrong password")).status == 401
        assert (await login(http, name, address)).status == 429
