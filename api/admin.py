"""Administration (`wallet-admin`), configured from the environment like the service.

    grant-admin USERNAME    give the user the admin role, which sees and operates on every
    revoke-admin USERNAME   wallet (or take it away); it holds from the user's next access
                            token, at most ACCESS_TOKEN_TTL later
    requeue-dead-letters    put the chosen dead letters back on their wallets' streams, for
                            the workers to apply, once their cause is gone
    drop-dead-letters       discard the chosen dead letters

Dead letters are chosen with --all, or by --wallet and/or --entry (the entry id in its
wallet's stream, as `wallet-inspect dead-letters` and the worker's log show it); --dry-run
shows what would be done and changes nothing. A requeued operation that the ledger already
holds is answered from the ledger, never applied twice (docs/commands.md, dead letters).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from shared import cli, deadletters
from shared.connections import PG_ERRORS, REDIS_ERRORS, open_redis
from shared.keys import KeySpace
from shared.settings import Settings

EXIT_CODES = {
    0: "done (with --dry-run: nothing changed)",
    1: (
        "the settings are not valid, PostgreSQL or Redis cannot be reached, no such user, "
        "no dead letter matches --wallet/--entry, or a wallet's queue was full (the dead "
        "letter stays)"
    ),
}


async def dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    redis = open_redis(settings, name=f"{settings.redis_key_prefix}:admin")
    try:
        found = await deadletters.read(redis, keys)
        letters = found if args.all else deadletters.chosen(found, args.wallet, args.entry)
        if not letters:
            print("no dead letter matches" if found else "no dead letters")
            return 0 if args.all else 1
        left = 0
        for letter in letters:
            named = f"wallet {letter.wallet} entry {letter.entry}"
            if args.dry_run and args.command == "drop-dead-letters":
                print(f"would drop {named}")
            elif args.dry_run:
                why_not = deadletters.readable(letter.message)
                caveat = f" (this release cannot read it either: {why_not})" if why_not else ""
                print(f"would requeue {named}{caveat}")
            elif args.command == "drop-dead-letters":
                await deadletters.drop(redis, keys, letter)
                print(f"dropped {named}")
            else:
                limits = (settings.wallet_queue_limit, settings.shard_queue_limit)
                queued = await deadletters.requeue(redis, keys, letter, *limits)
                if queued is None:
                    left += 1
                    print(f"not requeued {named}: its queue is full; try again later")
                else:
                    print(f"requeued {named} as entry {queued}")
        return 1 if left else 0
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("wallet-admin", __doc__, EXIT_CODES)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, verb in (("grant-admin", "give"), ("revoke-admin", "take away")):
        user = commands.add_parser(name, help=f"{verb} the admin role")
        user.add_argument("username")
    selections = []
    for name, what in (
        ("requeue-dead-letters", "put dead letters back on their wallets' streams"),
        ("drop-dead-letters", "discard dead letters"),
    ):
        command = commands.add_parser(name, help=what)
        command.add_argument("--all", action="store_true", help="every dead letter")
        command.add_argument(
            "--wallet",
            action="append",
            default=[],
            metavar="WALLET_ID",
            help="that wallet's (repeatable)",
        )
        command.add_argument(
            "--entry",
            action="append",
            default=[],
            metavar="ENTRY_ID",
            help="the entry's id in its wallet's stream (repeatable); with --wallet, of those",
        )
        command.add_argument("--dry-run", action="store_true", help="show, change nothing")
        selections.append(command)
    args = parser.parse_args(argv)
    if args.command in ("requeue-dead-letters", "drop-dead-letters"):
        chose = bool(args.wallet or args.entry)
        if args.all == chose:
            chosen = next(c for c in selections if c.prog.endswith(args.command))
            chosen.error("choose the dead letters: --all, or --wallet and/or --entry")
    settings = Settings.from_env_or_exit("wallet-admin")
    try:
        if args.command in ("grant-admin", "revoke-admin"):
            return grant(args.username, args.command == "grant-admin", settings)
        return asyncio.run(dead_letters(args, settings))
    except (*REDIS_ERRORS, *PG_ERRORS) as e:
        print(f"wallet-admin: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


async def set_admin(settings: Settings, username: str, admin: bool) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        status = await conn.execute(
            "UPDATE users SET is_admin = $2 WHERE username = $1", username.lower(), admin
        )
    finally:
        await conn.close()
    return bool(status == "UPDATE 1")


def grant(username: str, admin: bool, settings: Settings) -> int:
    if not asyncio.run(set_admin(settings, username, admin)):
        print(f"no user {username!r}", file=sys.stderr)
        return 1
    print(f"{username}: {'admin' if admin else 'no longer admin'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
