"""The backlog: the wallets of the owned shards that have work, what has been read of their
streams, which are set aside, and which go in the next round.

Pure bookkeeping: no Redis, no PostgreSQL, no clock of its own (the caller passes `now`),
so its rules are tested alone (tests/test_backlog.py). The round (worker/worker.py) feeds it
what the wake listener and the streams' reads found, and asks it which wallets to commit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from shared.backoff import backoff
from shared.codec import MessageError, decode_request
from worker.decide import Entry

log = logging.getLogger("worker")

START = "0-0"  # the position before a stream's first entry
PARKED_DELAY_FIRST = 2.0  # seconds before a parked wallet's first new try; it doubles
PARKED_DELAY_MAX = 60.0
HELD_DELAY_FIRST = 0.5  # seconds before a held-back wallet's first new try; it doubles
HELD_DELAY_MAX = 5.0  # up to this: what held it back (Redis full, a slot moving) passes
BUSY_KEPT_MAX = 100_000  # wallets remembered as busy (forgotten all at once past it)

# A wake-up as the wake listener found it: the wallet, the first entry of its stream (its
# id and message)
Wake = tuple[str, str, bytes]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry no batch can apply, set aside with the reason."""

    wallet_id: str
    entry_id: str
    message: bytes
    error: str


@dataclass(slots=True)
class Reading:
    """What was read of one wallet's stream and is not committed yet."""

    entries: list[Entry]
    dead: list[DeadLetter]
    cursor: str  # the id of the last entry read: where the wallet's next read starts after


def decode_entry(wallet: str, entry_id: str, message: bytes) -> Entry:
    """The operation of an entry of `wallet`'s stream; MessageError if it is not one."""
    request = decode_request(message)
    if request.wallet_id != wallet:
        raise MessageError(f"it names wallet {request.wallet_id}")
    return Entry(entry_id, request)


