"""The worker's SQL, as plain set-based statements, each with why it is shaped so. The
callers: worker/apply.py (a batch), worker/transfers.py (the resending), worker/ownership.py
(taking a shard over)."""

# Reads the batch's wallets and, in the same round trip, the operations among the batch's
# ids that they recorded before (redelivered entries, retried Idempotency-Keys): one row per
# such operation, or one row with op_id NULL for a wallet that has none.
READ_WALLETS = """
WITH found AS (
    SELECT id, balance, op_seq, held, applied_entry FROM wallets WHERE id = any($1::uuid[])
),
-- MATERIALIZED: looked up by id alone, through the unique (id, wallet_id) index. Joined
-- with the wallets, the planner may instead read a wallet's whole ledger through the
-- primary key's wallet_id prefix.
earlier AS MATERIALIZED (
    SELECT wallet_id, id, seq, kind, amount, status, reason, balance_after, created_at,
           transfer_id, counterparty, hold_id, held_after
    FROM operations WHERE id = any($2::uuid[])
)
SELECT f.id::text AS wallet_id, f.balance AS wallet_balance, f.op_seq, f.held AS wallet_held,
       f.applied_entry, e.id::text AS op_id, e.seq, e.kind, e.amount, e.status, e.reason,
       e.balance_after, e.created_at, e.transfer_id::text, e.counterparty::text,
       e.hold_id::text, e.held_after
FROM found f LEFT JOIN earlier e ON e.wallet_id = f.id
"""

# The holds a batch's captures, voids and expiries name, as they are now.
READ_HOLDS = """
SELECT id::text, wallet_id::text, amount, status,
       (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at
FROM holds WHERE id = any($1::uuid[])
"""

# A shard's holds still held, to expire when due: read by its new owner.
HELD_IN_SHARDS = """
SELECT id::text, wallet_id::text, amount, (extract(epoch FROM expires_at) * 1000)::bigint
       AS expires_at
FROM holds WHERE shard = any($1::int[]) AND status = 'held'
"""

