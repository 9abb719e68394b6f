#!/usr/bin/env bash
# GPU check in one command, from the repository root; everything it writes goes to $OUT (default /tmp/rlvr_gpu_out):
#   1. the GPU's name, driver and the versions of torch / triton (device.txt);
#   2. the gpu-marked tests: compiled Triton kernels against the torch reference at realistic shapes (gpu_tests.log);
#   3. the benchmark (python -m rlvr_kernels.bench, i.e. rlvr-bench; default --quick: the reference shape N=8192,
#      H=4096, V=151936 bf16 plus a short sweep), its results folder packed as results.tgz (bench.log).
# Peers that are not installed (trl, liger-kernel, verl) give "not run" rows; wheels placed in .whl/ are installed
# into /tmp/site first. To add the results to the repository:
#   mkdir -p benchmarks/results && tar xzf $OUT/results.tgz -C benchmarks/results
#   python benchmarks/update_readme.py
# Usage: bash benchmarks/gpu_check.sh [benchmark arguments, default --quick]
set -uo pipefail
OUT=${OUT:-/tmp/rlvr_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/device.txt"
python3 -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
# $OUT/results is this script's scratch folder (packed and removed below): --overwrite replaces a leftover one
python3 -m rlvr_kernels.bench "${@:---quick}" --out "$OUT/results" --overwrite --no-progress 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ -d "$OUT/results" ]; then
  dev=$(python3 -c "import json; m = json.load(open('$OUT/results/meta.json')); print(m['device'] + '-' + m['date'])" \
        2>/dev/null || echo gpu)
  mv "$OUT/results" "$OUT/$dev" && tar czf "$OUT/results.tgz" -C "$OUT" "$dev" && rm -rf "${OUT:?}/$dev"
fi
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 && tests_rc != 5 || bench_rc != 0 ))