class Backlog:
    """Which wallets have work, and in which order they get it.

    A wallet is active while its stream may hold entries not committed, with the id of the
    last entry read of it (START: read it from the beginning). What was read and awaits its
    batch is its reading. After a bad batch its wallets go one at a time (isolating), so the
    one to blame is found and parked (tried again later, less and less often) while the
    others go on.
    """

    def __init__(
        self,
        shard_of: Callable[[str], int],
        *,
        batch_max: int,
        batch_wallets_max: int,
        use_wake_entries: bool = True,
    ) -> None:
        """`use_wake_entries`: a woken wallet's first operation, which came with its wake-up,
        is applied as it is; else its stream is read whole (BATCH_INTERVAL, for fuller
        batches)."""
        self._shard_of = shard_of
        self._batch_max = batch_max
        self._batch_wallets_max = batch_wallets_max
        self._use_wake_entries = use_wake_entries
        # wallet id -> the id of the last entry read from its stream (committed or in
        # `_ready`); in the order the rounds take them
        self._active: dict[str, str] = {}
        # wallet id -> what was read of its stream and awaits its batch
        self._ready: dict[str, Reading] = {}
        self._isolating: set[str] = set()
        # wallet id -> (when to try it again, failures so far)
        self._parked: dict[str, tuple[float, int]] = {}
        self._round: list[str] = []  # the wallets of the last round picked
        # Wallets whose last batch held several operations: on their next wake-up their
        # stream is read, not the wake's entry taken alone (see take_wakes).
        self._busy: set[str] = set()

    # What it holds.

    def has_work(self, wallet: str) -> bool:
        return wallet in self._active

    @property
    def idle(self) -> bool:
        """No wallet is known to have operations waiting."""
        return not self._active

    def is_parked(self, wallet: str) -> bool:
        return wallet in self._parked

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    @property
    def cursors(self) -> Mapping[str, str]:
        """Each active wallet's position: the id of the last entry read of its stream."""
        return self._active

    def next_retry(self) -> float:
        """When the first parked wallet is due for another try (inf if none is parked)."""
        return min((due for due, _ in self._parked.values()), default=math.inf)

    # What comes in.

    def mark_active(self, wallets: Iterable[str]) -> None:
        """Wallets found dirty (a rescan): those not yet active are read from the start."""
        active = self._active
        for wallet in wallets:
            active.setdefault(wallet, START)

    def take_wakes(self, wakes: list[Wake], owned: Collection[int]) -> None:
        """Takes up the wallets that have just become dirty. A wallet with no position yet
        starts at the first entry of its new stream, which came with the wake: applied
        without reading the stream, unless `use_wake_entries` is off or the wallet's last
        batch held several operations. Such a wallet's stream is emptied by its batch just
        before its clients, answered, send again: the wake comes with the first of a burst,
        and a batch of that one alone would cost a commit for one operation. For a wallet
        already active, the wake is one already seen through its stream."""
        active, shard_of = self._active, self._shard_of
        for wallet, entry_id, message in wakes:
            if wallet in active or shard_of(wallet) not in owned:
                continue
            if not self._use_wake_entries or wallet in self._busy:  # read all that waits
                active[wallet] = START
                continue
            try:
                entry = decode_entry(wallet, entry_id, message)
            except MessageError:
                active[wallet] = START  # the stream's read will set it aside
                continue
            active[wallet] = entry_id
            self._ready[wallet] = Reading([entry], [], entry_id)

    def took_readings(self, wallets: Iterable[str], readings: Iterable[Reading | None]) -> None:
        """Records what was read of each wallet's stream: its next entries, or None when
        nothing was left, in which case the wallet is clean and no longer active."""
        active, ready = self._active, self._ready
        for wallet, reading in zip(wallets, readings, strict=True):
            if reading is None:
                del active[wallet]
            else:
                active[wallet] = reading.cursor
                ready[wallet] = reading

    # A round.

    def pick(self, owned: Collection[int], now: float) -> list[str]:
        """The wallets of the next round: one alone while a bad batch is being taken apart
        or a parked wallet is due for another try, else the active ones not parked, as many
        as fit in a batch. The picked go to the back: the next round starts with the
        wallets this one did not reach."""
        picked = self._round = self._pick(owned, now)
        active = self._active
        for wallet in picked:
            active[wallet] = active.pop(wallet)
        return picked

    def _pick(self, owned: Collection[int], now: float) -> list[str]:
        shard_of = self._shard_of
        parked = self._parked
        self._isolating.update(w for w, (due, _) in parked.items() if due <= now)
        for w in list(self._isolating):
            if w in parked and parked[w][0] > now:  # parked again since: not yet
                continue
            if w in self._active and shard_of(w) in owned:
                return [w]
            self._isolating.discard(w)
        picked: list[str] = []
        in_hand = 0
        for w in self._active:
            # A shard lost since the last settling: its wallets are dropped at the next.
            if w in self._parked or shard_of(w) not in owned:
                continue
            reading = self._ready.get(w)
            size = len(reading.entries) if reading else 1
            if picked and in_hand + size > self._batch_max:
                break
            picked.append(w)
            in_hand += size
            if len(picked) == self._batch_wallets_max:
                break
        return picked

    def unread(self, wallets: list[str]) -> list[str]:
        """Those of `wallets` with nothing read yet."""
        ready = self._ready
        return [w for w in wallets if w not in ready]

    def room(self, wallets: list[str]) -> int:
        """How many more entries a batch of `wallets` can take beyond those read already."""
        ready = self._ready
        in_hand = sum(len(ready[w].entries) for w in wallets if w in ready)
        return max(0, self._batch_max - in_hand)

    def take_ready(self, wallets: list[str]) -> dict[str, Reading]:
        """The readings of `wallets`, out of the backlog and into a batch."""
        ready, busy = self._ready, self._busy
        batch = {w: ready.pop(w) for w in wallets if w in ready}
        if len(busy) > BUSY_KEPT_MAX:
            busy.clear()
        for wallet, reading in batch.items():
            if len(reading.entries) > 1:
                busy.add(wallet)
            else:
                busy.discard(wallet)
        return batch

    def went_through(self, wallets: list[str]) -> None:
        """The round of `wallets` was committed and answered: none of them is to blame."""
        self._isolating.difference_update(wallets)
        for wallet in wallets:
            if self._parked.pop(wallet, None) is not None:
                log.info("wallet %s works again", wallet)

    def read_again(self, wallets: list[str]) -> None:
        """The round of `wallets` failed part way: read them again from the start of their
        streams (operation ids keep what was committed from being applied twice)."""
        for w in wallets:
            if w in self._active:
                self._active[w] = START
            self._ready.pop(w, None)

    def hold_back(self, wallets: list[str], now: float) -> None:
        """The round of `wallets` was committed but what they hand on (a transfer's next
        step, a dead letter) could not be queued: their entries stay, read again from the
        start after a while (less and less often), and handed on again then."""
        self.read_again(wallets)
        for wallet in wallets:
            self._isolating.discard(wallet)
            failures = self._parked.get(wallet, (0.0, 0))[1] + 1
            self._parked[wallet] = (
                now + backoff(failures, HELD_DELAY_FIRST, HELD_DELAY_MAX),
                failures,
            )

    def blame(self, error: Exception, now: float) -> None:
        """After a bad batch (of the last round picked): take it apart, or, if it held one
        wallet, park that wallet (its operations wait in its stream) and try it again
        later, less and less often."""
        if len(self._round) > 1:
            log.warning(
                "a batch of %d wallets failed (%s: %s); trying them one at a time",
                len(self._round),
                type(error).__name__,
                error,
            )
            self._isolating.update(self._round)
            return
        for wallet in self._round:
            self._isolating.discard(wallet)
            failures = self._parked.get(wallet, (0.0, 0))[1] + 1
            delay = backoff(failures, PARKED_DELAY_FIRST, PARKED_DELAY_MAX)
            self._parked[wallet] = (now + delay, failures)
            log.error(
                "wallet %s cannot be applied (%s: %s); its operations wait in its stream, "
                "next try in %.0fs",
                wallet,
                type(error).__name__,
                error,
                delay,
            )

    # What goes.

    def keep_only(self, owned: Collection[int]) -> None:
        """Forgets the wallets of shards not in `owned` (lost or handed back)."""
        shard_of = self._shard_of
        self._active = {w: c for w, c in self._active.items() if shard_of(w) in owned}
        self._ready = {w: r for w, r in self._ready.items() if w in self._active}
        self._isolating.intersection_update(self._active)
        self._parked = {w: v for w, v in self._parked.items() if w in self._active}
        self._busy = {w for w in self._busy if shard_of(w) in owned}
