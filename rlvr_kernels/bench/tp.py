"""The vocabulary-parallel (tensor-parallel lm_head) points: time and memory per TP degree.

Ops (record field ``op``, implementation ``rlvr_kernels``, field ``tp`` the degree and ``case`` ``tp<degree>``):

- ``tp_logprobs_fwd_bwd``: ``fused_linear_logprobs(x, w_shard, t, tp_group=g, vocab_start=s)`` forward + backward
  of ``sum(logp) + sum(entropy)`` (dX all-reduced over the group: ``grad_hidden="full"``);
- ``tp_loss_fused``: the fused ``RLVRLoss`` (DAPO, beta = 0, old log-probs) with ``tp_group=g``, forward + backward.

Each rank holds the contiguous rows ``[s, s + V/TP)`` of the lm_head (Megatron's layout) and the full hidden states
and targets. The benchmark's child process for a TP point (:func:`worker`, started by
:func:`rlvr_kernels.bench.runner.run_points`) starts the TP ranks itself: forked, in a gloo group through a file
store in a fresh temporary folder, on CPU; spawned, one per GPU, in an NCCL group, on CUDA. A rank that raises,
dies or does not finish within the point's time limit (a hang in a collective) ends the point with an ``error`` (the
other ranks are killed), never a stalled benchmark.

Measured, per rank, after the warm-up steps: ``barrier``, then the step timed alone (``perf_counter``, after
``torch.cuda.synchronize`` on GPU); each step's time is the slowest rank's (a MAX all-reduce after the step, outside
the timed region), and the repeats, warm-up and adaptive repeat count follow the point's timing settings as every
other point does. Memory (``peak_mem_mib``, the largest over the ranks; ``peak_mem_mib_ranks`` per rank): GPU
``max_memory_allocated`` during the timed steps minus what was allocated before them (the inputs); CPU the growth of
the rank process's peak resident set (VmHWM, reset after warm-up) over its resident set before the timed steps, the
benchmark's CPU measure (``mem_measure`` says which). Bytes exchanged per rank per step are computed, not measured:
the all-gather of ``(3 + K) * N`` fp64 row statistics (K = 0 gathered ids here) plus the fp32 dX all-reduce of
``N * H * 4`` bytes (0 at TP = 1, where no bytes leave the process). CPU ranks use ``max(1, cores // TP)`` torch
threads each (``threads_per_rank``; ``oversubscribed`` when TP exceeds the cores).
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import pickle
import shutil
import tempfile
import time
import traceback

TP_OPS = ("tp_logprobs_fwd_bwd", "tp_loss_fused")
TP_DEGREES = (1, 2, 4)
IMPL = "rlvr_kernels"
K_GATHERED = 0  # gathered ids per row in the measured steps (the all-gather carries 3 + K values per row)


def is_tp(p: dict) -> bool:
    """Whether a point is one of the TP points (run by :func:`worker`, not by the timing module)."""
    return p.get("op") in TP_OPS


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def degrees(device: str, tp=None) -> list:
    """The TP degrees to run: ``tp`` (else 1, 2, 4); on CUDA only those the GPUs allow (one rank per GPU)."""
    out = [int(d) for d in (tp or TP_DEGREES)]
    if device == "cuda":
        import torch

        out = [d for d in out if d <= max(1, torch.cuda.device_count())]
    return out


def threads_per_rank(tp: int) -> int:
    return max(1, cores() // tp)


def shard_sizes(V: int, tp: int) -> list:
    """Contiguous rows per rank (the first ``V % tp`` ranks get one more)."""
    return [V // tp + (r < V % tp) for r in range(tp)]


def comm_bytes(N: int, H: int, tp: int, K: int = K_GATHERED) -> dict:
    """Bytes each rank hands to the collectives per step (computed): the all-gather of its ``(3 + K) * N`` fp64
    statistics and the fp32 dX all-reduce (``N * H * 4``); 0 at TP = 1."""
    if tp <= 1:
        return dict(allgather_bytes=0, allreduce_bytes=0, comm_bytes=0)
    ag, ar = (3 + K) * N * 8, N * H * 4
    return dict(allgather_bytes=ag, allreduce_bytes=ar, comm_bytes=ag + ar)


def points(cfg: dict, device: str, tp=None) -> list:
    """The TP points of a run: each TP op at the reference shape, per dtype and TP degree."""
    T = cfg["T"]
    n0, h0, v0 = cfg["ref"]
    out = []
    for dtype in cfg["dtypes"]:
        for op in TP_OPS:
            for d in degrees(device, tp):
                out.append(dict(op=op, impl=IMPL, case=f"tp{d}", N=n0, H=h0, V=v0, T=T, dtype=dtype, tp=d))
    return out


# ----------------------------------------------------------------------------------------------------------------
# one rank


def _die_with_parent() -> None:
    """Linux: this rank is killed when the process that started it dies (a killed point leaves no rank behind)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _inject(p: dict, rank: int, where: str) -> None:
    """Test hook: ``p["inject"] = "<what>@<rank>[:<where>]"`` makes that rank raise, exit or hang (``raise``,
    ``exit``, ``hang``) at ``where`` (``start``, the default, or ``step``: after the warm-up)."""
    spec = p.get("inject")
    if not spec:
        return
    what, _, at = spec.partition("@")
    r, _, w = at.partition(":")
    if int(r or 0) != rank or (w or "start") != where:
        return
    if what == "raise":
        raise RuntimeError(f"injected failure on rank {rank}")
    if what == "exit":
        os._exit(7)
    if what == "hang":
        time.sleep(10**6)


