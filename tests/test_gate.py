"""The wake readers' gate alone (worker/gate.py): no Redis."""

from __future__ import annotations

import asyncio

import pytest

from worker.gate import ReadGate


async def parked(gate: ReadGate, count: int) -> list[asyncio.Task[bool]]:
    readers = [asyncio.create_task(gate.wait()) for _ in range(count)]
    await asyncio.sleep(0)  # each reaches its wait
    return readers


async def test_opening_lets_every_parked_reader_go_and_says_how_to_read() -> None:
    gate = ReadGate()
    readers = await parked(gate, 3)
    assert not any(r.done() for r in readers)
    gate.open(at_once=False)
    assert await asyncio.gather(*readers) == [False, False, False]
    # The round waits for nothing it did not ask for at once.
    await asyncio.wait_for(gate.reads_done(), 1)


async def test_reads_asked_for_at_once_are_waited_for_until_each_is_done() -> None:
    gate = ReadGate()
    readers = await parked(gate, 2)
    gate.open(at_once=True)
    assert await asyncio.gather(*readers) == [True, True]
    waiting = asyncio.create_task(gate.reads_done())
    gate.read_done()
    await asyncio.sleep(0)
    assert not waiting.done()  # one read still owed
    gate.read_done()
    await asyncio.wait_for(waiting, 1)


async def test_opening_with_nobody_parked_owes_nothing_and_the_next_waits() -> None:
    gate = ReadGate()
    gate.open(at_once=True)
    await asyncio.wait_for(gate.reads_done(), 1)
    [reader] = await parked(gate, 1)
    await asyncio.sleep(0.01)
    assert not reader.done()  # the earlier open was for nobody
    gate.open()
    assert await reader is False


async def test_a_reader_cancelled_after_it_was_let_go_at_once_owes_nothing() -> None:
    gate = ReadGate()
    [reader] = await parked(gate, 1)
    gate.open(at_once=True)
    reader.cancel()  # stopped before it could read
    with pytest.raises(asyncio.CancelledError):
        await reader
    await asyncio.wait_for(gate.reads_done(), 1)


async def test_a_reader_cancelled_while_parked_is_no_longer_counted() -> None:
    gate = ReadGate()
    [leaving, staying] = await parked(gate, 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.open(at_once=True)
    assert await staying is True
    waiting = asyncio.create_task(gate.reads_done())
    gate.read_done()  # the one reader left: nothing else is owed
    await asyncio.wait_for(waiting, 1)
