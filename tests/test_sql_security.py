"""`flowtrack sql` is read-only and stays inside the store (issue 10, items 8, 9, 14).

Each hostile statement runs through the CLI as a user runs it, against the real engine, while a TCP listener
on a free loopback port records whether anything connected, a secret file waits to be read, and the working
directory is watched for files written. None of it may happen, whatever the quoting, comments or nesting.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT, cli_env
from worker.cli import app
from worker.store import Store

SECRET = "flowtrack-secret-7f3a9c"


class Listener:
    """A loopback TCP server that only counts connections (url(), remote(), s3(), mysql() would connect)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's working directory (where a relative INTO OUTFILE lands), with a secret file in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho hi\n")  # what APPEND once appended to
    return tmp_path


def sql(statement: str, clickhouse_url: str, *extra: str) -> Any:
    return CliRunner().invoke(app, ["sql", statement, *extra], env=cli_env("redis://127.0.0.1:1/0", clickhouse_url),
                              catch_exceptions=False)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def hostile_statements(secret: Path, port: int) -> list[str]:
    url = f"http://127.0.0.1:{port}"
    return [
        # INTO OUTFILE past comments, dollar-quoting, nested quotes, unicode, APPEND
        "SELECT $$'$$ AS a INTO OUTFILE 'x.txt' --'",
        "SELECT 1 AS a # '\nINTO OUTFILE 'x.txt' --'",
        "SELECT 1 AS a /* ' */ INTO OUTFILE 'run.sh' APPEND",
        "SELECT 'it''s \\' -- ' AS a -- '\nINTO OUTFILE 'x.txt'",
        "SELECT 'é' AS \"ü\" INTO OUTFILE 'ü.txt' TRUNCATE",
        "EXPLAIN SELECT 1 INTO OUTFILE 'x.txt'",
        "SELECT 1 UNION ALL SELECT 2 INTO OUTFILE 'x.txt' FORMAT TSV",
        # table functions that read files, open connections or run programs, however nested
        f"DESC file('{secret}')",
        f"DESC file('{secret}', 'LineAsString')",
        f"DESCRIBE TABLE (SELECT * FROM FiLe('{secret}', 'LineAsString'))",
        f"SELECT file('{secret}')",
        f"WITH t AS (SELECT * FROM file('{secret}', 'LineAsString')) SELECT * FROM t",
        f"SELECT * FROM numbers(1) AS n JOIN (SELECT * FROM file('{secret}', 'LineAsString')) AS f ON 1",
        f"SELECT * FROM loop(file('{secret}', 'LineAsString')) LIMIT 1",
        f"DESC url('{url}/x.csv', 'CSV')",
        f"SELECT * FROM url('{url}/x', 'LineAsString')",
        f"DESC remote('127.0.0.1:{port}', system.one)",
        f"SELECT * FROM remoteSecure('127.0.0.1:{port}', system.one)",
        f"SELECT * FROM (SELECT * FROM s3('{url}/bucket/k.csv', 'CSV'))",
        f"SELECT * FROM mysql('127.0.0.1:{port}', 'db', 't', 'u', 'p')",
        f"SELECT * FROM postgresql('127.0.0.1:{port}', 'db', 't', 'u', 'p')",
        "SELECT * FROM executable('run.sh', 'TSV', 'a String')",
        "SELECT * FROM input('a String')",
        "SELECT * FROM python(SECRET)",
        f"EXPLAIN PIPELINE SELECT * FROM url('{url}/x', 'LineAsString')",
        # writes, multi-statements, lifting readonly
        "INSERT INTO FUNCTION file('x.txt') SELECT 1",
        "SELECT 1; SELECT 1 INTO OUTFILE 'x.txt'",
        f"SELECT 1; SELECT * FROM url('{url}/x', 'LineAsString')",
        "SELECT 1 SETTINGS readonly=0",
        "SELECT 1 SETTINGS readonly=0 INTO OUTFILE 'x.txt'",
        "INSERT INTO flowtrack.rejected_events (reason) VALUES ('x')",
        "CREATE TABLE flowtrack.evil (a String) ENGINE = File(TSV)",
    ]


