"""Rerun the fault suite and print its table: ``python -m tests.faults [extra pytest args]``.

Each scenario appends its figures to a JSON-lines file (FLOWTRACK_FAULTS_REPORT); this command runs
``pytest -m faults tests/faults`` with that file set, then prints one row per scenario. Exit status: 0 only when
every scenario shows 0 lost and 0 duplicates with nothing pending (the negative controls must instead show the
duplicates / losses they were built to show) and pytest itself passed. "Redis lost" is what Redis itself lost in
an asynchronous failover (Redis Cluster scenarios; see tests/faults/clusterharness.py): reported, not a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
REPORT_ENV = "FLOWTRACK_FAULTS_REPORT"


def run_suite(extra: list[str], report: Path) -> tuple[int, float]:
    env = dict(os.environ, **{REPORT_ENV: str(report)})
    args = [sys.executable, "-m", "pytest", "-m", "faults", "tests/faults", "-q", "-rxXfE", "-p", "no:cacheprovider",
            *extra]
    started = time.monotonic()
    rc = subprocess.call(args, cwd=ROOT, env=env)
    return rc, time.monotonic() - started


def load_rows(report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]


def render(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="flowtrack fault suite", show_lines=False)
    for name, justify in (("scenario", "left"), ("produced", "right"), ("stored", "right"), ("lost", "right"),
                          ("Redis lost", "right"),
                          ("duplicates", "right"), ("rejected", "right"), ("pending", "right"),
                          ("recovery s", "right"), ("took s", "right"), ("result", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        if row["expect"] != "clean":
            verdict = f"[green]control OK ({row['expect']} caught)[/]" if row["ok"] else "[red]CONTROL FAILED[/]"
        elif row["ok"]:
            verdict = "[green]OK[/]"
        else:
            verdict = "[red]FAIL[/]" + (" [yellow](known bug)[/]" if row.get("xfail") else "")
        table.add_row(row["scenario"], str(row["produced"]), str(row["stored"]), _hl(row["lost"], row),
                      str(row.get("redis_lost", 0)),
                      _hl(row["duplicates"], row), f"{row['rejected']}/{row['expected_rejected']}",
                      _hl(row["pending"], row), f"{row['recovery_s']:.2f}", f"{row['duration_s']:.1f}", verdict)
    console.print(table)
    for row in rows:
        if row["problems"] and row["expect"] == "clean":
            console.print(f"[red]✗[/] {row['scenario']}: " + "; ".join(row["problems"]))
            if row.get("xfail"):
                console.print(f"    [yellow]{row['xfail']}[/]")
        if row.get("notes"):
            console.print(f"  [dim]{row['scenario']}: {row['notes']}[/]")


def _hl(value: int, row: dict[str, Any]) -> str:
    return f"[red]{value}[/]" if value and row["expect"] == "clean" else str(value)


def main(argv: list[str]) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=200)
    with tempfile.TemporaryDirectory(prefix="flowtrack-faults-") as tmp:
        report = Path(tmp) / "results.jsonl"
        rc, took = run_suite(argv, report)
        rows = load_rows(report)
    render(rows, console)
    bad = [r["scenario"] for r in rows if not r["ok"]]
    console.print(f"{len(rows)} scenario rows in {took:.0f}s; pytest exit {rc}; "
                  + (f"[red]{len(bad)} not clean[/]" if bad else "[green]all clean[/]"))
    if not rows:
        return 2
    return 1 if bad or rc not in (0,) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
