"""The Lua scripts that keep a wallet's stream, its shard's dirty set and notification list
consistent. Each touches keys of one shard only (one hash tag), so it runs on Redis Cluster.
"""

from __future__ import annotations

import hashlib

# KEYS: wallet stream, shard dirty set, shard notification list, shard queued count
# ARGV: wallet id, encoded operation, wallet queue limit, shard queue limit
# Appends the operation unless the wallet's or the shard's queue is full; a wallet that had
# nothing queued becomes dirty and its id goes on the notification list, which wakes the
# shard's owner. Returns the entry id, or false when a queue is full.
ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3])
   or tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[4]) then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
redis.call('INCR', KEYS[4])
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[3], ARGV[1])
end
return id
"""

# KEYS: wallet stream, shard dirty set, shard queued count
# ARGV: wallet id, the lowest entry id to keep (everything below it has been committed)
# Called by the owner after COMMIT and the replies. Drops the committed entries; a stream left
# empty is deleted and its wallet is no longer dirty. Returns the number of entries left.
ACKNOWLEDGE = """
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
if trimmed > 0 and redis.call('DECRBY', KEYS[3], trimmed) < 0 then
  redis.call('SET', KEYS[3], 0)
end
local left = redis.call('XLEN', KEYS[1])
if left == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return left
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


def sha(script: str) -> str:
    """The id EVALSHA knows a script by."""
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


ACKNOWLEDGE_SHA = sha(ACKNOWLEDGE)


def next_entry_id(entry_id: str) -> str:
    """The smallest stream entry id greater than `entry_id` ("5-1" -> "5-2")."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"
