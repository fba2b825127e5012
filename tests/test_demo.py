"""`flowtrack demo` as a user runs it: in a terminal (a pty) until Ctrl-C, and piped with --duration-s."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWTRACK_")}
    env.update(COLUMNS="120", LINES="60", TERM="xterm-256color")
    return env


def read_until(fd: int, buffer: list[str], pattern: re.Pattern[str], timeout_s: float) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buffer.append(chunk.decode("utf-8", "replace"))
        match = pattern.search(ANSI.sub("", "".join(buffer)))
        if match:
            return match
    return None


def test_demo_shows_progress_in_a_terminal_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "demo", "--rate", "200", "--clickhouse-url",
                             f"chdb://{tmp_path / 'store'}"], cwd=tmp_path, env=demo_env(),
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    out: list[str] = []
    try:
        # the dashboard appears at once, then stored events and the newest flow's tree
        assert read_until(leader, out, re.compile(r"flowtrack demo — Ctrl-C to stop"), 30), "".join(out)[-2000:]
        first_frame_s = time.monotonic() - started
        stored = read_until(leader, out, re.compile(r"stored ([1-9][0-9,]*)"), 40)
        assert stored, ANSI.sub("", "".join(out))[-3000:]
        assert read_until(leader, out, re.compile(r"most recent finished flow"), 40), \
            ANSI.sub("", "".join(out))[-3000:]
        screen = ANSI.sub("", "".join(out))
        assert "latest stored events" in screen and "events/s" in screen and "lag" in screen
        assert re.search(r"[├└]── \w+", screen)  # a tree was drawn
        proc.send_signal(signal.SIGINT)
        read_until(leader, out, re.compile(r"live views need the Redis"), 40)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    text = ANSI.sub("", "".join(out))
    assert first_frame_s < 15
    assert "summary: produced" in text and "what landed in ClickHouse" in text
    assert "flowtrack history" in text and "flowtrack show s-" in text and "Traceback" not in text
    summary = re.search(r"stored ([0-9,]+), rejected", text)
    assert summary and int(summary.group(1).replace(",", "")) > 0


def test_demo_piped_prints_plain_progress_every_second_and_a_summary(tmp_path: Path) -> None:
    store = f"chdb://{tmp_path / 'store'}"
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--duration-s", "4", "--rate", "300",
                           "--clickhouse-url", store], cwd=tmp_path, env=demo_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    progress = re.findall(r"^\s*(\d+\.\d)s\s+produced ([\d,]+)\s+stored ([\d,]+)", proc.stdout, re.M)
    assert len(progress) >= 3 and float(progress[0][0]) <= 1.5  # a line from the first second on
    assert int(progress[-1][2].replace(",", "")) > 0
    assert "summary: produced" in proc.stdout and f"--clickhouse-url {store}" in proc.stdout
    # the store it leaves behind answers the commands it suggests
    session = re.search(r"flowtrack show (s-[0-9a-f]+)", proc.stdout)
    assert session
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "show", session.group(1), "--clickhouse-url", store],
                           cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"session {session.group(1)}" in shown.stdout
