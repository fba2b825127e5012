"""What a worker process loads: nothing flowtrack never uses (pandas costs ~0.15 s of start-up and ~35 MB of RSS).

Each check runs in a fresh interpreter (chDB allows one store per process; a module once imported stays)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_PRELUDE = """
import sys
from worker.normalize import FlowEvent, Rejection
from worker.settings import Settings
from worker.sink import Sink
from worker.store import Store

store = Store.open(Settings(clickhouse_url="chdb://" + sys.argv[1]))
store.migrate()
"""

# Every way a worker talks to the store: migrate (records versions with an insert), a batch (events, rejections,
# the rollup's recompute), and reading rows back.
_STEPS = {
    "migrate": "",
    "write a batch": """
event = FlowEvent("e1", "u1", "s1", "n1", "", "llm_call", 1_735_689_600_000, {"k": "v"}, "flow_events", "1-0", 0, 0)
sink = Sink(store)
sink.write([event], [Rejection("flow_events", "2-0", "no session", "{}")])
sink.rollup.close()
""",
    "read rows": """
store.query("SELECT * FROM flowtrack.flow_events")
store.query("SELECT * FROM flowtrack.flow_sessions")
""",
}


@pytest.mark.parametrize("step", list(_STEPS))
def test_talking_to_the_store_does_not_import_pandas(step: str, tmp_path: Path) -> None:
    script = _PRELUDE + textwrap.dedent(_STEPS[step]) + "\nprint('pandas' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False", f"pandas was imported by: {step}"
