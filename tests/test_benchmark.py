"""The benchmark's machinery on tiny shapes (``rlvr-bench --smoke``, the package :mod:`rlvr_kernels.bench`): records,
ratios, error rows, outputs, the output folder rules, meta.json, the cases generated from the method catalogue, the
thin wrappers in benchmarks/, and update_readme.py rewriting only the marked README block. Timings are not checked
(no timed unit tests); each run measures as few points as the check needs."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch

from rlvr_kernels import methods
from rlvr_kernels.bench import cases as bc
from rlvr_kernels.bench import cli, readme_table, report, runner, timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


update_readme = _load("rlvr_bench_update_readme", BENCH / "update_readme.py")  # the thin wrapper kept for old commands

SMOKE_OPS = "logprobs_fwd,logprobs_fwd_bwd,loss_fused,loss_ragged,token_pass,loss_grpo,loss_cppo"
SMOKE_IMPLS = "cublas_gemm,rlvr_kernels,torch_full_logits,verl_triton,no_such_impl"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(
        ["--smoke", "--device", "cpu", "--out", str(out), "--ops", SMOKE_OPS, "--impls", SMOKE_IMPLS, "--no-progress"]
    )
    assert rc == 0
    with open(out / "results.json") as f:
        records = json.load(f)
    return out, records


def test_records_schema(smoke_run):
    out, records = smoke_run
    assert records
    ops = set(bc.GEMMS) | {"token_pass"} | set(bc.loss_ops())
    for r in records:
        for key in ("op", "impl", "device", "dtype", "N", "H", "V"):
            assert key in r, (key, r)
        assert r["op"] in ops
        assert r["device"] == "cpu-" + __import__("platform").machine()
        assert r["dtype"] == "fp32"
        if "error" in r:
            assert isinstance(r["error"], str) and r["error"]
            assert "ms_median" not in r
        else:
            assert r["ms_median"] > 0 and r["peak_mem_mib"] >= 0
    seen = {(r["op"], r["impl"]) for r in records if "error" not in r}
    for op in bc.GEMMS:
        for impl in ("cublas_gemm", "rlvr_kernels", "torch_full_logits"):
            assert (op, impl) in seen
    assert {r["case"] for r in records if r["op"] == "token_pass"} == set(bc.TOKEN_CASES)
    assert all(r["gemms"] == bc.GEMMS[r["op"]] for r in records if r["impl"] == "cublas_gemm")


def test_ragged_batch_reports_time_per_valid_token(smoke_run):
    """The fused loss on a batch of realistic length spread: its own table, with the valid-token count and the time
    per valid token (rlvr_kernels skips the padding; its roofline is the GEMMs over every position)."""
    out, records = smoke_run
    ragged = [r for r in records if r["op"] == bc.RAGGED_OP and "error" not in r]
    assert {r["impl"] for r in ragged} >= {"rlvr_kernels", "cublas_gemm"}
    p = ragged[0]
    lengths = bc.ragged_lengths(p["N"] // p["T"], p["T"])
    assert min(lengths) == max(1, p["T"] // 4) and max(lengths) == p["T"]
    assert bc.valid_tokens(p) == sum(lengths) < p["N"]
    md = (out / "results.md").read_text()
    assert "Fused loss on a ragged batch" in md and "us per valid token" in md
    assert f"{bc.valid_tokens(p)} of {p['N']} positions are loss tokens" in md


def test_ratios(smoke_run):
    _, records = smoke_run
    by = {(r["op"], r["impl"], r["N"], r["V"]): r for r in records if r["op"] != "token_pass"}
    ours = [r for r in records if r["impl"] == "rlvr_kernels" and r["op"] in bc.GEMMS]
    assert ours
    for r in ours:
        gemm = by[(r["op"], "cublas_gemm", r["N"], r["V"])]
        peer = by[(r["op"], "torch_full_logits", r["N"], r["V"])]
        assert r["ratio_vs_gemm"] == pytest.approx(r["ms_median"] / gemm["ms_median"])
        assert r["time_ratio_vs_torch_full_logits"] == pytest.approx(r["ms_median"] / peer["ms_median"])
        assert peer["ours_time_ratio"] == pytest.approx(r["time_ratio_vs_torch_full_logits"])
        assert gemm["ratio_vs_gemm"] == 1.0
    tok = [r for r in records if r["op"] == "token_pass" and "error" not in r]
    assert tok and all(r["ratio_vs_vocab_pass"] > 0 for r in tok)
    loss = next(r for r in records if r["op"] == "loss_grpo" and r["impl"] == "rlvr_kernels")
    assert "ratio_vs_gemm" in loss  # against the fused loss's 3-GEMM roofline


def test_failing_impls_give_error_rows(smoke_run):
    _, records = smoke_run
    unknown = [r for r in records if r["impl"] == "no_such_impl"]
    assert unknown and all("unknown implementation" in r["error"] for r in unknown)
    verl = [r for r in records if r["impl"] == "verl_triton"]
    assert verl and all(r["error"].startswith("not available") and "CUDA" in r["error"] for r in verl)
    cppo = [r for r in records if r["op"] == "loss_cppo"]
    assert len(cppo) == 1
    if "error" in cppo[0]:  # rlvr_kernels.cppo not in this checkout yet
        assert "not available" in cppo[0]["error"]


def test_outputs_written(smoke_run):
    out, records = smoke_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {"op", "impl", "device", "dtype", "N", "H", "V", "ms_median", "peak_mem_mib", "error"} <= set(rows[0])
    md = (out / "results.md").read_text()
    assert "| op | impl |" in md and "not run:" in md
    meta = json.loads((out / "meta.json").read_text())
    assert meta["reference"]["N"] == runner.SMOKE["ref"][0]
    pytest.importorskip("matplotlib")
    for op in ("logprobs_fwd", "logprobs_fwd_bwd", "loss_fused", "token_pass", "losses"):
        png = out / f"{op}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_CRASH_SCRIPT = """
