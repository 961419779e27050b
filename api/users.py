"""`python -m api.users grant-admin <username>` (or `revoke-admin`): the admin role, which
sees and operates on every wallet, is given from the command line only. The change holds
from the user's next access token (at most ACCESS_TOKEN_TTL later)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from shared.settings import Settings


async def set_admin(settings: Settings, username: str, admin: bool) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        status = await conn.execute(
            "UPDATE users SET is_admin = $2 WHERE username = $1", username.lower(), admin
        )
    finally:
        await conn.close()
    return bool(status == "UPDATE 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.users", description=__doc__)
    parser.add_argument("action", choices=["grant-admin", "revoke-admin"])
    parser.add_argument("username")
    args = parser.parse_args(argv)
    found = asyncio.run(set_admin(Settings.from_env(), args.username, args.action == "grant-admin"))
    if not found:
        print(f"no user {args.username!r}", file=sys.stderr)
        return 1
    print(f"{args.username}: {'admin' if args.action == 'grant-admin' else 'no longer admin'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
