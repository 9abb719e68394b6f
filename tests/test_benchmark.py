"""The benchmark's machinery on tiny shapes (benchmarks/run.py --smoke): records, ratios, error rows, outputs, and
update_readme.py rewriting only the marked README block. Timings are not checked (no timed unit tests)."""
from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench_run = _load("rlvr_bench_run", BENCH / "run.py")  # puts benchmarks/ on sys.path for its helper modules
update_readme = _load("rlvr_bench_update_readme", BENCH / "update_readme.py")
import bench_cases as bc  # noqa: E402

SMOKE_OPS = "logprobs_fwd,logprobs_fwd_bwd,loss_fused,token_pass,loss_grpo,loss_cppo"
SMOKE_IMPLS = "cublas_gemm,rlvr_kernels,torch_full_logits,verl_triton,no_such_impl"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench_run.main(["--smoke", "--device", "cpu", "--out", str(out), "--ops", SMOKE_OPS, "--impls", SMOKE_IMPLS,
                         "--no-progress"])
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
    assert meta["reference"]["N"] == bench_run.SMOKE["ref"][0]
    pytest.importorskip("matplotlib")
    for op in ("logprobs_fwd", "logprobs_fwd_bwd", "loss_fused", "token_pass", "losses"):
        png = out / f"{op}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_CRASH_SCRIPT = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("rlvr_bench_run", sys.argv[1])
bench_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_run)
import bench_cases as bc
real_build = bc.build
def build(p, device):
    if p["case"] == "crash":
        os._exit(3)
    return real_build(p, device)
bc.build = build
p = dict(op="logprobs_fwd", impl="cublas_gemm", N=16, H=8, V=32, T=16, dtype="fp32")
res = bench_run.run_points([dict(p, case="crash"), dict(p, case="")], "cpu", bench_run.TIMING["smoke"],
                           start_method="fork", progress=False, log=None, group_by_impl=True, point_timeout=120.0)
print(json.dumps(res))
"""


def test_child_crash_becomes_error_row_and_the_rest_run():
    """A child that dies (segfault, OOM kill) gives its point an error; a new child takes the remaining points.

    Run in a fresh interpreter: forking this test process after it ran OpenMP-parallel torch ops (other tests in the
    same xdist worker) can deadlock the child, which the benchmark itself never does (it forks from a fresh one)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(BENCH / "run.py")], capture_output=True,
                         text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res[0] == {"error": "child process exited with code 3"}
    assert res[1]["ms_median"] > 0


def test_plan_gpu_reference_shape():
    points, cfg = bench_run.plan("cuda", "full")
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
    recs = [dict(base, op="logprobs_fwd", impl="cublas_gemm", ms_median=2.0, peak_mem_mib=0.0),
            dict(base, op="logprobs_fwd", impl="rlvr_kernels", ms_median=3.0, peak_mem_mib=10.0),
            dict(base, op="logprobs_fwd", impl="liger_flsce", ms_median=6.0, peak_mem_mib=40.0),
            dict(base, op="logprobs_fwd", impl="trl_unfused", error="boom")]
    bench_run.add_ratios(recs)
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
    block = text[len(before + update_readme.START): -len(update_readme.END + after)]
    assert "old table" not in block and "| op | impl |" in block and "logprobs_fwd_bwd" in block
    assert update_readme.main([str(out), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("logprobs_fwd_bwd", "edited by hand", 1))
    assert update_readme.main([str(out), "--readme", str(readme), "--check"]) == 1
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme.main([str(out), "--readme", str(readme)])
