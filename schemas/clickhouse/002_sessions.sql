-- Sessions: an AggregatingMergeTree fed by a materialized view. Every aggregate is
-- duplicate-safe (uniqExact over event_id, min, max), so counts stay exact when a batch
-- reaches the view twice. Status: 'failed' if any error-type event, else 'completed' if
-- any end-type event, else 'active'. ended_at is NULL while the session is active.
CREATE TABLE IF NOT EXISTS flowtrack.sessions_agg
(
    user_id       String,
    session_id    String,
    started_at    SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_event_at SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    closed_at     SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    events        AggregateFunction(uniqExact, String),
    errors        AggregateFunction(uniqExact, String),
    ends          AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
ORDER BY (user_id, session_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS flowtrack.sessions_mv TO flowtrack.sessions_agg AS
SELECT
    user_id,
    session_id,
    min(ts) AS started_at,
    max(ts) AS last_event_at,
    maxIf(ts, is_end = 1 OR is_error = 1) AS closed_at,
    uniqExactState(event_id) AS events,
    uniqExactIfState(event_id, is_error = 1) AS errors,
    uniqExactIfState(event_id, is_end = 1) AS ends
FROM flowtrack.events
GROUP BY user_id, session_id;

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
        min(started_at) AS started_at,
        max(last_event_at) AS last_event_at,
        max(closed_at) AS closed,
        uniqExactMerge(events) AS event_count,
        uniqExactMerge(errors) AS error_count,
        uniqExactMerge(ends) AS end_count,
        multiIf(error_count > 0, 'failed', end_count > 0, 'completed', 'active') AS status
    FROM flowtrack.sessions_agg
    GROUP BY user_id, session_id
);
