"""Run a function on ``world`` ranks of a real gloo process group (CPU), for the scale-out tests.

``run_ranks(fn, world, *args)`` forks ``world`` processes from the calling one (start method "fork": torch and the
package, already imported, are not imported again), joins them in a gloo group through a file store in a fresh
temporary directory, calls ``fn(rank, world, *args)`` on each and returns the ranks' return values (anything
picklable), in rank order. A rank's exception is raised here with its traceback; a rank that does not finish within
``timeout`` seconds (a hang: a collective one rank never reached) fails the test instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback


def _rank_main(rank: int, fn, world: int, store: str, out_dir: str, args: tuple, backend: str = "gloo") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        backend, init_method="file://" + store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        try:
            result = ("ok", fn(rank, world, *args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent with its traceback
            result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 180.0, backend: str = "gloo") -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each computed on its own rank of a gloo group
    (``backend="nccl"``: an NCCL group, the ranks spawned, ``fn`` a module-level function)."""
    import torch.multiprocessing as mp

    method = "spawn" if backend == "nccl" else "fork"
    with tempfile.TemporaryDirectory(prefix="rlvr_gloo_") as out_dir:
        store = os.path.join(out_dir, "store")
        ctx = mp.start_processes(
            _rank_main, args=(fn, world, store, out_dir, args, backend), nprocs=world, join=False, start_method=method
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {world} ranks did not finish within {timeout} s (a hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        out = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out.append(value)
        return out


def run_ranks_nccl(fn, world: int, *args, timeout: float = 300.0) -> list:
    """:func:`run_ranks` over an NCCL group, rank ``r`` on CUDA device ``r`` (the gpu-marked tests)."""
    return run_ranks(fn, world, *args, timeout=timeout, backend="nccl")