def _build(p: dict, device: str, rank: int, group):
    """``(step, grad_bytes, rows)`` of this rank: fresh inputs (hidden states and ids the same on every rank, the
    weight this rank's shard) and the step (forward + backward, gradients dropped at its end)."""
    import torch

    from rlvr_kernels.bench.cases import DTYPES

    dtype = getattr(torch, DTYPES[p["dtype"]])
    n, h, v, T, tp = p["N"], p["H"], p["V"], p["T"], p["tp"]
    if n % T:
        raise ValueError(f"N={n} must be a multiple of the sequence length T={T}")
    B = n // T
    sizes = shard_sizes(v, tp)
    start, rows = sum(sizes[:rank]), sizes[rank]
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, T, h, device=dev, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, v, (B, T), device=dev, generator=gen)
    mask = torch.ones(B, T, device=dev)
    adv = torch.randn(B, device=dev, generator=gen)
    old = -torch.rand(B, T, device=dev, generator=gen) * 8.0 - 2.0
    gen_w = torch.Generator(device=dev).manual_seed(1 + rank)
    w = (torch.randn(rows, h, device=dev, generator=gen_w) / math.sqrt(h)).to(dtype).requires_grad_()
    grad_bytes = x.numel() * x.element_size() + w.numel() * w.element_size()

    if p["op"] == "tp_logprobs_fwd_bwd":
        from rlvr_kernels import fused_linear_logprobs

        x2d, t1d = x.view(-1, h), t.view(-1)

        def run():
            logp, ent = fused_linear_logprobs(x2d, w, t1d, tp_group=group, vocab_start=start)
            return logp.sum() + ent.float().sum()
    elif p["op"] == "tp_loss_fused":
        from rlvr_kernels import RLVRLoss

        lf = RLVRLoss(beta=0.0, loss_type="dapo", fused=True)

        def run():
            return lf(x, w, t, mask, adv, old_per_token_logps=old, tp_group=group, vocab_start=start)[0]
    else:
        raise ValueError(f"unknown TP op {p['op']!r}")

    def step():
        run().backward()
        x.grad = None
        w.grad = None

    return step, grad_bytes, rows


def _measure_rank(p: dict, device: str, timing: dict, rank: int) -> dict:
    import resource

    import torch
    import torch.distributed as dist

    from rlvr_kernels.bench import timing as tm

    cuda = device == "cuda"
    group = dist.group.WORLD
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def barrier():
        if cuda:
            dist.barrier(device_ids=[rank])
        else:
            dist.barrier()

    _inject(p, rank, "start")
    gc.collect()
    t_build = time.perf_counter()
    step, grad_bytes, rows = _build(p, device, rank, group)
    for _ in range(timing["warmup"]):
        step()
    sync()
    warm_s = time.perf_counter() - t_build
    _inject(p, rank, "step")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        how = "cuda_max_memory_allocated"
    else:
        base = tm._proc_status_kib("VmRSS") if tm._reset_rss_peak() else None
        how = "rss_hwm_growth" if base is not None else "ru_maxrss_growth"
        ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slowest, own = [], []
    cell = torch.zeros(1, dtype=torch.float64, device=dev)
    # the loop's condition reads only the slowest-rank times, the same on every rank: all run the same steps
    while len(slowest) < timing["min_reps"] or (
        sum(slowest) < timing["target_s"] * 1e3 and len(slowest) < timing["max_reps"]
    ):
        barrier()
        sync()
        s = time.perf_counter()
        step()
        sync()
        ms = (time.perf_counter() - s) * 1e3
        own.append(ms)
        cell.fill_(ms)
        dist.all_reduce(cell, op=dist.ReduceOp.MAX, group=group)
        slowest.append(float(cell.item()))
    if cuda:
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    elif base is not None:
        peak = (tm._proc_status_kib("VmHWM") - base) / 1024
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0) / 1024
    return dict(
        slowest=slowest,
        own_median=tm.summarize(own)["ms_median"],
        peak=max(0.0, peak),
        mem_measure=how,
        grad_bytes=grad_bytes,
        rows=rows,
        warm_s=warm_s,
        threads=torch.get_num_threads(),
    )


def _write(folder: str, rank: int, result: tuple) -> None:
    path = os.path.join(folder, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)