def test_hostile_statements_write_no_file_read_no_file_and_open_no_connection(
        store: Store, clickhouse_url: str, workdir: Path, listener: Listener) -> None:
    before = snapshot(workdir)
    for statement in hostile_statements(workdir / "secret.txt", listener.port):
        result = sql(statement, clickhouse_url, "-f", "json")
        assert result.exit_code == 1, (statement, result.output)
        assert SECRET not in result.output, statement
        assert snapshot(workdir) == before, statement
        assert listener.connections == 0, statement
        assert "Traceback" not in result.output
    assert store.scalar("SELECT count() FROM flowtrack.rejected_events") == 0


def test_refusals_say_why(store: Store, clickhouse_url: str, workdir: Path) -> None:
    reasons = {
        "SELECT $$'$$ AS a INTO OUTFILE 'x.txt' --'": "INTO OUTFILE",
        f"DESC file('{workdir / 'secret.txt'}')": "file() reaches outside the store",
        "DROP TABLE flowtrack.flow_events": "read-only",
        "SELECT 1; SELECT 2": "Multi-statements are not allowed",
        "SELECT 1 SETTINGS readonly=0": "Cannot modify 'readonly' setting",
        "SELECT 1 FORMAT CSV": "--format",
    }
    for statement, reason in reasons.items():
        result = sql(statement, clickhouse_url)
        assert result.exit_code == 1 and reason in result.output, (statement, result.output)


def test_reading_statements_still_work(store: Store, clickhouse_url: str, workdir: Path) -> None:
    ok: dict[str, list[list[Any]]] = {
        "SELECT count() AS n FROM flowtrack.flow_events WHERE session_id = {s:String}": [[0]],
        "/* a comment */ SELECT 1 AS a -- another\n": [[1]],
        "SELECT 'INTO OUTFILE ''x.txt''' AS a": [["INTO OUTFILE 'x.txt'"]],
        "SELECT $$file('x')$$ AS a": [["file('x')"]],
        "SELECT sum(number) AS s FROM numbers(10)": [[45]],
        "SELECT format('{}-{}', 'a', 'b') AS f": [["a-b"]],
        "WITH x AS (SELECT 2 AS v) SELECT v FROM x": [[2]],
        "EXISTS TABLE flowtrack.flow_events": [[1]],
    }
    for statement, expected in ok.items():
        result = sql(statement, clickhouse_url, "-f", "json", "-p", "s=x")
        assert result.exit_code == 0, (statement, result.output)
        assert [list(r.values()) for r in json.loads(result.stdout)] == expected, statement
    for statement in ("SHOW TABLES FROM flowtrack LIKE 'flow%'", "DESC flowtrack.flow_events", "EXPLAIN SELECT 1"):
        result = sql(statement, clickhouse_url, "-f", "csv")
        assert result.exit_code == 0 and result.stdout.strip(), (statement, result.output)
    assert snapshot(workdir) == {"secret.txt": (SECRET + "\n").encode(), "run.sh": b"#!/bin/sh\necho hi\n"}


def test_errors_are_one_line_about_the_users_own_text(store: Store, clickhouse_url: str) -> None:
    missing = sql("SELECT nosuchcol", clickhouse_url)
    assert missing.exit_code == 1
    assert missing.output.count("\n") == 1 and "Unknown expression identifier `nosuchcol`" in missing.output
    for mislabel in ("read-only", "refused a write", "readonly", "FORMAT Native", "SETTINGS", "Traceback"):
        assert mislabel not in missing.output, missing.output

    for text in ("SELEC 1", "SELECT 1,\n  2 +", "SELECT (1 + 2 FROM numbers(3)"):
        error = sql(text, clickhouse_url)
        assert error.exit_code == 1 and error.output.count("\n") == 1, error.output
        assert "Syntax error" in error.output and "Traceback" not in error.output
        assert "FORMAT Native" not in error.output and "formatQuery" not in error.output
        position = int(error.output.split("position ", 1)[1].split()[0])
        assert 0 < position <= len(text) + 1, (text, error.output)  # inside (or at the end of) the user's text

    unknown_table = sql("SELECT * FROM flowtrack.nope", clickhouse_url)
    assert unknown_table.exit_code == 1 and "flowtrack.nope" in unknown_table.output
    assert unknown_table.output.count("\n") == 1
    bad_param = sql("SELECT 1", clickhouse_url, "-p", "novalue")
    assert bad_param.exit_code == 2


def test_error_text_from_the_user_is_not_markup_or_terminal_control(store: Store, clickhouse_url: str) -> None:
    result = sql("SELECT `[bold]x\x1b]0;t\x07`", clickhouse_url)
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "[bold]x\\x1b]0;t\\x07" in result.output


