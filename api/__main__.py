"""The HTTP service (`wallet-api`, or `python -m api`): the API on HOST:PORT, configured from
the environment (DATABASE_URL, REDIS_URL and the rest; docs/configuration.md). It runs until
SIGTERM or SIGINT, then closes its connections and exits."""

from __future__ import annotations

import logging
import sys

import uvloop
from aiohttp import web

from api.app import LISTEN_BACKLOG, create_app
from shared import cli, logs
from shared.settings import Settings

EXIT_CODES = {
    0: "stopped by SIGTERM or SIGINT",
    1: "the settings are not valid, or the service could not start (its port taken)",
}


def main(argv: list[str] | None = None) -> int:
    cli.parser("wallet-api", __doc__, EXIT_CODES).parse_args(argv)
    settings = Settings.from_env_or_exit("api")
    logs.configure(settings.log_level)
    logging.getLogger("api").info("starting with %r", settings)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        reuse_port=settings.reuse_port,
        backlog=LISTEN_BACKLOG,
        access_log=None,
        loop=uvloop.new_event_loop(),
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
