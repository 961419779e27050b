"""Looking into the write path (`wallet-inspect`, or `python -m worker.inspect`).

    shards          each shard: its owner, how long ago the owner last renewed its lease,
                    its epoch, how many operations wait in it and how old the oldest is
    wallet <id>     one wallet's queued operations, straight from its stream, beside its
                    last applied position and balance in PostgreSQL
    stuck           queued operations older than --older-than seconds (default 10)
    transfers       transfers debited and not yet credited or returned, oldest first, with
                    their age, how often their step was resent and when it is next due,
                    and whether their return waits for room in the source
    holds           holds still held that expire within --within seconds (default 3600),
                    soonest first, and those past their expiry not yet expired (a worker
                    down, or behind)
    dead-letters    entries no worker could read as an operation, set aside: each with its
                    wallet, entry id, age, error and what it says of its operation
                    (`wallet-admin requeue-dead-letters` puts them back)

Plain text for people, --json for scripts. Reads DATABASE_URL, REDIS_URL and the other
settings from the environment like the service; changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import asyncpg
import orjson

from shared import cli, deadletters
from shared.codec import MessageError, decode_request
from shared.connections import PG_ERRORS, REDIS_ERRORS, RedisClient, open_redis
from shared.keys import KeySpace
from shared.money import format_minor
from shared.queue import queue_for
from shared.settings import Settings


def entry_age(entry_id: bytes | str, now_ms: int) -> float:
    """Seconds since Redis appended the entry (its id starts with the time in ms)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return max(0.0, (now_ms - int(raw.partition("-")[0])) / 1000)


async def oldest_entries(redis: RedisClient, keys: KeySpace, shard: int) -> dict[str, bytes]:
    """Each dirty wallet of the shard, with the id of the oldest entry in its stream."""
    members: Any = await redis.smembers(keys.dirty_set(shard))
    wallets = sorted(w.decode() for w in members)
    queue = queue_for(keys, redis)
    async with redis.pipeline(transaction=False) as pipe:
        for w in wallets:
            pipe.execute_command(*queue.first_entry(w))
        firsts = await pipe.execute()
    return {w: first[0][0] for w, first in zip(wallets, firsts, strict=True) if first}


async def redis_now_ms(redis: RedisClient) -> int:
    """Redis's clock, which stamped the entry ids (this host's may differ)."""
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


async def shards_report(settings: Settings, redis: RedisClient, pg: Any) -> list[dict[str, Any]]:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    ttl_ms = settings.worker_lease_ttl * 1000
    epochs = {r["shard"]: r["epoch"] for r in await pg.fetch("SELECT shard, epoch FROM shards")}
    now_ms = await redis_now_ms(redis)
    report = []
    for shard in range(settings.shard_count):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.lease(shard))
            pipe.pttl(keys.lease(shard))
            pipe.get(keys.queued(shard))
            owner, lease_left_ms, queued = await pipe.execute()
        oldest = await oldest_entries(redis, keys, shard)
        report.append(
            {
                "shard": shard,
                "owner": owner.decode() if owner else None,
                "renewed_seconds_ago": round((ttl_ms - lease_left_ms) / 1000, 3) if owner else None,
                "epoch": epochs.get(shard),
                "queued": int(queued or 0),
                "lag_seconds": max((entry_age(e, now_ms) for e in oldest.values()), default=0.0),
            }
        )
    return report


async def wallet_report(
    settings: Settings, redis: RedisClient, pg: Any, wallet: str
) -> dict[str, Any]:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    row = await pg.fetchrow(
        "SELECT balance, op_seq, applied_entry FROM wallets WHERE id::text = $1", wallet
    )
    now_ms = await redis_now_ms(redis)
    queued = []
    stream: Any = await redis.execute_command(*queue_for(keys, redis).entries(wallet))
    for entry_id, fields in stream:
        item: dict[str, Any] = {
            "entry": entry_id.decode(),
            "age_seconds": entry_age(entry_id, now_ms),
        }
        try:
            op = decode_request(fields.get(b"m", b""))
            item |= {"operation": op.op_id, "type": op.kind, "amount": format_minor(op.amount)}
        except MessageError as e:
            item["undecodable"] = str(e)
        queued.append(item)
    return {
        "wallet": wallet,
        "shard": keys.shard_of(wallet),
        "exists": row is not None,
        "balance": format_minor(row["balance"]) if row else None,
        "ledger_rows": row["op_seq"] if row else None,
        "applied_entry": row["applied_entry"] if row else None,
        "queued": queued,
    }


