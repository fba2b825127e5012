-- only-if: SELECT count() FROM system.tables WHERE database = 'flowtrack' AND name = 'rejected' AND position(sorting_key, 'cityHash64') = 0
-- A rejected entry's identity is its entry id *and* what it held: two different entries rejected under one entry id
-- (a chosen id reused after Redis lost data) were one row, the later rejection replacing the earlier, though the
-- contract says a reused entry id never drops anything silently (valid events have it: their derived event_id holds
-- a digest of the content). The same entry rejected again (redelivered, replayed by --force) is the same raw:
-- still one row.
CREATE TABLE IF NOT EXISTS flowtrack.rejected_012
(
    received_at   DateTime64(3, 'UTC'),
    source_stream String,
    source_id     String,
    reason        String,
    raw           String
)
ENGINE = ReplacingMergeTree
PARTITION BY toMonday(received_at)
ORDER BY (source_stream, source_id, cityHash64(raw))
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

TRUNCATE TABLE flowtrack.rejected_012;

INSERT INTO flowtrack.rejected_012 SELECT received_at, source_stream, source_id, reason, raw FROM flowtrack.rejected FINAL;

EXCHANGE TABLES flowtrack.rejected AND flowtrack.rejected_012;

DROP TABLE IF EXISTS flowtrack.rejected_012;
