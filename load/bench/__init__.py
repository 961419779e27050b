"""The benchmark: `make bench` (or `python -m load.bench --help`).

On one machine it starts PostgreSQL and Redis (embedded, unless DATABASE_URL and REDIS_URL
name running servers: the benchmark creates its own database beside DATABASE_URL's and
drops it after), the service (`python -m api`, `python -m worker`) and the row-lock
reference (`python -m load.rowlock`), and drives both with the same load from this
process, the service then the reference, phase by phase, so that each pair of figures
comes from the same minutes of the same machine.

Closed loop first, the way most clients call a service: a number of keep-alive
connections, each sending its next deposit as soon as the answer to the last one is in
(1, 8, 64 and 256 connections on one wallet, and 64 over 1,000 wallets). Each phase ends
by letting every request in flight finish, so the balances are checked exactly.

Then the open model: requests start at a constant rate whether or not earlier ones have
finished, and latency counts from when a request was due, so a stalled server cannot
hide its queue (no coordinated omission). A constant rate on one wallet (default 1000/s
for 60 s); then, rising step by step, the highest rate each design sustains on one wallet
and, for the service, over 10,000 wallets (sustained: at least 95% of it completed in
time, nothing but 200 and 409, p99 under --p99-limit); then the same for transfers; then
holds, each placed under an Idempotency-Key the client chose and, once placed, captured on
the same connection by the id the key makes (64 connections on one wallet and over 1,000
wallets, and 1000/s on one wallet, a hold and its capture counting as two requests);
then, optionally, the constant rate with the worker restarted at each of --intervals
(BATCH_INTERVAL, the opt-in linger).

Every phase waits until the service has nothing queued, then checks that the balances
moved by what the ledger's applied rows say and, when every request was answered, that
the ledger says what the answers said; after holds, that each wallet's held amount is its
held holds', within its balance, and as its newest ledger row says. It counts commits from
the ledger rows' xmin and tells how much of a core each server process and the generator
used. The run ends with
the targets the service is held to.

Its modules: `__main__` (the command line), `phases` (the designs, the typed phases, the
plan), `workloads` (the requests of each phase), `generator` (the two ways of sending
them), `designs` (starting and ending the service and the row lock), `run` (each step
driven and checked), `results`, `targets` (the targets as data, and their judging) and
`report` (the tables, and the docs/benchmarks.md rewrite).
"""
