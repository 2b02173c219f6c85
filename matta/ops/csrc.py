"""Build the C++/CUDA sources in `csrc/` on first use and cache the result.

matta works without a compiler: every C++ op has a PyTorch fallback, and callers ask
`load_extension` only when they want the compiled path. The build goes through
`torch.utils.cpp_extension.load` (ninja), into `$MATTA_EXTENSIONS_DIR` or
`~/.cache/matta/extensions`, keyed by the source hash so an edited source rebuilds.
"""
import functools
import hashlib
import os
import shutil

from .._source_tree import REPO_ROOT


class ExtensionBuildError(RuntimeError):
    """The C++ toolchain is missing or the build failed; the message says which and why."""


def source_dir() -> str:
    """`csrc/` of a source checkout, or the copy installed as `matta/csrc`."""
    for candidate in (
        os.path.join(REPO_ROOT, "csrc"),
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"),
    ):
        if os.path.isdir(candidate):
            return candidate
    raise ExtensionBuildError("matta's csrc/ sources are not installed; reinstall matta")


def missing_toolchain(cuda: bool = False) -> list:
    """Names of the build tools that are not on PATH (empty when the build can run)."""
    needed = ["ninja", os.environ.get("CXX", "c++")]
    if cuda:
        needed.append("nvcc")
    return [tool for tool in needed if shutil.which(tool) is None]


def _build_directory(name: str, sources: list) -> str:
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    root = os.environ.get("MATTA_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "matta", "extensions"
    )
    path = os.path.join(root, f"{name}-{digest.hexdigest()[:16]}")
    os.makedirs(path, exist_ok=True)
    return path


@functools.cache
def load_extension(name: str, sources: tuple, extra_cflags: tuple = ("-O3",), verbose: bool = False):
    """Compile (once per source version) and import the extension built from `sources`.

    `sources` are file names inside csrc/. Raises ExtensionBuildError naming the missing
    tool or the compiler's complaint instead of a deep traceback from the build system.
    """
    paths = [os.path.join(source_dir(), s) for s in sources]
    for path in paths:
        if not os.path.isfile(path):
            raise ExtensionBuildError(f"extension {name!r}: source {path} does not exist")
    cuda = any(p.endswith(".cu") for p in paths)
    missing = missing_toolchain(cuda)
    if missing:
        raise ExtensionBuildError(
            f"extension {name!r} needs {', '.join(missing)} on PATH to build "
            "(pip install ninja; install a C++ compiler, and the CUDA toolkit for .cu sources)"
        )
    from torch.utils.cpp_extension import load

    try:
        return load(
            name=name,
            sources=paths,
            extra_cflags=list(extra_cflags),
            build_directory=_build_directory(name, paths),
            verbose=verbose,
        )
    except Exception as error:  # the build system raises many kinds; report them as one
        raise ExtensionBuildError(f"building extension {name!r} failed: {error}") from error
