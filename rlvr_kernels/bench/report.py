"""Writing a benchmark run: results.json, results.csv, meta.json and results.md (markdown tables); plots.py draws.

:func:`summary_markdown` is shared with :mod:`rlvr_kernels.bench.readme_table`, which puts the same tables into the
README. Times are shown as the median with the interquartile range (p25-p75) of the repeats next to it; records of
older runs, which kept only the median and the minimum, show an empty IQR cell.
"""

from __future__ import annotations

import csv
import json
import os

from rlvr_kernels.bench.cases import GEMM_IMPL, RAGGED_OP, impl_label, ragged_lengths, valid_tokens

MAIN_FIELDS = [
    "op",
    "impl",
    "case",
    "device",
    "dtype",
    "N",
    "H",
    "V",
    "B",
    "T",
    "ms_median",
    "ms_p25",
    "ms_p75",
    "ms_min",
    "ms_max",
    "reps",
    "peak_mem_mib",
    "ratio_vs_gemm",
    "ours_time_ratio",
    "ours_mem_ratio",
    "ratio_vs_vocab_pass",
    "gemms",
    "impl_label",
    "grads_mib",
    "extra_mem_mib",
    "warmup",
    "warmup_s",
    "run_id",
    "error",
]
CORE_OPS = ("logprobs_fwd", "logprobs_fwd_bwd", "loss_fused")
OP_TITLES = {
    "logprobs_fwd": "forward: log-prob + entropy from hidden states (no grad); roofline 1 GEMM",
    "logprobs_fwd_bwd": "composable forward + backward of sum(logp) + sum(entropy); roofline 4 GEMMs",
    "loss_fused": "DAPO loss from hidden states, forward + backward; roofline 3 GEMMs",
    "token_pass": "token-level ops on [B, T] inputs",
    RAGGED_OP: "the DAPO loss on a batch of rows with T/4 ... T loss tokens (the rest padding); time per valid token",
    "tp_logprobs_fwd_bwd": "vocabulary-parallel lm_head: composable forward + backward, per TP degree",
    "tp_loss_fused": "vocabulary-parallel lm_head: fused DAPO loss, forward + backward, per TP degree",
}
TP_OPS = ("tp_logprobs_fwd_bwd", "tp_loss_fused")
# Files a run writes into its folder (``--overwrite`` removes these, and only these, before writing).
OUTPUT_FILES = ("results.json", "results.csv", "results.md", "meta.json") + tuple(
    f"{name}.png" for name in CORE_OPS + ("token_pass", "losses")
)


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


def fmt_iqr(r: dict) -> str:
    """``p25–p75`` of a record's repeats ('' for records without them)."""
    if r.get("ms_p25") is None or r.get("ms_p75") is None:
        return ""
    return f"{fmt_ms(r['ms_p25'])}–{fmt_ms(r['ms_p75'])}"


def fmt_ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"


