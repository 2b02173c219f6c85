#!/usr/bin/env bash
# The one prepared check for a lent GPU (H100/H200): timings first (the dispatch table's
# own first), then the compiled-kernel tests in whatever time is left, then a summary.
#
#   bash benchmarks/gpu_check.sh        # results in $OUT when set, else in a new temp dir
#
# Made for a lease: one command of at most 10 minutes on a fixed image (python3, torch,
# triton, pytest preinstalled; no registry, so the checkout runs through PYTHONPATH), of
# which at most 8 files of $OUT and the last 12,000 characters of output come back.
# - Deadline: every step's limit is cut to what is left of MATTA_GPU_CHECK_DEADLINE_S
#   (default 540 s) less the time the summary needs; a step with too little left is skipped,
#   so the summary always prints inside one 10-minute command.
# - Nothing is lost to a kill: the benchmarks rewrite their JSON after every row (or every
#   round of an interleaved timing), Python runs unbuffered, and $OUT is refreshed after
#   every step. A step killed at its limit keeps the rows it measured.
# - $OUT holds 4 files: summary.txt (printed last), results.json (every benchmark's JSON,
#   by step), dispatch_table.json (also written over matta/ops/dispatch_table.json in this
#   checkout: copy it into the repository to ship it) and gpu_check.tar.gz (every step's
#   output and JSON, machine.txt, steps.tsv).
# Step limits come from what each step compiles and times on the host (16 cores): the
# nested-linear timings build 18 kernel configs per dtype group (about 1.5 s of host time
# each) and autotune them per token bucket; the loss, model and training steps reuse
# Triton's on-disk cache; the training step builds GPT-2 Medium MatTA (0.81B parameters)
# once and measures Shampoo and torch.compile on that same model only where its remaining
# budget covers their estimates. The kernel tests, the longest step, come last.
# MATTA_GPU_CHECK_PYTHON picks the interpreter (default python3, the image's);
# MATTA_GPU_CHECK_BENCHMARKS the folder of the benchmark scripts (tests put fakes there);
# MATTA_GPU_CHECK_STEP_LIMIT_S caps every step's limit (tests, rehearsals).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
deadline=${MATTA_GPU_CHECK_DEADLINE_S:-540}
reserve=${MATTA_GPU_CHECK_RESERVE_S:-20}  # the summary, the last archive, and a margin
cap=${MATTA_GPU_CHECK_STEP_LIMIT_S:-600}  # a lower cap on every step's limit, for a quick rehearsal
py=${MATTA_GPU_CHECK_PYTHON:-python3}
bench=${MATTA_GPU_CHECK_BENCHMARKS:-benchmarks}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The interpreter's knobs off: compiled kernels, the GPU's own tiles and blocks.
unset TRITON_INTERPRET MATTA_INTERPRET_TILES MATTA_INTERPRET_BLOCK_V
export MATTA_TEST_DEVICE=cuda TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-$(mktemp -d -t matta-gpu.XXXXXX)}
mkdir -p "$OUT"
work=$(mktemp -d -t matta-gpu-work.XXXXXX)
printf 'step\texit\tseconds\tlimit\n' > "$work/steps.tsv"

left() { echo $((deadline - reserve - (SECONDS - started))); }

refresh_out() {  # $OUT from $work: the archive and the merged JSON, each replaced atomically
  tar -czf "$OUT/.gpu_check.tar.gz" -C "$work" . 2>/dev/null && mv -f "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
  "$py" benchmarks/gpu_summary.py --merge "$work" --out "$OUT/results.json" 2>>"$work/summary_errors.txt"
}