import json, os
from rlvr_kernels.bench import cases as bc, runner, timing
real_build = bc.build
def build(p, device):
    if p["case"] == "crash":
        os._exit(3)
    return real_build(p, device)
bc.build = build
p = dict(op="logprobs_fwd", impl="cublas_gemm", N=16, H=8, V=32, T=16, dtype="fp32")
res = runner.run_points([dict(p, case="crash"), dict(p, case="")], "cpu", timing.TIMING["smoke"],
                        start_method="fork", progress=False, log=None, group_by_impl=True, point_timeout=120.0)
print(json.dumps(res))
"""


def test_child_crash_becomes_error_row_and_the_rest_run():
    """A child that dies (segfault, OOM kill) gives its point an error; a new child takes the remaining points.

    Run in a fresh interpreter: forking this test process after it ran OpenMP-parallel torch ops (other tests in the
    same xdist worker) can deadlock the child, which the benchmark itself never does (it forks from a fresh one)."""
    out = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT], capture_output=True, text=True, timeout=300, check=True, cwd=ROOT
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res[0] == {"error": "child process exited with code 3"}
    assert res[1]["ms_median"] > 0


def test_plan_gpu_reference_shape():
    points, cfg = runner.plan("cuda", "full")
    assert cfg["ref"] == (8192, 4096, 151936) and cfg["dtypes"] == ("bf16",)
    at_ref = {(p["op"], p["impl"]) for p in points if (p["N"], p["H"], p["V"]) == cfg["ref"]}
    for impl in bc.LOGPROB_IMPLS:
        assert ("logprobs_fwd", impl) in at_ref and ("logprobs_fwd_bwd", impl) in at_ref
    for impl in bc.LOSS_FUSED_IMPLS:
        assert ("loss_fused", impl) in at_ref
    assert {p["V"] for p in points if p["op"] == "logprobs_fwd"} >= {128256, 151936}
    assert all(p["N"] % p["T"] == 0 for p in points)


def test_add_ratios_unit():
    base = dict(case="", dtype="fp32", N=8, H=4, V=16)
    recs = [
        dict(base, op="logprobs_fwd", impl="cublas_gemm", ms_median=2.0, peak_mem_mib=0.0),
        dict(base, op="logprobs_fwd", impl="rlvr_kernels", ms_median=3.0, peak_mem_mib=10.0),
        dict(base, op="logprobs_fwd", impl="liger_flsce", ms_median=6.0, peak_mem_mib=40.0),
        dict(base, op="logprobs_fwd", impl="trl_unfused", error="boom"),
    ]
    runner.add_ratios(recs)
    assert recs[1]["ratio_vs_gemm"] == 1.5
    assert recs[2]["ours_time_ratio"] == 0.5 and recs[2]["ours_mem_ratio"] == 0.25
    assert recs[1]["time_ratio_vs_liger_flsce"] == 0.5 and recs[1]["mem_ratio_vs_liger_flsce"] == 0.25
    assert not any("ratio" in k for k in recs[3])


def test_update_readme_rewrites_only_the_block(smoke_run, tmp_path):
    out, _ = smoke_run
    readme = tmp_path / "README.md"
    before = "# Title\n\nIntro text.\n\n## Results\n\nSome words.\n\n"
    after = "\n\n## Tests\n\nMore words, kept as they are.\n"
    readme.write_text(before + update_readme.START + "\nold table\n" + update_readme.END + after)
    assert update_readme.main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before + update_readme.START) and text.endswith(update_readme.END + after)
    block = text[len(before + update_readme.START) : -len(update_readme.END + after)]
    assert "old table" not in block and "| op | impl |" in block and "logprobs_fwd_bwd" in block
    assert update_readme.main([str(out), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("logprobs_fwd_bwd", "edited by hand", 1))
    assert update_readme.main([str(out), "--readme", str(readme), "--check"]) == 1
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme.main([str(out), "--readme", str(readme)])


# ----------------------------------------------------------------------------------------------------------------
# the package's command line: output folders, meta.json, the report, the catalogue cases

# one point (our GRPO loss at the smoke shape), two timed repeats, no plots: the smallest real run
TINY = [
    "--smoke",
    "--device",
    "cpu",
    "--ops",
    "loss_grpo",
    "--impls",
    "rlvr_kernels",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--no-plots",
    "--no-progress",
]
# no point at all (nothing matches): the machinery around the measurements only
EMPTY = ["--smoke", "--device", "cpu", "--ops", "no_such_op", "--no-plots", "--no-progress"]


def test_default_folder_is_never_overwritten(tmp_path, monkeypatch):
    """Without --out each run gets a new folder ./rlvr-bench-results/<device>-<date>, then -2, ...; the first run's
    files are left as they were. meta.json records threads, CPUs, the load average and the command line."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(TINY) == 0
    name = f"cpu-{platform.machine()}-{dt.date.today().isoformat()}"
    first = tmp_path / "rlvr-bench-results" / name
    before = (first / "results.json").read_bytes()
    assert cli.main(TINY) == 0
    second = tmp_path / "rlvr-bench-results" / f"{name}-2"
    assert (second / "results.json").exists()
    assert (first / "results.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "rlvr-bench-results").iterdir()) == [name, f"{name}-2"]
    (rec,) = json.loads(before)
    assert rec["op"] == "loss_grpo" and rec["reps"] == 2 and rec["ms_p25"] <= rec["ms_median"] <= rec["ms_p75"]

    meta = json.loads((first / "meta.json").read_text())
    assert meta["torch_num_threads"] == torch.get_num_threads()
    assert meta["cpu_count"] == os.cpu_count()
    assert meta["torch"] == torch.__version__ and meta["device"] == f"cpu-{platform.machine()}"
    assert meta["device_full_name"]
    assert meta["command"].startswith("python -m rlvr_kernels.bench --smoke") and meta["argv"] == TINY
    assert meta["timing"]["min_reps"] == meta["timing"]["max_reps"] == 2
    assert meta["gemm_baseline"] == "torch.mm (CPU)"
    if hasattr(os, "getloadavg"):
        assert set(meta["loadavg"]) == {"1m", "5m", "15m"} and all(v >= 0 for v in meta["loadavg"].values())
        assert meta["busy"] == (meta["loadavg"]["1m"] > cli.BUSY_FRACTION * os.cpu_count())
    assert isinstance(meta["busy"], bool)


def test_explicit_out_existing_non_empty_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "results.json").write_text("[]")
    assert cli.main(EMPTY + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--overwrite" in err and str(out) in err
    assert (out / "results.json").read_text() == "[]" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt",
        "results.json",
    ]
    # --overwrite replaces the run's own files, nothing else
    assert cli.main(EMPTY + ["--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text()) == []
    assert (out / "notes.txt").read_text() == "keep me" and (out / "meta.json").exists()
    # an empty or missing --out needs no flag
    assert cli.main(EMPTY + ["--out", str(tmp_path / "new" / "dir")]) == 0


def test_busy_machine_warns_and_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0 * (os.cpu_count() or 1), 1.0, 0.5), raising=False)
    assert cli.main(EMPTY + ["--out", str(tmp_path / "busy")]) == 0
    assert "WARNING: the machine is busy" in capsys.readouterr().err
    meta = json.loads((tmp_path / "busy" / "meta.json").read_text())
    assert meta["busy"] is True and meta["loadavg"]["5m"] == 1.0
    assert "the machine was busy" in (tmp_path / "busy" / "results.md").read_text()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)
    assert cli.machine_state()["busy"] is False


