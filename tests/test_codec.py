"""The messages between API and workers across versions: a reply written by an older or a
newer process is read as written or answered as unknown, never misread."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from api.app import create_app
from shared.codec import (
    REPLY_VERSION,
    MessageError,
    Outcome,
    decode_outcomes,
    decode_request,
    encode_outcomes,
)
from shared.keys import KeySpace
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import eventually, operate

OUTCOMES = [
    Outcome(7, "op-1", "w-1", "applied", "DEPOSIT", 250, 1250, None, "2026-12-01T00:00:00Z", 3),
    Outcome(8, "op-2", "w-1", "rejected", "WITHDRAW", 9999, 1250, "insufficient_funds", "", 4),
]


def test_a_reply_reads_back_as_written() -> None:
    assert decode_outcomes(encode_outcomes(OUTCOMES)) == OUTCOMES


def test_a_reply_from_before_versions_reads_as_it_was_written() -> None:
    legacy = orjson.dumps([list(dataclasses.astuple(o)) for o in OUTCOMES])
    assert decode_outcomes(legacy) == OUTCOMES


def test_a_newer_writer_s_added_fields_are_ignored() -> None:
    reply = orjson.loads(encode_outcomes(OUTCOMES))
    for outcome in reply["o"]:
        outcome["fee"] = 12
    assert decode_outcomes(orjson.dumps(reply)) == OUTCOMES


@pytest.mark.parametrize(
    "reply",
    [
        {"v": REPLY_VERSION + 1, "o": []},
        {"o": []},
        {"v": REPLY_VERSION, "o": [{"t": 7}]},
        [[7, "op-1"]],
        "a string",
    ],
)
def test_a_reply_it_cannot_read_is_refused(reply: Any) -> None:
    with pytest.raises(MessageError):
        decode_outcomes(orjson.dumps(reply))


async def test_the_api_answers_202_to_a_reply_of_an_unknown_version_and_reads_a_known_one(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any, redis: Redis
) -> None:
    """No worker runs: the test answers the queued operations itself, through the API's
    reply channel, once in a version the API does not know and once in its own."""
    api = await aiohttp_client(create_app(dataclasses.replace(settings, reply_timeout=1.0)))
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    stream = keys.wallet_stream(wallet)

    async def answer(version: int) -> tuple[int, dict[str, Any]]:
        sending = asyncio.create_task(operate(api, wallet, "DEPOSIT", "1.00"))

        async def queued() -> bool:
            return bool(await redis.xlen(stream))

        await eventually(queued, what="the operation to be queued")
        entries: Any = await redis.xrange(stream)
        [(entry_id, fields)] = entries
        await redis.xdel(stream, entry_id)
        request = decode_request(fields[b"m"])
        outcome = Outcome(
            request.tag, request.op_id, wallet, "applied", "DEPOSIT", 100, 100, None, "t", 1
        )
        reply = orjson.loads(encode_outcomes([outcome]))
        reply["v"] = version
        await redis.publish(request.reply_to, orjson.dumps(reply))
        status, body, _ = await sending
        return status, body

    status, body = await answer(REPLY_VERSION + 1)
    assert (status, body["status"]) == (202, "pending")
    status, body = await answer(REPLY_VERSION)
    assert (status, body["status"], body["balance"]) == (200, "applied", "1.00")
