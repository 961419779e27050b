"""`python -m api`: the HTTP service, configured from the environment."""

from __future__ import annotations

import logging

import uvloop
from aiohttp import web

from api.app import LISTEN_BACKLOG, create_app
from shared import logs
from shared.settings import Settings


def main() -> None:
    logs.configure()
    settings = Settings.from_env_or_exit("api")
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
