"""The benchmark's vocabulary-parallel points (``tp_*`` ops, :mod:`rlvr_kernels.bench.tp`) on tiny shapes: TP = 1, 2
through the real command line (records, ratios to TP = 1, the per-TP table), and a rank that raises, dies or hangs
becoming a record with an ``error`` (never a stalled benchmark). Timings are not checked."""

from __future__ import annotations

import csv
import json

import pytest

from rlvr_kernels.bench import cli, runner, timing
from rlvr_kernels.bench import tp as btp


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_tp")
    argv = ["--smoke", "--device", "cpu", "--out", str(out), "--ops", "tp_*", "--tp", "1,2", "--no-progress"]
    assert cli.main(argv + ["--no-plots"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tp_records(tp_run):
    out, records = tp_run
    n, h, v = runner.SMOKE["ref"]
    assert sorted((r["op"], r["tp"]) for r in records) == [(op, d) for op in sorted(btp.TP_OPS) for d in (1, 2)]
    for r in records:
        assert "error" not in r, r
        d = r["tp"]
        assert (r["N"], r["H"], r["V"], r["impl"], r["case"]) == (n, h, v, "rlvr_kernels", f"tp{d}")
        assert r["ms_min"] <= r["ms_p25"] <= r["ms_median"] <= r["ms_p75"] <= r["ms_max"] and r["reps"] >= 2
        assert len(r["peak_mem_mib_ranks"]) == len(r["rank_ms_median"]) == d
        assert r["peak_mem_mib"] == pytest.approx(max(r["peak_mem_mib_ranks"]), abs=0.01) and r["peak_mem_mib"] >= 0
        assert r["mem_measure"] in ("rss_hwm_growth", "ru_maxrss_growth")
        assert r["threads_per_rank"] == max(1, btp.cores() // d) and r["tp_backend"] == "gloo"
        assert r["vocab_rows_per_rank"] == v // d
        assert r["comm_bytes"] == (0 if d == 1 else 3 * n * 8 + n * h * 4)
        one = next(o for o in records if o["op"] == r["op"] and o["tp"] == 1)
        assert r["time_ratio_vs_tp1"] == pytest.approx(r["ms_median"] / one["ms_median"])
        assert "ratio_vs_gemm" not in r
    md = (out / "results.md").read_text()
    assert "Vocabulary-parallel lm_head per TP degree" in md and "| tp_loss_fused | 2 |" in md
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"tp", "comm_bytes", "time_ratio_vs_tp1"} <= set(rows[0])


def test_rank_failures_become_error_records():
    """A rank that raises, dies or hangs ends its point with an error; the other ranks are killed, the run goes on."""
    points, _ = runner.plan("cpu", "smoke", ops=["tp_logprobs_fwd_bwd"], tp=[2])
    bad = [dict(points[0], inject=spec) for spec in ("raise@1", "exit@0:step", "hang@1")]
    t = timing.TIMING["smoke"]
    res = runner.run_points(bad[:2], "cpu", t, point_timeout=60.0, progress=False, log=None)
    res += runner.run_points(bad[2:], "cpu", t, point_timeout=3.0, progress=False, log=None)
    recs = runner.make_records(bad, res, "cpu-test")
    assert all(r["tp"] == 2 and "ms_median" not in r for r in recs)
    assert recs[0]["error"] == "rank 1 of 2: RuntimeError: injected failure on rank 1"
    assert recs[1]["error"] == "rank 0 of 2 exited with code 7 without a result"
    assert recs[2]["error"].startswith("timed out after") and "did not finish (a hang?)" in recs[2]["error"]


def test_plan_and_counts():
    pts, cfg = runner.plan("cpu", "quick", ops=["tp_*"])
    assert {(p["op"], p["tp"]) for p in pts} == {(op, d) for op in btp.TP_OPS for d in (1, 2, 4)}
    assert all((p["N"], p["H"], p["V"]) == cfg["ref"] for p in pts)
    assert not runner.plan("cpu", "quick", ops=["logprobs_*"])[0][-1]["op"].startswith("tp_")
    assert btp.shard_sizes(10, 4) == [3, 3, 2, 2]
    assert btp.comm_bytes(8, 4, 2) == dict(allgather_bytes=192, allreduce_bytes=128, comm_bytes=320)
