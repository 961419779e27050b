"""The hostile client: it does what a client may do, to the honest clients' harm if the
service let it. It squats the ids of the planned transfers (computed from the seed, with
the service's own derivations, in every spelling of a UUID), reuses honest clients' keys
with other bodies, and sends one new request under one key many times at once."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Coroutine
from typing import Any

from load.chaos.clients import REUSE, SQUAT, TWIN, Clients, Sent
from load.chaos.schedule import BEFORE, SQUATTED_FIRST, WHILE, Planned, new_key, planned_transfer
from shared.codec import DEPOSIT, TRANSFER, WITHDRAW
from shared.ids import client_operation_id, return_op_id, transfer_id_for

SQUAT_MINOR = 1
SQUAT_AHEAD = 40  # how many planned transfers ahead of the honest clients it squats at most
REUSE_PAUSE = 0.05  # between two reused keys
TWINS = 8  # sends of one key at once
TWIN_PAUSE = 0.1
CONNECTIONS = 2 * 8 + TWINS + 1  # two squats' deposits, a key's twins, a reuse


def spellings(u: str) -> list[str]:
    """A UUID as clients may write it; each is a key of its own."""
    plain = uuid.UUID(u)
    return [str(plain), str(plain).upper(), f"{{{plain}}}", plain.urn, plain.hex]


def computed_ids(p: Planned) -> list[str]:
    """Every id of the transfer that a client can compute with the service's own
    derivations."""
    transfer_id = transfer_id_for(p.source, p.key)
    return [
        transfer_id,
        return_op_id(transfer_id),
        client_operation_id(p.key),
        transfer_id_for(p.destination, p.key),
    ]


class Hostile:
    def __init__(self, clients: Clients, think: float) -> None:
        self.clients, self.think = clients, think
        # (source, key) of each planned transfer squatted -> when: all its squats answered
        # before it was sent, sent while it was not answered yet, or later
        self.squatted: dict[tuple[str, str], str] = {}

    def attacks(self, rng: random.Random) -> list[Coroutine[Any, Any, None]]:
        """What it does during the load, each drawing from a generator of its own."""
        return [
            attack(random.Random(rng.random()))
            for attack in (self.squatter, self.squatter_in_flight, self.reuser, self.twins)
        ]

    async def squat(self, p: Planned, rng: random.Random, every_spelling: bool) -> None:
        """Deposits 0.01 on the transfer's two wallets under each id of it a client can
        compute, in every spelling or in one drawn."""
        squats = [
            Sent(key, wallet, DEPOSIT, SQUAT_MINOR, [], role=SQUAT)
            for wallet in (p.source, p.destination)
            for computed in computed_ids(p)
            for key in (
                spellings(computed) if every_spelling else [rng.choice(spellings(computed))]
            )
        ]
        self.clients.sent += squats
        await asyncio.gather(*(self.clients.operate(op) for op in squats))

    async def squat_first(self, rng: random.Random) -> None:
        """Before the load: the first planned transfers' ids, in every spelling."""
        for n in range(SQUATTED_FIRST):
            p = planned_transfer(self.clients.seed, n, self.clients.wallets)
            self.squatted[(p.source, p.key)] = "before_sent"
            await self.squat(p, rng, True)

    async def squatter(self, rng: random.Random) -> None:
        """During the load: the ids of the planned transfers to squat before they are sent,
        ahead of the honest clients (or as they are sent, where it falls behind)."""
        clients, n = self.clients, SQUATTED_FIRST
        while not clients.load_over:
            if n >= clients.transfers_taken + SQUAT_AHEAD:
                await asyncio.sleep(self.think)
                continue
            n = max(n, clients.transfers_taken)
            p = planned_transfer(clients.seed, n, clients.wallets)
            if p.squat == BEFORE:
                self.squatted[(p.source, p.key)] = self.when(n)
                await self.squat(p, rng, False)
                if n >= clients.transfers_taken:
                    self.squatted[(p.source, p.key)] = "before_sent"
            n += 1

    async def squatter_in_flight(self, rng: random.Random) -> None:
        """During the load: the ids of the planned transfers to squat while they are under
        way, as soon as an honest client has sent them."""
        clients, n = self.clients, SQUATTED_FIRST
        while not clients.load_over:
            if n >= clients.transfers_taken:
                await asyncio.sleep(0.005)
                continue
            n = max(n, clients.transfers_taken - 1)  # behind: those sent long ago are settled
            p = planned_transfer(clients.seed, n, clients.wallets)
            if p.squat == WHILE:
                self.squatted[(p.source, p.key)] = self.when(n)
                await self.squat(p, rng, False)
            n += 1

    def when(self, n: int) -> str:
        """Where the honest clients' n-th transfer stands, as its squats are sent."""
        sent = self.clients.planned_sent.get(n)
        return "late" if sent is not None and sent.statuses else "in_flight"

    async def reuser(self, rng: random.Random) -> None:
        """Sends honest clients' keys, once answered, again with another body."""
        clients = self.clients
        while not clients.load_over:
            await asyncio.sleep(REUSE_PAUSE)
            answered = (rng.choice(clients.sent) for _ in range(20))
            original = next(
                (
                    op
                    for op in answered
                    if not op.role
                    and op.kind in (DEPOSIT, WITHDRAW, TRANSFER)
                    and op.statuses[-1:] in ([200], [409])
                ),
                None,
            )
            if original is None:
                continue
            reuse = dataclasses.replace(original, statuses=[], role=REUSE, of=original)
            if rng.random() < 0.5:
                reuse.minor += rng.randrange(1, 100) * 100
            elif original.kind == TRANSFER:
                reuse.to = rng.choice(
                    [w for w in clients.wallets if w not in (reuse.wallet, reuse.to)]
                )
            else:
                reuse.kind = WITHDRAW if original.kind == DEPOSIT else DEPOSIT
            clients.sent.append(reuse)
            await clients.operate(reuse)

    async def twins(self, rng: random.Random) -> None:
        """Sends a new request, under a new key, TWINS times at once."""
        clients = self.clients
        while not clients.load_over:
            kind = rng.choice([DEPOSIT, WITHDRAW, TRANSFER])
            source = rng.choice(clients.wallets[1:])
            to = rng.choice([w for w in clients.wallets if w != source]) if kind == TRANSFER else ""
            key, minor = new_key(rng), rng.randrange(1, 200) * 100
            group = [
                Sent(key, source, kind, minor, [], to=to, role=TWIN, bodies=[])
                for _ in range(TWINS)
            ]
            clients.sent += group
            await asyncio.gather(*(clients.operate(op) for op in group))
            await asyncio.sleep(TWIN_PAUSE)
