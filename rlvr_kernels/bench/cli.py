"""Benchmark of rlvr_kernels against plain torch, torch.compile, TRL, Liger, verl and the GEMM roofline.

Usage: ``rlvr-bench [--quick] [--out DIR]`` (or ``python -m rlvr_kernels.bench``, or ``python benchmarks/run.py`` in
a checkout; also ``--smoke`` for tiny shapes, ``--ops``, ``--impls``, ``--dtypes``, ``--repeats``, ``--append``,
``--list``; see ``--help``). Runs on whatever device is there: CUDA if available (bf16, the Qwen3-8B reference shape
N=8192, H=4096, V=151936 plus sweeps over N and V), else the CPU (fp32, scaled-down shapes).

Ops (record field ``op``): ``logprobs_fwd``, ``logprobs_fwd_bwd``, ``loss_fused``, ``token_pass`` (field ``case``
says which token op) and whole losses ``loss_<name>`` (the method cases generated from
:mod:`rlvr_kernels.methods`), and the vocabulary-parallel ``tp_logprobs_fwd_bwd`` / ``tp_loss_fused`` at the reference
shape per TP degree (field ``tp``: 1, 2, 4, or ``--tp``; gloo ranks on CPU, one NCCL rank per GPU;
:mod:`rlvr_kernels.bench.tp`); implementations (field ``impl``): ``rlvr_kernels`` (ours), the GEMM roofline of the op
(id ``cublas_gemm``: 1, 4 or 3 ``torch.mm`` GEMMs, field ``gemms``; shown as ``torch.mm (CPU)`` on a CPU and
``cuBLAS (torch.mm)`` on a GPU) and the peers. An implementation that cannot run gives a record with an ``error``
field saying why.

Measurement: each point runs in its own child process (:mod:`rlvr_kernels.bench.runner`); warm-up, then repeated
steps reported as median, interquartile range (p25, p75), min and the repeat count (:mod:`rlvr_kernels.bench.timing`);
every ratio divides medians measured in the same run.

Writes into ``--out DIR``, by default a new folder ``rlvr-bench-results/<device>-<date>`` in the current directory
(``-2``, ``-3``, ... when that exists; an existing non-empty ``--out`` is refused unless ``--overwrite`` or
``--append``): ``results.json`` (the records), ``results.csv``, ``results.md``, ``meta.json`` (versions, device,
threads, CPU count, load average, command line) and PNG plots (with matplotlib). ``python benchmarks/update_readme.py
DIR`` then regenerates the README's results block from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time

from rlvr_kernels import _info
from rlvr_kernels.bench import cases as bc
from rlvr_kernels.bench import report as br
from rlvr_kernels.bench import runner
from rlvr_kernels.bench import timing as timing_mod

DEFAULT_ROOT = "rlvr-bench-results"  # under the current working directory
BUSY_FRACTION = 0.8  # a 1-minute load average above this x the CPU count at the start marks the run busy


class OutputFolderError(RuntimeError):
    """The output folder cannot be used as asked (the message says why and what to pass instead)."""


def default_prog() -> str:
    """How this process was started, as a user would type it again."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "rlvr-bench" if base == "rlvr-bench" else "python -m rlvr_kernels.bench"


def claim_default_folder(root: str, name: str, *, append: bool = False) -> str:
    """A folder ``root/name`` that did not exist before (created here): ``name``, else ``name-2``, ``name-3``, ...
    Never an existing one, so that a run never overwrites another; with ``append`` the newest existing one."""
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, name)
    if append:
        last, k = None, 1
        while os.path.isdir(base if k == 1 else f"{base}-{k}"):
            last, k = (base if k == 1 else f"{base}-{k}"), k + 1
        if last is not None:
            return last
    k = 1
    while True:
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.makedirs(path)  # atomic: two runs started together get two folders
            return path
        except FileExistsError:
            k += 1