def _rank_main(rank: int, p: dict, device: str, timing: dict, folder: str, timeout: float) -> None:
    """One rank: join the group, measure, write ``("ok", result)`` or ``("error", message, time, traceback)`` to its
    file (an error before the group is torn down, so that the launcher sees the first failure, not its echo)."""
    _die_with_parent()
    import torch
    import torch.distributed as dist

    world = p["tp"]
    if device == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    else:
        torch.set_num_threads(threads_per_rank(world))
        backend = "gloo"

    def fail(exc: BaseException) -> None:
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        _write(folder, rank, ("error", msg, time.time(), traceback.format_exc()))

    try:
        # the group's own timeout is a backstop behind the launcher's deadline
        dist.init_process_group(
            backend,
            init_method="file://" + os.path.join(folder, "store"),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout + 30.0),
        )
    except BaseException as exc:  # noqa: BLE001 - handed to the launcher with the rank's traceback
        fail(exc)
        return
    try:
        _write(folder, rank, ("ok", _measure_rank(p, device, timing, rank)))
    except BaseException as exc:  # noqa: BLE001
        fail(exc)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group a failed peer left behind
            pass


# ----------------------------------------------------------------------------------------------------------------
# the launcher: one TP point in the benchmark's child process


def _read(folder: str, rank: int):
    try:
        with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _first_failure(folder: str, procs: list) -> str:
    """The first rank that died without a result, else the earliest error a rank wrote."""
    errors, silent = [], []
    for r, pr in enumerate(procs):
        res = _read(folder, r)
        if res is not None and res[0] == "error":
            errors.append((res[2], r, res[1]))
        elif res is None and not pr.is_alive():
            silent.append(r)
    if silent:  # a crash (an exception writes its file): the others' errors are its echo
        r = silent[0]
        return f"rank {r} of {len(procs)} exited with code {procs[r].exitcode} without a result"
    _, r, msg = min(errors)
    return f"rank {r} of {len(procs)}: {msg}"


def measure(p: dict, device: str, timing: dict, timeout: float = 300.0) -> dict:
    """Run one TP point on ``p["tp"]`` ranks and summarise it (``error`` when a rank failed or hung)."""
    import multiprocessing as mp

    from rlvr_kernels.bench import timing as tm

    tp = int(p["tp"])
    if device == "cuda":
        import torch

        if tp > torch.cuda.device_count():
            return {"error": f"not available: TP={tp} needs {tp} GPUs, {torch.cuda.device_count()} present"}
    # fork on CPU (this child has imported torch and run nothing yet); CUDA ranks must not inherit a CUDA context
    ctx = mp.get_context("spawn" if device == "cuda" else "fork")
    folder = tempfile.mkdtemp(prefix="rlvr_tp_")
    t0 = time.monotonic()
    procs = []
    try:
        for rank in range(tp):
            proc = ctx.Process(target=_rank_main, args=(rank, p, device, timing, folder, timeout), daemon=True)
            proc.start()
            procs.append(proc)
        deadline = t0 + timeout
        failure = None
        while True:
            alive = [r for r, pr in enumerate(procs) if pr.is_alive()]
            dead = [r for r in range(tp) if r not in alive]
            if any(_read(folder, r) is None or _read(folder, r)[0] == "error" for r in dead):
                time.sleep(0.5)  # the first failure makes the others fail too: let them write, then take the first
                failure = _first_failure(folder, procs)
                break
            if not alive or all((_read(folder, r) or ("",))[0] == "ok" for r in range(tp)):
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {timeout:.0f} s: ranks {alive} of {tp} did not finish (a hang?)"
                break
            time.sleep(0.02)
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
        for pr in procs:
            pr.join(timeout=10)
        results = [_read(folder, r) for r in range(tp)]
        shutil.rmtree(folder, ignore_errors=True)
    if failure:
        return {"error": failure[:400]}
    ranks = [r[1] for r in results]
    res = tm.summarize(ranks[0]["slowest"])  # the per-step slowest rank's time (the same list on every rank)
    peaks = [r["peak"] for r in ranks]
    grads = max(r["grad_bytes"] for r in ranks) / 2**20
    res.update(
        peak_mem_mib=max(peaks),
        peak_mem_mib_ranks=[round(x, 2) for x in peaks],
        mem_measure=ranks[0]["mem_measure"],
        grads_mib=grads,
        extra_mem_mib=max(0.0, max(peaks) - grads),
        rank_ms_median=[round(r["own_median"], 3) for r in ranks],
        warmup=timing["warmup"],
        warmup_s=round(max(r["warm_s"] for r in ranks), 3),
        launch_s=round(time.monotonic() - t0, 3),
        tp=tp,
        tp_backend="nccl" if device == "cuda" else "gloo",
        threads_per_rank=ranks[0]["threads"],
        cpu_cores=cores(),
        oversubscribed=device != "cuda" and tp > cores(),
        vocab_rows_per_rank=max(r["rows"] for r in ranks),
        **comm_bytes(p["N"], p["H"], tp),
    )
    return res


def measure_safe(p: dict, device: str, timing: dict, timeout: float) -> dict:
    try:
        return measure(p, device, timing, timeout)
    except Exception as exc:  # noqa: BLE001 - any failure of the launcher becomes a row saying why
        return {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:400]}


def worker(q, points, device, timing, timeout):
    """Child process: measure the TP ``points`` in order, reporting on ``q`` as :func:`timing.worker` does."""
    for i, p in enumerate(points):
        q.put(("start", i, None))
        q.put(("done", i, measure_safe(p, device, timing, timeout)))