# One statement: the new ledger rows, the transfers the batch starts or moves on, the holds
# it places and ends, then every wallet's balance, held amount, ledger length and applied
# stream position. Nothing is written, and nothing returned, unless every wallet still has
# the balance, held amount and ledger length the decision started from, every hold it ends
# is still held, and every shard of the batch still has the caller's epoch. Both are locked
# until COMMIT: the wallets against another writer (there should be none), the shard rows so
# that a new owner's epoch bump waits for it. The wallets first (CASE keeps the order): a
# batch waiting for a wallet's row then holds no shard row, so a takeover need not wait for
# it, and the batch meets the fence once it has the row. Both are checked before the ledger
# insert, so that such a batch is refused rather than failing on a duplicate key. A transfer
# moves on only from the state its step follows (a credit or its refusal from in_flight, the
# return from in_flight or returning). Every read of a table also names its keys with
# `= any(...)`, so that it finds its rows by the primary key whatever the plan: joined with
# unnest alone, a batch of many wallets can be planned as a scan of the whole table, or,
# in the plan the worker keeps, as a merge join reading whole indexes.
RECORD_BATCH = """
WITH unchanged AS (
    SELECT w.id FROM wallets w
    JOIN unnest($11::uuid[], $12::bigint[], $13::bigint[], $37::bigint[])
           AS was(id, balance, op_seq, held)
      ON w.id = was.id AND w.balance = was.balance AND w.op_seq = was.op_seq
     AND w.held = was.held
    WHERE w.id = any($11::uuid[])
    ORDER BY w.id FOR UPDATE OF w
),
fence AS (
    SELECT s.shard FROM shards s
    JOIN unnest($17::int[], $18::bigint[]) AS held(shard, epoch)
      ON s.shard = held.shard AND s.epoch = held.epoch
    WHERE s.shard = any($17::int[])
    FOR SHARE OF s
),
allowed AS (
    SELECT CASE WHEN (SELECT count(*) FROM unchanged) = cardinality($11::uuid[])
                THEN (SELECT count(*) FROM fence) = cardinality($17::int[])
                     -- and every hold the batch ends is still held (a FILTER, not a
                     -- WHERE: the planner would take it for the expiring index's predicate
                     -- and scan all of that index)
                     AND (SELECT count(*) FILTER (WHERE status = 'held') FROM holds
                          WHERE id = any($49::uuid[])) = cardinality($49::uuid[])
                ELSE false END AS ok
),
recorded AS (
    INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after,
                            transfer_id, counterparty, hold_id, held_after)
    SELECT r.* FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[],
                           $6::text[], $7::text[], $8::bigint[], $9::uuid[], $10::uuid[],
                           $35::uuid[], $36::bigint[]) AS r,
                    allowed
    WHERE allowed.ok
),
placed AS (
    INSERT INTO holds (wallet_id, id, amount, status, captured, expires_at, shard, transfer_id,
                       destination_id)
    SELECT h.wallet_id, h.id, h.amount, h.status, h.captured,
           timestamptz 'epoch' + h.expires_ms * interval '1 millisecond', h.shard,
           h.transfer_id, h.destination_id
    FROM unnest($39::uuid[], $40::uuid[], $41::bigint[], $42::text[], $43::bigint[],
                $44::bigint[], $45::int[], $46::uuid[], $47::uuid[])
           AS h(wallet_id, id, amount, status, captured, expires_ms, shard, transfer_id,
                destination_id),
         allowed
    WHERE allowed.ok
),
ended AS (
    UPDATE holds AS h
    SET status = e.status, captured = e.captured, transfer_id = e.transfer_id,
        destination_id = e.destination_id, updated_at = now()
    FROM unnest($48::uuid[], $49::uuid[], $50::text[], $51::bigint[], $52::uuid[], $53::uuid[])
           AS e(wallet_id, id, status, captured, transfer_id, destination_id),
         allowed
    WHERE h.wallet_id = any($48::uuid[]) AND h.id = any($49::uuid[])
      AND h.wallet_id = e.wallet_id AND h.id = e.id AND allowed.ok
),
started AS (
    INSERT INTO transfers (source_id, id, destination_id, amount, status, reason,
                           source_balance_after, source_shard, resend_at)
    SELECT t.*, now() + make_interval(secs => $33) FROM unnest(
               $19::uuid[], $20::uuid[], $21::uuid[], $22::bigint[], $23::text[], $24::text[],
               $25::bigint[], $31::int[]) AS t,
           allowed
    WHERE allowed.ok
),
moved AS (
    UPDATE transfers AS t
    SET status = m.status, reason = coalesce(t.reason, m.reason),
        source_balance_after = coalesce(m.balance, t.source_balance_after), updated_at = now(),
        -- A step that moved it on restarts the resend clock; a return that waits again
        -- backs off further (RESCHEDULE's rule).
        return_waiting = m.waits, sent_at = now(),
        resends = CASE WHEN m.waits THEN t.resends ELSE 0 END,
        resend_at = now() + make_interval(secs => CASE WHEN m.waits
            THEN least($33 * power(2, least(t.resends, 20)), $34) ELSE $33 END)
    FROM unnest($26::uuid[], $27::uuid[], $28::text[], $29::text[], $30::bigint[], $32::bool[])
           AS m(source_id, id, status, reason, balance, waits),
         allowed
    WHERE t.source_id = any($26::uuid[]) AND t.id = any($27::uuid[])
      AND t.source_id = m.source_id AND t.id = m.id
      AND allowed.ok
      -- A CASE, so that the planner does not take it for the unsettled index's predicate
      -- and scan all of that index for these few rows.
      AND CASE WHEN m.status = 'rejected' OR m.waits THEN t.status IN ('in_flight', 'returning')
               ELSE t.status = 'in_flight' END
)
UPDATE wallets AS w
SET balance = v.balance, op_seq = v.op_seq, held = v.held,
    applied_entry = coalesce(v.entry, w.applied_entry), updated_at = now()
FROM unnest($11::uuid[], $14::bigint[], $15::bigint[], $16::text[], $38::bigint[])
       AS v(id, balance, op_seq, entry, held),
     allowed
WHERE w.id = any($11::uuid[]) AND w.id = v.id AND allowed.ok
RETURNING now() AS now
"""

