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

import pytest

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


VENV_BIN = Path(sys.executable).parent


def user_env(tmp_path: Path) -> dict[str, str]:
    """A shell where the venv is not activated: `flowtrack` is not on PATH (a fresh clone's first hour)."""
    env = demo_env()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != VENV_BIN.resolve())
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    return env


def printed_commands(text: str, command: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(command + " ")]


def test_demo_shows_progress_in_a_terminal_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Launched as the README says (.venv/bin/flowtrack, venv not activated) in a terminal; Ctrl-C goes to the
    whole foreground process group, as a terminal sends it: the private Redis must not die before the worker
    has finished, and the commands printed afterwards must work as printed."""
    env = user_env(tmp_path)
    leader, follower = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen([".venv/bin/flowtrack", "demo", "--rate", "200", "--clickhouse-url",
                             f"chdb://{tmp_path / 'store'}"], cwd=tmp_path, env=env, start_new_session=True,
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
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        read_until(leader, out, re.compile(r"live views read the streams"), 40)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    text = ANSI.sub("", "".join(out))
    assert first_frame_s < 15
    assert "summary: produced" in text and "what landed in ClickHouse" in text
    assert "Traceback" not in text and "Redis unavailable" not in text and "redelivered" not in text, text[-3000:]
    summary = re.search(r"stored ([0-9,]+), rejected", text)
    assert summary and int(summary.group(1).replace(",", "")) > 0
    # every suggested command works exactly as printed, from the same directory, venv not activated
    suggested = printed_commands(text, ".venv/bin/flowtrack")
    assert {c.split()[1] for c in suggested} >= {"history", "show", "rejected", "sql"}, suggested
    for command in suggested:
        if command.split()[1] == "rejected":
            continue  # reads Redis too (queued replays); the private one is gone, by design
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)


def test_demo_with_keep_redis_leaves_the_live_views_working(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    proc = subprocess.run([".venv/bin/flowtrack", "demo", "--duration-s", "3", "--keep-redis", "--clickhouse-url",
                           f"chdb://{tmp_path / 'store'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    pid = re.search(r"stop it with kill (\d+)", proc.stdout)
    try:
        assert proc.returncode == 0, proc.stderr
        assert pid, proc.stdout
        live = {c.split()[1]: c for c in printed_commands(proc.stdout, ".venv/bin/flowtrack")}
        tail = subprocess.run(live["tail"] + " -n 3 -f json", shell=True, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3, (live["tail"], tail.stderr)
        status = subprocess.run(live["status"], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode in (0, 1) and "flow_events" in status.stdout, (status.stdout, status.stderr)
    finally:
        if pid:
            os.kill(int(pid.group(1)), signal.SIGTERM)


def test_demo_to_a_dead_redis_fails_clearly_in_a_terminal_and_piped(tmp_path: Path) -> None:
    for url in ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/3"):
        leader, follower = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "demo", "--duration-s", "3", "--redis-url",
                                 url, "--clickhouse-url", f"chdb://{tmp_path / 'store'}"], cwd=tmp_path,
                                env=demo_env(), stdin=follower, stdout=follower, stderr=follower, close_fds=True)
        os.close(follower)
        out: list[str] = []
        try:
            read_until(leader, out, re.compile(r"never matches(?!)"), 20)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            os.close(leader)
        text = " ".join(ANSI.sub("", "".join(out)).split())
        assert code == 1, text
        assert "error: Redis unavailable" in text and "produced 0" not in text and "Traceback" not in text, text
    piped = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--duration-s", "3", "--redis-url",
                            "redis://127.0.0.1:1/0", "--clickhouse-url", f"chdb://{tmp_path / 'store'}"],
                           cwd=tmp_path, env=demo_env(), capture_output=True, text=True, timeout=60)
    assert piped.returncode == 1 and "Redis unavailable" in piped.stderr and "summary" not in piped.stdout


def test_the_printed_command_is_the_one_that_was_launched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.demo import flowtrack_command

    script = tmp_path / "venv" / "bin" / "flowtrack"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert flowtrack_command(str(script)) == str(script)  # not on PATH: the full path, as launched
    monkeypatch.chdir(tmp_path)
    assert flowtrack_command("venv/bin/flowtrack") == "venv/bin/flowtrack"  # relative, valid from here
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert flowtrack_command(str(script)) == "flowtrack"  # what PATH finds is this very script
    assert flowtrack_command("/usr/lib/x/worker/cli.py") == f"{sys.executable} -m worker.cli"


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
    session = re.search(r"-m worker.cli show (s-[0-9a-f]+)", proc.stdout)
    assert session
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "show", session.group(1), "--clickhouse-url", store],
                           cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"session {session.group(1)}" in shown.stdout


def test_demo_whose_redis_dies_midway_ends_with_an_error(tmp_path: Path) -> None:
    from worker.redisserver import RedisServer

    with RedisServer() as server:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "demo", "--duration-s", "30", "--redis-url",
                                 server.url, "--clickhouse-url", f"chdb://{tmp_path / 'store'}"], cwd=tmp_path,
                                env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert "produced" in proc.stdout.readline() + proc.stdout.readline()  # running: progress lines
            server.kill()
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 1, (stdout, stderr)
    message = " ".join(stderr.split())
    assert f"error: the demo stopped: writing to Redis at {server.url} failed" in message, message
    assert "Traceback" not in stderr and "summary:" not in stdout
