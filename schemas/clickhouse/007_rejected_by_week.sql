-- only-if: SELECT count() FROM system.tables WHERE database = 'flowtrack' AND name = 'rejected' AND partition_key = ''
-- Rejected entries partitioned by week of receipt, so retention drops whole parts. Identity unchanged:
-- (source_stream, source_id); received_at is not in the key, so FINAL merges across partitions.
CREATE TABLE IF NOT EXISTS flowtrack.rejected_007
(
    received_at   DateTime64(3, 'UTC'),
    source_stream String,
    source_id     String,
    reason        String,
    raw           String
)
ENGINE = ReplacingMergeTree
PARTITION BY toMonday(received_at)
ORDER BY (source_stream, source_id)
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

TRUNCATE TABLE flowtrack.rejected_007;

INSERT INTO flowtrack.rejected_007 SELECT received_at, source_stream, source_id, reason, raw FROM flowtrack.rejected FINAL;

EXCHANGE TABLES flowtrack.rejected AND flowtrack.rejected_007;
