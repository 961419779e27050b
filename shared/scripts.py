"""The Lua scripts that keep a wallet's stream, its shard's dirty set and notification list
consistent. Each touches keys of one shard only (one hash tag), so it runs on Redis Cluster.
"""

from __future__ import annotations

import hashlib

# KEYS: wallet stream, shard dirty set, shard notification list
# ARGV: wallet id, encoded operation, queue limit
# Appends the operation unless the wallet's queue is full; a wallet that had nothing queued
# becomes dirty and its id goes on the notification list, which wakes the shard's owner.
# Returns the entry id, or false when the queue is full.
ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[3], ARGV[1])
end
return id
"""

# KEYS: wallet stream, shard dirty set
# ARGV: wallet id, the lowest entry id to keep (everything below it has been committed)
# Called by the owner after COMMIT and the replies. Drops the committed entries; a stream left
# empty is deleted and its wallet is no longer dirty. Returns the number of entries left.
ACKNOWLEDGE = """
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
local left = redis.call('XLEN', KEYS[1])
if left == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
return left
"""


def sha(script: str) -> str:
    """The id EVALSHA knows a script by."""
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


ACKNOWLEDGE_SHA = sha(ACKNOWLEDGE)


def next_entry_id(entry_id: str) -> str:
    """The smallest stream entry id greater than `entry_id` ("5-1" -> "5-2")."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"
