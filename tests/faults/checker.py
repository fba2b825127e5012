"""Read back what a store holds, in its own process (chDB allows one process per store path).

    python tests/faults/checker.py <clickhouse-url> [--events-relation flowtrack.flow_events]

Prints one JSON object: every visible event id (with repeats, so duplicates show), the physical copies,
the per-session counts, and every rejected entry. The harness turns it into lost/duplicate figures; this
script only reads, and never deduplicates anything itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from worker.settings import Settings
from worker.store import Store


def read_back(url: str, events_relation: str) -> dict[str, Any]:
    store = Store.open(Settings(clickhouse_url=url))
    _, exists = store.query("SELECT count() FROM system.tables WHERE database = 'flowtrack' AND name = 'events'")
    if not exists or not exists[0][0]:
        return {"event_ids": [], "physical_rows": 0, "physical_distinct": 0, "session_event_sum": 0,
                "rejected": [], "schema": False}
    _, rows = store.query(f"SELECT event_id FROM {events_relation}")
    event_ids = [r[0] for r in rows]
    _, phys = store.query("SELECT count(), uniqExact(event_id) FROM flowtrack.events")
    _, sessions = store.query("SELECT sum(event_count), count() FROM flowtrack.flow_sessions")
    _, rejected = store.query("SELECT source_stream, source_id, reason FROM flowtrack.rejected_events")
    return {
        "event_ids": event_ids,
        "physical_rows": int(phys[0][0]),
        "physical_distinct": int(phys[0][1]),
        "session_event_sum": int(sessions[0][0] or 0),
        "sessions": int(sessions[0][1] or 0),
        "rejected": [[r[0], r[1], r[2]] for r in rejected],
        "schema": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--events-relation", default="flowtrack.flow_events")
    args = parser.parse_args()
    sys.stdout.buffer.write(orjson.dumps(read_back(args.url, args.events_relation)))


if __name__ == "__main__":
    main()
