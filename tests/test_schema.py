"""The JSON schema of the event contract and the normalizer agree: what the schema accepts normalizes to an
event, what it refuses becomes a rejection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from worker.normalize import FlowEvent, Normalizer, Rejection

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "flow_event.schema.json").read_text())
BASE = {"session_id": "s1", "node_id": "n1", "event_type": "llm_call", "user_id": 7}

VALID: list[dict[str, Any]] = [
    BASE,
    {**BASE, "user_id": "alice", "parent_id": None},
    {**BASE, "parent_id": "root", "timestamp": "2026-11-24T10:00:00Z"},
    {**BASE, "timestamp": 1764000000, "event_id": 42},
    {**BASE, "event_id": None},
    {**BASE, "timestamp": 1764000000123, "event_id": "e-1", "model": "gpt-4o", "usage": {"tokens": 12}},
    {**BASE, "session_id": "séance-🧵", "node_id": "узел"},
]
INVALID: list[dict[str, Any]] = [
    {k: v for k, v in BASE.items() if k != "session_id"},
    {**BASE, "node_id": ""},
    {**BASE, "event_type": "x" * 129},
    {**BASE, "session_id": 5},
    {**BASE, "user_id": 1.5},
    {**BASE, "parent_id": 3},
    {**BASE, "timestamp": True},
    {**BASE, "event_id": "e" * 257},
]


@pytest.mark.parametrize("event", VALID, ids=range(len(VALID)))
def test_what_the_schema_accepts_normalizes(event: dict[str, Any]) -> None:
    jsonschema.validate(event, SCHEMA)
    result = Normalizer().normalize("flow_events", "1764000000000-0", {b"data": orjson.dumps(event)})
    assert isinstance(result, FlowEvent), result


@pytest.mark.parametrize("event", INVALID, ids=range(len(INVALID)))
def test_what_the_schema_refuses_is_rejected(event: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, SCHEMA)
    result = Normalizer().normalize("flow_events", "1764000000000-0", {b"data": orjson.dumps(event)})
    assert isinstance(result, Rejection), result
