"""The native CPU kernels (``csrc/*.cpp``): built on first use, loaded once per process, with the plain-torch path as
the fallback.

Each source file is one extension, compiled by ``torch.utils.cpp_extension.load`` (a C++ compiler and ``ninja``, a
dependency of the package, from PyPI or the system) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) the first time a CPU op needs it, and only loaded afterwards (the cache is keyed by the
sources and flags, so an edit rebuilds it). Loading runs the file's ``TORCH_LIBRARY_IMPL(rlvr_kernels, CPU, ...)``
block: its kernels become the CPU implementations of ops defined in Python (``torch.library.custom_op``), whose
Python bodies stay the fallback for every other device and for machines without a compiler.

``RLVR_KERNELS_NATIVE=0`` turns the native kernels off (before the first CPU call); a build that fails is said once
(a ``RuntimeWarning`` with the reason) and the op keeps its plain-torch path. :func:`rlvr_kernels.info` shows the
state of each extension.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading
import warnings

_LOCK = threading.Lock()
# extension stem -> "loaded" | "disabled" | "failed: <reason>"; absent until first asked for
_STATE: dict[str, str] = {}


def source_dir() -> pathlib.Path | None:
    """Where the C++ sources are: ``rlvr_kernels/_csrc`` in a wheel, ``csrc/`` beside the package in a checkout."""
    here = pathlib.Path(__file__).resolve().parent
    for d in (here / "_csrc", here.parent / "csrc"):
        if d.is_dir() and any(d.glob("*.cpp")):
            return d
    return None


def enabled() -> bool:
    """False when ``RLVR_KERNELS_NATIVE`` is ``0`` / ``false`` / ``off`` / ``no``."""
    return os.environ.get("RLVR_KERNELS_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_flags() -> list[str]:
    """Vector-ISA flags for at::vec, from what this machine's CPU reports (the build runs where it is used)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma", "-mf16c"]  # fmt: skip
    if {"avx2", "fma", "f16c"} <= have:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return []


# A build lock older than this was left by a process killed while it built (torch waits on it forever).
STALE_LOCK_S = 900.0


def _clear_stale_lock(name: str) -> None:
    """Remove torch's build lock of extension ``name`` when it is older than :data:`STALE_LOCK_S`: a process killed
    mid-build (a timeout, Ctrl-C) leaves it behind, and every later first use would wait on it without end. A build
    takes seconds to a few minutes; a live one keeps its lock younger than that."""
    import time

    from torch.utils import cpp_extension

    lock = pathlib.Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(
            f"rlvr_kernels: removing a stale build lock of csrc ({lock}, {age:.0f} s old: a build was interrupted)",
            RuntimeWarning,
            stacklevel=4,
        )
        lock.unlink(missing_ok=True)


def _build(stem: str, src: pathlib.Path) -> None:
    from torch.utils import cpp_extension

    _clear_stale_lock(f"rlvr_kernels_{stem}")
    cflags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1", *(_cpu_flags() if sys.platform == "linux" else [])]
    cpp_extension.load(
        name=f"rlvr_kernels_{stem}",
        sources=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def load(stem: str) -> bool:
    """Build (first time) and load ``csrc/<stem>.cpp``; True when its kernels are registered. Never raises: a
    missing compiler or a failed build leaves the plain-torch path in place, said once."""
    state = _STATE.get(stem)
    if state is not None:
        return state == "loaded"
    with _LOCK:
        if stem in _STATE:
            return _STATE[stem] == "loaded"
        if not enabled():
            _STATE[stem] = "disabled"
            return False
        d = source_dir()
        src = None if d is None else d / f"{stem}.cpp"
        try:
            if src is None or not src.is_file():
                raise FileNotFoundError(f"{stem}.cpp is not shipped with this installation")
            _build(stem, src)
            _STATE[stem] = "loaded"
        except Exception as e:  # no compiler, no ninja, a compile error: keep the torch path
            reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            _STATE[stem] = f"failed: {reason}"
            warnings.warn(
                f"rlvr_kernels: the native CPU kernels csrc/{stem}.cpp could not be built ({reason}); the "
                "plain-torch path is used instead (slower on CPU). rlvr_kernels.info() shows the state; "
                "RLVR_KERNELS_NATIVE=0 turns the native kernels off without trying.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _STATE[stem] == "loaded"


def state() -> dict[str, str]:
    """Each native extension and its state: ``loaded``, ``disabled``, ``failed: ...``, or ``not built yet``."""
    d = source_dir()
    stems = sorted(p.stem for p in d.glob("*.cpp")) if d is not None else []
    return {s: _STATE.get(s, "disabled" if not enabled() else "not built yet") for s in stems}
