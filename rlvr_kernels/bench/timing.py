"""Timing one point: warm-up, then repeated steps, summarised as median, interquartile range and minimum.

The style of ``triton.testing.do_bench`` / ``torch.utils.benchmark``: a few warm-up steps (compilation, autotuning,
allocator caches), then ``R`` timed repeats (CUDA events around each step on GPU, ``perf_counter`` on CPU), reported
as ``ms_median``, ``ms_p25`` / ``ms_p75`` (the interquartile range), ``ms_min``, ``ms_max`` and ``reps``. Each point
runs at least ``min_reps`` and at most ``max_reps`` repeats, stopping after ``target_s`` seconds once ``min_reps`` are
done (``--repeats R`` sets both bounds to R). Ratios between implementations are formed from the medians measured in
the same run (:func:`rlvr_kernels.bench.runner.add_ratios`).
"""

from __future__ import annotations

import ctypes
import gc
import math
import time

from rlvr_kernels.bench import cases

# warm-up steps and repeat bounds per (device, mode)
TIMING = {
    ("cuda", "full"): dict(warmup=3, min_reps=10, max_reps=100, target_s=1.0),
    ("cuda", "quick"): dict(warmup=2, min_reps=5, max_reps=30, target_s=0.3),
    ("cpu", "full"): dict(warmup=1, min_reps=5, max_reps=50, target_s=1.5),
    ("cpu", "quick"): dict(warmup=1, min_reps=3, max_reps=20, target_s=0.25),
    "smoke": dict(warmup=1, min_reps=2, max_reps=3, target_s=0.0),
}


def timing_for(device: str, mode: str, *, repeats=None, warmup=None) -> dict:
    """The timing settings of a run: the preset of (device, mode), with ``repeats`` (exactly R timed repeats) and
    ``warmup`` overriding it."""
    t = dict(TIMING["smoke"] if mode == "smoke" else TIMING[(device, mode)])
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        t.update(min_reps=repeats, max_reps=repeats, target_s=0.0)
    if warmup is not None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        t["warmup"] = warmup
    return t


def quantile(sorted_xs: list, q: float) -> float:
    """The q-quantile of sorted values, linear interpolation between order statistics (numpy's default)."""
    if not sorted_xs:
        raise ValueError("no values")
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list) -> dict:
    """``ms_median``, ``ms_p25``, ``ms_p75``, ``ms_min``, ``ms_max`` and ``reps`` of the timed repeats."""
    xs = sorted(times_ms)
    return {
        "ms_median": quantile(xs, 0.5),
        "ms_p25": quantile(xs, 0.25),
        "ms_p75": quantile(xs, 0.75),
        "ms_min": xs[0],
        "ms_max": xs[-1],
        "reps": len(xs),
    }


def _proc_status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Return freed heap to the OS and reset the kernel's peak-RSS mark (Linux >= 4.0); False where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(p: dict, device: str, timing: dict) -> dict:
    """Time (ms: median, IQR, min over the repeats) and peak memory (MiB) of one point, after ``timing['warmup']``
    warm-up steps.

    GPU: CUDA events around each step; peak = ``max_memory_allocated`` during the timed steps minus what was
    allocated before them (the inputs). CPU: ``perf_counter``; peak = growth of the resident set during the timed
    steps over the resident set before them (the peak mark is reset after warm-up; the caller runs each CPU point in
    a fresh process). Steps that take a gradient drop it at their end, so the peak includes the gradients once.
    """
    import resource

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_build = time.perf_counter()
    step, grad_bytes = cases.build(p, device)  # looked up at call time (tests replace it)
    for _ in range(timing["warmup"]):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t_build
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_ok = _reset_rss_peak()
        base = _proc_status_kib("VmRSS") if hwm_ok else None
    times = []
    t_end = time.perf_counter() + timing["target_s"]
    while len(times) < timing["min_reps"] or (time.perf_counter() < t_end and len(times) < timing["max_reps"]):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            s = time.perf_counter()
            step()
            times.append((time.perf_counter() - s) * 1e3)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif base is not None:
        peak = (_proc_status_kib("VmHWM") - base) / 1024
    else:  # no resettable peak mark: growth of ru_maxrss over the whole run, warm-up included
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0) / 1024
    peak = max(0.0, peak)
    res = summarize(times)
    res.update(peak_mem_mib=peak, warmup=timing["warmup"], warmup_s=round(warm_s, 3))
    if grad_bytes:
        res["grads_mib"] = grad_bytes / 2**20
        res["extra_mem_mib"] = max(0.0, peak - grad_bytes / 2**20)
    return res


def measure_safe(p: dict, device: str, timing: dict) -> dict:
    try:
        return measure(p, device, timing)
    except cases.NotAvailable as exc:
        return {"error": f"not available: {exc}"[:400]}
    except Exception as exc:  # noqa: BLE001 - any failure of an implementation becomes a row saying why
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        return {"error": msg[:400]}
    finally:
        gc.collect()


def worker(q, points, device, timing):
    """Child process: measure ``points`` in order, reporting each result on ``q`` as ``(index, result)``."""
    # Objects inherited from the fork server (torch, the peers) are never garbage: keep the collector off them, so
    # that it neither spends time on them nor touches (copies) their pages.
    gc.freeze()
    for i, p in enumerate(points):
        q.put(("start", i, None))
        q.put(("done", i, measure_safe(p, device, timing)))