async def stuck_report(
    settings: Settings, redis: RedisClient, older_than: float
) -> list[dict[str, Any]]:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    now_ms = await redis_now_ms(redis)
    queue = queue_for(keys, redis)
    stuck = []
    for shard in range(settings.shard_count):
        for wallet, entry in (await oldest_entries(redis, keys, shard)).items():
            age = entry_age(entry, now_ms)
            if age > older_than:
                stuck.append(
                    {
                        "shard": shard,
                        "wallet": wallet,
                        "oldest_entry": entry.decode(),
                        "age_seconds": age,
                        "queued": await redis.execute_command(*queue.length(wallet)),
                    }
                )
    return stuck


async def transfers_report(pg: Any) -> dict[str, Any]:
    rows = await pg.fetch(
        "SELECT id::text AS transfer, source_id::text AS source,"
        " destination_id::text AS destination, amount, status,"
        " extract(epoch FROM now() - created_at)::float8 AS age_seconds,"
        " extract(epoch FROM now() - updated_at)::float8 AS since_last_step_seconds,"
        " resends, extract(epoch FROM resend_at - now())::float8 AS next_resend_in_seconds,"
        " return_waiting"
        " FROM transfers WHERE status IN ('in_flight', 'returning') ORDER BY created_at"
    )
    unsettled = [{**r, "amount": format_minor(r["amount"])} for r in rows]
    return {
        "unsettled": len(unsettled),
        "oldest_age_seconds": unsettled[0]["age_seconds"] if unsettled else None,
        # amounts that cannot go back to their source yet (it is at the largest balance)
        "returns_waiting": sum(1 for t in unsettled if t["return_waiting"]),
        "transfers": unsettled,
    }


async def holds_report(pg: Any, within: float) -> dict[str, Any]:
    rows = await pg.fetch(
        "SELECT id::text AS hold, wallet_id::text AS wallet, amount, shard,"
        " extract(epoch FROM expires_at - now())::float8 AS expires_in_seconds"
        " FROM holds WHERE status = 'held'"
        " AND expires_at < now() + make_interval(secs => $1) ORDER BY expires_at",
        within,
    )
    holds = [{**r, "amount": format_minor(r["amount"])} for r in rows]
    return {
        "expiring": len(holds),
        "overdue": sum(1 for h in holds if h["expires_in_seconds"] < 0),
        "holds": holds,
    }


async def dead_letters_report(
    settings: Settings, redis: RedisClient, wallets: list[str]
) -> list[dict[str, Any]]:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    now_ms = await redis_now_ms(redis)
    letters = deadletters.chosen(await deadletters.read(redis, keys), wallets=wallets)
    return [
        {
            "shard": letter.shard,
            "id": letter.id,
            "wallet": letter.wallet,
            "entry": letter.entry,
            "age_seconds": entry_age(letter.entry, now_ms) if letter.entry else None,
            "dead_lettered_seconds_ago": entry_age(letter.id, now_ms),
            "error": letter.error,
            **deadletters.operation(letter.message),
            "message": letter.message.decode(errors="replace"),
        }
        for letter in letters
    ]


