"""Every registered Triton kernel configuration builds for Hopper (sm_90) and Ampere (sm_80).

No GPU is needed: Triton lowers to PTX and ptxas assembles a cubin for the target. The check
runs in a subprocess because this test session runs the kernels through the interpreter.
"""
import json
import os
import subprocess
import sys

import pytest


def test_every_kernel_config_compiles_for_gpus(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "matta.kernels.compile_check", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    names = {r["name"] for r in results}
    assert any(name.startswith("nested_linear.") for name in names)
    for name in names:
        archs = {r["arch"] for r in results if r["name"] == name}
        assert archs == {80, 90}, (name, archs)
    assert all(r["ok"] for r in results)


def test_kernels_only_import_as_a_matta_subpackage():
    """No matta module imports a top-level `kernels` (which could be a stranger's package)."""
    import ast
    import pathlib

    import matta.kernels
    import matta.kernels.nested_linear  # noqa: F401

    assert matta.kernels.__name__ == "matta.kernels"
    assert matta.kernels.nested_linear.__name__ == "matta.kernels.nested_linear"
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("matta/**/*.py"), *root.glob("kernels/**/*.py"), *root.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path}: {n}" for n in names if n == "kernels" or n.startswith("kernels.")]
    assert not offenders, offenders
