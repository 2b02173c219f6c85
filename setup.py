"""Packaging glue that pyproject.toml cannot express: the top-level source folder `kernels/`
installs inside the matta package, as `matta.kernels`.

A top-level `import kernels` could resolve to an unrelated PyPI package, so the Triton
kernels are only ever installed and imported as a subpackage of matta.
"""
from setuptools import find_packages, setup

matta_packages = find_packages(include=["matta", "matta.*"])
kernel_packages = ["matta.kernels" + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])]

setup(
    packages=matta_packages + kernel_packages,
    package_dir={"matta.kernels": "kernels"},
    package_data={"matta.ops": ["dispatch_table.json"]},
)
