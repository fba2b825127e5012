-- only-if: SELECT count() FROM system.merge_tree_settings WHERE name = 'merge_selector_base'
-- Wider merges of `events`: the merge selector waits for ~20 parts of a size instead of ~5 before merging them, so
-- each event is rewritten fewer times on its way to a large part. Merges were ~1.7 of the ~7.5 core-seconds a
-- worker spends storing 400k events on the embedded engine, most of them on `events` (its 13 columns and map); this
-- saves ~0.5-0.65 core-s of those (~7 % of the drain's CPU; README, "Benchmark"). The price is more parts per
-- partition at any time (after 40 inserts of 10k rows: 7 instead of 5), each a primary-index lookup for a flow's
-- reads; measured with `flowtrack bench queries` at 10M and 100M (README). Skipped on a server without the setting.
ALTER TABLE flowtrack.events MODIFY SETTING merge_selector_base = 20;
