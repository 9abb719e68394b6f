"""PNG plots of a run (matplotlib, only when it is installed): time and peak memory against N and V per op, the token
pass, and the whole losses. Times are medians with whiskers from the interquartile range of the repeats; the GEMM
roofline is named as it ran (``torch.mm (CPU)`` on a CPU, ``cuBLAS (torch.mm)`` on a GPU)."""

from __future__ import annotations

import os

from rlvr_kernels.bench.cases import GEMM_IMPL, impl_label
from rlvr_kernels.bench.report import CORE_OPS, OP_TITLES, _at, reference_of

STYLE = {  # impl -> (colour, line style); the same in every plot
    "rlvr_kernels": ("tab:red", "-"),
    "rlvr_kernels_composable": ("lightcoral", "-"),
    GEMM_IMPL: ("black", "--"),
    "torch_full_logits": ("tab:blue", "-"),
    "torch_compile": ("tab:cyan", "-"),
    "trl_unfused": ("tab:green", "-"),
    "trl_chunked": ("tab:olive", "-"),
    "liger_flsce": ("tab:orange", "-"),
    "liger_grpo": ("tab:brown", "-"),
    "verl_triton": ("tab:purple", "-"),
    "verl_torch": ("tab:pink", "-"),
    "torch_reference": ("tab:gray", "--"),
}


def _series(records, ref, op, axis):
    """impl -> sorted [(x, ms, MiB, p25, p75)] along N (at the reference H, V) or V (at the reference N, H); p25 / p75
    are the median itself for records without repeats' quantiles."""
    out: dict = {}
    for r in records:
        if r["op"] != op or r["dtype"] != ref["dtype"] or r["H"] != ref["H"] or "ms_median" not in r:
            continue
        if axis == "N" and r["V"] != ref["V"]:
            continue
        if axis == "V" and r["N"] != ref["N"]:
            continue
        key = r["impl"] if op != "token_pass" else (r["case"], r["impl"])
        med = r["ms_median"]
        out.setdefault(key, []).append((r[axis], med, r["peak_mem_mib"], r.get("ms_p25", med), r.get("ms_p75", med)))
    return {k: sorted(v) for k, v in out.items()}


def _yerr(pts):
    """Asymmetric whiskers from the IQR: [median - p25, p75 - median]."""
    return [[max(0.0, p[1] - p[3]) for p in pts], [max(0.0, p[4] - p[1]) for p in pts]]


def _style(impl):
    return STYLE.get(impl, (None, "-"))


def _device_kind(meta: dict) -> str:
    return meta.get("device_kind") or ("cpu" if str(meta.get("device", "")).startswith("cpu") else "cuda")


def plot_op(records, meta, op, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_of(records, meta)
    kind = _device_kind(meta)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    drawn = False
    for col, axis in enumerate(("N", "V")):
        series = _series(records, ref, op, axis)
        for impl, pts in series.items():
            colour, ls = _style(impl)
            xs = [p[0] for p in pts]
            lw = 2.6 if impl == "rlvr_kernels" else 1.4
            name = impl_label(impl, kind)
            axes[0, col].errorbar(
                xs, [p[1] for p in pts], yerr=_yerr(pts), marker="o", color=colour, ls=ls, lw=lw, capsize=3, label=name
            )
            if impl != GEMM_IMPL:
                axes[1, col].plot(xs, [p[2] for p in pts], marker="o", color=colour, ls=ls, lw=lw, label=name)
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
        axes[0, col].set_ylabel("ms (median, whiskers: IQR)")
        axes[1, col].set_ylabel("MiB above inputs")
    if not drawn:
        plt.close(fig)
        return False
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="upper center",
        ncol=6,
        frameon=False,
        bbox_to_anchor=(0.5, 0.935),
        fontsize=9,
    )
    failed = sorted({impl_label(r["impl"], kind) for r in records if r["op"] == op and "error" in r})
    note = f"not run here: {', '.join(failed)} (see results.md)" if failed else ""
    fig.suptitle(
        f"{op}: {OP_TITLES.get(op, '')}\n{meta['device']}, {ref['dtype']}; roofline {impl_label(GEMM_IMPL, kind)}",
        fontsize=11,
        y=0.99,
    )
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
        a0.errorbar(
            xs,
            [p[1] for p in pts],
            yerr=_yerr(pts),
            marker="o",
            color=colour,
            ls=ls,
            capsize=3,
            label=f"{case} ({impl})",
        )
        if fwd and impl == "rlvr_kernels":
            f = {p[0]: p[1] for p in fwd}
            rx = [x for x in xs if x in f]
            a1.plot(rx, [100 * p[1] / f[p[0]] for p in pts if p[0] in f], marker="o", color=colour, label=case)
    if fwd:
        a0.errorbar(
            [p[0] for p in fwd],
            [p[1] for p in fwd],
            yerr=_yerr(fwd),
            color="tab:red",
            lw=2.6,
            capsize=3,
            label="forward vocab pass (ours)",
        )
        a1.axhline(5.0, color="black", ls=":", label="5% target")
    for ax in (a0, a1):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.grid(True, which="both", alpha=0.3)
    a0.set_yscale("log")
    a0.set_ylabel("ms (median, whiskers: IQR)")
    a0.set_title("time vs N")
    a1.set_yscale("log")
    a1.set_ylabel("% of our forward vocab pass (medians)")
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
    kind = _device_kind(meta)
    rows = [r for r in _at(records, ref, N=ref["N"]) if r["op"].startswith("loss_") and r["op"] != "loss_fused"]
    names = list(dict.fromkeys(r["op"] for r in rows))
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(names) + 1.8))
    ys = range(len(names))
    for k, impl in enumerate(("rlvr_kernels", "liger_grpo")):
        vals, lo, hi = [], [], []
        for op in names:
            r = next((r for r in rows if r["op"] == op and r["impl"] == impl and "ms_median" in r), None)
            med = r["ms_median"] if r else 0.0
            vals.append(med)
            lo.append(max(0.0, med - r.get("ms_p25", med)) if r else 0.0)
            hi.append(max(0.0, r.get("ms_p75", med) - med) if r else 0.0)
        ax.barh(
            [y + (k - 0.5) * 0.38 for y in ys],
            vals,
            height=0.38,
            xerr=[lo, hi],
            capsize=2,
            color=_style(impl)[0],
            label=impl,
        )
    gemm = next((r for r in _at(records, ref, N=ref["N"], op="loss_fused", impl=GEMM_IMPL) if "ms_median" in r), None)
    if gemm:
        ax.axvline(
            gemm["ms_median"], color="black", ls="--", label=f"3 GEMMs, {impl_label(GEMM_IMPL, kind)} (roofline)"
        )
    missing = [
        op for op in names if not any(r["op"] == op and r["impl"] == "rlvr_kernels" and "ms_median" in r for r in rows)
    ]
    ax.set_yticks(list(ys))
    ax.set_yticklabels([n + ("  (not available)" if n in missing else "") for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("ms (median, whiskers: IQR), forward + backward")
    ax.set_title(f"whole losses at N={ref['N']}, H={ref['H']}, V={ref['V']}, {ref['dtype']}; {meta['device']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records, meta, out) -> list:
    """The plots of a run into ``out`` (none, with a message, when matplotlib is not installed)."""
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
