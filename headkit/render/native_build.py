"""Compile a C source file on first use and load it with :mod:`ctypes`.

Used by the native splatting backend (:mod:`.gaussians_native`) for ``csrc/composite.c``. The
shared library is built once per (source, flags, compiler) with the system C compiler and kept
in a cache folder, ``$HEADKIT_CACHE/native`` or ``~/.cache/headkit/native``, under a name that
holds a hash of the source text, the flags, the compiler's path and version line and the CPU
architecture, so an edited source or another compiler gets a fresh build, and no stale one is
ever loaded. The build goes to a temporary name in that folder and is renamed into place
(``os.replace``, atomic), so concurrent processes never load a half-written file.

Flags: ``-O3 -fPIC -shared -fopenmp -std=c99 -fno-trapping-math``. ``-std=c99`` (ISO C)
keeps ``a * b + c`` from being contracted into fused multiply-adds; ``-fno-trapping-math``
only lets the compiler evaluate both sides of a select, which vectorisation needs (it changes
no result; the kernel never reads floating-point exception flags). No ``-march=native``: the
cache may be shared by machines with other CPUs. No ``-ffast-math``: it would change the
rounding and the comparisons the image formation is defined by. The compiler is ``$CC``, else ``cc``, else
``gcc``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c99", "-fno-trapping-math")


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed; the message says which and why (one line)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$HEADKIT_CACHE/native``, else ``~/.cache/headkit/native``."""
    root = os.environ.get("HEADKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "headkit")
    return Path(root) / "native"


def find_compiler() -> Optional[str]:
    """Path of the C compiler to use (``$CC``, ``cc`` or ``gcc``), or None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C compiler {compiler} does not run ({type(exc).__name__}: {exc})")
    return (done.stdout.splitlines() or [""])[0]


def build_library(source: Path, flags: Sequence[str] = FLAGS) -> Path:
    """Path of the shared library built from ``source`` (compiled now unless cached).

    Raises:
        NativeBuildError: no compiler, or the build failed (the compiler's last error line).
    """
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler found ($CC, cc, gcc)")
    text = Path(source).read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), compiler.encode(),
                                     _compiler_version(compiler).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"{Path(source).stem}-{key}.so"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=folder)
        os.close(handle)
    except OSError as exc:
        raise NativeBuildError(f"cannot write to the cache folder {folder} ({exc})")
    try:
        done = subprocess.run([compiler, *flags, "-o", temp, str(source), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
            last = (errors or done.stderr.splitlines() or ["(no output)"])[-1].strip()
            raise NativeBuildError(f"{compiler} failed to build {Path(source).name}: {last}")
        os.replace(temp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{compiler} could not build {Path(source).name} "
                               f"({type(exc).__name__}: {exc})")
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def load_library(source: Path, flags: Sequence[str] = FLAGS) -> ctypes.CDLL:
    """Build (if needed) and load ``source`` as a :class:`ctypes.CDLL` (calls release the GIL).

    Raises:
        NativeBuildError: as :func:`build_library`, or the built library does not load.
    """
    path = build_library(source, flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"built {path} but it does not load ({exc})")
