"""The normalizer's C hot path (worker/_fastpath.c) is built by the package's build hook wherever a C compiler and
Python's headers are present, as on CI and every developer machine of this project, so the equivalence tests in
test_normalize_fast.py and test_normalize_shapes.py run against it; without them the Python path serves alone."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from worker.normalize import Normalizer


def test_the_c_hot_path_is_built_where_a_compiler_is() -> None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if shutil.which(compiler) is None or not headers.exists():
        pytest.skip(f"no C compiler ({compiler}) or no {headers}: the Python path serves alone")
    assert Normalizer.native is not None, (
        "a C compiler and Python's headers are here, yet worker/_fastpath was not built: reinstall "
        "(`pip install -e .`) and read the build hook's message")
