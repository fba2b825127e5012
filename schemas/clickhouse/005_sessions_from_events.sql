-- Sessions are computed from the deduplicated events instead of a materialized view.
-- The uniqExact states of 002 made every merge of sessions_agg hold all event ids of the merged
-- parts in memory (~120 MB per million events, growing with the data); counting rows of
-- `events FINAL` (one row per event_id) is exact by construction and costs nothing at ingest.
-- Status: 'failed' if any error-type event, else 'completed' if any end-type event, else 'active'.
-- ended_at is NULL while the session is active.
DROP VIEW IF EXISTS flowtrack.sessions_mv;

DROP VIEW IF EXISTS flowtrack.flow_sessions;

DROP TABLE IF EXISTS flowtrack.sessions_agg;

CREATE VIEW IF NOT EXISTS flowtrack.flow_sessions AS
SELECT
    user_id,
    session_id,
    started_at,
    last_event_at,
    if(status = 'active', NULL, closed) AS ended_at,
    event_count,
    error_count,
    status,
    dateDiff('millisecond', started_at, if(status = 'active', last_event_at, closed)) AS duration_ms
FROM
(
    SELECT
        user_id,
        session_id,
        min(ts) AS started_at,
        max(ts) AS last_event_at,
        maxIf(ts, is_end = 1 OR is_error = 1) AS closed,
        count() AS event_count,
        countIf(is_error = 1) AS error_count,
        countIf(is_end = 1) AS end_count,
        multiIf(error_count > 0, 'failed', end_count > 0, 'completed', 'active') AS status
    FROM flowtrack.events FINAL
    GROUP BY user_id, session_id
);
