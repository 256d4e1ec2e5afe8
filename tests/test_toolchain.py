"""The build's compiler check (fastnorm/_toolchain.py) and the bad-argument check of a built
extension (.ci/check_errors_raise.py): an extension that links libstdc++ statically crashed on its
first error message on the GPU image (its CXX=/opt/gcc/bin/g++ does so); here a g++ wrapper that
adds -static-libstdc++ stands in for such a compiler."""

from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest

import fastnorm
from fastnorm import _ops, _toolchain

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci"))
import check_errors_raise  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture
def static_gxx(tmp_path):
    """A folder holding g++ and c++ that link libstdc++ statically."""
    real = shutil.which("g++")
    for name in ("g++", "c++"):
        wrapper = tmp_path / name
        wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" -static-libstdc++\n')
        wrapper.chmod(0o755)
    return tmp_path


def test_the_probe_tells_static_from_dynamic_libstdcxx(static_gxx):
    assert _toolchain.links_libstdcxx_dynamically(shutil.which("g++")) is True
    assert _toolchain.links_libstdcxx_dynamically(str(static_gxx / "g++")) is False
    assert _toolchain.links_libstdcxx_dynamically(str(static_gxx / "no-such-compiler")) is None


def test_a_static_cxx_is_replaced_by_one_on_path(static_gxx, capsys):
    change = _toolchain.choose_compiler({"CXX": str(static_gxx / "g++")})
    assert _toolchain.links_libstdcxx_dynamically(change["CXX"]) is True
    assert os.path.basename(change["CC"]) in ("gcc", "cc")
    assert "statically" in capsys.readouterr().out
    assert _toolchain.choose_compiler({"CXX": shutil.which("g++")}) == {}


def test_without_a_dynamic_compiler_the_build_refuses_naming_libstdcxx(static_gxx, monkeypatch):
    monkeypatch.setattr(_toolchain, "FALLBACK_COMPILERS", (str(static_gxx / "g++"), str(static_gxx / "c++")))
    with pytest.raises(SystemExit, match=r"links libstdc\+\+ statically.*Set CXX"):
        _toolchain.choose_compiler({"CXX": str(static_gxx / "g++")})


def test_a_statically_linked_library_fails_the_check_of_the_built_extension(static_gxx, tmp_path):
    source, library = tmp_path / "probe.cpp", tmp_path / "probe.so"
    source.write_text(_toolchain.PROBE_SOURCE)
    os.system(f"{static_gxx / 'g++'} -shared -fPIC {source} -o {library}")
    with pytest.raises(SystemExit, match="without libstdc"):
        _toolchain.check_extension(str(library))


def test_the_built_extension_loads_libstdcxx_and_raises_whole_messages():
    built = glob.glob(os.path.join(os.path.dirname(fastnorm.__file__), "_C*.so"))
    if _ops.EXTENSION_ERROR is not None:
        pytest.skip(_ops.EXTENSION_ERROR)
    assert _toolchain.LIBSTDCXX in _toolchain.needed_libraries(built[0])
    assert check_errors_raise.problem("cpu") is None


def test_the_check_reports_a_call_that_ends_the_process(monkeypatch):
    monkeypatch.setattr(check_errors_raise, "CALL", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert "ended the process (exit status -11)" in check_errors_raise.problem("cpu")
