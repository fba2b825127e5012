-- A node's name and parent come from its first event, ties in time broken by event_id (as a session's path breaks
-- them): argMin(event_type, ts) and anyIf(parent_id, …) left both to chance, so flow_nodes, `flowtrack show` and
-- the Flow dashboard could name a node after its second event (two events of one node in the same millisecond, as
-- entries without a timestamp often are) or hang it under a parent a later event names. Same columns, same rows.
CREATE OR REPLACE VIEW flowtrack.flow_nodes AS
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
        argMinIf(parent_id, (ts, event_id), parent_id != '') AS first_parent,
        toString(argMin(event_type, (ts, event_id))) AS first_type,
        min(ts) AS start_ts,
        max(ts) AS end_ts,
        countIf(is_error = 1) AS error_events,
        any(user_id) AS any_user
    FROM flowtrack.events FINAL
    GROUP BY session_id, node_id
);