def test_sql_help_documents_exit_codes() -> None:
    result = CliRunner().invoke(app, ["sql", "--help"])
    assert "Exit 0" in result.output and "3 the" in result.output


# -- the embedded store in use, a dead server --------------------------------------------------------------
def test_two_sql_at_once_say_store_in_use_without_the_engines_raw_line(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'store'}"
    env = cli_env("redis://127.0.0.1:1/0", url)
    subprocess.run([sys.executable, "-m", "worker.cli", "migrate"], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    slow = "SELECT max(sleepEachRow(0.25)) AS s FROM numbers(10)"  # ~2.5 s holding the store
    procs = [subprocess.Popen([sys.executable, "-m", "worker.cli", "sql", slow], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes.count(0) >= 1 and set(codes) <= {0, 3}, results
    assert 3 in codes, results  # the run overlapped (each takes ~2.5 s), so someone met a held store
    for code, _, err in results:
        assert "Cannot lock file" not in err and "Code: 76" not in err, err
        if code == 3:
            assert "in use by another process" in err and err.count("\n") == 1, err


def test_a_dead_server_is_one_clear_line() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = cli_env("redis://127.0.0.1:1/0", f"http://u:secret@127.0.0.1:{port}/flowtrack")
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "sql", "SELECT 1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Unexpected Http Driver Exception" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot reach ClickHouse" in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr and "Connection refused" in proc.stderr



# -- the server path: a user the server itself restricts ----------------------------------------------------
def test_compose_defines_a_restricted_sql_user() -> None:
    import xml.etree.ElementTree as ET

    import yaml

    root = ET.parse(ROOT / "deploy" / "clickhouse" / "users.xml").getroot()
    user = root.find("users/flowtrack_sql")
    assert user is not None
    password = user.find("password")
    assert password is not None and password.get("from_env") == "CLICKHOUSE_SQL_PASSWORD"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "CLICKHOUSE_SQL_PASSWORD" in compose["services"]["clickhouse"]["environment"]
    assert "CLICKHOUSE_SQL_PASSWORD=" in (ROOT / ".env.example").read_text()
    grants = [" ".join((q.text or "").split()) for q in user.findall("grants/query")]
    assert grants == ["GRANT SELECT ON flowtrack.*", "GRANT SELECT ON system.table_functions"]
    # explicit grants replace the implicit ones allow_databases would give (which include the sources)
    assert user.find("allow_databases") is None and user.find("access_management") is None
    profile = root.find(f"profiles/{user.findtext('profile')}")
    assert profile is not None and profile.findtext("readonly") == "1"


def test_a_runaway_statement_is_stopped_by_time_and_memory_limits(store: Store, clickhouse_url: str) -> None:
    """readonly=1 refuses SETTINGS in the statement, so the limits are the connection's: without them a statement
    like this held both cores for hours (and a groupArray over everything, the machine's memory)."""
    if not store.embedded:
        pytest.skip("a server's flowtrack_sql profile sets its own limits")
    slow = sql("SELECT count() FROM numbers_mt(10000000000000)", clickhouse_url, "--timeout-s", "1")
    assert slow.exit_code == 1 and "Timeout exceeded" in slow.output, slow.output
    limits = sql("SELECT getSetting('max_execution_time') AS t, getSetting('max_memory_usage') AS m", clickhouse_url,
                 "-f", "json")
    assert limits.exit_code == 0, limits.output
    assert json.loads(limits.output) == [{"t": 300.0, "m": 4 << 30}]
    assert sql("SELECT 1", clickhouse_url, "--timeout-s", "0").exit_code == 2


def test_limit_0_answers_the_columns_and_every_write_gets_the_read_only_refusal(store: Store,
                                                                               clickhouse_url: str) -> None:
    """A statement ending in LIMIT 0 is a valid question (the columns); statements EXPLAIN AST cannot even dump
    (SYSTEM FLUSH LOGS) are refused as writes, not with a parser error about our FORMAT clause."""
    empty = sql("SELECT session_id, event_id FROM flowtrack.events LIMIT 0", clickhouse_url, "-f", "json")
    assert empty.exit_code == 0 and json.loads(empty.output) == [], empty.output
    for statement in ("SYSTEM FLUSH LOGS", "SET readonly = 0", "OPTIMIZE TABLE flowtrack.events FINAL"):
        refused = sql(statement, clickhouse_url)
        assert refused.exit_code == 1 and "read-only" in refused.output, (statement, refused.output)
