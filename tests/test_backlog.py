"""The backlog's rules, alone: no Redis, no PostgreSQL, no event loop, a clock passed in."""

from __future__ import annotations

import uuid

import pytest

from shared.codec import OperationRequest, encode_request
from worker.backlog import START, Backlog, Reading, Wake
from worker.decide import Entry

OWNED = {0, 1}


class Wallets:
    """Wallet ids of chosen shards, and the shard function that knows them."""

    def __init__(self) -> None:
        self.shards: dict[str, int] = {}

    def new(self, shard: int = 0) -> str:
        wallet = str(uuid.uuid4())
        self.shards[wallet] = shard
        return wallet

    def shard_of(self, wallet: str) -> int:
        return self.shards[wallet]


@pytest.fixture
def wallets() -> Wallets:
    return Wallets()


def backlog_of(wallets: Wallets, **limits: int) -> Backlog:
    return Backlog(
        wallets.shard_of,
        batch_max=limits.get("batch_max", 100),
        batch_wallets_max=limits.get("batch_wallets_max", 10),
    )


def entry(wallet: str, entry_id: str) -> Entry:
    request = OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", 100, "", 0)
    return Entry(entry_id, request)


def wake(wallet: str, entry_id: str = "5-0") -> Wake:
    return (wallet, entry_id, encode_request(entry(wallet, entry_id).request))


def reading(wallet: str, *ids: str) -> Reading:
    return Reading([entry(wallet, i) for i in ids], [], ids[-1])


def test_a_woken_wallet_is_ready_with_the_operation_that_came_with_its_wake(
    wallets: Wallets,
) -> None:
    backlog = backlog_of(wallets)
    woken = wallets.new()
    backlog.take_wakes([wake(woken, "7-0")], OWNED)
    assert backlog.has_work(woken)
    assert backlog.cursors[woken] == "7-0"
    assert backlog.pick(OWNED, now=0.0) == [woken]
    assert backlog.unread([woken]) == []  # no read of its stream before its batch
    [batch] = backlog.take_ready([woken]).values()
    assert [e.entry_id for e in batch.entries] == ["7-0"]


def test_wakes_of_active_wallets_of_other_shards_and_unreadable_ones_are_not_applied(
    wallets: Wallets,
) -> None:
    backlog = backlog_of(wallets)
    known, elsewhere, garbled = wallets.new(), wallets.new(shard=5), wallets.new()
    backlog.mark_active([known])
    backlog.take_wakes(
        [wake(known, "9-0"), wake(elsewhere), (garbled, "3-0", b"\x00not a message")], OWNED
    )
    assert backlog.cursors[known] == START  # already seen through its stream
    assert not backlog.has_work(elsewhere)  # another worker's
    assert backlog.cursors[garbled] == START  # its stream's read sets the entry aside
    assert backlog.unread([known, garbled]) == [known, garbled]


def test_with_a_batch_interval_a_woken_wallet_s_stream_is_read_whole(wallets: Wallets) -> None:
    backlog = Backlog(wallets.shard_of, batch_max=100, batch_wallets_max=10, use_wake_entries=False)
    woken = wallets.new()
    backlog.take_wakes([wake(woken)], OWNED)
    assert backlog.cursors[woken] == START
    assert backlog.unread([woken]) == [woken]


def test_a_wallet_whose_last_batch_held_several_has_its_stream_read_when_woken(
    wallets: Wallets,
) -> None:
    """A busy wallet's batch empties its stream just before its clients send again: the
    wake comes with the first of a burst, so its stream is read rather than that one
    committed alone. A wallet whose last batch held one takes its wake's entry again."""
    backlog = backlog_of(wallets)
    busy = wallets.new()
    backlog.mark_active([busy])
    backlog.took_readings([busy], [reading(busy, "1-0", "2-0", "3-0")])
    backlog.take_ready(backlog.pick(OWNED, now=0.0))
    backlog.took_readings([busy], [None])  # its batch emptied its stream
    backlog.take_wakes([wake(busy, "4-0")], OWNED)
    assert backlog.cursors[busy] == START
    assert backlog.unread([busy]) == [busy]

    backlog.took_readings([busy], [reading(busy, "4-0")])  # only one had come by the read
    backlog.take_ready(backlog.pick(OWNED, now=0.0))
    backlog.took_readings([busy], [None])
    backlog.take_wakes([wake(busy, "5-0")], OWNED)
    assert backlog.cursors[busy] == "5-0"
    assert backlog.unread([busy]) == []


def test_a_reading_moves_the_cursor_and_an_empty_one_makes_the_wallet_clean(
    wallets: Wallets,
) -> None:
    backlog = backlog_of(wallets)
    a, b = wallets.new(), wallets.new()
    backlog.mark_active([a, b])
    backlog.took_readings([a, b], [reading(a, "1-0", "2-0"), None])
    assert backlog.cursors == {a: "2-0"}
    assert not backlog.has_work(b)
    assert backlog.room([a, b]) == 98  # two of the batch's 100 in hand


