#!/usr/bin/env bash
# The second prepared command for a lent GPU: a `matta study` at a budget this CPU cannot
# afford, every run side by side on the one GPU, inside one 10-minute command.
#
#   bash benchmarks/gpu_study.sh        # RESULTS.md, study.png and the rest in $OUT
#
# The study (STUDY_FLAGS): the tiny preset (GPT-2 tiny Student, TA with FFN 1024 and 2 TA-only
# layers, stdlib data), its 6 core arms, 3 seeds and the learning-rate sweep, at 3000 steps
# instead of 400: 7.5x the budget of studies/tiny, where the TA alone did not yet beat the
# Student alone by twice the seed spread (the study's own criterion); 6.1M tokens per run,
# 1.6 passes over the corpus. On this CPU it would take about 9 hours (studies/tiny: 78 min
# for 400 steps on 2 cores). Sized by benchmarks/study_gpu_budget.py (BENCHMARKS.md, "A study
# on a lent GPU"): 22 runs, 8 side by side, predicted about 6 minutes on an H200 from the ops
# and FLOPs of each kind of step counted here; a model, with its constants stated there.
#
# $OUT receives at most 5 files: RESULTS.md and study.png (copy both into
# studies/gpu-tiny-3000/ with the card and the date), study.json, study.log (every run's start
# and end) and study_runs.tar.gz (every run's config, metrics, results and log; no checkpoints).
# A deadline (MATTA_GPU_STUDY_DEADLINE_S, default 540 s) stops the study before the lease's
# 10 minutes; then the runs that finished are still archived, and a report of them is tried.
# MATTA_GPU_CHECK_PYTHON picks the interpreter (default python3, the image's).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
deadline=${MATTA_GPU_STUDY_DEADLINE_S:-540}
py=${MATTA_GPU_CHECK_PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET MATTA_INTERPRET_TILES MATTA_INTERPRET_BLOCK_V
OUT=${OUT:-$(mktemp -d -t matta-study.XXXXXX)}
mkdir -p "$OUT"
work=$(mktemp -d -t matta-study-work.XXXXXX)
STUDY_FLAGS=(--preset tiny --steps 3000 --seeds 3 --jobs 8 --device cuda)
# MATTA_GPU_STUDY_FLAGS replaces them (a CPU rehearsal: "--quick --seeds 2 --device cpu").
read -r -a flags <<< "${MATTA_GPU_STUDY_FLAGS:-${STUDY_FLAGS[*]}}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "$(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"; } | tee "$work/study.log"
echo "\$ matta study ${flags[*]}" | tee -a "$work/study.log"
timeout -k 30 $((deadline - 40 - (SECONDS - started))) "$py" -m matta study "${flags[@]}" --out "$work/study" \
  2>&1 | tee -a "$work/study.log"
code=${PIPESTATUS[0]}
echo "matta study: exit $code after $((SECONDS - started)) s" | tee -a "$work/study.log"
if [[ ! -f $work/study/RESULTS.md && -d $work/study/runs ]]; then  # stopped early: report what finished
  "$py" -c "import sys; from matta.study_report import write_report; print(write_report(sys.argv[1]))" \
    "$work/study" 2>&1 | tail -n 3 | tee -a "$work/study.log"
fi
for f in RESULTS.md study.png study.json; do [[ -f $work/study/$f ]] && cp "$work/study/$f" "$OUT/"; done
cp "$work/study.log" "$OUT/study.log"
[[ -d $work/study/runs ]] && tar -czf "$OUT/study_runs.tar.gz" -C "$work/study" --exclude=checkpoints runs
ls -l "$OUT"
[[ -f $OUT/RESULTS.md ]] && grep -E '^(Budget:|\| )' "$OUT/RESULTS.md" | head -n 60
exit "$code"
