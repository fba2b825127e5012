"""Terminal views (rich): tables, tail lines, the flow tree, status and rejected listings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker.flows import Flow, Placed, RejectedRow, ReplayOutcome, StatusReport
from worker.normalize import FlowEvent, Rejection
from worker.query import _cell

TYPE_STYLES = {"user_message": "bold cyan", "llm_call": "magenta", "llm_response": "magenta",
               "tool_call": "yellow", "tool_result": "yellow", "flow_completed": "green", "error": "bold red"}
STATUS_STYLES = {"active": "cyan", "completed": "green", "failed": "bold red", "ok": "green", "error": "bold red"}
# Attributes worth a glance, in this order; others follow alphabetically.
KEY_ATTRIBUTES = ("message", "code", "tool", "model", "tokens", "text", "channel", "ok")


def print_table(console: Console, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> None:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console.print(table)
    console.print(f"[dim]{len(rows)} row(s)[/]")


def fold(value: str, width: int) -> str:
    """A long value cut to ``width`` characters with the number of hidden ones, on one line."""
    flat = " ".join(value.split())
    if width <= 0 or len(flat) <= width:
        return flat
    return f"{flat[:width]}…(+{len(flat) - width})"


def key_attributes(attributes: dict[str, str], width: int = 40, limit: int = 4) -> str:
    keys = [k for k in KEY_ATTRIBUTES if k in attributes]
    keys += sorted(k for k in attributes if k not in KEY_ATTRIBUTES)
    shown = [f"{k}={fold(attributes[k], width)}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"+{len(keys) - limit} more")
    return " ".join(shown)


def format_duration(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_time(value: datetime | None, with_date: bool = True) -> str:
    if value is None or value.timestamp() <= 0:
        return "-"
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if with_date else value.strftime("%H:%M:%S.%f")[:-3]


def short(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


# -- tail ---------------------------------------------------------------------------------------
def tail_line(item: FlowEvent | Rejection) -> Text:
    if isinstance(item, Rejection):
        line = Text(f"{'rejected':<12}  ", style="bold red")
        line.append(f"{item.source_stream} {item.source_id}  ", style="dim")
        line.append(item.reason, style="red")
        return line
    ts = datetime.fromtimestamp(item.ts_ms / 1000, UTC)
    line = Text(format_time(ts, with_date=False) + "  ", style="dim")
    line.append(f"u={short(item.user_id, 12):<6} ", style="blue")
    line.append(f"{short(item.session_id, 20):<20} ")
    line.append(item.node_id, style="bold")
    if item.parent_id:
        line.append(" ← " + item.parent_id, style="dim")
    line.append("  ")
    line.append(item.event_type, style=TYPE_STYLES.get(item.event_type, ""))
    attributes = key_attributes(item.attributes, width=32, limit=3)
    if attributes:
        line.append("  " + attributes, style="red" if item.is_error else "")
    return line


def tail_record(item: FlowEvent | Rejection) -> dict[str, Any]:
    if isinstance(item, Rejection):
        return {"rejected": True, "source_stream": item.source_stream, "source_id": item.source_id,
                "reason": item.reason, "raw": item.raw}
    return {"ts": datetime.fromtimestamp(item.ts_ms / 1000, UTC).isoformat(timespec="milliseconds"),
            "user_id": item.user_id, "session_id": item.session_id, "node_id": item.node_id,
            "parent_id": item.parent_id, "event_type": item.event_type, "attributes": item.attributes,
            "event_id": item.event_id, "source_stream": item.source_stream, "source_id": item.source_id}


# -- history ------------------------------------------------------------------------------------
def history_table(rows: Sequence[Sequence[Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("user", "left"), ("session", "left"), ("started (UTC)", "left"), ("ended", "left"),
                          ("duration", "right"), ("events", "right"), ("errors", "right"), ("status", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for user, session, started, ended, duration, events, errors, status in rows:
        table.add_row(str(user), str(session), format_time(started), format_time(ended, with_date=False),
                      format_duration(duration), str(events),
                      Text(str(errors), style="bold red" if errors else ""),
                      Text(str(status), style=STATUS_STYLES.get(str(status), "")))
    return table


# -- one flow as a tree -------------------------------------------------------------------------
def flow_header(flow: Flow) -> Text:
    text = Text()
    text.append(f"session {flow.session_id}", style="bold")
    text.append(f"  user {flow.user_id}  ")
    text.append(flow.status, style=STATUS_STYLES.get(flow.status, ""))
    text.append(f"  started {format_time(flow.started_at)} UTC  duration {format_duration(flow.duration_ms)}"
                f"  {flow.event_count} events  {len(flow.nodes)} nodes")
    if flow.error_count:
        text.append(f"  {flow.error_count} error(s)", style="bold red")
    return text


def tree_lines(placed: Sequence[Placed], width: int, attr_width: int = 40, max_guides: int | None = None
               ) -> list[Text]:
    """The flow as guide-drawn lines, one per node; deep branches keep their last levels and show the depth.

    Built line by line from ``place_nodes`` (no recursion, no rich.Tree): thousands of nodes and hundreds
    of levels render in linear time and never exceed the console width with guides.
    """
    if max_guides is None:
        max_guides = max(4, (width - 50) // 4)
    lines: list[Text] = []
    for p in placed:
        node = p.node
        line = Text()
        if p.depth > 0:
            guides = "".join("    " if last else "│   " for last in p.guides)
            levels = len(p.guides)
            if levels > max_guides:
                keep = max_guides - 2
                guides = f"┆ {p.depth:>4} ┆ " + guides[len(guides) - keep * 4:] if keep > 0 else f"┆{p.depth}┆ "
            line.append(guides, style="dim")
            line.append("└── " if p.last else "├── ", style="dim")
        failed = node.status == "error"
        line.append(node.name, style="bold red" if failed else TYPE_STYLES.get(node.name, "bold"))
        line.append(f" {node.node_id}", style="red" if failed else "")
        line.append(f"  +{format_duration(p.offset_ms)}", style="dim")
        line.append(f" {format_duration(node.duration_ms)}", style="cyan")
        if len(node.event_types) > 1:
            line.append(f" [{len(node.event_types)} events]", style="dim")
        if failed:
            line.append(" ✗ error", style="bold red")
        if node.note:
            line.append(f" ({node.note}: parent {node.parent_id!r})", style="yellow")
        attributes = key_attributes(node.attributes, width=attr_width)
        if attributes:
            line.append("  " + attributes, style="red" if failed else "dim")
        lines.append(line)
    return lines


def flow_view(flow: Flow, placed: Sequence[Placed], width: int, attr_width: int = 40) -> Group:
    lines: list[RenderableType] = [flow_header(flow)]
    lines.extend(tree_lines(placed, width, attr_width))
    return Group(*lines)


# -- status -------------------------------------------------------------------------------------
def status_view(report: StatusReport) -> Group:
    parts: list[RenderableType] = []
    streams = Table(title=f"streams and group {report.group!r} on {report.redis_url}", title_justify="left")
    for name, justify in (("stream", "left"), ("length", "right"), ("lag", "right"), ("pending", "right"),
                          ("stale", "right"), ("consumers (pending, idle)", "left")):
        streams.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in report.streams:
        g = s.group
        if g is None:
            streams.add_row(s.name, str(s.length), Text("no group", style="yellow"), "-", "-", "-")
            continue
        lag = "?" if g.lag is None else f"{g.lag}{'+' if g.lag_capped else ''}"
        consumers = ", ".join(f"{c.name} ({c.pending}, {format_duration(c.idle_ms)})" for c in g.consumers) or "-"
        streams.add_row(s.name, str(s.length), Text(lag, style="bold red" if (g.lag or 0) > report.max_lag else ""),
                        str(g.pending), Text(str(g.stale_pending), style="bold red" if g.stale_pending else ""),
                        consumers)
    if not report.redis_error:  # else the error is said once, in the verdict below
        parts.append(streams)
        parts.append(Text(f"{len(report.streams)} stream(s), total lag {report.total_lag}, "
                          f"pending {report.total_pending}", style="dim"))
    if report.store and not report.store_error:  # an error is said once: in the verdict, or on stderr (locked)
        store = Table(title=f"store: {report.store}", title_justify="left", show_header=False)
        store.add_column("what")
        store.add_column("value", justify="right")
        store.add_row("events", f"{report.events:,}" if report.events is not None else "-")
        for status, count in report.sessions.items():
            store.add_row(f"sessions {status}", Text(f"{count:,}", style=STATUS_STYLES.get(status, "")))
        store.add_row("last ingested (UTC)", format_time(report.last_ingested_at))
        store.add_row("rejected", f"{report.rejected_total or 0:,}")
        for reason, count in report.rejected_by_reason.items():
            store.add_row(Text(f"  {reason}", style="red"), f"{count:,}")
        parts.append(store)
    for warning in report.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    for problem in report.problems:
        parts.append(Text(f"UNHEALTHY: {problem}", style="bold red"))
    if report.healthy:
        parts.append(Text("healthy", style="bold green"))
    return Group(*parts)


# -- rejected -----------------------------------------------------------------------------------
def rejected_table(rows: Sequence[RejectedRow], raw_width: int = 60) -> Table:
    table = Table(title="rejected entries (newest first)", title_justify="left")
    table.add_column("received (UTC)", no_wrap=True)
    table.add_column("stream / entry id", no_wrap=True)
    table.add_column("reason", style="red")
    table.add_column("raw (folded)", overflow="fold")
    table.add_column("replayed")
    for row in rows:
        table.add_row(format_time(row.received_at), f"{row.source_stream} {row.source_id}", row.reason,
                      fold(row.raw, raw_width), Text(row.replayed, style="green" if row.replayed else ""))
    return table


def replay_table(outcomes: Sequence[ReplayOutcome]) -> Table:
    table = Table(title="replay", title_justify="left")
    for name in ("stream / entry id", "result", "new entry id", "event_id", "detail"):
        table.add_column(name, overflow="fold")
    for o in outcomes:
        style = {"replayed": "green", "already replayed": "yellow"}.get(o.action, "red")
        table.add_row(f"{o.source_stream} {o.source_id}", Text(o.action, style=style), o.new_id, o.event_id,
                      o.detail)
    return table
