"""Terminal views (rich): tables, tail lines, the flow tree, status and rejected listings.

Everything shown here comes from producers (stream entries) or from the store, so none of it may drive the
terminal: control characters (ESC sequences that set titles or clear the screen, bells, bidi overrides) are
rendered visibly as escapes (``visible``), and data reaches rich only as ``Text``, never as markup, so a
value like ``[bold]`` is shown as typed. JSON and CSV outputs are not rendered here and stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker.flows import Flow, Placed, RejectedRow, ReplayOutcome, StatusReport, StreamStatus
from worker.normalize import FlowEvent, Rejection
from worker.query import _cell
from worker.settings import redact_url

TYPE_STYLES = {"user_message": "bold cyan", "llm_call": "magenta", "llm_response": "magenta",
               "tool_call": "yellow", "tool_result": "yellow", "flow_completed": "green", "error": "bold red"}
STATUS_STYLES = {"active": "cyan", "completed": "green", "failed": "bold red", "ok": "green", "error": "bold red"}
# Attributes worth a glance, in this order; others follow alphabetically.
KEY_ATTRIBUTES = ("message", "code", "tool", "model", "tokens", "text", "channel", "ok")


# C0 and C1 control characters, DEL, and the bidirectional controls that reorder what a terminal shows.
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_VISIBLE.update({c: f"\\u{c:04x}" for c in _BIDI})
_VISIBLE.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})
# Bytes that were not UTF-8, carried as lone surrogates (surrogateescape): shown as the byte, like printable().
_VISIBLE.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})


def visible(value: object) -> str:
    """``value`` as text that cannot drive a terminal: control characters become escapes like ``\\x1b``."""
    return str(value).translate(_VISIBLE)


def data(value: object, style: str = "") -> Text:
    """Stored or streamed data for rich: escaped, and never read as markup."""
    return Text(visible(value), style=style)


def print_table(console: Console, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> None:
    table = Table(title=data(title) if title else None, show_lines=False)
    for column in columns:
        table.add_column(data(column), overflow="fold")
    for row in rows:
        table.add_row(*(data(_cell(v)) for v in row))
    console.print(table)
    console.print(f"[dim]{len(rows)} row(s)[/]")


def fold(value: str, width: int) -> str:
    """A long value cut to ``width`` characters with the number of hidden ones, on one line."""
    flat = visible(" ".join(value.split()))
    if width <= 0 or len(flat) <= width:
        return flat
    return f"{flat[:width]}…(+{len(flat) - width})"


def key_attributes(attributes: dict[str, str], width: int = 40, limit: int = 4) -> str:
    keys = [k for k in KEY_ATTRIBUTES if k in attributes]
    keys += sorted(k for k in attributes if k not in KEY_ATTRIBUTES)
    shown = [f"{visible(k)}={fold(attributes[k], width)}" for k in keys[:limit]]
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
    """A time in UTC; "-" for none (1970-01-01 is a time the contract accepts, not a missing one)."""
    if value is None:
        return "-"
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if with_date else value.strftime("%H:%M:%S.%f")[:-3]


def short(value: str, width: int) -> str:
    value = visible(value)
    return value if len(value) <= width else value[: width - 1] + "…"


# -- tail ---------------------------------------------------------------------------------------
def tail_line(item: FlowEvent | Rejection) -> Text:
    if isinstance(item, Rejection):
        line = Text(f"{'rejected':<12}  ", style="bold red")
        line.append(f"{visible(item.source_stream)} {visible(item.source_id)}  ", style="dim")
        line.append(visible(item.reason), style="red")
        return line
    ts = datetime.fromtimestamp(item.ts_ms / 1000, UTC)
    line = Text(format_time(ts, with_date=False) + "  ", style="dim")
    line.append(f"u={short(item.user_id, 12):<6} ", style="blue")
    line.append(f"{short(item.session_id, 20):<20} ")
    line.append(visible(item.node_id), style="bold")
    if item.parent_id:
        line.append(" ← " + visible(item.parent_id), style="dim")
    line.append("  ")
    line.append(visible(item.event_type), style=TYPE_STYLES.get(item.event_type, ""))
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
    table = Table(title=data(title), title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("user", "left"), ("session", "left"), ("started (UTC)", "left"), ("ended", "left"),
                          ("duration", "right"), ("events", "right"), ("errors", "right"), ("status", "left")):
        # Ids fold when too long (up to 256 chars), so they never squeeze the other columns out of the table.
        if name in ("user", "session"):
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        else:
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for user, session, started, ended, duration, events, errors, status in rows:
        table.add_row(data(user), data(session), format_time(started), format_time(ended, with_date=False),
                      format_duration(duration), str(events),
                      Text(str(errors), style="bold red" if errors else ""),
                      data(status, style=STATUS_STYLES.get(str(status), "")))
    return table


# -- one flow as a tree -------------------------------------------------------------------------
def flow_header(flow: Flow) -> Text:
    text = Text()
    text.append(f"session {visible(flow.session_id)}", style="bold")
    text.append(f"  user {visible(flow.user_id)}  ")
    text.append(visible(flow.status), style=STATUS_STYLES.get(flow.status, ""))
    text.append(f"  started {format_time(flow.started_at)} UTC  duration {format_duration(flow.duration_ms)}"
                f"  {flow.event_count} events  {len(flow.nodes)} nodes")
    if flow.error_count:
        text.append(f"  {flow.error_count} error(s)", style="bold red")
    return text


def tree_lines(placed: Sequence[Placed], width: int, attr_width: int = 40, max_guides: int | None = None
               ) -> list[Text]:
    """The flow as guide-drawn lines, one per node; deep branches keep their last levels and show the depth.

    Built line by line from ``place_nodes`` (no recursion, no rich.Tree, whose nested renderables are
    quadratic in depth). The guides come from a running stack of "was the ancestor at this level a last
    child" flags, and at most ``max_guides`` levels are drawn: time, memory and line length stay linear in
    the number of nodes however deep the flow is.
    """
    if max_guides is None:
        max_guides = max(4, (width - 50) // 4)
    lines: list[Text] = []
    ancestors_last: list[bool] = []  # [k] = the last placed node at depth k+1 was its parent's last child
    for p in placed:
        node = p.node
        line = Text()
        if p.depth > 0:
            del ancestors_last[p.depth - 1:]
            levels = len(ancestors_last)  # guide columns: ancestors between the root and this node
            shown = ancestors_last[max(0, levels - max(0, max_guides - 2)):] if levels > max_guides \
                else ancestors_last
            guides = "".join("    " if last else "│   " for last in shown)
            if levels > max_guides:
                guides = (f"┆ {p.depth:>4} ┆ " if max_guides > 2 else f"┆{p.depth}┆ ") + guides
            line.append(guides, style="dim")
            line.append("└── " if p.last else "├── ", style="dim")
            ancestors_last.append(p.last)
        else:
            ancestors_last.clear()
        failed = node.status == "error"
        line.append(visible(node.name), style="bold red" if failed else TYPE_STYLES.get(node.name, "bold"))
        line.append(f" {visible(node.node_id)}", style="red" if failed else "")
        line.append(f"  +{format_duration(p.offset_ms)}", style="dim")
        line.append(f" {format_duration(node.duration_ms)}", style="cyan")
        if len(node.event_types) > 1:
            line.append(f" [{len(node.event_types)} events]", style="dim")
        if failed:
            line.append(" ✗ error", style="bold red")
        if node.note:
            line.append(f" ({node.note}: parent {visible(repr(node.parent_id))})", style="yellow")
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
# The terminal table shows this many streams at most, those needing attention first; --json lists every one (a table
# of 20,000 streams took 12 s of CPU to draw and scrolled the verdict away).
STATUS_TABLE_STREAMS = 50


def _needing_attention(report: StatusReport) -> list[StreamStatus]:
    """The streams in the order they were found, or, when there are too many to show, the most behind first."""
    if len(report.streams) <= STATUS_TABLE_STREAMS:
        return list(report.streams)

    def behind(s: StreamStatus) -> tuple[int, int, int]:
        g = s.group
        return (0, s.length, 0) if g is None else (g.stale_pending, g.lag or 0, g.pending)

    return sorted(report.streams, key=behind, reverse=True)[:STATUS_TABLE_STREAMS]


def status_view(report: StatusReport) -> Group:
    parts: list[RenderableType] = []
    where = redact_url(report.redis_url)
    streams = Table(title=data(f"streams and group {report.group!r} on {where}"), title_justify="left")
    for name, justify in (("stream", "left"), ("length", "right"), ("lag", "right"), ("pending", "right"),
                          ("stale", "right"), ("consumers (pending, idle)", "left")):
        streams.add_column(name, justify=justify)  # type: ignore[arg-type]
    shown = _needing_attention(report)
    for s in shown:
        g = s.group
        if g is None:
            streams.add_row(data(s.name), str(s.length), Text("no group", style="yellow"), "-", "-", "-")
            continue
        lag = "?" if g.lag is None else f"{g.lag}{'+' if g.lag_capped else ''}"
        consumers = ", ".join(f"{c.name} ({c.pending}, {format_duration(c.idle_ms)})" for c in g.consumers) or "-"
        lag_style = "bold red" if (g.lag or 0) > report.max_lag else ""
        streams.add_row(data(s.name), str(s.length), Text(lag, style=lag_style),
                        str(g.pending), Text(str(g.stale_pending), style="bold red" if g.stale_pending else ""),
                        data(consumers))
    if not report.redis_error:  # else the error is said once, in the verdict below
        parts.append(streams)
        if len(shown) < len(report.streams):
            parts.append(Text(f"{len(report.streams) - len(shown):,} more stream(s) not shown (the {len(shown)} "
                              "most behind are; all are in the totals; --json lists every one)", style="dim"))
        cluster = (f" on a Redis Cluster of {report.cluster_primaries} primar"
                   f"{'y' if report.cluster_primaries == 1 else 'ies'}" if report.cluster_primaries else "")
        parts.append(Text(f"{len(report.streams)} stream(s){cluster}, total lag {report.total_lag}, "
                          f"pending {report.total_pending}", style="dim"))
    if report.store and not report.store_error:  # an error is said once: in the verdict, or on stderr (locked)
        store = Table(title=data(f"store: {report.store}"), title_justify="left", show_header=False)
        store.add_column("what")
        store.add_column("value", justify="right")
        store.add_row("events", f"{report.events:,}" if report.events is not None else "-")
        for status, count in report.sessions.items():
            store.add_row(data(f"sessions {status}"), Text(f"{count:,}", style=STATUS_STYLES.get(status, "")))
        store.add_row("last ingested (UTC)", format_time(report.last_ingested_at))
        store.add_row("rejected", f"{report.rejected_total or 0:,}")
        for reason, count in report.rejected_by_reason.items():
            store.add_row(data(f"  {reason}", style="red"), f"{count:,}")
        parts.append(store)
    for warning in report.warnings:
        parts.append(data(f"warning: {warning}", style="yellow"))
    for problem in report.problems:
        parts.append(data(f"UNHEALTHY: {problem}", style="bold red"))
    if report.healthy:
        parts.append(Text("healthy", style="bold green"))
    return Group(*parts)


# -- rejected -----------------------------------------------------------------------------------
def rejected_table(rows: Sequence[RejectedRow], raw_width: int = 60) -> Table:
    table = Table(title="rejected entries (newest first)", title_justify="left")
    table.add_column("received (UTC)", no_wrap=True)
    table.add_column("stream / entry id", overflow="fold")  # a long key folds instead of squeezing the rest out
    table.add_column("reason", style="red")
    table.add_column("raw (folded)", overflow="fold")
    table.add_column("replayed")
    for row in rows:
        table.add_row(format_time(row.received_at), data(f"{row.source_stream} {row.source_id}"),
                      data(row.reason, style="red"), Text(fold(row.raw, raw_width)),
                      data(row.replayed, style="green" if row.replayed else ""))
    return table


def replay_table(outcomes: Sequence[ReplayOutcome]) -> Table:
    table = Table(title="replay", title_justify="left")
    for name in ("stream / entry id", "result", "new entry id", "event_id", "detail"):
        table.add_column(name, overflow="fold")
    for o in outcomes:
        style = {"replayed": "green", "already replayed": "yellow"}.get(o.action, "red")
        table.add_row(data(f"{o.source_stream} {o.source_id}"), Text(o.action, style=style), data(o.new_id),
                      data(o.event_id), data(o.detail))
    return table
