"""What this installation of rlvr_kernels runs on: versions, the backends ``"auto"`` picks, and the state of the
native CPU kernels (``csrc/``). ``python -c "import rlvr_kernels; print(rlvr_kernels.info())"``."""

from __future__ import annotations

import os
from typing import Any

import torch

from rlvr_kernels import _native
from rlvr_kernels._backend import resolve_backend, triton_available


def info(build: bool = False) -> dict[str, Any]:
    """A dict describing the installation.

    Keys: ``version``; ``torch``; ``triton`` (version or None); ``cuda`` (whether a CUDA device is visible);
    ``backend`` (what ``backend="auto"`` resolves to on ``cpu`` and, when present, ``cuda`` tensors, after
    ``RLVR_KERNELS_BACKEND``); ``native``: each ``csrc/`` extension and its state (``loaded``, ``not built yet``,
    ``disabled`` by ``RLVR_KERNELS_NATIVE=0``, or ``failed: <reason>``, in which case the plain-torch path runs);
    ``native_sources`` (where the C++ sources are, or None). ``build=True`` builds and loads the native kernels now
    instead of at their first CPU use (a build that fails is reported, not raised).
    """
    from rlvr_kernels import __version__

    if build:
        for stem in _native.state():
            _native.load(stem)
    tri = None
    if triton_available():
        import triton

        tri = triton.__version__
    backend = {"cpu": resolve_backend("auto", torch.device("cpu"))}
    if torch.cuda.is_available():
        backend["cuda"] = resolve_backend("auto", torch.device("cuda"))
    src = _native.source_dir()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "triton": tri,
        "cuda": torch.cuda.is_available(),
        "backend": backend,
        "native": _native.state(),
        "native_sources": None if src is None else str(src),
        "env": {k: os.environ[k] for k in ("RLVR_KERNELS_BACKEND", "RLVR_KERNELS_NATIVE") if k in os.environ},
    }