def prepare_explicit_folder(out: str, *, overwrite: bool, append: bool) -> str:
    """``out`` ready to write into: created when missing; an existing non-empty folder only with ``append`` (merge)
    or ``overwrite`` (the previous run's output files in it are removed first, nothing else)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputFolderError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not append:
        if not overwrite:
            raise OutputFolderError(
                f"--out {out} exists and is not empty; refusing to overwrite it. Pass --overwrite to replace the "
                f"results in it, --append to merge into them, or another --out (without --out every run gets a new "
                f"folder under ./{DEFAULT_ROOT}/)"
            )
        for name in br.OUTPUT_FILES:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    return out


def machine_state() -> dict:
    """Threads, CPUs and load average now; ``busy`` when the 1-minute load average exceeds BUSY_FRACTION x CPUs."""
    import torch

    cpus = os.cpu_count() or 1
    try:
        la = os.getloadavg()
        load = {"1m": round(la[0], 2), "5m": round(la[1], 2), "15m": round(la[2], 2)}
    except (OSError, AttributeError):  # not on every platform
        load = None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return dict(
        torch_num_threads=torch.get_num_threads(),
        torch_num_interop_threads=torch.get_num_interop_threads(),
        cpu_count=os.cpu_count(),
        cpus_usable=usable,
        loadavg=load,
        busy=bool(load is not None and load["1m"] > BUSY_FRACTION * cpus),
        busy_threshold=round(BUSY_FRACTION * cpus, 2),
    )


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        epilog="Without --out, results go to a new folder "
        "./rlvr-bench-results/<device>-<date> (-2, -3, ... when it exists).",
    )
    mode_g = ap.add_mutually_exclusive_group()
    mode_g.add_argument(
        "--quick", action="store_true", help="small shapes and sweeps, few repetitions (a few minutes on a 2-core CPU)"
    )
    mode_g.add_argument("--smoke", action="store_true", help="tiny shapes, 2-3 repetitions (tests the machinery)")
    ap.add_argument(
        "--out",
        default=None,
        help=f"output folder (default: a new ./{DEFAULT_ROOT}/<device>-<date>[-n]); "
        "an existing non-empty one needs --overwrite or --append",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing non-empty --out, replacing the results files there",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="merge into the results already in --out (default: the "
        "newest ./rlvr-bench-results/<device>-<date>[-n]), replacing the same points, instead of starting "
        "afresh; for runs split by --ops / --impls (ratios pair only records of the same run)",
    )
    ap.add_argument(
        "--ops", default=None, help="comma-separated op names or globs, e.g. 'logprobs_*,loss_fused,loss_dapo_*'"
    )
    ap.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations, e.g. 'rlvr_kernels,gemm,"
        "liger_grpo' (gemm, record id cublas_gemm: the torch.mm GEMM roofline on every device)",
    )
    ap.add_argument("--dtypes", default=None, help="comma-separated dtypes (fp32, bf16, fp16)")
    ap.add_argument(
        "--tp",
        default=None,
        help="comma-separated TP degrees of the tp_* ops (default 1,2,4; on CUDA at most the GPU count)",
    )
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="exactly R timed repeats per point (default: the mode's "
        "adaptive count, e.g. 3-20 within 0.25 s for a CPU --quick run)",
    )
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per point (default: the mode's)")
    ap.add_argument("--list", action="store_true", help="print the points that would run, and exit")
    ap.add_argument(
        "--start-method",
        default=None,
        choices=("spawn", "forkserver", "fork"),
        help="child processes (default: forkserver on CPU, spawn on CUDA)",
    )
    ap.add_argument("--point-timeout", type=float, default=None, help="seconds one point may take")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _print_plan(points: list, device: str) -> None:
    by_op: dict = {}
    for p in points:
        d = by_op.setdefault(p["op"], {"impls": {}, "cases": {}, "shapes": {}})
        d["impls"][bc.impl_label(p["impl"], device)] = None
        if p["case"]:
            d["cases"][p["case"]] = None
        d["shapes"][(p["N"], p["H"], p["V"], p["dtype"])] = None
    for op, d in by_op.items():
        cases = f" cases: {', '.join(d['cases'])};" if d["cases"] else ""
        print(f"{op}:{cases} impls: {', '.join(d['impls'])}; {len(d['shapes'])} shape(s)")
    print(f"{len(points)} points")


def _run_summary(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("run_id", "started", "command", "mode", "torch_num_threads", "loadavg", "busy")}


def main(argv=None, *, prog: str | None = None) -> int:
    """The benchmark's command line; returns the exit code (0: ran, 2: bad arguments or output folder)."""
    prog = prog or default_prog()
    ap = _parser(prog)
    args = ap.parse_args(argv)
    arg_list = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    started = dt.datetime.now()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        tp = [int(d) for d in split(args.tp)] if args.tp else None
    except ValueError:
        ap.error(f"--tp takes comma-separated integers, got {args.tp!r}")
    if tp and min(tp) < 1:
        ap.error(f"--tp degrees must be >= 1, got {args.tp!r}")
    points, cfg = runner.plan(
        device, mode, ops=split(args.ops), impls=split(args.impls), dtypes=split(args.dtypes), tp=tp
    )
    try:
        timing = timing_mod.timing_for(device, mode, repeats=args.repeats, warmup=args.warmup)
    except ValueError as exc:
        ap.error(str(exc))
    if args.list:
        _print_plan(points, device)
        return 0
    dev_name = runner.device_name(device)
    date = started.date().isoformat()
    try:
        if args.out:
            out = prepare_explicit_folder(args.out, overwrite=args.overwrite, append=args.append)
        else:
            out = claim_default_folder(
                os.path.join(os.getcwd(), DEFAULT_ROOT), f"{dev_name}-{date}", append=args.append
            )
    except OutputFolderError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    state = machine_state()
    if state["busy"]:
        print(
            f"WARNING: the machine is busy: 1-minute load average {state['loadavg']['1m']:.2f} on "
            f"{state['cpu_count']} CPUs (above {BUSY_FRACTION} x CPUs); the timings will be noisy. Stop other jobs "
            'or run again later (recorded as "busy": true in meta.json).',
            file=sys.stderr,
            flush=True,
        )
    run_id = f"{started.isoformat(timespec='seconds')}-{os.getpid()}"
    print(
        f"{len(points)} points on {dev_name} ({mode}, {timing['warmup']} warm-up + {timing['min_reps']}-"
        f"{timing['max_reps']} repeats, {state['torch_num_threads']} torch threads); writing {out}",
        flush=True,
    )
    # the native CPU kernels are built here, once, not inside a timed child; their state goes into meta.json
    native = _info.info(build=device == "cpu")["native"]
    timeout = args.point_timeout or (120.0 if mode == "smoke" else 300.0 if mode == "quick" else 900.0)
    results = runner.run_points(
        points, device, timing, start_method=args.start_method, point_timeout=timeout, progress=not args.no_progress
    )
    records = runner.make_records(points, results, dev_name, run_id)
    versions = runner.versions()
    meta = dict(
        device=dev_name,
        device_kind=device,
        device_full_name=runner.device_full_name(device),
        date=date,
        started=started.isoformat(timespec="seconds"),
        run_id=run_id,
        mode=mode,
        prog=prog,
        command=shlex.join(shlex.split(prog) + arg_list),
        argv=arg_list,
        reference=dict(zip(("N", "H", "V"), cfg["ref"]), dtype=cfg["dtypes"][0], T=cfg["T"]),
        n_sweep=list(cfg["n_sweep"]),
        v_sweep=list(cfg["v_sweep"]),
        timing=timing,
        gemm_baseline=bc.impl_label(bc.GEMM_IMPL, device),
        torch=torch.__version__,
        **state,
        platform=platform.platform(),
        python=platform.python_version(),
        versions=versions,
        native=native,
    )
    runs = [_run_summary(meta)]
    if args.append and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            records = runner.merge_records(json.load(f), records)
        try:
            with open(os.path.join(out, "meta.json")) as f:
                old = json.load(f)
            runs = old.get("runs") or [_run_summary(old)]
            runs.append(_run_summary(meta))
        except (OSError, ValueError):
            pass
    meta["runs"] = runs  # every invocation whose records are in the folder (one, unless --append)
    meta["busy"] = any(bool(r.get("busy")) for r in runs)
    runner.add_ratios(records)
    try:
        meta["loadavg_end"] = dict(zip(("1m", "5m", "15m"), (round(x, 2) for x in os.getloadavg())))
    except (OSError, AttributeError):
        meta["loadavg_end"] = None
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    br.write_all(records, meta, out)
    if not args.no_plots:
        from rlvr_kernels.bench import plots  # matplotlib only when drawing

        plots.write_plots(records, meta, out)
    n_err = sum("error" in r for r in records)
    print("\n" + br.summary_markdown(records, meta).rstrip())
    if state["busy"]:
        print("\n" + br.busy_note(meta))
    print(f"\n{len(records)} records ({n_err} with an error) in {meta['wall_s']:.0f} s; wrote {out}")
    return 0
