"""The admin role, which sees and operates on every wallet: given and taken away from the
command line only (`wallet-admin grant-admin <username>`, or `revoke-admin`; also
`python -m api.users ...`, the same commands). The change holds from the user's next access
token (at most ACCESS_TOKEN_TTL later)."""

from __future__ import annotations

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


if __name__ == "__main__":
    from api.admin import main

    sys.exit(main())
