"""The bank-style chaos run: `python -m load.chaos --help`.

Real processes on one machine: an API and three workers, on a PostgreSQL and a Redis that
the run starts for itself (embedded ones, so that it can crash and restart them). Clients
send deposits and withdrawals with Idempotency-Keys to one hot wallet and 50 others, and
(a third of what they send) transfers between them, half of them to the hot wallet, and
record every answer: 200 (applied), 409 (refused), anything else or nothing (unknown). Their
transfers follow a plan drawn from the seed alone (the n-th transfer's wallets, amount and
Idempotency-Key, an ordinary-looking UUID), so that a client who knows the seed can compute
them before they are sent.

Beside them a hostile client, also drawing from the seed, does what a client may do:
- squats ids: for a share of the planned transfers, half of them before they are sent
  (the first few before the load starts, the others a little ahead of the honest
  clients), half as soon as an honest client has sent them, while they are under way, it
  deposits 0.01 on the transfer's source and destination under Idempotency-Keys equal to
  every id of the transfer it can compute with the service's own derivations
  (shared/ids.py: the transfer's id, its return's, the id its key would become as an
  operation, the id it would have from the destination), each in one of its spellings
  (as is, upper case, braces, urn:uuid:, no hyphens; the first few transfers in all five);
- reuses keys: it sends an honest client's key, once answered 200 or 409, again with
  another body (another amount, the other kind, another destination);
- sends one new request under one key many times at once.
Meanwhile a schedule drawn from the seed strikes each fault once:
- kill: a worker is killed with SIGKILL;
- pause: the owner of the hot wallet is stopped (SIGSTOP) inside a batch until its lease
  has run out and another worker has taken its shards, then continued;
- start: one more worker starts;
- terminate_postgres_sessions: PostgreSQL terminates every session of the service;
- drop_redis_connections: Redis drops every connection of the service;
- restart_postgres: PostgreSQL crashes (an immediate stop), stays down 2 s, and starts,
  recovering from its WAL;
- restart_redis_empty: Redis is killed and started again with nothing (no persistence):
  streams, leases and heartbeats are gone;
- cut_worker_from_postgres: a worker that reaches PostgreSQL through a proxy is cut off
  from it (packets dropped, connections kept) while it keeps Redis, until its shards have
  been served by others; then the network comes back and it takes shards again;
- poison_entry: an entry no batch could apply (an amount past BIGINT) is put on the hot
  wallet's stream, as a broken writer would;
- kill_api: the API process is killed with SIGKILL, and a new one started;
- pause_api: the API process is stopped (SIGSTOP) for 2 s, then continued.
With `--redis-cluster` the run starts a Redis Cluster of Debian's redis-server (3 primaries
with a replica each) instead of one Redis, and its three faults take the place of
restart_redis_empty:
- kill_redis_primary: the primary of the hot wallet's slot is killed with SIGKILL, and its
  replica takes over (2 s node timeout); what it had not passed on is gone;
- move_slot: the hot wallet's slot is moved to another primary under load, keys and all;
- redis_primary_back: the killed primary is started again, and joins as a replica.
After each fault every wallet is sent a deposit until it answers 200; the time from the
fault to the last wallet's 200 is that fault's recovery, and must stay within its bound.

Then the faults are healed and every unknown is sent again with its key until it has an
answer, and the run checks: every transfer is completed or rejected, none in flight; every
200 is in the ledger exactly once and applied (a transfer's two legs), every 409 moved
nothing (a transfer refused, or credited back), nothing is in the ledger that no client
sent, every balance follows from its ledger and is never negative, the balances add up to
the deposits minus the withdrawals, every shard has exactly one owner among the live workers, the
stopped worker's late batch was refused by its fence, the poison entry is in the dead
letters, every fault's recovery stayed within its bound, and no answer was a 500. And for
the hostile client: every squatting deposit was answered 200 and applied once; every
transfer it squatted was completed, or rejected only for want of funds at its source; no
request of a client was refused as a reused key but the reuses, each answered 422 with
the key's first operation left as it was and nothing of the reuse applied; the sends of
one key at once were applied once and all answered alike.

A failing run prints its seed and exits 1; `--seed` replays the same schedule, and
`--schedule-only` prints it without running. `--report` writes the report as JSON (what
tests/test_chaos.py reads), the hostile client's counts under "hostile"; `--no-hostile`
runs without it. Traffic goes to loopback only; the run stops by itself.

Its modules: `__main__` (the command line), `schedule` (what the seed decides: the faults'
times, the planned transfers), `stage` (the servers, the service's processes, the run's
connections), `clients` (the honest clients and the record of every request),
`hostile` (the hostile client), `faults` (the registry: a class per fault, with its bound,
how it strikes and how it heals), `run` (the load with the faults, each held to its
bound), `checks` (the final checks) and `report` (the report, printed and as JSON).
"""