# A batch of one wallet that writes nothing but its ledger rows (deposits, withdrawals, no
# transfer moved on, no hold placed or ended): a hot wallet's batches and every lone
# request's. RECORD_BATCH's guards in the same order, on one wallet and one shard, in a
# statement that costs PostgreSQL a third less: the wallet locked if still as the decision
# found it, then the shard row shared if still at the caller's epoch (an uncorrelated EXISTS
# is a one-time filter, checked before the shard is scanned), then the wallet moved on and
# its rows inserted only if both held. One wallet needs no count: its UPDATE either happens
# or not, and the insert follows it.
RECORD_WALLET = """
WITH unchanged AS (
    SELECT id FROM wallets
    WHERE id = $1 AND balance = $2 AND op_seq = $3 AND held = $4
    FOR UPDATE
),
fence AS (
    SELECT shard FROM shards
    WHERE shard = $5 AND epoch = $6 AND EXISTS (SELECT FROM unchanged)
    FOR SHARE
),
moved AS (
    UPDATE wallets SET balance = $7, op_seq = $8, held = $9,
        applied_entry = coalesce($10, applied_entry), updated_at = now()
    WHERE id = $1 AND EXISTS (SELECT FROM fence)
    RETURNING now() AS now
),
recorded AS (
    INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after,
                            transfer_id, counterparty, hold_id, held_after)
    SELECT $1, r.* FROM unnest($11::bigint[], $12::uuid[], $13::text[], $14::bigint[],
                               $15::text[], $16::text[], $17::bigint[], $18::uuid[],
                               $19::uuid[], $20::uuid[], $21::bigint[]) AS r
    WHERE EXISTS (SELECT FROM moved)
)
SELECT now FROM moved
"""

EPOCHS = "SELECT shard, epoch FROM shards WHERE shard = any($1::int[])"

# Taking a shard over: the new epoch is the fencing token of every batch the new owner
# commits. It waits for a batch of the former owner that holds the shard row (RECORD_BATCH).
TAKE_SHARD = """
INSERT INTO shards (shard, epoch, owner) VALUES ($1, 1, $2)
ON CONFLICT (shard) DO UPDATE
SET epoch = shards.epoch + 1, owner = excluded.owner, acquired_at = now()
RETURNING epoch
"""


# Each owned shard's transfers whose pending step is due to be sent again, the longest
# due first, at most $2 of a shard: a shard's stuck transfers never hold another's back,
# and each one looked at goes to the back (RESCHEDULE), so every unsettled one comes round.
DUE = """
SELECT t.source_id::text, t.id::text, t.destination_id::text, t.amount, t.status,
       t.reason, t.source_balance_after, t.created_at, t.return_waiting, t.source_shard,
       (extract(epoch FROM t.sent_at) * 1000)::bigint AS sent_at_ms
FROM unnest($1::int[]) AS s(shard)
CROSS JOIN LATERAL (
    SELECT * FROM transfers
    WHERE source_shard = s.shard AND status IN ('in_flight', 'returning')
      AND resend_at <= now()
    ORDER BY resend_at
    LIMIT $2
) AS t
"""

# Before a resending sends: each transfer looked at waits twice as long as the last time
# ($4 seconds, doubling, up to $5), whether its step is sent now or may still be queued;
# those sent now ($3) were sent now. Run for one shard's transfers at a time: the two
# `= any` keep the plan a lookup by key whatever the table's statistics, at the cost of a
# probe of the primary key for every pair of the arrays, so the arrays are kept short.
RESCHEDULE = """
UPDATE transfers AS t
SET resends = t.resends + 1,
    resend_at = now() + make_interval(secs => least($4 * power(2, least(t.resends, 20)), $5)),
    sent_at = CASE WHEN r.sent THEN now() ELSE t.sent_at END
FROM unnest($1::uuid[], $2::uuid[], $3::bool[]) AS r(source_id, id, sent)
WHERE t.source_id = any($1::uuid[]) AND t.id = any($2::uuid[])
  AND t.source_id = r.source_id AND t.id = r.id
"""

UNSETTLED_COUNTS = """
SELECT count(*) AS unsettled, count(*) FILTER (WHERE return_waiting) AS returns_waiting,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_seconds
FROM transfers WHERE source_shard = any($1::int[]) AND status IN ('in_flight', 'returning')
"""
