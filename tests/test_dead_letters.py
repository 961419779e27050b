"""Dead letters: an entry no worker could read is listed by `wallet-inspect dead-letters`, put
back by `wallet-admin requeue-dead-letters` once a worker can read it, and applied once,
however many times it is put back; one that can never be read is dropped."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from shared import codec
from shared.keys import KeySpace
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.conftest import running_worker
from tests.helpers import eventually, ledger


def command(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is installed by `make install` (pyproject's [project.scripts])"
    return found


async def run(settings: Settings, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command `name`, configured by `settings` alone."""
    return await asyncio.to_thread(
        subprocess.run,
        [command(name), *args],
        env=settings.to_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def newer_message(op_id: str, wallet: str, amount: int) -> bytes:
    """A deposit as the API of the next release queues it, under a message version this
    release's workers refuse: what a rolling upgrade that starts with the API leaves."""
    fields = {"op": op_id, "w": wallet, "k": "DEPOSIT", "a": amount, "r": "", "t": 0}
    return orjson.dumps({"v": codec.VERSION + 1, **fields})


async def enqueue(redis: Redis, keys: KeySpace, wallet: str, message: bytes) -> str:
    entry: Any = await redis.eval(ENQUEUE, 4, *keys.enqueue_keys(wallet), wallet, message, 10, 10)
    return str(entry.decode())


async def letters(redis: Redis, keys: KeySpace, wallet: str) -> list[Any]:
    found: Any = await redis.xrange(keys.dead_letters(keys.shard_of(wallet)))
    return list(found)


async def drained(redis: Redis, keys: KeySpace, wallet: str) -> bool:
    """Its stream acknowledged (left empty) and the wallet no longer dirty."""
    shard = keys.shard_of(wallet)
    stream_left = await redis.xlen(keys.wallet_stream(wallet, shard))
    return not stream_left and not await redis.sismember(keys.dirty_set(shard), wallet)


async def balance(pg: Any, wallet: str) -> int:
    return int(await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet))


async def test_a_dead_letter_is_listed_requeued_once_readable_and_applied_once(
    settings: Settings, redis: Redis, pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    op_id = str(uuid.uuid4())
    message = newer_message(op_id, wallet, 250)
    async with running_worker(settings):
        entry = await enqueue(redis, keys, wallet, message)

        async def dead_lettered() -> bool:
            return len(await letters(redis, keys, wallet)) == 1

        await eventually(dead_lettered, what="the entry to go to the dead letters")
        await eventually(lambda: drained(redis, keys, wallet), what="its wallet to go on")

    listed = await run(settings, "wallet-inspect", "--json", "dead-letters")
    assert listed.returncode == 0, listed.stderr
    [letter] = orjson.loads(listed.stdout)
    assert (letter["wallet"], letter["entry"], letter["shard"]) == (
        wallet,
        entry,
        keys.shard_of(wallet),
    )
    assert letter["error"] == f"unknown message version {codec.VERSION + 1}"
    assert (letter["operation"], letter["type"], letter["amount"]) == (op_id, "DEPOSIT", "2.50")
    assert letter["age_seconds"] >= 0
    shown = await run(settings, "wallet-inspect", "dead-letters")
    assert shown.returncode == 0, shown.stderr
    assert f"wallet {wallet}  entry {entry}" in shown.stdout
    assert f"DEPOSIT 2.50  op {op_id}" in shown.stdout
    assert "error: unknown message version" in shown.stdout

    nobody = await run(
        settings, "wallet-admin", "requeue-dead-letters", "--wallet", str(uuid.uuid4())
    )
    assert (nobody.returncode, nobody.stdout.strip()) == (1, "no dead letter matches")
    dry = await run(settings, "wallet-admin", "requeue-dead-letters", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would requeue wallet {wallet} entry {entry}" in dry.stdout
    assert "this release cannot read it either" in dry.stdout
    assert len(await letters(redis, keys, wallet)) == 1
    assert await redis.xlen(keys.wallet_stream(wallet)) == 0

    # The workers are upgraded: they read the next release's messages.
    monkeypatch.setattr(codec, "VERSION", codec.VERSION + 1)
    async with running_worker(settings):
        requeued = await run(
            settings, "wallet-admin", "requeue-dead-letters", "--wallet", wallet, "--entry", entry
        )
        assert requeued.returncode == 0, requeued.stderr
        assert requeued.stdout.startswith(f"requeued wallet {wallet} entry {entry} as entry ")
        assert await letters(redis, keys, wallet) == []  # gone once queued

        async def applied() -> bool:
            return bool(await ledger(pg, wallet))

        await eventually(applied, what="the requeued deposit to be applied")
        await eventually(lambda: drained(redis, keys, wallet), what="the stream to be drained")
        assert [(r["id"], r["amount"]) for r in await ledger(pg, wallet)] == [(op_id, 250)]
        assert await balance(pg, wallet) == 250

        # The same letter once more, as a requeue cut short between queueing the entry and
        # deleting the letter leaves it: put back, it is answered from the ledger.
        letter_fields = {"wallet": wallet, "entry": entry, "m": message, "error": "again"}
        await redis.xadd(keys.dead_letters(keys.shard_of(wallet)), letter_fields)  # type: ignore[arg-type]
        again = await run(settings, "wallet-admin", "requeue-dead-letters", "--all")
        assert again.returncode == 0, again.stderr
        await eventually(lambda: drained(redis, keys, wallet), what="the stream to be drained")
        assert [r["id"] for r in await ledger(pg, wallet)] == [op_id]
        assert await balance(pg, wallet) == 250
    assert await letters(redis, keys, wallet) == []


async def test_an_entry_no_release_reads_is_dropped(
    settings: Settings, redis: Redis, pg: Any, worker: Any
) -> None:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    entry = await enqueue(redis, keys, wallet, b"\x00not a message")

    async def dead_lettered() -> bool:
        return len(await letters(redis, keys, wallet)) == 1

    await eventually(dead_lettered, what="the entry to go to the dead letters")
    shown = await run(settings, "wallet-inspect", "dead-letters", "--wallet", wallet)
    assert "message '\\x00not a message'" in shown.stdout, shown.stdout
    dry = await run(settings, "wallet-admin", "drop-dead-letters", "--entry", entry, "--dry-run")
    assert (dry.returncode, dry.stdout.strip()) == (0, f"would drop wallet {wallet} entry {entry}")
    assert len(await letters(redis, keys, wallet)) == 1
    dropped = await run(settings, "wallet-admin", "drop-dead-letters", "--entry", entry)
    assert (dropped.returncode, dropped.stdout.strip()) == (
        0,
        f"dropped wallet {wallet} entry {entry}",
    )
    assert await letters(redis, keys, wallet) == []
    assert await ledger(pg, wallet) == []
