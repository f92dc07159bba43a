"""The mypyc build of the hot path: what is compiled, and the guard against stale in-place builds.

Run the suite against pure Python with a pure build: ``RPCFAST_NO_MYPYC=1`` both when installing
and when running pytest.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

import pytest

import rpcfast
from rpcfast import _compiled

ROOT = Path(__file__).resolve().parents[2]


def load_setup_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rpcfast_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_py_and_makefile_compile_the_modules_listed_in_compiled() -> None:
    sources, group = load_setup_py()._compiled_constants()
    compiled = (*_compiled.HOT_PATH, *_compiled.ENGINE_PATH)
    assert tuple(sources) == compiled and group == _compiled.GROUP
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")  # join continued lines
    match = re.search(r"^HOT_PATH := (.*)$", makefile, re.MULTILINE)
    assert match is not None and tuple(match.group(1).split()) == compiled
    c_sources = (*_compiled.C_SOURCES, *_compiled.ENGINE_C_SOURCES)
    assert tuple(load_setup_py()._c_sources()) == c_sources
    match = re.search(r"^C_SOURCES := (.*)$", makefile, re.MULTILINE)
    assert match is not None and tuple(match.group(1).split()) == c_sources
    assert re.search(r"^\$\(VENV\)/.installed: .*\$\(HOT_PATH\) \$\(C_SOURCES\)", makefile, re.M)


def test_hot_path_modules_are_sync_so_trio_never_runs_compiled_coroutines() -> None:
    for relative in (*_compiled.HOT_PATH, *_compiled.ENGINE_PATH):
        text = (ROOT / relative).read_text()
        assert "async def" not in text and "await " not in text, relative


def test_compiled_flag_says_where_every_hot_path_module_came_from() -> None:
    engine = [importlib.import_module(_compiled.module_name(r)) for r in _compiled.ENGINE_PATH]
    files = [str(sys.modules[_compiled.module_name(r)].__file__) for r in _compiled.HOT_PATH]
    files += [str(module.__file__) for module in engine]
    from_extensions = [f.endswith(tuple(EXTENSION_SUFFIXES)) for f in files]
    assert all(from_extensions) == rpcfast.COMPILED
    assert all(from_extensions) or not any(from_extensions), files  # never half compiled


def test_the_build_compiles_unless_told_not_to_or_unable() -> None:
    """What make venv must produce here: compiled, unless RPCFAST_NO_MYPYC=1 (set it for the
    test run too) or this machine has no mypyc or no C compiler."""
    setup_py = load_setup_py()
    able = importlib.util.find_spec("mypyc") is not None and setup_py._has_compiler()
    wanted = os.environ.get("RPCFAST_NO_MYPYC", "") in ("", "0")
    assert (able and wanted) == rpcfast.COMPILED


def fake_tree(root: Path, *, source_time: float, extension_time: float | None) -> Path:
    """A source tree with the hot-path sources and, optionally, a compiled _session."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("")
    for relative in _compiled.HOT_PATH:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        os.utime(path, (source_time, source_time))
    session = root / _compiled.HOT_PATH[0]
    extension = session.with_name(session.stem + str(sysconfig.get_config_var("EXT_SUFFIX")))
    if extension_time is not None:
        extension.write_bytes(b"")
        os.utime(extension, (extension_time, extension_time))
    return extension


def test_an_extension_older_than_its_source_is_refused_at_import(tmp_path: Path) -> None:
    extension = fake_tree(tmp_path, source_time=2000.0, extension_time=1000.0)
    assert _compiled.stale_extensions(tmp_path) == [(tmp_path / _compiled.HOT_PATH[0], extension)]
    with pytest.raises(ImportError, match=r"rpcfast/_session\.py changed .*`make venv`"):
        _compiled.check_fresh(tmp_path)


def test_a_fresh_extension_or_none_at_all_is_accepted(tmp_path: Path) -> None:
    fake_tree(tmp_path / "fresh", source_time=1000.0, extension_time=2000.0)
    _compiled.check_fresh(tmp_path / "fresh")
    fake_tree(tmp_path / "pure", source_time=1000.0, extension_time=None)
    _compiled.check_fresh(tmp_path / "pure")


def test_installed_copies_are_not_checked(tmp_path: Path) -> None:
    """Installers write files in any order; only a source tree (pyproject.toml) is checked."""
    fake_tree(tmp_path, source_time=2000.0, extension_time=1000.0)
    (tmp_path / "pyproject.toml").unlink()
    _compiled.check_fresh(tmp_path)


def test_this_checkout_has_no_stale_extensions() -> None:
    assert _compiled.stale_extensions(ROOT) == []


def test_no_compiler_means_a_pure_build_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_py = load_setup_py()
    monkeypatch.delenv("RPCFAST_NO_MYPYC", raising=False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])  # not in place: keeps files
    assert setup_py._has_compiler() is False
    assert setup_py.hot_path_extensions() == []
    assert "no C compiler found; installing pure Python" in capsys.readouterr().err


def test_disabling_mypyc_removes_extensions_left_by_an_in_place_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_py = load_setup_py()
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "rpcfast", tree / "rpcfast", ignore=shutil.ignore_patterns("*.so"))
    suffix = str(sysconfig.get_config_var("EXT_SUFFIX"))
    left = [tree / "rpcfast" / f"_session{suffix}", tree / "rpcfast" / f"_hotpath__mypyc{suffix}"]
    for path in left:
        path.write_bytes(b"")
    monkeypatch.setattr(setup_py, "ROOT", tree)
    monkeypatch.setenv("RPCFAST_NO_MYPYC", "1")
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    assert setup_py.hot_path_extensions() == []
    assert all(path.exists() for path in left)  # a wheel build leaves the tree alone
    monkeypatch.setattr(sys, "argv", ["setup.py", "build_ext", "--inplace"])
    assert setup_py.hot_path_extensions() == []
    assert not any(path.exists() for path in left)