def dead_letters_text(report: list[dict[str, Any]]) -> str:
    if not report:
        return "no dead letters"
    lines = [f"{len(report)} dead letter{'' if len(report) == 1 else 's'}"]
    for d in report:
        age = "-" if d["age_seconds"] is None else f"{d['age_seconds']:.3f}s"
        said = " ".join(d[k] for k in ("type", "amount") if k in d)
        if "operation" in d:
            said += f"  op {d['operation']}"
        lines += [
            f"  wallet {d['wallet']}  entry {d['entry']}  age {age}  (shard {d['shard']},"
            f" dead letter {d['id']})",
            "    " + (said.strip() or f"message {d['message'][:200]!r}"),
            f"    error: {d['error']}",
        ]
    return "\n".join(lines)


def as_text(command: str, report: Any) -> str:
    if command == "dead-letters":
        return dead_letters_text(report)
    if command == "holds":
        head = f"{report['expiring']} holds expiring, {report['overdue']} of them overdue"
        return head + "\n" + as_text("", report["holds"])
    if command == "transfers":
        if not report["unsettled"]:
            return "no transfer in flight"
        head = (
            f"{report['unsettled']} transfers in flight, the oldest "
            f"{report['oldest_age_seconds']:.3f}s old, {report['returns_waiting']} of them "
            "returns waiting for room in their source"
        )
        return head + "\n" + as_text("", report["transfers"])
    if command == "wallet":
        head = (
            f"wallet {report['wallet']} (shard {report['shard']}): "
            + (
                f"balance {report['balance']}, {report['ledger_rows']} ledger rows, "
                f"last applied entry {report['applied_entry']}"
                if report["exists"]
                else "no such wallet in PostgreSQL"
            )
            + f"; {len(report['queued'])} queued"
        )
        lines = [
            f"  {q['entry']}  {q['age_seconds']:8.3f}s  "
            + (
                f"{q['type']} {q['amount']}  op {q['operation']}"
                if "type" in q
                else q["undecodable"]
            )
            for q in report["queued"]
        ]
        return "\n".join([head, *lines])
    if not report:
        return "nothing"
    columns = list(report[0])
    rows = [[("-" if r[c] is None else str(r[c])) for c in columns] for r in report]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        for line in [columns, *rows]
    )


async def inspect(args: argparse.Namespace, settings: Settings) -> Any:
    redis = open_redis(settings, name=f"{settings.redis_key_prefix}:inspect")
    pg = None
    try:
        if args.command == "stuck":
            return await stuck_report(settings, redis, args.older_than)
        if args.command == "dead-letters":
            return await dead_letters_report(settings, redis, args.wallet or [])
        pg = await asyncpg.connect(settings.database_url)
        if args.command == "shards":
            return await shards_report(settings, redis, pg)
        if args.command == "wallet":
            return await wallet_report(settings, redis, pg, args.wallet_id.lower())
        if args.command == "holds":
            return await holds_report(pg, args.within)
        return await transfers_report(pg)
    finally:
        if pg is not None:
            await pg.close()
        await redis.aclose()


EXIT_CODES = {
    0: "the report is printed",
    1: "the settings are not valid, or PostgreSQL or Redis cannot be reached",
}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("wallet-inspect", __doc__, EXIT_CODES)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("shards", help="owner, epoch, backlog and lag of every shard")
    wallet = commands.add_parser("wallet", help="one wallet's queue beside its ledger position")
    wallet.add_argument("wallet_id")
    stuck = commands.add_parser("stuck", help="queued operations older than a threshold")
    stuck.add_argument("--older-than", type=float, default=10.0, help="seconds (10)")
    commands.add_parser("transfers", help="transfers in flight, oldest first")
    holds = commands.add_parser("holds", help="held holds near or past their expiry")
    holds.add_argument("--within", type=float, default=3600.0, help="seconds (3600)")
    dead = commands.add_parser("dead-letters", help="entries set aside as unreadable, oldest first")
    dead.add_argument(
        "--wallet", action="append", metavar="WALLET_ID", help="only this wallet's (repeatable)"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env_or_exit("wallet-inspect")
    try:
        report = asyncio.run(inspect(args, settings))
    except (*REDIS_ERRORS, *PG_ERRORS) as e:
        print(f"wallet-inspect: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(as_text(args.command, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
