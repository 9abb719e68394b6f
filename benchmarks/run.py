"""Microbenchmark of the fused log-prob/entropy op against plain torch and the GEMM roofline.

Usage: ``python benchmarks/run.py [--quick] [--out DIR]``. Runs on whatever device is there (CUDA if available).
Each (op, impl) point runs in its own child process so that peak memory is its own: ``max_memory_allocated`` on GPU,
the growth of the resident set on CPU. Time is the median of repeated runs after warm-up (CUDA events on GPU).
Writes ``results.json`` (records with op, impl, device, dtype, N, H, V, ms_median, peak_mem_mib, ratios),
``results.csv`` and ``results.md`` into ``--out`` (default ``benchmarks/results/<device>-<date>/``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def _build(op: str, impl: str, n: int, h: int, v: int, dtype_name: str, device: str):
    """Return a zero-argument callable running one step of (op, impl)."""
    import torch

    from rlvr_kernels import fused_linear_logprobs

    dtype = getattr(torch, DTYPES[dtype_name])
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, h, device=device, generator=gen) * 0.05).to(dtype)
    w = (torch.randn(v, h, device=device, generator=gen) * 0.05).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=gen)
    bwd = op == "logprobs_fwd_bwd"
    if bwd:
        x.requires_grad_()
        w.requires_grad_()

    if impl == "cublas_gemm":
        gemms = 4 if bwd else 1
        xx, ww = x.detach(), w.detach()

        def step():
            for _ in range(gemms):
                torch.mm(xx, ww.T)
        return step

    if impl == "rlvr_kernels":
        def fn():
            return fused_linear_logprobs(x, w, t)
    elif impl == "torch_full_logits":
        def fn():
            z = (x @ w.T).float()
            logz = torch.log_softmax(z, -1)
            return logz.gather(-1, t[:, None])[:, 0], -(logz.exp() * logz).sum(-1)
    else:
        raise ValueError(impl)

    def step():
        if bwd:
            x.grad = w.grad = None
            logp, ent = fn()
            (logp.sum() + ent.sum()).backward()
        else:
            with torch.no_grad():
                fn()
    return step


def _measure(q, op, impl, n, h, v, dtype_name, device, reps):
    import resource

    import torch

    try:
        step = _build(op, impl, n, h, v, dtype_name, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            step()
            times = []
            for _ in range(reps):
                s = time.perf_counter()
                step()
                times.append((time.perf_counter() - s) * 1e3)
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        q.put({"ms_median": statistics.median(times), "peak_mem_mib": peak})
    except Exception as exc:  # a peer or impl that cannot run gets a row saying why
        q.put({"error": f"{type(exc).__name__}: {exc}"[:300]})


def run_point(op, impl, n, h, v, dtype_name, device, reps):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(q, op, impl, n, h, v, dtype_name, device, reps))
    p.start()
    p.join()
    res = q.get() if not q.empty() else {"error": f"child exited with code {p.exitcode}"}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, a few repetitions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        shapes = [(8192, 4096, 151936, "bf16")] if not args.quick else [(2048, 4096, 151936, "bf16")]
        reps = 10
    else:
        shapes = [(512, 256, 32000, "fp32")] if args.quick else [(1024, 512, 32000, "fp32"), (2048, 512, 65536, "fp32")]
        reps = 3
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{_device_name()}-{dt.date.today().isoformat()}"
    )
    os.makedirs(out, exist_ok=True)
    records = []
    for n, h, v, dtype_name in shapes:
        for op in ("logprobs_fwd", "logprobs_fwd_bwd"):
            for impl in ("cublas_gemm", "rlvr_kernels", "torch_full_logits"):
                res = run_point(op, impl, n, h, v, dtype_name, device, reps)
                rec = dict(op=op, impl=impl, device=_device_name(), dtype=dtype_name, N=n, H=h, V=v, **res)
                records.append(rec)
                shown = f"{rec['ms_median']:.2f} ms, {rec['peak_mem_mib']:.0f} MiB" if "ms_median" in rec else rec["error"]
                print(f"{op:18s} {impl:18s} N={n} H={h} V={v} {dtype_name}: {shown}", flush=True)
    # ratios against the GEMM roofline of the same op and shape
    for rec in records:
        base = next((r for r in records if r["impl"] == "cublas_gemm" and r["op"] == rec["op"] and r["N"] == rec["N"]
                     and r["V"] == rec["V"] and "ms_median" in r), None)
        if base and "ms_median" in rec:
            rec["ratio_vs_gemm"] = rec["ms_median"] / base["ms_median"]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    keys = ["op", "impl", "device", "dtype", "N", "H", "V", "ms_median", "peak_mem_mib", "ratio_vs_gemm", "error"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(records)
    lines = ["| op | impl | dtype | N x H x V | ms (median) | x GEMM roofline | peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "ms_median" in r:
            ratio = f"{r['ratio_vs_gemm']:.2f}" if "ratio_vs_gemm" in r else ""
            lines.append(f"| {r['op']} | {r['impl']} | {r['dtype']} | {r['N']} x {r['H']} x {r['V']} | "
                         f"{r['ms_median']:.2f} | {ratio} | {r['peak_mem_mib']:.0f} |")
        else:
            lines.append(f"| {r['op']} | {r['impl']} | {r['dtype']} | {r['N']} x {r['H']} x {r['V']} | "
                         f"not run: {r['error']} | | |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Device: {_device_name()}, {dt.date.today().isoformat()}, torch {torch.__version__}\n\n" + table)
    print("\n" + table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
