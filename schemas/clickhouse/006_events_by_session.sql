-- only-if: SELECT count() FROM system.tables WHERE database = 'flowtrack' AND name = 'events' AND sorting_key = 'event_id'
-- Events re-laid out for the access paths: one flow is one primary-key range.
-- Identity (a contract refinement): an event is (session_id, event_id). The sort key is that identity and
-- nothing else, so copies of an event collapse whatever their other fields say, even an explicit event_id
-- re-sent without a timestamp (its copies carry different ts). ts is therefore not in the key; it only
-- partitions (weekly: retention drops whole parts) — so FINAL must merge across partitions (the default;
-- never enable do_not_merge_across_partitions_select_final on this table).
-- ReplacingMergeTree(ingested_at): the last stored copy is the visible one, deterministically.
-- index_granularity = 128: session ids are random, so the sessions of one batch hit granules all over the table;
-- small granules keep a read of a few thousand sessions (the rollup's recompute after every batch, a flow) at a
-- few hundred thousand rows whatever the table's size. Scans over all events are served by other relations.
-- This migration copies the old table (deduplicated) into the new layout and swaps the two atomically;
-- it runs only while the old layout (ORDER BY event_id) is in place, so a re-run after a crash is safe.
CREATE TABLE IF NOT EXISTS flowtrack.events_006
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
    ingested_at   DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toMonday(ts)
ORDER BY (session_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1, index_granularity = 128;

TRUNCATE TABLE flowtrack.events_006;

INSERT INTO flowtrack.events_006
SELECT event_id, user_id, session_id, node_id, parent_id, event_type, ts, attributes, source_stream, source_id,
       is_end, is_error, ingested_at
FROM flowtrack.events FINAL;

EXCHANGE TABLES flowtrack.events AND flowtrack.events_006;
