"""Make `matta.kernels` importable from a plain source checkout.

An installed matta (wheel or editable) has `matta.kernels` already, mapped from the
top-level `kernels/` folder by setup.py. A checkout used through PYTHONPATH (as on a lent
GPU machine, which has no package registry) has not; there the subpackage is loaded
straight from `<checkout>/kernels`, and never as a top-level `kernels` module.
"""
import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_kernels_subpackage() -> None:
    if "matta.kernels" in sys.modules or importlib.util.find_spec("matta.kernels") is not None:
        return
    init = os.path.join(REPO_ROOT, "kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ImportError("matta.kernels is missing: reinstall matta (pip install -e .)")
    spec = importlib.util.spec_from_file_location(
        "matta.kernels", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["matta.kernels"] = module
    spec.loader.exec_module(module)
