"""Writing a benchmark run: results.json, results.csv, meta.json, results.md (markdown tables) and PNG plots.

``summary_markdown`` is shared with ``update_readme.py``, which puts the same tables into the README.
"""
from __future__ import annotations

import csv
import json
import os

MAIN_FIELDS = ["op", "impl", "case", "device", "dtype", "N", "H", "V", "B", "T", "ms_median", "peak_mem_mib",
               "ratio_vs_gemm", "ours_time_ratio", "ours_mem_ratio", "ratio_vs_vocab_pass", "gemms", "ms_min", "reps",
               "grads_mib", "extra_mem_mib", "warmup_s", "error"]
CORE_OPS = ("logprobs_fwd", "logprobs_fwd_bwd", "loss_fused")
OP_TITLES = {
    "logprobs_fwd": "forward: log-prob + entropy from hidden states (no grad); roofline 1 GEMM",
    "logprobs_fwd_bwd": "composable forward + backward of sum(logp) + sum(entropy); roofline 4 GEMMs",
    "loss_fused": "DAPO loss from hidden states, forward + backward; roofline 3 GEMMs",
    "token_pass": "token-level ops on [B, T] inputs",
}
STYLE = {  # impl -> (colour, line style); the same in every plot
    "rlvr_kernels": ("tab:red", "-"),
    "rlvr_kernels_composable": ("lightcoral", "-"),
    "cublas_gemm": ("black", "--"),
    "torch_full_logits": ("tab:blue", "-"),
    "torch_compile": ("tab:cyan", "-"),
    "trl_unfused": ("tab:green", "-"),
    "liger_flsce": ("tab:orange", "-"),
    "liger_grpo": ("tab:brown", "-"),
    "verl_triton": ("tab:purple", "-"),
    "verl_torch": ("tab:pink", "-"),
    "torch_reference": ("tab:gray", "--"),
}


# ----------------------------------------------------------------------------------------------------------------
# numbers


def fmt_ms(x) -> str:
    if x is None:
        return ""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"