def fmt_mib(x) -> str:
    if x is None:
        return ""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _cell(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def label(r: dict) -> str:
    """A record's implementation as text shows it (the GEMM roofline: ``torch.mm (CPU)`` / ``cuBLAS (torch.mm)``)."""
    return impl_label(r["impl"], r.get("device", ""))


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


def command_of(meta: dict) -> str:
    """The command line of a run (older runs recorded only the arguments of ``python benchmarks/run.py``)."""
    if meta.get("command"):
        return meta["command"]
    return " ".join(["python benchmarks/run.py"] + list(meta.get("argv") or []))


def busy_note(meta: dict) -> str:
    """A warning line when the machine was busy at the start of the run ('' otherwise)."""
    if not meta.get("busy"):
        return ""
    runs = [r for r in (meta.get("runs") or [meta]) if r.get("busy")] or [meta]
    load = max((r.get("loadavg") or {}).get("1m") or 0.0 for r in runs)
    return (
        f"**Warning: the machine was busy** (1-minute load average {load:.2f} at the start on "
        f"{meta.get('cpu_count')} CPUs): the figures are noisy."
    )


# ----------------------------------------------------------------------------------------------------------------
# markdown


def summary_markdown(records: list, meta: dict | None, *, heading: str = "###") -> str:
    """Tables at the reference shape: the three vocabulary-pass ops, the token pass, the whole losses."""
    ref = reference_of(records, meta)
    n0 = ref["N"]
    lines = []
    shape = f"N={n0}, H={ref['H']}, V={ref['V']}, {ref['dtype']}"
    lines += [
        f"{heading} Vocabulary pass at {shape}",
        "",
        "| op | impl | ms (median) | IQR (ms) | x GEMM roofline | peak MiB | ours / this (time) | "
        "ours / this (memory) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op in CORE_OPS:
        for r in _at(records, ref, op=op, N=n0):
            if "error" in r:
                lines.append(f"| {op} | {label(r)} | not run: {_cell(r['error'])} | | | | | |")
                continue
            impl = f"**{r['impl']}**" if r["impl"] == "rlvr_kernels" else label(r)
            if r["impl"] == GEMM_IMPL:
                impl = f"{label(r)} x{r.get('gemms', '?')}"
            lines.append(
                f"| {op} | {impl} | {fmt_ms(r['ms_median'])} | {fmt_iqr(r)} | "
                f"{fmt_ratio(r.get('ratio_vs_gemm'))} | {fmt_mib(r['peak_mem_mib'])} | "
                f"{fmt_ratio(r.get('ours_time_ratio'))} | {fmt_ratio(r.get('ours_mem_ratio'))} |"
            )
    tok = [r for r in records if r["op"] == "token_pass" and r["dtype"] == ref["dtype"]]
    if tok:
        ns = sorted({r["N"] for r in tok})
        nt = n0 if n0 in ns else ns[-1]
        T = next(r["T"] for r in tok if r["N"] == nt)
        lines += [
            "",
            f"{heading} Token pass at N={nt} (B={nt // T}, T={T})",
            "",
            "| op | impl | ms (median) | IQR (ms) | % of our forward vocab pass |",
            "|---|---|---|---|---|",
        ]
        for r in tok:
            if r["N"] != nt:
                continue
            name = f"token_pass/{r['case']}"
            if "error" in r:
                lines.append(f"| {name} | {label(r)} | not run: {_cell(r['error'])} | | |")
            else:
                pct = r.get("ratio_vs_vocab_pass")
                lines.append(
                    f"| {name} | {label(r)} | {fmt_ms(r['ms_median'])} | {fmt_iqr(r)} | "
                    f"{'' if pct is None else f'{100 * pct:.1f}'} |"
                )
    ragged = list(_at(records, ref, op=RAGGED_OP, N=n0))
    if ragged:
        T = ragged[0]["T"]
        valid = valid_tokens(ragged[0])
        lengths = ragged_lengths(n0 // T, T)
        lines += [
            "",
            f"{heading} Fused loss on a ragged batch at {shape}: {valid} of {n0} positions are loss tokens "
            f"(rows of {min(lengths)} ... {max(lengths)} of T={T})",
            "",
            "| impl | ms (median) | IQR (ms) | us per valid token | x 3 GEMMs over all positions | peak MiB | "
            "ours / this (time) | ours / this (memory) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ragged:
            if "error" in r:
                lines.append(f"| {label(r)} | not run: {_cell(r['error'])} | | | | | | |")
                continue
            impl = f"**{r['impl']}**" if r["impl"] == "rlvr_kernels" else label(r)
            lines.append(
                f"| {impl} | {fmt_ms(r['ms_median'])} | {fmt_iqr(r)} | {1000.0 * r['ms_median'] / max(1, valid):.3g} "
                f"| {fmt_ratio(r.get('ratio_vs_gemm'))} | {fmt_mib(r['peak_mem_mib'])} | "
                f"{fmt_ratio(r.get('ours_time_ratio'))} | {fmt_ratio(r.get('ours_mem_ratio'))} |"
            )
    losses = [
        r for r in _at(records, ref, N=n0) if r["op"].startswith("loss_") and r["op"] not in ("loss_fused", RAGGED_OP)
    ]
    if losses:
        lines += [
            "",
            f"{heading} Whole losses (forward + backward) at {shape}",
            "",
            "| loss | rlvr_kernels ms (median) | IQR (ms) | x 3 GEMMs | peak MiB | Liger ms (median) | "
            "Liger IQR (ms) | ours / Liger (time) | ours / Liger (memory) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for op in dict.fromkeys(r["op"] for r in losses):
            ours = next((r for r in losses if r["op"] == op and r["impl"] == "rlvr_kernels"), None)
            lig = next((r for r in losses if r["op"] == op and r["impl"] == "liger_grpo"), None)
            if ours is None:
                continue
            if "error" in ours:
                cells = [f"not run: {_cell(ours['error'], 80)}", "", "", ""]
            else:
                cells = [
                    fmt_ms(ours["ms_median"]),
                    fmt_iqr(ours),
                    fmt_ratio(ours.get("ratio_vs_gemm")),
                    fmt_mib(ours["peak_mem_mib"]),
                ]
            if lig is None:
                cells += ["–", "", "", ""]
            elif "error" in lig:
                cells += [f"not run: {_cell(lig['error'], 60)}", "", "", ""]
            else:
                cells += [
                    fmt_ms(lig["ms_median"]),
                    fmt_iqr(lig),
                    fmt_ratio(lig.get("ours_time_ratio")),
                    fmt_ratio(lig.get("ours_mem_ratio")),
                ]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += tp_markdown(records, heading=heading)
    return "\n".join(lines) + "\n"


def fmt_bytes(x) -> str:
    if not x:
        return "0"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x} B"


def tp_markdown(records: list, *, heading: str = "###") -> list:
    """Lines of the "per TP degree" table of the vocabulary-parallel ops (none without such records)."""
    tp = [r for r in records if r["op"] in TP_OPS]
    lines = []
    for key in dict.fromkeys((r["dtype"], r["N"], r["H"], r["V"]) for r in tp):
        rows = sorted((r for r in tp if (r["dtype"], r["N"], r["H"], r["V"]) == key), key=lambda r: (r["op"], r["tp"]))
        dtype, n, h, v = key
        lines += [
            "",
            f"{heading} Vocabulary-parallel lm_head per TP degree at N={n}, H={h}, V={v}, {dtype} (V/TP rows per rank)",
            "",
            "| op | TP | threads per rank | ms (median, slowest rank) | IQR (ms) | x TP=1 time | peak MiB per rank | "
            "x TP=1 memory | bytes exchanged per rank per step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        how = set()
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['tp']} | not run: {_cell(r['error'])} | | | | | | |")
                continue
            how.add(r.get("mem_measure"))
            over = " (oversubscribed)" if r.get("oversubscribed") else ""
            lines.append(
                f"| {r['op']} | {r['tp']} | {r.get('threads_per_rank', '?')}{over} | "
                f"{fmt_ms(r['ms_median'])} | {fmt_iqr(r)} | {fmt_ratio(r.get('time_ratio_vs_tp1'))} | "
                f"{fmt_mib(r['peak_mem_mib'])} | {fmt_ratio(r.get('mem_ratio_vs_tp1'))} | "
                f"{fmt_bytes(r.get('comm_bytes'))} |"
            )
        mem = (
            "`max_memory_allocated` during the timed steps minus the inputs"
            if how == {"cuda_max_memory_allocated"}
            else "the growth of the rank process's peak resident set (VmHWM, reset after warm-up) during the timed "
            "steps, gradients included"
        )
        lines += [
            "",
            "Each step is timed on every rank after a barrier; the time of a step is the slowest rank's. *peak MiB per "
            f"rank*: the largest over the ranks of {mem}. *Bytes exchanged* are computed, not measured: the all-gather "
            "of 3 fp64 statistics per row (3 x N x 8) plus the fp32 dX all-reduce (N x H x 4); none at TP=1. Ratios "
            "divide by TP=1 of the same op in the same run; TP=1 runs the same tp_group code on a group of one.",
        ]
    return lines


def full_table(records: list) -> str:
    lines = [
        "| op | impl | dtype | N x H x V | ms (median) | IQR (ms) | min (ms) | repeats | x GEMM roofline | "
        "peak MiB | ours / this (time) | ours / this (memory) |",
        "|---" * 12 + "|",
    ]
    for r in records:
        op = r["op"] + (f"/{r['case']}" if r.get("case") else "")
        shape = f"{r['N']} x {r['H']} x {r['V']}"
        if "error" in r:
            lines.append(f"| {op} | {label(r)} | {r['dtype']} | {shape} | not run: {_cell(r['error'])} | | | | | | | |")
        else:
            lines.append(
                f"| {op} | {label(r)} | {r['dtype']} | {shape} | {fmt_ms(r['ms_median'])} | {fmt_iqr(r)} | "
                f"{fmt_ms(r.get('ms_min'))} | {r.get('reps', '')} | {fmt_ratio(r.get('ratio_vs_gemm'))} | "
                f"{fmt_mib(r['peak_mem_mib'])} | {fmt_ratio(r.get('ours_time_ratio'))} | "
                f"{fmt_ratio(r.get('ours_mem_ratio'))} |"
            )
    return "\n".join(lines) + "\n"


HOW_TO_READ = """\
How to read: every number is measured in one run, each point in its own child process. *ms* is the median of the
timed repeats after warm-up, *IQR* their interquartile range (25th-75th percentile; empty for runs that kept only
the median). *x GEMM roofline* divides by the op's GEMM-only floor measured in the same run: 1 `[N,H]x[H,V]` GEMM
for the forward, 4 for the composable forward+backward, 3 for the fused loss, run with `torch.mm` (rows
`cuBLAS (torch.mm)` on a GPU, `torch.mm (CPU)` on a CPU, where MKL/oneDNN runs it). Every ratio divides medians of
the same run. *peak MiB* is the memory the step adds on top of its inputs (GPU: `max_memory_allocated`; CPU: growth
of the process's resident set), gradients included. *ours / this* is rlvr_kernels' time (memory) over that row's:
below 1 means we are faster (leaner). `not run` rows say why a peer could not run on this device.
"""


def native_line(native: dict) -> str:
    """``vocab_rows loaded, ...``: each csrc extension's state in the run."""
    return ", ".join(f"{k} {v}" for k, v in sorted(native.items()))


def machine_line(meta: dict) -> str:
    """One sentence on the machine and the software of a run."""
    v = meta.get("versions", {})
    peers = ", ".join(f"{k} {v[k]}" for k in ("trl", "liger-kernel", "verl", "transformers") if v.get(k))
    load = meta.get("loadavg")
    load_s = (
        f"load average {load['1m']:.2f} / {load['5m']:.2f} / {load['15m']:.2f} at the start"
        if load
        else "load average unknown"
    )
    threads = meta.get("torch_num_threads")
    dev = meta.get("device_full_name") or meta["device"]
    t = meta.get("timing") or {}
    reps = f"{t.get('warmup')} warm-up + {t.get('min_reps')}-{t.get('max_reps')} timed repeats per point" if t else ""
    return (
        f"(mode {meta['mode']}, {dev}, {meta.get('cpu_count')} CPUs"
        + (f", {threads} torch threads" if threads is not None else "")
        + (f", {load_s}" if "loadavg" in meta else "")
        + (f"; {reps}" if reps else "")
        + (f"; native CPU kernels: {native_line(meta['native'])}" if meta.get("device_kind") == "cpu" else "")
        + f"; torch {v.get('torch')}, triton {v.get('triton')}; {peers}; wall time {meta.get('wall_s', 0):.0f} s)."
    )


def write_markdown(records: list, meta: dict, path: str) -> None:
    head = [f"# Benchmark: {meta['device']}, {meta['date']}", "", f"`{command_of(meta)}`", machine_line(meta), ""]
    note = busy_note(meta)
    if note:
        head += [note, ""]
    head += [HOW_TO_READ, summary_markdown(records, meta, heading="##"), "## All records", "", full_table(records)]
    with open(path, "w") as f:
        f.write("\n".join(head))


def write_csv(records: list, path: str) -> None:
    extra = sorted({k for r in records for k in r} - set(MAIN_FIELDS))
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=MAIN_FIELDS + extra, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(records)


def write_all(records: list, meta: dict, out: str) -> None:
    """Write every text output of a run into ``out`` (results.json, meta.json, results.csv, results.md); the plots
    are :func:`rlvr_kernels.bench.plots.write_plots`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_csv(records, os.path.join(out, "results.csv"))
    write_markdown(records, meta, os.path.join(out, "results.md"))