def test_a_round_takes_as_many_entries_and_wallets_as_a_batch_holds_and_goes_round_fairly(
    wallets: Wallets,
) -> None:
    backlog = backlog_of(wallets, batch_max=5, batch_wallets_max=3)
    a, b, c, d, e = (wallets.new() for _ in range(5))
    backlog.mark_active([a, b, c, d, e])
    backlog.took_readings([a, b], [reading(a, "1-0", "2-0"), reading(b, "1-0", "2-0", "3-0")])
    # a (2 entries) and b (3) fill the batch of 5: c must wait.
    assert backlog.pick(OWNED, now=0.0) == [a, b]
    backlog.take_ready([a, b])
    # The next round starts with the wallets the last did not reach; at most 3 wallets.
    assert backlog.pick(OWNED, now=0.0) == [c, d, e]
    # a and b have nothing read now: one entry each, so far.
    assert backlog.pick(OWNED, now=0.0) == [a, b, c]


def test_a_bad_batch_is_taken_apart_and_the_wallet_to_blame_parked_with_backoff(
    wallets: Wallets,
) -> None:
    backlog = backlog_of(wallets)
    good, bad = wallets.new(), wallets.new()
    backlog.mark_active([good, bad])
    assert backlog.pick(OWNED, now=0.0) == [good, bad]
    backlog.blame(RuntimeError("a batch of two failed"), now=0.0)
    # One at a time now: the good one goes through, the bad one is parked.
    alone = []
    for _ in range(2):
        [wallet] = backlog.pick(OWNED, now=0.0)
        alone.append(wallet)
        if wallet == good:
            backlog.went_through([wallet])
        else:
            backlog.blame(RuntimeError("it fails alone"), now=0.0)
    assert sorted(alone) == sorted([good, bad])
    assert backlog.is_parked(bad)
    assert not backlog.is_parked(good)
    assert backlog.parked_count == 1
    first_retry = backlog.next_retry()
    assert 1.0 <= first_retry <= 2.0  # the first wait: between half and all of 2 s
    assert backlog.pick(OWNED, now=0.5) == [good]  # the others go on

    # Due again: tried alone; failing again, it waits longer.
    assert backlog.pick(OWNED, now=first_retry) == [bad]
    backlog.blame(RuntimeError("still"), now=first_retry)
    assert 2.0 <= backlog.next_retry() - first_retry <= 4.0

    # Once it goes through it is like any other.
    assert backlog.pick(OWNED, now=backlog.next_retry()) == [bad]
    backlog.went_through([bad])
    assert not backlog.is_parked(bad)
    assert backlog.next_retry() == float("inf")
    assert set(backlog.pick(OWNED, now=100.0)) == {good, bad}


def test_a_failed_round_reads_its_wallets_again_from_the_start(wallets: Wallets) -> None:
    backlog = backlog_of(wallets)
    a = wallets.new()
    backlog.mark_active([a])
    backlog.took_readings([a], [reading(a, "4-0")])
    backlog.read_again([a])
    assert backlog.cursors[a] == START
    assert backlog.unread([a]) == [a]


def test_the_wallets_of_shards_no_longer_owned_are_forgotten(wallets: Wallets) -> None:
    backlog = backlog_of(wallets)
    kept, lost, lost_parked = wallets.new(shard=0), wallets.new(shard=1), wallets.new(shard=1)
    backlog.mark_active([lost_parked])
    assert backlog.pick(OWNED, now=0.0) == [lost_parked]
    backlog.blame(RuntimeError("parked"), now=0.0)
    backlog.mark_active([kept, lost])
    backlog.took_readings([lost], [reading(lost, "1-0")])

    # Shard 1 is lost: until the backlog forgets it, its wallets are no longer picked.
    assert backlog.pick({0}, now=0.0) == [kept]
    backlog.keep_only({0})
    assert backlog.cursors == {kept: START}
    assert not backlog.is_parked(lost_parked)
    assert backlog.take_ready([lost]) == {}
    assert backlog.next_retry() == float("inf")


def test_a_held_back_wallet_waits_its_time_each_time_and_the_others_go_on(
    wallets: Wallets,
) -> None:
    """Held back twice (what it hands on could not be queued), it is tried alone once its
    time comes, never before, and the other wallets are picked meanwhile."""
    backlog = backlog_of(wallets)
    held, other = wallets.new(), wallets.new()
    backlog.mark_active([held, other])
    now = 0.0
    assert set(backlog.pick(OWNED, now)) == {held, other}
    backlog.went_through([other])
    for _ in range(3):
        backlog.hold_back([held], now)
        due = backlog.next_retry()
        assert due > now
        for t in (now + 0.001, (now + due) / 2, due - 0.001):
            assert backlog.pick(OWNED, t) == [other]
            backlog.went_through([other])
        assert backlog.pick(OWNED, due) == [held]  # alone, once its time has come
        now = due
    assert backlog.cursors[held] == START  # read again from the start each time