def test_report_has_median_and_iqr(smoke_run):
    out, records = smoke_run
    ok = [r for r in records if "error" not in r]
    assert ok
    for r in ok:
        assert r["ms_min"] <= r["ms_p25"] <= r["ms_median"] <= r["ms_p75"] <= r["ms_max"]
        assert r["reps"] >= 2 and r["warmup"] >= 1
    md = (out / "results.md").read_text()
    assert "ms (median)" in md and "IQR (ms)" in md
    gemm = next(
        r
        for r in ok
        if r["impl"] == "cublas_gemm"
        and r["op"] == "logprobs_fwd"
        and r["N"] == runner.SMOKE["ref"][0]
        and r["V"] == runner.SMOKE["ref"][2]
    )
    assert f"| {report.fmt_ms(gemm['ms_median'])} | {report.fmt_iqr(gemm)} |" in md
    with open(out / "results.csv") as f:
        assert {"ms_median", "ms_p25", "ms_p75", "ms_min", "reps"} <= set(next(csv.DictReader(f)))
    # the README block shows them too
    block = readme_table.render_block([str(out)], str(out / "README.md"))
    assert "IQR (ms)" in block and report.fmt_iqr(gemm) in block


def test_cpu_baseline_is_never_called_cublas(smoke_run):
    out, records = smoke_run
    texts = [(out / "results.md").read_text(), readme_table.render_block([str(out)], str(out / "README.md"))]
    for text in texts:
        # (the command line the run was started with is the user's own text: it is left out)
        text = "\n".join(line for line in text.splitlines() if not line.startswith("`python"))
        rows = [line for line in text.splitlines() if line.startswith("|")]
        assert any("torch.mm (CPU)" in line for line in rows)
        assert not any("cublas" in line.lower() for line in rows)
        # the only mention of cuBLAS is the GPU's label in the reading note
        assert text.lower().count("cublas") == text.count("`cuBLAS (torch.mm)` on a GPU")
    assert all(r["impl_label"] == "torch.mm (CPU)" for r in records if r["impl"] == "cublas_gemm")
    assert bc.impl_label("cublas_gemm", "cpu") == "torch.mm (CPU)"
    assert bc.impl_label("cublas_gemm", "cuda") == "cuBLAS (torch.mm)"
    assert bc.impl_label("cublas_gemm", "NVIDIA-H200") == "cuBLAS (torch.mm)"
    gemm_points = runner.plan("cpu", "smoke", impls=["gemm"])[0]  # the command line's name for the roofline
    assert gemm_points and all(p["impl"] == "cublas_gemm" for p in gemm_points)


