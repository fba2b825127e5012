-- Nodes: one row per node of a flow, shaped for Grafana's trace view and node graph.
-- name is the event_type of the node's first event; status is 'error' when any of the
-- node's events is an error type, else 'ok'.
CREATE VIEW IF NOT EXISTS flowtrack.flow_nodes AS
SELECT
    session_id,
    node_id,
    first_parent AS parent_id,
    first_type AS name,
    start_ts,
    end_ts,
    dateDiff('millisecond', start_ts, end_ts) AS duration_ms,
    if(error_events > 0, 'error', 'ok') AS status,
    any_user AS user_id
FROM
(
    SELECT
        session_id,
        node_id,
        anyIf(parent_id, parent_id != '') AS first_parent,
        toString(argMin(event_type, ts)) AS first_type,
        min(ts) AS start_ts,
        max(ts) AS end_ts,
        countIf(is_error = 1) AS error_events,
        any(user_id) AS any_user
    FROM flowtrack.events FINAL
    GROUP BY session_id, node_id
);
