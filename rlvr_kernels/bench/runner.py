"""Planning the points of a run, measuring them in child processes, and turning the results into records.

Each point runs in a child process, so that a crash or an out-of-memory stays there and the peak memory is its own.
On CPU every point gets a fresh process, forked from a server that has already imported torch and the peers (peak =
growth of the resident set during the timed steps); on GPU one spawned process per implementation runs its points in
turn (peak = ``max_memory_allocated`` minus what was allocated before the timed steps, reset per point).

Ratios in the records (:func:`add_ratios`), always between medians of the same run (records with the same
``run_id``): ``ratio_vs_gemm`` (time over the op's GEMM roofline), ``ours_time_ratio`` / ``ours_mem_ratio`` on each
peer row and ``time_ratio_vs_<peer>`` / ``mem_ratio_vs_<peer>`` on ours (ours / peer), ``ratio_vs_vocab_pass`` for
the token ops (time over our forward vocab pass at the same N).
"""

from __future__ import annotations

import fnmatch
import multiprocessing as mp
import platform
import queue
import sys
import time

from rlvr_kernels.bench import cases as bc
from rlvr_kernels.bench import timing as timing_mod
from rlvr_kernels.bench import tp as tp_mod

# Shapes per (device, mode): T = sequence length (N = B * T), the reference point (N, H, V), the N sweep at the
# reference (H, V), the V sweep at the reference (N, H), extra lm_heads at the reference N, and the dtypes.
SHAPES = {
    ("cuda", "full"): dict(
        T=1024,
        ref=(8192, 4096, 151936),
        n_sweep=(2048, 4096, 8192, 16384),
        v_sweep=(32768, 65536, 128256, 151936),
        heads=((2048, 151936),),
        dtypes=("bf16",),
    ),
    ("cuda", "quick"): dict(
        T=1024, ref=(8192, 4096, 151936), n_sweep=(2048, 8192), v_sweep=(32768, 151936), heads=(), dtypes=("bf16",)
    ),
    ("cpu", "full"): dict(
        T=512,
        ref=(1024, 512, 32768),
        n_sweep=(512, 1024, 2048, 4096),
        v_sweep=(8192, 16384, 32768, 65536),
        heads=((1024, 32768),),
        dtypes=("fp32",),
    ),
    ("cpu", "quick"): dict(
        T=256, ref=(512, 256, 16384), n_sweep=(256, 512, 1024), v_sweep=(8192, 16384, 32768), heads=(), dtypes=("fp32",)
    ),
}
# --smoke: tiny shapes that test the machinery (the smallest configuration; the test suite uses it)
SMOKE = dict(T=16, ref=(32, 32, 512), n_sweep=(16, 32), v_sweep=(256, 512), heads=(), dtypes=None)
MODES = ("full", "quick", "smoke")


def device_name(device: str) -> str:
    """The short device name of folders and records: the GPU's name, or ``cpu-<machine>``."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def device_full_name(device: str) -> str:
    """The device's model name: the GPU's name, or the CPU's model from /proc/cpuinfo (else platform.processor)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def plan(device: str, mode: str, *, ops=None, impls=None, dtypes=None, tp=None) -> tuple[list, dict]:
    """The points to run, in order, and the shape config used. ``ops`` are op names or globs (``loss_dapo_*``),
    ``impls`` implementation ids, ``dtypes`` among fp32 / bf16 / fp16, ``tp`` the TP degrees of the TP ops
    (default 1, 2, 4; on CUDA those the GPUs allow)."""
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
        for impl in bc.LOSS_FUSED_IMPLS:  # the ragged batch at the reference shape
            if impl == "torch_compile" and mode == "quick" and device == "cpu":
                continue
            add(bc.RAGGED_OP, impl, n0, h0, v0, dtype)
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
    points += tp_mod.points(cfg, device, tp)  # the vocabulary-parallel ops at the reference shape, per TP degree
    if ops:
        points = [p for p in points if any(fnmatch.fnmatchcase(p["op"], pat) for pat in ops)]
    if impls:
        impls = [bc.IMPL_ALIASES.get(i, i) for i in impls]
        kept = [p for p in points if p["impl"] in impls]
        # an implementation named on the command line that no op offers still gets rows (saying why it did not
        # run): one per point of the ops' GEMM rooflines
        for extra in [i for i in impls if not any(p["impl"] == i for p in points)]:
            kept += [dict(p, impl=extra) for p in points if p["impl"] == bc.GEMM_IMPL]
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
        mods = ["torch", "rlvr_kernels", "rlvr_kernels.bench.cases", "rlvr_kernels.bench.timing"]
        mods += ["torch.distributed", "rlvr_kernels.bench.tp"]
        for impl in sorted(impls):
            if device == "cuda" or impl != "verl_triton":  # verl's Triton op is not run on CPU: do not import it
                mods += list(bc.PEER_MODULES.get(impl, ()))
        ctx.set_forkserver_preload(mods)
    return ctx, method


