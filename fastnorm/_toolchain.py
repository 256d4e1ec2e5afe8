"""Build-time check of the C++ compiler (setup.py loads this file by path; it imports no torch).

An extension that links libstdc++ statically (some compilers installed outside the system's, such
as a module-loaded GCC or the GPU image's /opt/gcc, do so by default) carries a second copy of the
iostreams that is never initialized: its first error message, formatted by c10::str through an
ostringstream, crashes the process (SIGSEGV) instead of raising. So the build takes a compiler
whose shared libraries load the process's libstdc++.so.6, or refuses with a message that says what
to set.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile

LIBSTDCXX = "libstdc++.so.6"
# A shared library that uses the iostreams, as c10::str does.
PROBE_SOURCE = '#include <sstream>\nstd::string probe(long n) { std::ostringstream s; s << n; return s.str(); }\n'
FALLBACK_COMPILERS = ("g++", "c++", "/usr/bin/g++", "/usr/bin/c++")

_SHT_DYNAMIC, _DT_NEEDED = 6, 1


def needed_libraries(path: str) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared library (what `ldd` starts from)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == _DT_NEEDED:
                end = data.index(b"\0", strings + value)
                needed.append(data[strings + value:end].decode())
    return needed


def links_libstdcxx_dynamically(compiler: str) -> bool | None:
    """Whether a shared library that `compiler` builds needs libstdc++.so.6; None where the probe
    cannot be built (no such compiler, not GCC-like, not ELF)."""
    with tempfile.TemporaryDirectory(prefix="fastnorm_cxx_probe_") as folder:
        source, library = os.path.join(folder, "probe.cpp"), os.path.join(folder, "probe.so")
        with open(source, "w") as f:
            f.write(PROBE_SOURCE)
        try:
            built = subprocess.run([compiler, "-shared", "-fPIC", source, "-o", library], capture_output=True)
        except OSError:
            return None
        if built.returncode != 0:
            return None
        try:
            return LIBSTDCXX in needed_libraries(library)
        except ValueError:
            return None


def choose_compiler(environ=os.environ) -> dict[str, str]:
    """The environment changes the build needs: {} when CXX (default c++) is fine or cannot be
    probed, else CXX (and CC beside it) set to a compiler found on PATH that links libstdc++
    dynamically. Raises SystemExit, naming libstdc++ and what to set, when there is none."""
    compiler = environ.get("CXX", "c++")
    if links_libstdcxx_dynamically(compiler) is not False:
        return {}
    own = os.path.realpath(shutil.which(compiler) or compiler)
    for candidate in FALLBACK_COMPILERS:
        path = shutil.which(candidate)
        if path is None or os.path.realpath(path) == own or not links_libstdcxx_dynamically(path):
            continue
        change = {"CXX": path}
        c_compiler = os.path.join(os.path.dirname(path), {"g++": "gcc", "c++": "cc"}[os.path.basename(path)])
        if os.access(c_compiler, os.X_OK):  # nvcc's host compiler (-ccbin $CC) from the same toolchain
            change["CC"] = c_compiler
        print(f"fastnorm: CXX={compiler} links {LIBSTDCXX} statically into shared libraries, which makes an "
              f"extension crash on its first error message; building with {path} instead")
        return change
    raise SystemExit(
        f"fastnorm: the C++ compiler CXX={compiler} links libstdc++ statically into shared libraries (a test "
        f"library it built does not need {LIBSTDCXX}). An extension built so crashes (SIGSEGV) on its first "
        f"error message, in a second, uninitialized copy of the iostreams. Set CXX (and CC) to a g++ that "
        f"links {LIBSTDCXX} dynamically, such as the one torch was built with, or set FASTNORM_NO_EXTENSION=1 "
        f"to install without the extension (the pure-PyTorch reference backend).")


def check_extension(path: str) -> None:
    """Raises SystemExit unless the built extension at `path` loads the process's libstdc++."""
    if LIBSTDCXX not in needed_libraries(path):
        raise SystemExit(
            f"fastnorm: {path} was linked without {LIBSTDCXX} (libstdc++ linked statically, by CXX or by CC, "
            f"which links the extension): it would crash on its first error message. Set CXX and CC to a "
            f"g++/gcc pair that links {LIBSTDCXX} dynamically and build again.")
