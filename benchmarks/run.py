"""Benchmark of rlvr_kernels against plain torch, torch.compile, TRL, Liger, verl and the GEMM roofline.

Usage: ``python benchmarks/run.py [--quick] [--out DIR]`` (also ``--smoke`` for tiny shapes, ``--ops``, ``--impls``,
``--append``; see ``--help``). Runs on whatever device is there: CUDA if available (bf16, the Qwen3-8B reference
shape N=8192, H=4096, V=151936 plus sweeps over N and V), else the CPU (fp32, scaled-down shapes).

Ops (record field ``op``): ``logprobs_fwd``, ``logprobs_fwd_bwd``, ``loss_fused``, ``token_pass`` (field ``case``
says which token op) and whole losses ``loss_<name>``; implementations (field ``impl``): ``rlvr_kernels`` (ours),
``cublas_gemm`` (the GEMM roofline of the op: 1, 4 or 3 GEMMs, field ``gemms``) and the peers. An implementation that
cannot run gives a record with an ``error`` field saying why.

Measurement: each point runs in a child process, so that a crash or an out-of-memory stays there and the peak
memory is its own. On CPU every point gets a fresh process, forked from a server that has already imported torch
and the peers (peak = growth of the resident set during the timed steps); on GPU one spawned process per
implementation runs its points in turn (peak = ``max_memory_allocated`` minus what was allocated before the timed
steps, reset per point). Time is the median of repeated steps after warm-up (CUDA events on GPU). Ratios in the
records: ``ratio_vs_gemm`` (time over the op's GEMM roofline), ``ours_time_ratio`` / ``ours_mem_ratio`` on each peer
row and ``time_ratio_vs_<peer>`` / ``mem_ratio_vs_<peer>`` on ours (ours / peer), ``ratio_vs_vocab_pass`` for the
token ops (time over our forward vocab pass at the same N).

Writes into ``--out`` (default ``benchmarks/results/<device>-<date>/``): ``results.json`` (the records),
``results.csv``, ``results.md``, ``meta.json`` and PNG plots (time and peak memory vs N and vs V per op).
``python benchmarks/update_readme.py`` then regenerates the README's results block from it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_cases as bc  # noqa: E402
import bench_report as br  # noqa: E402

# Shapes per (device, mode): T = sequence length (N = B * T), the reference point (N, H, V), the N sweep at the
# reference (H, V), the V sweep at the reference (N, H), extra lm_heads at the reference N, and the dtypes.
SHAPES = {
    ("cuda", "full"): dict(T=1024, ref=(8192, 4096, 151936), n_sweep=(2048, 4096, 8192, 16384),
                           v_sweep=(32768, 65536, 128256, 151936), heads=((2048, 151936),), dtypes=("bf16",)),
    ("cuda", "quick"): dict(T=1024, ref=(8192, 4096, 151936), n_sweep=(2048, 8192), v_sweep=(32768, 151936),
                            heads=(), dtypes=("bf16",)),
    ("cpu", "full"): dict(T=512, ref=(1024, 512, 32768), n_sweep=(512, 1024, 2048, 4096),
                          v_sweep=(8192, 16384, 32768, 65536), heads=((1024, 32768),), dtypes=("fp32",)),
    ("cpu", "quick"): dict(T=256, ref=(512, 256, 16384), n_sweep=(256, 512, 1024), v_sweep=(8192, 16384, 32768),
                           heads=(), dtypes=("fp32",)),
}
SMOKE = dict(T=16, ref=(32, 32, 512), n_sweep=(16, 32), v_sweep=(256, 512), heads=(), dtypes=None)
TIMING = {
    ("cuda", "full"): dict(warmup=3, min_reps=10, max_reps=100, target_s=1.0),
    ("cuda", "quick"): dict(warmup=2, min_reps=5, max_reps=30, target_s=0.3),
    ("cpu", "full"): dict(warmup=1, min_reps=5, max_reps=50, target_s=1.5),
    ("cpu", "quick"): dict(warmup=1, min_reps=3, max_reps=20, target_s=0.25),
    "smoke": dict(warmup=1, min_reps=2, max_reps=3, target_s=0.0),
}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def shapes_of(cfg: dict) -> list:
    """The distinct (N, H, V) points of a shape config, reference first."""
    n0, h0, v0 = cfg["ref"]
    out = [cfg["ref"]]
    out += [(n, h0, v0) for n in cfg["n_sweep"]]
    out += [(n0, h0, v) for v in cfg["v_sweep"]]
    out += [(n0, h, v) for h, v in cfg["heads"]]
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def plan(device: str, mode: str, *, ops=None, impls=None, dtypes=None) -> tuple[list, dict]:
    """The points to run, in order, and the shape config used."""
    cfg = dict(SMOKE) if mode == "smoke" else dict(SHAPES[(device, mode)])
    if cfg["dtypes"] is None:
        cfg["dtypes"] = ("bf16",) if device == "cuda" else ("fp32",)
    if dtypes:
        cfg["dtypes"] = tuple(dtypes)
    T = cfg["T"]
    n0, h0, v0 = cfg["ref"]
    points = []

    def add(op, impl, n, h, v, dtype, case=""):
        points.append(dict(op=op, impl=impl, case=case, N=n, H=h, V=v, T=T, dtype=dtype))

    for dtype in cfg["dtypes"]:
        for n, h, v in shapes_of(cfg):
            ref_shape = (n, h, v) == cfg["ref"]
            for op, op_impls in [(o, bc.LOGPROB_IMPLS) for o in bc.LOGPROB_OPS] + [("loss_fused", bc.LOSS_FUSED_IMPLS)]:
                for impl in op_impls:
                    # torch.compile pays a cold compile per shape (tens of seconds on CPU): quick runs keep it to
                    # the reference shape
                    if impl == "torch_compile" and mode == "quick" and device == "cpu" and not ref_shape:
                        continue
                    add(op, impl, n, h, v, dtype)
        token_impls = ("rlvr_kernels", "torch_reference") if device == "cuda" else ("rlvr_kernels",)
        for n in cfg["n_sweep"]:
            for case in bc.TOKEN_CASES:
                for impl in token_impls:
                    add("token_pass", impl, n, h0, v0, dtype, case)
        for name, spec in bc.LOSS_VARIANTS.items():
            for impl in bc.LOSS_VARIANT_IMPLS:
                if impl == "liger_grpo" and spec.get("liger") is None:
                    continue
                add(f"loss_{name}", impl, n0, h0, v0, dtype)
    if ops:
        points = [p for p in points if any(fnmatch.fnmatchcase(p["op"], pat) for pat in ops)]
    if impls:
        kept = [p for p in points if p["impl"] in impls]
        # an implementation named on the command line that no op offers still gets rows (saying why it did not
        # run): one per point of the ops' GEMM rooflines
        for extra in [i for i in impls if not any(p["impl"] == i for p in points)]:
            kept += [dict(p, impl=extra) for p in points if p["impl"] == "cublas_gemm"]
        points = kept
    return points, cfg


# ----------------------------------------------------------------------------------------------------------------
# running points in child processes


def _context(device: str, start_method: str | None, impls: set):
    method = start_method or ("spawn" if device == "cuda" else "forkserver")
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        mods = ["bench_cases", "torch", "rlvr_kernels"]
        for impl in sorted(impls):
            if device == "cuda" or impl != "verl_triton":  # verl's Triton op is not run on CPU: do not import it
                mods += list(bc.PEER_MODULES.get(impl, ()))
        ctx.set_forkserver_preload(mods)
    return ctx, method


def run_points(points: list, device: str, timing: dict, *, start_method=None, point_timeout=600.0,
               progress=True, log=print, group_by_impl=None) -> list:
    """Measure every point in child processes; returns one result dict per point (``error`` when it failed).

    CPU: one process per point (the resident set is per process). GPU (``group_by_impl``): one process per
    implementation, running its points in turn; a child that dies or overruns ``point_timeout`` gives its current
    point an error and a new child takes the rest."""
    ctx, method = _context(device, start_method, {p["impl"] for p in points})
    if group_by_impl is None:
        group_by_impl = device == "cuda"
    if group_by_impl:
        groups: dict = {}
        for i, p in enumerate(points):
            groups.setdefault(p["impl"], []).append(i)
        groups = list(groups.values())
    else:
        groups = [[i] for i in range(len(points))]
    results: list = [None] * len(points)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(points), unit="pt", dynamic_ncols=True, file=sys.stderr)
        except ImportError:  # tqdm is in the bench extra; run without a bar otherwise
            bar = None

    def label(p):
        case = f"/{p['case']}" if p["case"] else ""
        return f"{p['op']}{case} {p['impl']} N={p['N']} H={p['H']} V={p['V']} {p['dtype']}"

    def done(i, res):
        results[i] = res
        p = points[i]
        shown = (f"{res['ms_median']:.3f} ms, {res['peak_mem_mib']:.1f} MiB" if "ms_median" in res
                 else f"ERROR {res['error'][:150]}")
        line = f"{label(p):70s} {shown}"
        if bar is not None:
            bar.update(1)
            bar.write(line)
        elif log:
            log(line)

    for group in groups:
        remaining = list(group)
        while remaining:
            q = ctx.Queue()
            proc = ctx.Process(target=bc.worker, args=(q, [points[i] for i in remaining], device, timing), daemon=True)
            proc.start()
            current, started, finished = None, time.monotonic(), 0
            while finished < len(remaining):
                try:
                    kind, j, res = q.get(timeout=1.0)
                except queue.Empty:
                    failure = None
                    if not proc.is_alive():
                        try:  # the child may have put its last message just before exiting
                            kind, j, res = q.get(timeout=1.0)
                        except queue.Empty:
                            failure = f"child process exited with code {proc.exitcode}"
                    elif time.monotonic() - started > point_timeout:
                        failure = f"timed out after {point_timeout:.0f} s"
                        proc.kill()
                    if failure is None and proc.is_alive():
                        continue
                    if failure is not None:
                        j = current if current is not None else finished
                        done(remaining[j], {"error": failure})
                        remaining = remaining[j + 1:]
                        break
                if kind == "start":
                    current, started = j, time.monotonic()
                    if bar is not None:
                        bar.set_description(label(points[remaining[j]])[:60])
                else:
                    done(remaining[j], res)
                    finished += 1
                    current = None
            else:
                remaining = []
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            q.close()
    if bar is not None:
        bar.close()
    return results


# ----------------------------------------------------------------------------------------------------------------
# records and ratios

KEY = ("op", "impl", "case", "dtype", "N", "H", "V")


def make_records(points: list, results: list, dev_name: str) -> list:
    recs = []
    for p, res in zip(points, results):
        rec = dict(op=p["op"], impl=p["impl"], case=p["case"], device=dev_name, dtype=p["dtype"], N=p["N"],
                   H=p["H"], V=p["V"], B=p["N"] // p["T"], T=p["T"])
        if p["impl"] == "cublas_gemm" and p["op"] in bc.GEMMS:
            rec["gemms"] = bc.GEMMS[p["op"]]
        rec.update(res or {"error": "no result"})
        recs.append(rec)
    return recs


def add_ratios(records: list) -> list:
    """Fill the ratio fields in place (and drop stale ones); returns the records."""
    for r in records:
        for k in [k for k in r if "ratio" in k]:
            del r[k]
    ok = {tuple(r[k] for k in KEY): r for r in records if "ms_median" in r}

    def get(op, impl, r, case=""):
        return ok.get((op, impl, case, r["dtype"], r["N"], r["H"], r["V"]))

    for r in records:
        if "ms_median" not in r:
            continue
        op = r["op"]
        if op in bc.GEMMS:
            gemm = get(op, "cublas_gemm", r)
        elif op == "token_pass":
            gemm = get("logprobs_fwd", "cublas_gemm", r)
            fwd = get("logprobs_fwd", "rlvr_kernels", r)
            if fwd:
                r["ratio_vs_vocab_pass"] = r["ms_median"] / fwd["ms_median"]
        else:  # whole losses: the fused loss's 3-GEMM roofline
            gemm = get("loss_fused", "cublas_gemm", r)
        if gemm and gemm["ms_median"] > 0:
            r["ratio_vs_gemm"] = r["ms_median"] / gemm["ms_median"]
    for r in records:
        if "ms_median" not in r or r["impl"] in ("rlvr_kernels", "cublas_gemm"):
            continue
        ours = get(r["op"], "rlvr_kernels", r, r["case"])
        if not ours:
            continue
        if r["ms_median"] > 0:
            t = ours["ms_median"] / r["ms_median"]
            r["ours_time_ratio"] = t
            ours[f"time_ratio_vs_{r['impl']}"] = t
        if r["peak_mem_mib"] >= 1.0:  # below 1 MiB the resident-set growth is noise
            m = ours["peak_mem_mib"] / r["peak_mem_mib"]
            r["ours_mem_ratio"] = m
            ours[f"mem_ratio_vs_{r['impl']}"] = m
    return records


def merge_records(old: list, new: list) -> list:
    """``old`` with the records of ``new`` replacing those with the same (op, impl, case, dtype, N, H, V)."""
    fresh = {tuple(r[k] for k in KEY) for r in new}
    return [r for r in old if tuple(r.get(k) for k in KEY) not in fresh] + list(new)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "rlvr-kernels", "trl", "liger-kernel", "verl", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode_g = ap.add_mutually_exclusive_group()
    mode_g.add_argument("--quick", action="store_true", help="small shapes and sweeps, few repetitions (a few minutes "
                        "on a 2-core CPU)")
    mode_g.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repetitions (tests the machinery)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>/)")
    ap.add_argument("--ops", default=None, help="comma-separated op names or globs, e.g. 'logprobs_*,loss_fused'")
    ap.add_argument("--impls", default=None, help="comma-separated implementations, e.g. 'rlvr_kernels,cublas_gemm'")
    ap.add_argument("--dtypes", default=None, help="comma-separated dtypes (fp32, bf16, fp16)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--append", action="store_true", help="merge into the results already in --out (replacing "
                    "the same points) instead of starting afresh; for runs split by --ops / --impls")
    ap.add_argument("--start-method", default=None, choices=("spawn", "forkserver", "fork"),
                    help="child processes (default: forkserver on CPU, spawn on CUDA)")
    ap.add_argument("--point-timeout", type=float, default=None, help="seconds one point may take")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    points, cfg = plan(device, mode, ops=split(args.ops), impls=split(args.impls), dtypes=split(args.dtypes))
    timing = TIMING["smoke"] if mode == "smoke" else TIMING[(device, mode)]
    dev_name = device_name(device)
    date = dt.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"{dev_name}-{date}")
    os.makedirs(out, exist_ok=True)
    print(f"{len(points)} points on {dev_name} ({mode}); writing {out}", flush=True)
    timeout = args.point_timeout or (120.0 if mode == "smoke" else 300.0 if mode == "quick" else 900.0)
    results = run_points(points, device, timing, start_method=args.start_method, point_timeout=timeout,
                         progress=not args.no_progress)
    records = make_records(points, results, dev_name)
    meta = dict(device=dev_name, device_kind=device, date=date, mode=mode, argv=sys.argv[1:] if argv is None else argv,
                reference=dict(zip(("N", "H", "V"), cfg["ref"]), dtype=cfg["dtypes"][0], T=cfg["T"]),
                n_sweep=list(cfg["n_sweep"]), v_sweep=list(cfg["v_sweep"]), timing=timing,
                cpu_count=os.cpu_count(), platform=platform.platform(), versions=_versions())
    if args.append and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            records = merge_records(json.load(f), records)
    add_ratios(records)
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    br.write_all(records, meta, out, plots=not args.no_plots)
    n_err = sum("error" in r for r in records)
    print("\n" + br.summary_markdown(records, meta).rstrip())
    print(f"\n{len(records)} records ({n_err} with an error) in {meta['wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
