"""What the seed alone decides: when each fault strikes, and the honest clients' transfers
(which the hostile client computes too)."""

from __future__ import annotations

import dataclasses
import random
import uuid

from load.chaos.faults import faults

# The first few planned transfers are squatted before the load starts; of the others, a
# share: half before they are sent, half while they are under way.
SQUATTED_FIRST = 5
SQUAT_SHARE = 0.1
BEFORE, WHILE = "before", "while"  # when a planned transfer's ids are squatted


@dataclasses.dataclass(frozen=True)
class Strike:
    at: float  # seconds after the load started
    kind: str  # the fault's name
    pick: int  # which worker, where the fault picks one


def schedule(seed: int, seconds: float, cluster: bool = False) -> list[Strike]:
    """The faults of a run: each once, in an order and at times drawn from the seed, spread
    over the load's first three quarters so that each has time to play out. A killed
    primary comes back after it was killed."""
    rng = random.Random(seed)
    kinds = [fault.name for fault in faults(cluster)]
    rng.shuffle(kinds)
    if cluster and kinds.index("redis_primary_back") < kinds.index("kill_redis_primary"):
        back, kill = kinds.index("redis_primary_back"), kinds.index("kill_redis_primary")
        kinds[back], kinds[kill] = kinds[kill], kinds[back]
    slot = seconds * 0.75 / len(kinds)
    return [
        Strike(round(slot * (i + rng.uniform(0.2, 0.8)), 2), kind, rng.randrange(1000))
        for i, kind in enumerate(kinds)
    ]


@dataclasses.dataclass(frozen=True)
class Planned:
    """One of the honest clients' transfers, as the seed alone decides it."""

    source: str
    destination: str
    key: str
    minor: int
    squat: str  # when the hostile client squats its ids: BEFORE, WHILE, or never ("")


def planned_transfer(seed: int, n: int, wallets: list[str]) -> Planned:
    """The honest clients' n-th transfer: from one of the wallets beside the hot one
    (`wallets[0]`), half of them to the hot wallet. Anyone who knows the seed and the
    wallets can compute it, its Idempotency-Key too."""
    rng = random.Random(f"{seed}/transfer/{n}")
    source = rng.choice(wallets[1:])
    destination = source
    while destination == source:
        destination = wallets[0] if rng.random() < 0.5 else rng.choice(wallets)
    minor = rng.randrange(1, 200) * 100
    key = new_key(rng)
    squat = "" if rng.random() >= SQUAT_SHARE else rng.choice((BEFORE, WHILE))
    return Planned(source, destination, key, minor, BEFORE if n < SQUATTED_FIRST else squat)


def new_key(rng: random.Random) -> str:
    """An Idempotency-Key as clients make them (a random UUID), drawn from `rng`."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
