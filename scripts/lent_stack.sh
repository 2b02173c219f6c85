#!/usr/bin/env bash
# Rebuild here, on the CPU, the software stack a lent GPU runs, and check the project on it:
# Python 3.12, torch 2.11.0, triton 3.6.0, numpy 2.5.2 (the image's; see README "GPU leases").
# Run it when kernels, benchmarks or gpu_check.sh change, before spending a lease on them.
#
#   bash scripts/lent_stack.sh                  # environment in .venv-lent (made once, reused)
#   LENT_PYTHON=/path/to/python3.12 bash scripts/lent_stack.sh
#
# It checks that (1) every module and benchmark imports, (2) every kernel config builds for
# sm_90 without spilling (compile_check), and (3) gpu_check.sh runs to its summary, each CUDA
# step failing at once for want of a GPU. torch 2.11.0 comes from PyPI as its CUDA build
# (several GB, once). The interpreter kernel tests are not run here: triton 3.6's interpreter
# fails every kernel with a tensor loop bound under numpy >= 2.4, and CI already runs them on
# triton 3.6 with numpy 2.3 (.ci/run); a GPU does not use the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${LENT_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python3}
venv=.venv-lent
if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # The image's versions (issue 18).
  "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 numpy==2.5.2 safetensors==0.8.0 \
    transformers==5.17.0 tokenizers==0.23.2 pytest pytest-xdist pytest-benchmark
fi
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

echo "== imports"
"$venv/bin/python" - <<'PY'
import importlib, pkgutil, runpy, sys
import matta, matta.kernels
for module in pkgutil.walk_packages(matta.__path__, "matta."):
    # matta.__main__ runs the command line; lm_eval_model needs lm-eval, which a lease lacks.
    if module.name not in ("matta.__main__", "matta.lm_eval_model"):
        importlib.import_module(module.name)
sys.path.insert(0, "benchmarks")  # as when a benchmark runs as a script
for script in ("bench_nested_linear", "bench_loss", "bench_models", "bench_shampoo", "train_throughput",
               "write_dispatch_table", "gpu_summary"):
    sys.argv = [f"benchmarks/{script}.py", "--help"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), (script, exit_.code)
print("every module and benchmark imports")
PY

echo "== compile_check (sm_90)"
TRITON_INTERPRET= TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" -m matta.kernels.compile_check --arch 90 \
  --jobs "$(nproc)" > /tmp/lent_stack_compile.txt || { tail -n 30 /tmp/lent_stack_compile.txt; exit 1; }
tail -n 1 /tmp/lent_stack_compile.txt

echo "== gpu_check.sh dry run"
OUT=$(mktemp -d) MATTA_GPU_CHECK_PYTHON="$venv/bin/python" bash benchmarks/gpu_check.sh > /tmp/lent_stack_gpu_check.txt || true
tail -n 25 /tmp/lent_stack_gpu_check.txt
