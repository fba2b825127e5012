-- Events: one physical row per stored copy; the public view shows each event_id once.
-- ReplacingMergeTree keyed by event_id + FINAL in the view makes duplicates (redelivery,
-- re-insertion, explicit duplicate event_ids) invisible; the insert dedup window drops
-- whole re-inserted batches before they are even written.
CREATE DATABASE IF NOT EXISTS flowtrack;

CREATE TABLE IF NOT EXISTS flowtrack.events
(
    event_id      String,
    user_id       String,
    session_id    String,
    node_id       String,
    parent_id     String,
    event_type    LowCardinality(String),
    ts            DateTime64(3, 'UTC'),
    attributes    Map(String, String),
    source_stream LowCardinality(String),
    source_id     String,
    is_end        UInt8,
    is_error      UInt8,
    ingested_at   DateTime64(3, 'UTC'),
    INDEX idx_session session_id TYPE bloom_filter GRANULARITY 2,
    INDEX idx_user user_id TYPE bloom_filter GRANULARITY 2,
    INDEX idx_ts ts TYPE minmax GRANULARITY 2
)
ENGINE = ReplacingMergeTree
ORDER BY event_id
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS flowtrack.flow_events AS
SELECT event_id, user_id, session_id, node_id, parent_id, toString(event_type) AS event_type, ts, ingested_at,
       attributes, toString(source_stream) AS source_stream, source_id
FROM flowtrack.events FINAL;
