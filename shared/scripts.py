"""The Lua scripts that keep a wallet's stream, its shard's dirty set and wake stream
consistent. Each touches keys of one shard only (one hash tag), so it runs on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from typing import Any

from shared.connections import RedisClient
from shared.keys import KeySpace

# KEYS: wallet stream, shard dirty set, shard wake stream, shard queued count
# ARGV: wallet id, encoded operation, wallet queue limit, shard queue limit, and '1' to be
# admitted by a full Redis (a worker's hand-on)
# Appends the operation unless the wallet's or the shard's queue is full. A wallet that had
# nothing queued becomes dirty and goes on the wake stream with this first entry of its
# stream, so that the shard's owner can apply it without reading the wallet's stream.
# Returns the entry id, or false when a queue is full. A full Redis (maxmemory, noeviction)
# refuses a script's command that adds data only if it is the script's first write: a
# worker's hand-on writes first what adds nothing, so that a batch whose steps must be
# queued before its entries are trimmed (freeing memory) is not refused for ever.
ENQUEUE = """
if ARGV[5] == '1' then
  redis.call('PERSIST', KEYS[1])
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3])
   or tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[4]) then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
redis.call('INCR', KEYS[4])
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('PERSIST', KEYS[1])
  redis.call('XADD', KEYS[3], '*', 'w', ARGV[1], 'e', id, 'm', ARGV[2])
end
return id
"""

# KEYS: for each wallet, its stream, its shard's dirty set and its shard's queued count
# ARGV: how many entries to return at most for each wallet, then for each wallet its id and
# the lowest entry id to keep (everything below it has been committed and answered)
# Called by the owner after COMMIT and the replies, and to read wallets: one call for many
# wallets (all of one shard on a Redis Cluster), as a call's own cost is most of a quiet
# wallet's. Drops each wallet's committed entries and returns its next ones, a list per
# wallet. A wallet whose stream is left empty is no longer dirty: its next operation comes
# through the wake stream. The empty stream itself is kept a minute: a stream keeps handing
# out ids above its last one, so a wallet's entry ids only grow and "everything up to here
# is committed" stays true of its ids, whereas a stream deleted and started anew in the same
# millisecond would hand out ids below the old ones.
ACKNOWLEDGE_READ = """
local found = {}
for i = 1, #KEYS / 3 do
  local stream, dirty, queued = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local wallet, keep = ARGV[2 * i], ARGV[2 * i + 1]
  local trimmed = redis.call('XTRIM', stream, 'MINID', keep)
  if trimmed > 0 and redis.call('DECRBY', queued, trimmed) < 0 then
    redis.call('SET', queued, 0)
  end
  local entries = redis.call('XRANGE', stream, keep, '+', 'COUNT', ARGV[1])
  if #entries == 0 then
    redis.call('SREM', dirty, wallet)
    redis.call('PEXPIRE', stream, 60000)
  end
  found[i] = entries
end
return found
"""

# KEYS: shard lease. ARGV: worker id, lease time in ms.
# Extends the lease if the worker still holds it. Returns 1 if it does, else 0.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: shard lease. ARGV: worker id.
# Gives the lease up if the worker still holds it, so another worker can take the shard now.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# KEYS: shard lease, shard wake stream. ARGV: worker id, the lowest wake entry id to keep.
# Drops the wake entries the owner has read, if it still owns the shard: a former owner
# that was paused past its lease must not trim what the new owner has not read yet.
TRIM_WAKES = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
end
return 0
"""

# KEYS: shard dirty set, shard wake stream. The shard's dirty wallets and the id of the last
# wake entry at that moment, in one step (a script, as a MULTI cannot span a cluster's
# pipeline): the wake-ups after that id are of wallets that became dirty since.
DIRTY_SINCE = """
return {redis.call('SMEMBERS', KEYS[1]), redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)}
"""

# Liveness is judged by Redis's clock alone, never by comparing hosts' clocks: a host whose
# clock ran ahead would keep a dead worker "live", and its shards unowned, for the skew.
_REDIS_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A Redis full (maxmemory under noeviction) refuses a script's command that adds data only if
# it is the script's first write. The scripts a worker needs to go on draining the queues,
# which is what frees the memory, write first what adds nothing (ZREMRANGEBYSCORE, DEL): a
# worker that could neither heartbeat nor take shards there would leave them undrained.

# KEYS: the live workers (a sorted set: worker id -> when its heartbeat runs out, in ms).
# ARGV: worker id, heartbeat time in ms.
# Drops the workers whose heartbeat ran out; the worker's heartbeat. Returns the live ones.
HEARTBEAT = (
    _REDIS_NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

# KEYS: shard lease. ARGV: worker id, lease time in ms.
# Leases the shard to the worker if nobody holds it. Returns 1 if it did, else 0. (SET NX,
# but taken even when Redis is full: the DEL of the free lease writes first.)
TAKE_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: the live workers. Returns the ids of the workers whose heartbeat has not run out.
LIVE_WORKERS = (
    _REDIS_NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""
)


# KEYS: the sidelined workers. ARGV: worker id, how long the note holds in ms, why.
# A worker that gave its shards up says why, until it can commit again (or dies).
SIDELINE = (
    _REDIS_NOW_MS
    + """
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ' ' .. ARGV[3])
"""
)

# KEYS: the sidelined workers. Returns [id, why, id, why, ...] of the notes that hold;
# drops those that ran out (their workers died).
SIDELINED = (
    _REDIS_NOW_MS
    + """
local found = {}
local notes = redis.call('HGETALL', KEYS[1])
for i = 1, #notes, 2 do
  local until_ms, why = string.match(notes[i + 1], '^(%d+) (.*)$')
  if until_ms and tonumber(until_ms) >= now then
    table.insert(found, notes[i])
    table.insert(found, why)
  else
    redis.call('HDEL', KEYS[1], notes[i])
  end
end
return found
"""
)


async def live_workers(redis: RedisClient, keys: KeySpace) -> list[str]:
    """The ids of the workers alive now, by Redis's clock."""
    found: Any = await redis.eval(LIVE_WORKERS, 1, keys.workers())
    return [w.decode() for w in found]


async def sidelined_workers(redis: RedisClient, keys: KeySpace) -> dict[str, str]:
    """The workers alive but without shards because they cannot commit: id -> why."""
    found: Any = await redis.eval(SIDELINED, 1, keys.sidelined())
    return {found[i].decode(): found[i + 1].decode() for i in range(0, len(found), 2)}


def sha(script: str) -> str:
    """The id EVALSHA knows a script by."""
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


ENQUEUE_SHA = sha(ENQUEUE)
ACKNOWLEDGE_READ_SHA = sha(ACKNOWLEDGE_READ)


def next_entry_id(entry_id: str) -> str:
    """The smallest stream entry id greater than `entry_id` ("5-1" -> "5-2")."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"