def test_loss_cases_cover_the_method_catalogue():
    for name, rule in methods.CREDITS.items():
        if name == "none":
            assert "dapo_none" not in bc.LOSS_VARIANTS
            continue
        spec = bc.LOSS_VARIANTS[f"dapo_{name}"]
        assert spec["ours"]["credit"] == name and spec["ours"]["loss_type"] == "dapo"
        assert spec["ours"]["epsilon_high"] == 0.28
        assert bool(spec["ours"].get("schedule")) == (rule.schedule == "required")
        assert bool(spec.get("coefficients")) == ("coefficients" in rule.needs)
    for name, tr in methods.TRUST_REGIONS.items():
        if tr.loss_type is None:  # clip: no case of its own; gspo: the base case of TRL's GSPO
            assert (name in bc.LOSS_VARIANTS) == (name in bc.BASE_LOSSES)
            continue
        assert bc.LOSS_VARIANTS[name]["ours"]["loss_type"] == tr.loss_type
    # every case is planned, under its old name
    ops = {p["op"] for p in runner.plan("cpu", "quick")[0]}
    expected = {f"loss_dapo_{c}" for c in methods.CREDITS if c != "none"}
    expected |= {f"loss_{t}" for t, tr in methods.TRUST_REGIONS.items() if tr.loss_type}
    assert expected <= ops
    assert {
        "loss_grpo",
        "loss_dapo",
        "loss_cispo",
        "loss_dppo",
        "loss_cppo",
        "loss_dapo_tp_schedule",
        "loss_dapo_delta",
        "loss_dapo_entropy_bonus",
    } <= ops
    # the cases follow the catalogue: a new entry gets its case without touching the benchmark
    new = type("R", (), dict(schedule="required", needs=frozenset({"coefficients"})))()
    made = bc.method_cases(dict(methods.CREDITS, new_rule=new), dict(methods.TRUST_REGIONS))
    assert made["dapo_new_rule"] == dict(
        ours=dict(loss_type="dapo", epsilon_high=0.28, credit="new_rule", schedule=True), coefficients=True
    )


