"""Build hook: compiles the normalizer's optional C hot path (worker/_fastpath.c) when a C compiler is present.

Without one (a slim image, a machine with no compiler) the build goes on and flowtrack runs its Python path alone,
which gives the same events and rejections (worker/normalize.py). An editable install builds the module in place,
next to its source; a wheel carries it and is tagged for this interpreter and platform."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "worker._fastpath"
SOURCE = "worker/_fastpath.c"


class FastPathBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        out_dir = root if version == "editable" else Path(tempfile.mkdtemp(prefix="flowtrack-ext-"))
        try:
            built = compile_extension(root, out_dir)
        except Exception as exc:  # no compiler, no headers: the Python path serves
            print(f"flowtrack: the C hot path was not built ({type(exc).__name__}: {exc}); "
                  "the Python path will run", file=sys.stderr)
            return
        if version != "editable":
            build_data["force_include"][str(built)] = f"worker/{built.name}"
            build_data["pure_python"] = False
            build_data["infer_tag"] = True


def compile_extension(root: Path, out_dir: Path) -> Path:
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    extension = Extension(MODULE, [str(root / SOURCE)], extra_compile_args=["-O2"])
    command = build_ext(Distribution({"name": "flowtrack-fastpath", "ext_modules": [extension]}))
    command.build_lib = tempfile.mkdtemp(prefix="flowtrack-ext-")
    command.build_temp = tempfile.mkdtemp(prefix="flowtrack-ext-tmp-")
    command.ensure_finalized()
    command.run()
    relative = command.get_ext_filename(MODULE)
    target = out_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    # A rename, not a copy over the old file: a process that has the old module loaded keeps its mapping intact.
    os.replace(Path(command.build_lib) / relative, target)
    return target
