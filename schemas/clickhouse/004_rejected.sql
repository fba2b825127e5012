-- Rejected entries, keyed by their stream entry so a redelivered rejection shows once.
CREATE TABLE IF NOT EXISTS flowtrack.rejected
(
    received_at   DateTime64(3, 'UTC'),
    source_stream String,
    source_id     String,
    reason        String,
    raw           String
)
ENGINE = ReplacingMergeTree
ORDER BY (source_stream, source_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS flowtrack.rejected_events AS
SELECT received_at, source_stream, source_id, reason, raw
FROM flowtrack.rejected FINAL;
