-- only-if: SELECT count() = 0 FROM system.columns WHERE database = 'flowtrack' AND table = 'sessions' AND name = 'path'
-- (Skipped once 009 has added the path: its positional backfill below no longer fits the rollup, and 009 recomputes
-- every session itself; without the guard a re-run of 008 after 009 fails, or would blank the paths.)
-- Relations for the access paths besides one flow (006): a user's sessions, a session's time range, a time window.
--
-- sessions: the per-session rollup, one current row per (user_id, session_id), sorted for "one user's sessions".
--   Rows are not aggregated from insert blocks (a materialized view sees every copy, so count()/sum() would count
--   redeliveries): after each batch the worker recomputes the touched sessions from `events FINAL` (one key range
--   per session) and inserts the result with computed_at = the recompute's start time. The row of the latest
--   recompute wins; it started after every insert that finished before it, and every insert is followed by its own
--   recompute, so the winning row saw every stored copy: exact under redelivery, re-insertion and duplicate
--   event ids, with no per-event-id state anywhere (merges replace rows; reads hold one row per session).
--   is_deleted marks a session whose only events were purged (rows ClickHouse refused).
--   index_granularity = 256 (also on session_spans): panels look up the few sessions of a time window or one
--   session by key; with 8192-row granules a few dozen random sessions touch most granules of the table.
-- session_spans: session → its users and [start, end] (the OTel exporter's trace_id_ts table): finds the user of a
--   session (the rollup's key prefix) and the partitions of its events. Written by a materialized view from every
--   rollup row (one per touched session and batch, not per event); older rows only narrow the range, so readers
--   take min(start_ts)/max(end_ts) over a session's rows.
-- events_by_time: a narrow copy of events sorted by ts, for time windows over all flows (live panels, alerts,
--   error messages). ReplacingMergeTree keyed (ts, session_id, event_id): its partition key is a function of the
--   sort key, so FINAL is partition-local and a window read merges only the window's key range.
--   An event re-sent under the same event_id with a different ts (no timestamp given) sits here at both of its
--   times; `events`, and every relation built from it, show it once. No attributes (reading the map costs as
--   much as the rest of the copy at ingest): attribute panels look the few events they show up in `events` by
--   (session_id, event_id). No insert-dedup window: a re-inserted batch's copy collapses here like any copy.
DROP TABLE IF EXISTS flowtrack.events_006;

DROP TABLE IF EXISTS flowtrack.rejected_007;

CREATE TABLE IF NOT EXISTS flowtrack.sessions
(
    user_id       String,
    session_id    String,
    started_at    DateTime64(3, 'UTC'),
    last_event_at DateTime64(3, 'UTC'),
    closed_at     DateTime64(3, 'UTC'),
    event_count   UInt64,
    error_count   UInt64,
    end_count     UInt64,
    computed_at   DateTime64(6, 'UTC'),
    is_deleted    UInt8
)
ENGINE = ReplacingMergeTree(computed_at, is_deleted)
ORDER BY (user_id, session_id)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 256;

-- One definition of a session's figures, used by the worker's recompute and by this migration's backfill.
-- Read it with a session_id filter: the filter reaches the primary key of events. Copies are collapsed by
-- grouping on the identity (the last stored copy wins, as in FINAL) instead of FINAL: over the scattered key
-- ranges of a batch's sessions, grouping is several times cheaper than FINAL's merge of every range.
CREATE VIEW IF NOT EXISTS flowtrack.session_totals AS
SELECT
    user_id,
    session_id,
    min(ts) AS started_at,
    max(ts) AS last_event_at,
    maxIf(ts, is_end = 1 OR is_error = 1) AS closed_at,
    count() AS event_count,
    countIf(is_error = 1) AS error_count,
    countIf(is_end = 1) AS end_count
FROM
(
    SELECT session_id, event_id, argMax(user_id, ingested_at) AS user_id, argMax(ts, ingested_at) AS ts,
           argMax(is_end, ingested_at) AS is_end, argMax(is_error, ingested_at) AS is_error
    FROM flowtrack.events
    GROUP BY session_id, event_id
)
GROUP BY user_id, session_id;

CREATE TABLE IF NOT EXISTS flowtrack.session_spans
(
    session_id String,
    user_id    String,
    start_ts   DateTime64(3, 'UTC'),
    end_ts     DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toMonday(start_ts)
ORDER BY (session_id, start_ts)
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1, index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS flowtrack.session_spans_mv TO flowtrack.session_spans AS
SELECT session_id, user_id, started_at AS start_ts, last_event_at AS end_ts
FROM flowtrack.sessions
WHERE is_deleted = 0;

CREATE TABLE IF NOT EXISTS flowtrack.events_by_time
(
    ts          DateTime64(3, 'UTC'),
    session_id  String,
    event_id    String,
    user_id     String,
    node_id     String,
    parent_id   String,
    event_type  LowCardinality(String),
    is_end      UInt8,
    is_error    UInt8,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_ingested ingested_at TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toMonday(ts)
ORDER BY (ts, session_id, event_id)
SETTINGS ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS flowtrack.events_by_time_mv TO flowtrack.events_by_time AS
SELECT ts, session_id, event_id, user_id, node_id, parent_id, event_type, is_end, is_error, ingested_at
FROM flowtrack.events;

INSERT INTO flowtrack.events_by_time
SELECT ts, session_id, event_id, user_id, node_id, parent_id, event_type, is_end, is_error, ingested_at
FROM flowtrack.events FINAL;

INSERT INTO flowtrack.sessions
SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count, end_count, now64(6), 0
FROM flowtrack.session_totals;

-- Public: one row per session, read from the rollup (FINAL over one row per session and its replaced versions).
-- Status: 'failed' if any error-type event, else 'completed' if any end-type event, else 'active'.
-- ended_at is NULL while the session is active.
DROP VIEW IF EXISTS flowtrack.flow_sessions;

CREATE VIEW IF NOT EXISTS flowtrack.flow_sessions AS
SELECT
    user_id,
    session_id,
    started_at,
    last_event_at,
    if(status = 'active', NULL, closed_at) AS ended_at,
    event_count,
    error_count,
    status,
    dateDiff('millisecond', started_at, if(status = 'active', last_event_at, closed_at)) AS duration_ms
FROM
(
    SELECT user_id, session_id, started_at, last_event_at, closed_at, event_count, error_count,
           multiIf(error_count > 0, 'failed', end_count > 0, 'completed', 'active') AS status
    FROM flowtrack.sessions FINAL
);
