"""Every Redis key name, and the shard function.

All keys of one shard carry the shard number as a Redis Cluster hash tag (`{7}`), so a
shard's wallet streams, dirty set and wake stream live in one slot and the Lua
scripts that touch several of them work unchanged on Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class KeySpace:
    prefix: str
    shard_count: int

    def shard_of(self, wallet_id: str) -> int:
        """`wallet_id` in its canonical form: lower-case hex with hyphens."""
        return zlib.crc32(wallet_id.encode()) % self.shard_count

    def wallet_stream(self, wallet_id: str, shard: int | None = None) -> str:
        """The wallet's queue of operations not yet acknowledged by its writer."""
        if shard is None:
            shard = self.shard_of(wallet_id)
        return f"{self.prefix}:w:{{{shard}}}:{wallet_id}"

    def dirty_set(self, shard: int) -> str:
        """Ids of the shard's wallets whose streams hold entries: the truth for recovery."""
        return f"{self.prefix}:d:{{{shard}}}"

    def wake_stream(self, shard: int) -> str:
        """Stream of the shard's wallets that have just become dirty, each with the first
        entry of its stream: what wakes the shard's owner. The owner trims what it read."""
        return self._wake_streams[shard]

    @functools.cached_property
    def _wake_streams(self) -> tuple[str, ...]:
        # Named once: a worker reads every owned shard's wake stream after each wake-up.
        return tuple(f"{self.prefix}:wake:{{{shard}}}" for shard in range(self.shard_count))

    def queued(self, shard: int) -> str:
        """How many operations the shard's streams hold, all wallets together."""
        return f"{self.prefix}:q:{{{shard}}}"

    def enqueue_keys(self, wallet_id: str) -> list[str]:
        """The keys the ENQUEUE script takes for one of the wallet's operations."""
        shard = self.shard_of(wallet_id)
        return [
            self.wallet_stream(wallet_id, shard),
            self.dirty_set(shard),
            self.wake_stream(shard),
            self.queued(shard),
        ]

    def pending_transfer(self, transfer_id: str) -> str:
        """The source wallet of a transfer queued and not yet committed, so that its URL
        can tell it is pending; the source's writer deletes it once it is committed."""
        return f"{self.prefix}:transfer:{transfer_id}"

    def lease(self, shard: int) -> str:
        """The id of the worker that owns the shard; expires unless the owner renews it."""
        return f"{self.prefix}:lease:{{{shard}}}"

    def dead_letters(self, shard: int) -> str:
        """Stream of the shard's entries that could not be decoded, kept for an operator."""
        return f"{self.prefix}:dead:{{{shard}}}"

    def reply_channel(self, api_id: str) -> str:
        """Pub/sub channel of one API process: workers publish outcomes there."""
        return f"{self.prefix}:r:{api_id}"

    def workers(self) -> str:
        """Sorted set of live workers, scored by the time (ms) their heartbeat expires.
        Outside every shard's slot: only whole-key commands touch it."""
        return f"{self.prefix}:workers"

    def sidelined(self) -> str:
        """Hash of the workers that gave their shards up because they cannot commit: worker
        id -> "<when it runs out, ms> <why>"."""
        return f"{self.prefix}:sidelined"

    def committed(self, second: int) -> str:
        """Hash of the batches and operations all workers committed in one second (unix
        time), for the live view; it expires after a few minutes."""
        return f"{self.prefix}:committed:{second}"

    def attempts(self, kind: str, who: str) -> str:
        """Attempts (logins, registrations) in the current window of `kind`, per username,
        client address or both (hashed: they come from outside and may be long)."""
        digest = hashlib.sha256(who.encode()).hexdigest()[:32]
        return f"{self.prefix}:attempts:{kind}:{digest}"

    def pattern(self) -> str:
        """Matches every key of this namespace (for clean-up in tests and tools)."""
        return f"{self.prefix}:*"