def fmt_mib(x) -> str:
    if x is None:
        return ""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _cell(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def reference_of(records: list, meta: dict | None) -> dict:
    """The reference point ``{N, H, V, dtype}``: from meta.json, else the shape with the most records."""
    if meta and meta.get("reference"):
        return meta["reference"]
    counts: dict = {}
    for r in records:
        if r["op"] in CORE_OPS:
            k = (r["N"], r["H"], r["V"], r["dtype"])
            counts[k] = counts.get(k, 0) + 1
    n, h, v, d = max(counts, key=counts.get)
    return dict(N=n, H=h, V=v, dtype=d)


def _at(records, ref, **kw):
    out = []
    for r in records:
        if r["dtype"] != ref["dtype"] or r["H"] != ref["H"] or r["V"] != ref["V"]:
            continue
        if all(r.get(k) == v for k, v in kw.items()):
            out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# markdown


def summary_markdown(records: list, meta: dict | None, *, heading: str = "###") -> str:
    """Tables at the reference shape: the three vocabulary-pass ops, the token pass, the whole losses."""
    ref = reference_of(records, meta)
    n0 = ref["N"]
    lines = []
    shape = f"N={n0}, H={ref['H']}, V={ref['V']}, {ref['dtype']}"
    lines += [f"{heading} Vocabulary pass at {shape}", "",
              "| op | impl | ms | x GEMM roofline | peak MiB | ours / this (time) | ours / this (memory) |",
              "|---|---|---|---|---|---|---|"]
    for op in CORE_OPS:
        for r in _at(records, ref, op=op, N=n0):
            if "error" in r:
                lines.append(f"| {op} | {r['impl']} | not run: {_cell(r['error'])} | | | | |")
                continue
            impl = f"**{r['impl']}**" if r["impl"] == "rlvr_kernels" else r["impl"]
            if r["impl"] == "cublas_gemm":
                impl = f"cublas_gemm (x{r.get('gemms', '?')})"
            lines.append(f"| {op} | {impl} | {fmt_ms(r['ms_median'])} | {fmt_ratio(r.get('ratio_vs_gemm'))} | "
                         f"{fmt_mib(r['peak_mem_mib'])} | {fmt_ratio(r.get('ours_time_ratio'))} | "
                         f"{fmt_ratio(r.get('ours_mem_ratio'))} |")
    tok = [r for r in records if r["op"] == "token_pass" and r["dtype"] == ref["dtype"]]
    if tok:
        ns = sorted({r["N"] for r in tok})
        nt = n0 if n0 in ns else ns[-1]
        T = next(r["T"] for r in tok if r["N"] == nt)
        lines += ["", f"{heading} Token pass at N={nt} (B={nt // T}, T={T})", "",
                  "| op | impl | ms | % of our forward vocab pass |", "|---|---|---|---|"]
        for r in tok:
            if r["N"] != nt:
                continue
            name = f"token_pass/{r['case']}"
            if "error" in r:
                lines.append(f"| {name} | {r['impl']} | not run: {_cell(r['error'])} | |")
            else:
                pct = r.get("ratio_vs_vocab_pass")
                lines.append(f"| {name} | {r['impl']} | {fmt_ms(r['ms_median'])} | "
                             f"{'' if pct is None else f'{100 * pct:.1f}'} |")
    losses = [r for r in _at(records, ref, N=n0) if r["op"].startswith("loss_") and r["op"] != "loss_fused"]
    if losses:
        lines += ["", f"{heading} Whole losses (forward + backward) at {shape}", "",
                  "| loss | rlvr_kernels ms | x 3 GEMMs | peak MiB | Liger ms | ours / Liger (time) | "
                  "ours / Liger (memory) |", "|---|---|---|---|---|---|---|"]
        for op in dict.fromkeys(r["op"] for r in losses):
            ours = next((r for r in losses if r["op"] == op and r["impl"] == "rlvr_kernels"), None)
            lig = next((r for r in losses if r["op"] == op and r["impl"] == "liger_grpo"), None)
            if ours is None:
                continue
            if "error" in ours:
                cells = [f"not run: {_cell(ours['error'], 80)}", "", ""]
            else:
                cells = [fmt_ms(ours["ms_median"]), fmt_ratio(ours.get("ratio_vs_gemm")), fmt_mib(ours["peak_mem_mib"])]
            if lig is None:
                cells += ["–", "", ""]
            elif "error" in lig:
                cells += [f"not run: {_cell(lig['error'], 60)}", "", ""]
            else:
                cells += [fmt_ms(lig["ms_median"]), fmt_ratio(lig.get("ours_time_ratio")),
                          fmt_ratio(lig.get("ours_mem_ratio"))]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def full_table(records: list) -> str:
    lines = ["| op | impl | dtype | N x H x V | ms (median) | x GEMM roofline | peak MiB | ours / this (time) | "
             "ours / this (memory) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        op = r["op"] + (f"/{r['case']}" if r.get("case") else "")
        shape = f"{r['N']} x {r['H']} x {r['V']}"
        if "error" in r:
            lines.append(f"| {op} | {r['impl']} | {r['dtype']} | {shape} | not run: {_cell(r['error'])} | | | | |")
        else:
            lines.append(f"| {op} | {r['impl']} | {r['dtype']} | {shape} | {fmt_ms(r['ms_median'])} | "
                         f"{fmt_ratio(r.get('ratio_vs_gemm'))} | {fmt_mib(r['peak_mem_mib'])} | "
                         f"{fmt_ratio(r.get('ours_time_ratio'))} | {fmt_ratio(r.get('ours_mem_ratio'))} |")
    return "\n".join(lines) + "\n"


HOW_TO_READ = """\
How to read: every number is measured in one run, each point in its own child process. *ms* is the median of
repeated steps after warm-up. *x GEMM roofline* divides by the op's GEMM-only floor measured in the same run
(`cublas_gemm`: 1 `[N,H]x[H,V]` GEMM for the forward, 4 for the composable forward+backward, 3 for the fused
loss; on CPU it is the same `torch.mm`, MKL/oneDNN rather than cuBLAS). *peak MiB* is the memory the step adds on
top of its inputs (GPU: `max_memory_allocated`; CPU: growth of the process's resident set), gradients included.
*ours / this* is rlvr_kernels' time (memory) over that row's: below 1 means we are faster (leaner).
`not run` rows say why a peer could not run on this device.
"""


def write_markdown(records: list, meta: dict, path: str) -> None:
    v = meta.get("versions", {})
    peers = ", ".join(f"{k} {v[k]}" for k in ("trl", "liger-kernel", "verl", "transformers") if v.get(k))
    head = [f"# Benchmark: {meta['device']}, {meta['date']}", "",
            f"`python benchmarks/run.py {' '.join(meta.get('argv') or [])}`".replace(" `", "`"),
            f"(mode {meta['mode']}, {meta.get('cpu_count')} CPUs, torch {v.get('torch')}, triton {v.get('triton')}; "
            f"{peers}; wall time {meta.get('wall_s', 0):.0f} s).", "", HOW_TO_READ,
            summary_markdown(records, meta, heading="##"), "## All records", "", full_table(records)]
    with open(path, "w") as f:
        f.write("\n".join(head))


def write_csv(records: list, path: str) -> None:
    extra = sorted({k for r in records for k in r} - set(MAIN_FIELDS))
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=MAIN_FIELDS + extra, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(records)


# ----------------------------------------------------------------------------------------------------------------
# plots


def _series(records, ref, op, axis):
    """impl -> sorted [(x, ms, MiB)] along N (at the reference H, V) or V (at the reference N, H)."""
    out: dict = {}
    for r in records:
        if r["op"] != op or r["dtype"] != ref["dtype"] or r["H"] != ref["H"] or "ms_median" not in r:
            continue
        if axis == "N" and r["V"] != ref["V"]:
            continue
        if axis == "V" and r["N"] != ref["N"]:
            continue
        key = r["impl"] if op != "token_pass" else (r["case"], r["impl"])
        out.setdefault(key, []).append((r[axis], r["ms_median"], r["peak_mem_mib"]))
    return {k: sorted(v) for k, v in out.items()}


def _style(impl):
    return STYLE.get(impl, (None, "-"))


def plot_op(records, meta, op, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_of(records, meta)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    drawn = False
    for col, axis in enumerate(("N", "V")):
        series = _series(records, ref, op, axis)
        for impl, pts in series.items():
            colour, ls = _style(impl)
            xs = [p[0] for p in pts]
            lw = 2.6 if impl == "rlvr_kernels" else 1.4
            axes[0, col].plot(xs, [p[1] for p in pts], marker="o", color=colour, ls=ls, lw=lw, label=impl)
            if impl != "cublas_gemm":
                axes[1, col].plot(xs, [p[2] for p in pts], marker="o", color=colour, ls=ls, lw=lw, label=impl)
            drawn = True
        fixed = f"H={ref['H']}, V={ref['V']}" if axis == "N" else f"N={ref['N']}, H={ref['H']}"
        axes[0, col].set_title(f"time vs {axis} ({fixed})")
        axes[1, col].set_title(f"peak memory vs {axis} ({fixed})")
        for row in (0, 1):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens N" if axis == "N" else "vocabulary V")
            ax.grid(True, which="both", alpha=0.3)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("ms (median)")
        axes[1, col].set_ylabel("MiB above inputs")
    if not drawn:
        plt.close(fig)
        return False
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=6, frameon=False,
               bbox_to_anchor=(0.5, 0.935), fontsize=9)
    failed = sorted({r["impl"] for r in records if r["op"] == op and "error" in r})
    note = f"not run here: {', '.join(failed)} (see results.md)" if failed else ""
    fig.suptitle(f"{op}: {OP_TITLES.get(op, '')}\n{meta['device']}, {ref['dtype']}", fontsize=11, y=0.99)
    fig.text(0.5, 0.01, note, ha="center", fontsize=9, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.87))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_token_pass(records, meta, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_of(records, meta)
    series = _series(records, ref, "token_pass", "N")
    if not series:
        return False
    fwd = _series(records, ref, "logprobs_fwd", "N").get("rlvr_kernels")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10")
    cases = sorted({k[0] for k in series})
    for (case, impl), pts in series.items():
        colour = cmap(cases.index(case) % 10)
        ls = "-" if impl == "rlvr_kernels" else "--"
        xs = [p[0] for p in pts]
        a0.plot(xs, [p[1] for p in pts], marker="o", color=colour, ls=ls, label=f"{case} ({impl})")
        if fwd and impl == "rlvr_kernels":
            f = dict((p[0], p[1]) for p in fwd)
            rx = [x for x in xs if x in f]
            a1.plot(rx, [100 * p[1] / f[p[0]] for p in pts if p[0] in f], marker="o", color=colour, label=case)
    if fwd:
        a0.plot([p[0] for p in fwd], [p[1] for p in fwd], color="tab:red", lw=2.6, label="forward vocab pass (ours)")
        a1.axhline(5.0, color="black", ls=":", label="5% target")
    for ax in (a0, a1):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.grid(True, which="both", alpha=0.3)
    a0.set_yscale("log")
    a0.set_ylabel("ms (median)")
    a0.set_title("time vs N")
    a1.set_yscale("log")
    a1.set_ylabel("% of our forward vocab pass")
    a1.set_title(f"share of the forward vocab pass (H={ref['H']}, V={ref['V']})")
    a0.legend(fontsize=7)
    a1.legend(fontsize=7)
    fig.suptitle(f"token_pass: {OP_TITLES['token_pass']}; {meta['device']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_losses(records, meta, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_of(records, meta)
    rows = [r for r in _at(records, ref, N=ref["N"]) if r["op"].startswith("loss_") and r["op"] != "loss_fused"]
    names = list(dict.fromkeys(r["op"] for r in rows))
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(names) + 1.8))
    ys = range(len(names))
    for k, impl in enumerate(("rlvr_kernels", "liger_grpo")):
        vals = []
        for op in names:
            r = next((r for r in rows if r["op"] == op and r["impl"] == impl and "ms_median" in r), None)
            vals.append(r["ms_median"] if r else 0.0)
        ax.barh([y + (k - 0.5) * 0.38 for y in ys], vals, height=0.38, color=_style(impl)[0], label=impl)
    gemm = next((r for r in _at(records, ref, N=ref["N"], op="loss_fused", impl="cublas_gemm") if "ms_median" in r),
                None)
    if gemm:
        ax.axvline(gemm["ms_median"], color="black", ls="--", label="3 GEMMs (roofline)")
    missing = [op for op in names if not any(r["op"] == op and r["impl"] == "rlvr_kernels" and "ms_median" in r
                                             for r in rows)]
    ax.set_yticks(list(ys))
    ax.set_yticklabels([n + ("  (not available)" if n in missing else "") for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("ms (median), forward + backward")
    ax.set_title(f"whole losses at N={ref['N']}, H={ref['H']}, V={ref['V']}, {ref['dtype']}; {meta['device']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records, meta, out) -> list:
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib, or the package's bench extra): no plots")
        return written
    for op in CORE_OPS:
        path = os.path.join(out, f"{op}.png")
        if plot_op(records, meta, op, path):
            written.append(path)
    for name, fn in (("token_pass.png", plot_token_pass), ("losses.png", plot_losses)):
        path = os.path.join(out, name)
        if fn(records, meta, path):
            written.append(path)
    return written


def write_all(records: list, meta: dict, out: str, *, plots: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_csv(records, os.path.join(out, "results.csv"))
    write_markdown(records, meta, os.path.join(out, "results.md"))
    if plots:
        write_plots(records, meta, out)