def test_help_and_wrappers():
    for cmd in (
        [sys.executable, "-m", "rlvr_kernels.bench", "--help"],
        [sys.executable, str(BENCH / "run.py"), "--help"],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "usage:" in res.stdout and "--overwrite" in res.stdout and "--quick" in res.stdout
    assert update_readme.main is readme_table.main  # benchmarks/update_readme.py is the package's
    assert not (BENCH / "bench_cases.py").exists() and not (BENCH / "bench_report.py").exists()
    import re

    for path in (ROOT / "rlvr_kernels" / "bench").glob("*.py"):  # the package does not import from benchmarks/
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(benchmarks|bench_cases|bench_report)\b", text, re.M), path
        assert "sys.path" not in text, path


def test_summarize_quantiles():
    np = pytest.importorskip("numpy")
    for xs in ([3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1 * k * k for k in range(11)]):
        s = timing.summarize(xs)
        assert s["reps"] == len(xs) and s["ms_min"] == min(xs) and s["ms_max"] == max(xs)
        for key, q in (("ms_p25", 25), ("ms_median", 50), ("ms_p75", 75)):
            assert s[key] == pytest.approx(float(np.percentile(xs, q)))
    t = timing.timing_for("cpu", "quick", repeats=7, warmup=0)
    assert t["min_reps"] == t["max_reps"] == 7 and t["warmup"] == 0
    with pytest.raises(ValueError, match="repeats"):
        timing.timing_for("cpu", "quick", repeats=0)


def test_ratios_pair_only_records_of_the_same_run():
    base = dict(case="", dtype="fp32", N=8, H=4, V=16, op="logprobs_fwd")
    recs = [
        dict(base, impl="cublas_gemm", ms_median=2.0, peak_mem_mib=0.0, run_id="a"),
        dict(base, impl="rlvr_kernels", ms_median=3.0, peak_mem_mib=10.0, run_id="b"),
        dict(base, impl="liger_flsce", ms_median=6.0, peak_mem_mib=40.0, run_id="b"),
    ]
    runner.add_ratios(recs)
    assert "ratio_vs_gemm" not in recs[1]  # the roofline was measured in another run
    assert recs[2]["ours_time_ratio"] == 0.5


def test_update_readme_defaults_read_the_committed_results(tmp_path):
    """Without folders, update_readme.py takes the newest committed folder per device (a -n suffix is newer)."""
    dirs = readme_table.latest_result_dirs(str(BENCH / "results"))
    assert dirs and all((pathlib.Path(d) / "results.json").exists() for d in dirs)
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{update_readme.START}\n{update_readme.END}\n")
    assert update_readme.main(["--readme", str(readme)]) == 0
    assert "Vocabulary pass at" in readme.read_text()
    for name in ("cpu-a-2026-01-02", "cpu-a-2026-01-02-2", "cpu-a-2026-01-01-7", "gpu-2026-01-01"):
        (tmp_path / "r" / name).mkdir(parents=True)
        (tmp_path / "r" / name / "results.json").write_text("[]")
    assert [pathlib.Path(d).name for d in readme_table.latest_result_dirs(str(tmp_path / "r"))] == [
        "gpu-2026-01-01",
        "cpu-a-2026-01-02-2",
    ]
