"""Shard workers: the single writer of every wallet in the shards they own."""
