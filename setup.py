"""Build hook: compile rpcfast's per-datagram hot path with mypyc (everything else is pyproject).

The modules named in ``rpcfast/_compiled.py`` become C extension modules, which cuts the
interpreter's share of a round trip, and its hand-written C sources (``C_SOURCES``) are built
beside them. They stay plain Python as well, and are installed as such:

* ``RPCFAST_NO_MYPYC=1`` at build time, or no mypyc or C compiler: a warning, pure Python.
* A failure while compiling the generated C (say, no Python headers): a warning, pure Python.
* A type error that mypyc rejects: the build fails. That is a bug in our sources.

Only build commands compile (``pip`` also runs this file to read metadata). A pure in-place build
removes compiled modules that an earlier in-place build left in the source tree: they would
shadow the sources.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup  # type: ignore[import-untyped]
from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
INPLACE_ARGS = {"editable_wheel", "develop", "--inplace", "-i"}


def _compiled_constants() -> tuple[list[str], str]:
    """``HOT_PATH`` + ``ENGINE_PATH`` and ``GROUP`` from rpcfast/_compiled.py, read without
    importing rpcfast."""
    found = _constants("HOT_PATH", "ENGINE_PATH", "GROUP")
    return [*found["HOT_PATH"], *found["ENGINE_PATH"]], str(found["GROUP"])


def _c_sources() -> list[str]:
    """``C_SOURCES`` + ``ENGINE_C_SOURCES`` from rpcfast/_compiled.py."""
    found = _constants("C_SOURCES", "ENGINE_C_SOURCES")
    return [*found["C_SOURCES"], *found["ENGINE_C_SOURCES"]]


def _constants(*names: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    tree = ast.parse((ROOT / "rpcfast" / "_compiled.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id in names
            and node.value is not None
        ):
            found[node.target.id] = ast.literal_eval(node.value)
    return found


def _warn(message: str) -> None:
    print(f"WARNING: rpcfast: {message}; installing pure Python", file=sys.stderr)


def _has_compiler() -> bool:
    cc = str(sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(os.environ.get("CC", cc).split()[0]) is not None


def _remove_inplace_extensions(sources: list[str], group: str) -> None:
    """Delete compiled modules that an in-place build left beside the sources."""
    if not INPLACE_ARGS.intersection(sys.argv[1:]):
        return
    package, _, lib = group.rpartition(".")
    candidates = [ROOT / package.replace(".", "/") / f"{lib}__mypyc"]
    candidates += [ROOT / source.removesuffix(".py") for source in sources]
    candidates += [ROOT / source.removesuffix(".c") for source in _c_sources()]
    for stem in candidates:
        for path in stem.parent.glob(f"{stem.name}.*.so"):
            print(f"rpcfast: removing {path.relative_to(ROOT)} (pure Python build)")
            path.unlink()


def hot_path_extensions() -> list[Extension]:
    sources, group = _compiled_constants()
    if os.environ.get("RPCFAST_NO_MYPYC", "") not in ("", "0"):
        print("rpcfast: RPCFAST_NO_MYPYC is set; installing pure Python", file=sys.stderr)
        _remove_inplace_extensions(sources, group)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        _remove_inplace_extensions(sources, group)
        return []
    if not _has_compiler():
        _warn("no C compiler found")
        _remove_inplace_extensions(sources, group)
        return []
    # mypyc type-checks what the hot path imports too, but only the hot path's errors count:
    # another module's unfinished edit must not break every install
    extensions: list[Extension] = mypycify(
        ["--follow-imports=silent", *sources], group_name=group, opt_level="3"
    )
    for source in _c_sources():
        name = source.removesuffix(".c").replace("/", ".")
        extensions.append(Extension(name, [source], extra_compile_args=["-O2"]))
    return extensions


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """Builds the compiled modules, or none of them: a failure leaves pure Python behind."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler or linker failure, missing headers
            _warn(f"compiling the hot path failed ({exc})")
            for ext in self.extensions:
                self._output(ext, ROOT).unlink(missing_ok=True)
                self._output(ext, Path(self.build_lib)).unlink(missing_ok=True)
            return
        if self.inplace:
            # mypyc leaves an unchanged module's in-place copy alone, with its old time; it was
            # just rebuilt from the current sources, so say so for rpcfast._compiled's check
            for ext in self.extensions:
                path = self._output(ext, ROOT)
                if path.exists():
                    os.utime(path)

    @staticmethod
    def _output(ext: Extension, base: Path) -> Path:
        return base / (
            str(ext.name).replace(".", "/") + str(sysconfig.get_config_var("EXT_SUFFIX"))
        )


def main() -> None:
    building = bool(BUILD_COMMANDS.intersection(sys.argv[1:]))
    setup(
        ext_modules=hot_path_extensions() if building else [],
        cmdclass={"build_ext": OptionalBuildExt},
    )


if __name__ == "__main__":  # as pip and setuptools run it; tests import it
    main()
