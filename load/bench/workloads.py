"""What the generator sends: the requests of each workload, prepared as bytes, with what each
moves if it succeeds (load/bench/generator.py sends them)."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable, Sequence
from typing import NamedTuple

from shared.ids import hold_id_for
from shared.money import format_minor

AMOUNTS = range(100, 1001, 100)  # minor units: 1.00 to 10.00
SUCCESS = (200, 201)  # answers that moved what their request says (201: a hold placed)

# (wallet, change in minor units) pairs
Moves = tuple[tuple[str, int], ...]


class Request(NamedTuple):
    """A request ready to write; what it moves if it succeeds, of balances and of held
    amounts; and the request sent next on the same connection once it has (a hold's
    capture), before the connection takes the next pick. Each request is timed and counted
    on its own."""

    raw: bytes
    moves: Moves = ()
    holding: Moves = ()
    then: Request | None = None


# The next request of a phase.
Pick = Callable[[], Request]
# A phase's requests: a Pick for the target's host, drawing from a seeded generator.
Workload = Callable[[str, random.Random], Pick]


def request_head(host: str, wallet: str) -> bytes:
    """A request to the wallet's operation route, up to its Content-Length's value."""
    return (
        f"POST /api/v1/wallets/{wallet}/operation HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: "
    ).encode()


def request_tail(kind: str, minor: int) -> bytes:
    """The rest of an operation request: the Content-Length's value and the body."""
    body = f'{{"operationType":"{kind}","amount":"{format_minor(minor)}"}}'.encode()
    return b"%d\r\n\r\n%b" % (len(body), body)


def post(host: str, path: str, body: bytes, key: str | None = None) -> bytes:
    header = f"Idempotency-Key: {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{header}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def transfer_request(host: str, source: str, destination: str, minor: int) -> bytes:
    body = f'{{"from":"{source}","to":"{destination}","amount":"{format_minor(minor)}"}}'
    return post(host, "/api/v1/transfers", body.encode())


def operations(wallets: Sequence[str]) -> Workload:
    """Deposits and withdrawals of 1.00 to 10.00, half each, to wallets drawn at random."""

    def workload(host: str, rng: random.Random) -> Pick:
        heads = {w: request_head(host, w) for w in wallets}
        tails = {
            (kind, minor): request_tail(kind, minor)
            for kind in ("DEPOSIT", "WITHDRAW")
            for minor in AMOUNTS
        }

        def pick() -> Request:
            kind = "DEPOSIT" if rng.random() < 0.5 else "WITHDRAW"
            wallet = wallets[int(rng.random() * len(wallets))]
            minor = AMOUNTS[int(rng.random() * len(AMOUNTS))]
            change = minor if kind == "DEPOSIT" else -minor
            return Request(heads[wallet] + tails[(kind, minor)], ((wallet, change),))

        return pick

    return workload


def deposits(wallets: Sequence[str]) -> Workload:
    """Deposits of 0.01 to wallets drawn at random (the closed loop's)."""

    def workload(host: str, rng: random.Random) -> Pick:
        prepared = {
            w: Request(request_head(host, w) + request_tail("DEPOSIT", 1), ((w, 1),))
            for w in wallets
        }
        if len(wallets) == 1:
            only = prepared[wallets[0]]
            return lambda: only
        choices = list(wallets)
        return lambda: prepared[rng.choice(choices)]

    return workload


def transfers(sources: Sequence[str], destinations: Sequence[str]) -> Workload:
    """Transfers of 1.00 to 10.00 from a source drawn at random to a destination drawn at
    random (another wallet)."""

    def workload(host: str, rng: random.Random) -> Pick:
        def pick() -> Request:
            source = sources[int(rng.random() * len(sources))]
            destination = source
            while destination == source:
                destination = destinations[int(rng.random() * len(destinations))]
            minor = AMOUNTS[int(rng.random() * len(AMOUNTS))]
            raw = transfer_request(host, source, destination, minor)
            return Request(raw, ((source, -minor), (destination, minor)))

        return pick

    return workload


def holds(wallets: Sequence[str]) -> Workload:
    """Holds of 1.00 to 10.00 on wallets drawn at random, each placed under an
    Idempotency-Key of the generator's and, once placed (201), captured whole: two requests.
    The capture names the hold by the id the key makes (shared/ids.py), as a client that
    chose the key can, without reading the answer. Placing moves no balance, only the held
    amount; the capture takes the amount out of both."""

    def workload(host: str, rng: random.Random) -> Pick:
        # Keys of this phase's own: a search steps through its rates on the same wallets.
        prefix, numbers = uuid.uuid4().hex[:16], itertools.count()

        def pick() -> Request:
            wallet = wallets[int(rng.random() * len(wallets))]
            minor = AMOUNTS[int(rng.random() * len(AMOUNTS))]
            key = f"bench-{prefix}-{next(numbers)}"
            capture = Request(
                post(host, f"/api/v1/holds/{hold_id_for(wallet, key)}/capture", b"{}"),
                ((wallet, -minor),),
                ((wallet, -minor),),
            )
            body = f'{{"amount":"{format_minor(minor)}"}}'.encode()
            place = post(host, f"/api/v1/wallets/{wallet}/holds", body, key)
            return Request(place, (), ((wallet, minor),), capture)

        return pick

    return workload