def run_points(
    points: list,
    device: str,
    timing: dict,
    *,
    start_method=None,
    point_timeout=600.0,
    progress=True,
    log=print,
    group_by_impl=None,
) -> list:
    """Measure every point in child processes; returns one result dict per point (``error`` when it failed).

    CPU: one process per point (the resident set is per process). GPU (``group_by_impl``): one process per
    implementation, running its points in turn; a child that dies or overruns ``point_timeout`` gives its current
    point an error and a new child takes the rest. The TP points (:mod:`rlvr_kernels.bench.tp`) run in children of
    their own, which start the ranks and end a rank's failure or hang as an error a little before ``point_timeout``."""
    ctx, method = _context(device, start_method, {p["impl"] for p in points})
    if group_by_impl is None:
        group_by_impl = device == "cuda"
    if group_by_impl:
        groups: dict = {}
        for i, p in enumerate(points):
            groups.setdefault((p["impl"], tp_mod.is_tp(p)), []).append(i)
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
        return f"{p['op']}{case} {bc.impl_label(p['impl'], device)} N={p['N']} H={p['H']} V={p['V']} {p['dtype']}"

    def done(i, res):
        results[i] = res
        p = points[i]
        if "ms_median" in res:
            iqr = f" [{res['ms_p25']:.3f}-{res['ms_p75']:.3f}]" if "ms_p25" in res else ""
            shown = f"{res['ms_median']:.3f} ms{iqr} x{res.get('reps', '?')}, {res['peak_mem_mib']:.1f} MiB"
        else:
            shown = f"ERROR {res['error'][:150]}"
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
            todo = [points[i] for i in remaining]
            if tp_mod.is_tp(todo[0]):  # not a daemon: it starts the ranks
                rank_timeout = max(1.0, 0.9 * point_timeout - 1.0)
                proc = ctx.Process(target=tp_mod.worker, args=(q, todo, device, timing, rank_timeout), daemon=False)
            else:
                proc = ctx.Process(target=timing_mod.worker, args=(q, todo, device, timing), daemon=True)
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
                        remaining = remaining[j + 1 :]
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


def make_records(points: list, results: list, dev_name: str, run_id: str | None = None) -> list:
    """One record per point: the point's fields, the device, the result (or its ``error``), ``run_id``."""
    recs = []
    for p, res in zip(points, results):
        rec = dict(
            op=p["op"],
            impl=p["impl"],
            case=p["case"],
            device=dev_name,
            dtype=p["dtype"],
            N=p["N"],
            H=p["H"],
            V=p["V"],
            B=p["N"] // p["T"],
            T=p["T"],
        )
        if p["impl"] == bc.GEMM_IMPL:
            rec["impl_label"] = bc.impl_label(p["impl"], dev_name)
            if p["op"] in bc.GEMMS:
                rec["gemms"] = bc.GEMMS[p["op"]]
        if "tp" in p:
            rec["tp"] = p["tp"]
        if run_id is not None:
            rec["run_id"] = run_id
        rec.update(res or {"error": "no result"})
        recs.append(rec)
    return recs


def add_ratios(records: list) -> list:
    """Fill the ratio fields in place (and drop stale ones); returns the records.

    Every ratio is formed from two medians of the same run: records pair only with records of the same ``run_id``
    (records without one, as in older results, form one run)."""
    for r in records:
        for k in [k for k in r if "ratio" in k]:
            del r[k]
    ok = {tuple(r[k] for k in KEY) + (r.get("run_id"),): r for r in records if "ms_median" in r}

    def get(op, impl, r, case=""):
        return ok.get((op, impl, case, r["dtype"], r["N"], r["H"], r["V"], r.get("run_id")))

    for r in records:
        if "ms_median" not in r:
            continue
        op = r["op"]
        if tp_mod.is_tp(r):  # per TP degree: time and memory over TP = 1's
            one = get(op, r["impl"], r, "tp1")
            if one and one["ms_median"] > 0:
                r["time_ratio_vs_tp1"] = r["ms_median"] / one["ms_median"]
            if one and one["peak_mem_mib"] > 0:
                r["mem_ratio_vs_tp1"] = r["peak_mem_mib"] / one["peak_mem_mib"]
            continue
        if op in bc.GEMMS:
            gemm = get(op, bc.GEMM_IMPL, r)
        elif op == "token_pass":
            gemm = get("logprobs_fwd", bc.GEMM_IMPL, r)
            fwd = get("logprobs_fwd", "rlvr_kernels", r)
            if fwd:
                r["ratio_vs_vocab_pass"] = r["ms_median"] / fwd["ms_median"]
        else:  # whole losses: the fused loss's 3-GEMM roofline
            gemm = get("loss_fused", bc.GEMM_IMPL, r)
        if gemm and gemm["ms_median"] > 0:
            r["ratio_vs_gemm"] = r["ms_median"] / gemm["ms_median"]
    for r in records:
        if "ms_median" not in r or r["impl"] in ("rlvr_kernels", bc.GEMM_IMPL) or tp_mod.is_tp(r):
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


def versions() -> dict:
    """Python's and the installed distributions' versions (None: not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "rlvr-kernels", "trl", "liger-kernel", "verl", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
