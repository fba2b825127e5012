-- Each session's path in the rollup, so "Most common paths" is one GROUP BY over one row per session (no events
-- scan, no join: over 30 days at 100M events the per-session aggregation of the events plus its join with the
-- sessions went over Grafana's 1 GB memory budget).
--
-- path: the session's event types in time order joined by ' → ' (ties in time broken by event_id, so the path is a
--   function of the deduplicated events alone: copies, redeliveries and re-inserted batches change nothing). At most
--   50 steps: a longer session keeps its first 50 and ends in ' → …', so one runaway session cannot bloat the rollup
--   (at most ~50 x the longest type name per row) nor a panel that groups on it. The recompute sorts a session's
--   steps (as it holds its event ids anyway, to collapse copies); groupArraySorted(50), which would hold 50 only,
--   measured 1.7x the recompute query's time (arraySort: 1.4x; README, "ClickHouse relations"). Like every rollup
--   figure it is per (user_id, session_id): a session whose events name two users has two rows, each with its
--   user's events. Tombstones and rows written before this migration ran have ''
--   until recomputed; the backfill below recomputes every session that has events.
--   LowCardinality: sessions share paths (that is what the panel shows), so the column is a dictionary per part plus
--   small indexes. Measured at 10M events (513k sessions): 0.5 MiB uncompressed instead of 147 MiB, and the panel's
--   pass over the rollup 12 ms instead of 90. Many distinct paths (agents that loop) still work, only slower.
ALTER TABLE flowtrack.sessions ADD COLUMN IF NOT EXISTS path LowCardinality(String);

-- session_totals as in 008, plus event_type in the collapsed events and the path over them.
CREATE OR REPLACE VIEW flowtrack.session_totals AS
SELECT
    user_id,
    session_id,
    min(ts) AS started_at,
    max(ts) AS last_event_at,
    maxIf(ts, is_end = 1 OR is_error = 1) AS closed_at,
    count() AS event_count,
    countIf(is_error = 1) AS error_count,
    countIf(is_end = 1) AS end_count,
    concat(arrayStringConcat(arrayMap(step -> toString(step.3),
                                      arraySlice(arraySort(groupArray((ts, event_id, event_type))), 1, 50)), ' → '),
           if(count() > 50, ' → …', '')) AS path
FROM
(
    SELECT session_id, event_id, argMax(user_id, ingested_at) AS user_id, argMax(ts, ingested_at) AS ts,
           argMax(is_end, ingested_at) AS is_end, argMax(is_error, ingested_at) AS is_error,
           argMax(event_type, ingested_at) AS event_type
    FROM flowtrack.events
    GROUP BY session_id, event_id
)
GROUP BY user_id, session_id;

-- Backfill: recompute every session that has events (as the worker's recompute does; the new rows replace the old
-- ones), in 8 slices of the sessions by hash. Events are sorted by (session_id, event_id), so the collapse of copies
-- aggregates in key order (streaming, no hash table of every event id; small blocks, as it merges a stream from every
-- part), and the per-session aggregation spills to disk past 100 MB. What remains grows with the sessions of one
-- statement (the merge of the spilled data holds a buffer per spilled file: in one statement, 2.6 GiB at 100M
-- events, 5.1M sessions); a slice reads the session ids of every event and the rest of its own sessions' events
-- only. 008's backfill (one statement, no spilling) would hold every event id of the store in memory: it ran on
-- stores that 006 had just created, this one must run on stores of any size.
INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 0
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 1
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 2
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 3
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 4
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 5
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 6
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

INSERT INTO flowtrack.sessions (user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
                                end_count, path, computed_at, is_deleted)
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, path, now64(6), 0
FROM flowtrack.session_totals WHERE cityHash64(session_id) % 8 = 7
SETTINGS optimize_aggregation_in_order = 1, max_block_size = 8192, max_bytes_before_external_group_by = 100000000;

-- The backfill leaves two rows per session until merges replace the older; a quiet store's merges may not get to it
-- for long, and every flow_sessions read (FINAL) pays for it (10M events, History panels over all users: 34-39 ms
-- before this migration, 113-122 ms after the backfill, 13-21 ms after this merge into one part, which took 0.6 s).
-- One streaming merge of the rollup.
OPTIMIZE TABLE flowtrack.sessions FINAL;

-- Public: flow_sessions' columns plus the path (flow_sessions keeps its contract columns; same rows, same rules).
CREATE OR REPLACE VIEW flowtrack.flow_session_paths AS
SELECT
    user_id,
    session_id,
    started_at,
    last_event_at,
    if(status = 'active', NULL, closed_at) AS ended_at,
    event_count,
    error_count,
    status,
    dateDiff('millisecond', started_at, if(status = 'active', last_event_at, closed_at)) AS duration_ms,
    path
FROM
(
    SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, path,
           multiIf(error_count > 0, 'failed', end_count > 0, 'completed', 'active') AS status
    FROM flowtrack.sessions FINAL
);
