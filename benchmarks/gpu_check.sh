#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200): compiled-kernel tests, then timings,
# then the dispatch table written from the nested-linear timings.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT when set, else a temp dir
#
# That machine has no package registry (torch, triton, pytest preinstalled), so the checkout
# is used through PYTHONPATH instead of being installed. Each step has its own time limit so
# the whole run stays under 10 minutes (about 5 when nothing hits its limit); a failing
# step is reported and the rest still run.
# Results: $OUT/*.txt (each step's output), $OUT/*.json (benchmark rows), and
# $OUT/dispatch_table.json, also written over matta/ops/dispatch_table.json in this checkout
# (copy it into the repository to ship it). The last thing printed is a short table of every
# step and the benchmark tables.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET MATTA_INTERPRET_TILES
export MATTA_TEST_DEVICE=cuda TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-$(mktemp -d -t matta-gpu.XXXXXX)}
mkdir -p "$OUT"
status=()

step() {  # step NAME SECONDS COMMAND...: run, keep its output, remember its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee "$OUT/$name.txt") 2>&1
  local code=$?
  status+=("$(printf '%-22s exit %-3s %4ss' "$name" "$code" $((SECONDS - start)))")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"

# Compiled kernels against references: the same shapes as the CPU run, with every GPU tile
# config pinned by the tile tests (tests/test_nested_linear_tiles.py, the 2^31-offset one
# included); one config per other shape (tuning every test shape would cost minutes);
# float64 gradchecks left to the CPU run. Test processes compile in parallel where xdist is.
parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n 8)
MATTA_AUTOTUNE=0 step kernel_tests 220 python -m pytest -q --maxfail=20 -p no:cacheprovider "${parallel[@]}" \
  tests/test_nested_linear.py tests/test_nested_linear_tiles.py tests/test_matta_loss.py \
  tests/test_fused_linear_matta_loss.py tests/test_matrix_functions.py -k "not gradcheck"

step nested_linear 90 python benchmarks/bench_nested_linear.py --gpu --json "$OUT/nested_linear.json"
step nested_linear_fp32 45 python benchmarks/bench_nested_linear.py --gpu --dtypes tf32 fp32 --tokens 1024 16384 \
  --shapes ffn_up --repeats 10 --json "$OUT/nested_linear_fp32.json"
step dispatch_table 15 bash -c "python benchmarks/write_dispatch_table.py $OUT/nested_linear*.json \
  --out matta/ops/dispatch_table.json && cp matta/ops/dispatch_table.json $OUT/dispatch_table.json"
step matta_loss 50 python benchmarks/bench_loss.py --gpu --json "$OUT/matta_loss.json"
step shampoo_roots 50 python benchmarks/bench_shampoo.py --gpu --json "$OUT/shampoo.json"
step models 40 python benchmarks/bench_models.py --gpu --json "$OUT/models.json"
step train_throughput 60 python benchmarks/train_throughput.py --gpu --json "$OUT/train_throughput.json"

echo
echo "==================== summary ($(head -n 1 "$OUT/machine.txt"))"
for name in nested_linear nested_linear_fp32 dispatch_table matta_loss shampoo_roots models train_throughput; do
  [[ -f $OUT/$name.txt ]] && { echo "-- $name"; tail -n 16 "$OUT/$name.txt"; }
done
echo "-- kernel_tests: $(tail -n 1 "$OUT/kernel_tests.txt")"
printf '%s\n' "${status[@]}"
