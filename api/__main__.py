"""`python -m api`: the HTTP service, configured from the environment."""

from __future__ import annotations

import logging

import uvloop
from aiohttp import web

from api.app import create_app
from shared import logs
from shared.settings import Settings

# Connections waiting to be accepted. Past aiohttp's 128, a burst of new connections (a
# client pool growing at a busy moment) has SYNs dropped, and each waits a second to retry.
LISTEN_BACKLOG = 1024


def main() -> None:
    logs.configure()
    settings = Settings.from_env()
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


if __name__ == "__main__":
    main()