step() {  # step NAME LIMIT_S COMMAND...: run it under its limit cut to the deadline; keep all
  local name=$1 limit=$2 remaining
  shift 2
  remaining=$(left)
  if ((remaining < 10)); then
    echo "== $name: skipped, ${remaining}s left before the deadline"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$work/steps.tsv"
    return
  fi
  ((limit > cap)) && limit=$cap
  ((limit > remaining)) && limit=$remaining
  echo "== $name (limit ${limit}s, $((SECONDS - started))s into the run)"
  local begin=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$work/$name.txt"
  local code=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$code" $((SECONDS - begin)) "$limit" >> "$work/steps.tsv"
  refresh_out
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -n 1
  echo "$(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"; } | tee "$work/machine.txt"
cuda=0
grep -q "cuda True" "$work/machine.txt" && cuda=1

step nested_linear 100 "$py" "$bench/bench_nested_linear.py" --gpu --json "$work/nested_linear.json"
step nested_linear_fp32 80 "$py" "$bench/bench_nested_linear.py" --gpu --dtypes tf32 fp32 --tokens 1024 16384 \
  --shapes ffn_up --repeats 10 --json "$work/nested_linear_fp32.json"
step dispatch_table 30 bash -c "'$py' '$bench/write_dispatch_table.py' $work/nested_linear*.json \
  --out matta/ops/dispatch_table.json && cp matta/ops/dispatch_table.json '$OUT/dispatch_table.json'"
step matta_loss 50 "$py" "$bench/bench_loss.py" --gpu --json "$work/matta_loss.json"
step models 60 "$py" "$bench/bench_models.py" --gpu --json "$work/models.json"
step train_throughput 130 "$py" "$bench/train_throughput.py" --gpu --budget-s 110 --json "$work/train_throughput.json"
# The cost model's prediction of that step on this GPU's card (the summary prints it beside the measurement).
if ((cuda)); then
  step cost_prediction 60 "$py" -m matta cost --card auto --model gpt2-medium --ffn-ta 8192 --extra-layers 12 \
    --block-size 1024 --batch-size 8 --vocab-size 50257 --json "$work/cost_prediction.json"
else
  echo "== cost_prediction: skipped, no CUDA device (the card is the GPU's)"
  printf 'cost_prediction\tno-cuda\t0\t0\n' >> "$work/steps.tsv"
fi
step shampoo_roots 60 "$py" "$bench/bench_shampoo.py" --gpu --count 32 --json "$work/shampoo_roots.json"

# Compiled kernels against the references: the CPU run's shapes, with every GPU tile config
# pinned by the tile tests (the 2^31-offset one included) and one config per other shape
# (tuning every test shape would cost minutes); float64 gradchecks left to the CPU run.
# All the time that is left; test processes compile in parallel.
if ((cuda)); then
  parallel=()
  "$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  MATTA_AUTOTUNE=0 step kernel_tests 600 "$py" -m pytest -q --maxfail=20 -p no:cacheprovider "${parallel[@]}" \
    tests/test_nested_linear.py tests/test_nested_linear_tiles.py tests/test_matta_loss.py \
    tests/test_fused_linear_matta_loss.py tests/test_matrix_functions.py -k "not gradcheck"
else
  echo "== kernel_tests: skipped, no CUDA device"
  printf 'kernel_tests\tno-cuda\t0\t0\n' >> "$work/steps.tsv"
fi

refresh_out
echo
if ! "$py" benchmarks/gpu_summary.py "$work" > "$OUT/summary.txt" 2>>"$work/summary_errors.txt"; then
  { echo "summary failed ($(tail -n 1 "$work/summary_errors.txt")); steps:"; cat "$work/steps.tsv"
    for f in "$work"/*.txt; do echo "-- $(basename "$f")"; tail -n 8 "$f"; done; } > "$OUT/summary.txt"
fi
cp "$OUT/summary.txt" "$work/summary.txt"
tar -czf "$OUT/.gpu_check.tar.gz" -C "$work" . && mv -f "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
cat "$OUT/summary.txt"
# Exit 1 if a step failed or was killed (skipped ones do not count): the summary says which.
! cut -f 2 "$work/steps.tsv" | tail -n +2 | grep -qvE '^(0|skipped|no-cuda)$'
