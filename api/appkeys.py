"""The typed keys of what the application holds."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from api.deadlines import Deadlines
from api.enqueue import Enqueuer
from api.limits import Slots
from api.live import LiveStats
from api.render import HoldFacts
from api.replies import ReplyListener
from shared.connections import RedisClient
from shared.keys import KeySpace
from shared.metrics import ApiMetrics
from shared.queue import Queue
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
KEYS = web.AppKey("keys", KeySpace)
QUEUE = web.AppKey("queue", Queue)
PG = web.AppKey("pg", asyncpg.Pool)
REDIS = web.AppKey[RedisClient]("redis")
REPLIES = web.AppKey("replies", ReplyListener)
ENQUEUE = web.AppKey("enqueue", Enqueuer)
METRICS = web.AppKey("metrics", ApiMetrics)
LIVE = web.AppKey("live", LiveStats)
DEADLINES = web.AppKey("deadlines", Deadlines)
# password hashes at once in this process (registration, login)
HASHING = web.AppKey("hashing", Slots)
# wallet id -> owner's user id, as far as this process has looked them up
OWNERS = web.AppKey("owners", dict[str, str])
# ids of wallets this process has found to exist (wallets are never deleted)
KNOWN_WALLETS = web.AppKey("known_wallets", dict[str, None])
# hold id -> what never changes of it, for the holds this process placed or looked up
HOLD_WALLETS = web.AppKey("hold_wallets", dict[str, HoldFacts])
