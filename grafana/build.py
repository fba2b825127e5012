"""Dashboards as code: the table of contents, and the writer of ``grafana/dashboards/*.json``.

    python -m grafana.build            # regenerate the committed JSON
    python -m grafana.build --check    # exit 1 if the committed JSON is stale

Each dashboard lives in its own module with one function per panel; the JSON is written sorted and
indented so diffs stay readable. Grafana loads it through grafana/provisioning/dashboards/.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from grafana import flow, history, live, pipeline

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

# file name -> dashboard: the whole product, in reading order
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "flows-live.json": live.dashboard,  # refresh 1s, user_id; rate by type, latest events, lag, latest flow
    "flows-history.json": history.dashboard,  # sessions, outcomes, durations, common paths, failures
    "flow.json": flow.dashboard,  # session_id; trace waterfall, node graph, events in order
    "pipeline.json": pipeline.dashboard,  # worker metrics (Prometheus) + rejected entries (ClickHouse)
}


def to_model(builder: Dashboard) -> dict[str, Any]:
    """The dashboard as provisioning JSON: plain data, panel ids assigned in order."""
    model: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for index, panel in enumerate(model.get("panels", []), start=1):
        panel.setdefault("id", index)
    model.setdefault("schemaVersion", 39)
    model.setdefault("editable", True)
    return model


def render(builder: Dashboard) -> str:
    return json.dumps(to_model(builder), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    return {name: render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rendered = render_all()
    if "--check" in args:
        stale = [name for name, text in rendered.items()
                 if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text]
        for name in stale:
            print(f"stale: grafana/dashboards/{name} (run `python -m grafana.build`)", file=sys.stderr)
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote grafana/dashboards/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
