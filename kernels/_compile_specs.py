"""The list of kernel configurations to compile ahead of time for GPU targets, and what a
launch compiles, so that every launchable configuration can be checked against the list."""
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
                 torch.int32: "*i32"}


@dataclass(frozen=True)
class Launch:
    """What one launch of a `@triton.jit` function compiles, as the JIT specialises it.

    `pointer_types` holds the element types of the pointers the launch uses (a placeholder
    passed for an unused pointer is left out); `constexprs` the constexpr arguments and the
    integers passed as 1 (which the JIT turns into constants); `num_stages` None means
    Triton's default.
    """

    fn: Any
    pointer_types: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int | None

    def describe(self) -> str:
        constexprs = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        types = ", ".join(f"{k}: {v}" for k, v in self.pointer_types)
        return f"{getattr(self.fn, '__name__', self.fn)}({constexprs}; {types}; warps {self.num_warps}, " \
               f"stages {self.num_stages})"


def record_launch(fn, args: tuple, constexprs: dict, *, unused=(), do_not_specialize=(), num_warps: int,
                  num_stages: int | None = None) -> Launch:
    """The `Launch` of `fn[grid](*args, **constexprs, num_warps=..., num_stages=...)`;
    `unused` names the pointer arguments that only hold a placeholder."""
    bound = dict(zip(fn.arg_names, args))
    pointers = tuple((k, POINTER_TYPES[v.dtype]) for k, v in bound.items()
                     if isinstance(v, torch.Tensor) and k not in unused)
    ones = {k: 1 for k, v in bound.items()
            if isinstance(v, int) and not isinstance(v, bool) and v == 1 and k not in do_not_specialize}
    return Launch(fn, pointers, tuple(sorted({**ones, **constexprs}.items())), num_warps, num_stages)


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration: a `@triton.jit` function with its argument types.

    `signature` maps every argument to a Triton type string (`*bf16`, `i32`, `fp32`, ...;
    `constexpr` for constexpr arguments and for integers the launcher passes as 1, which
    Triton's JIT specialises to constants the same way); `constexprs` gives their values;
    `divisible` names the arguments that are multiples of 16 (pointers: 16-byte aligned), as
    the JIT marks them at run time on ordinary shapes; `options` holds launch options such as
    `num_warps` and `num_stages`. `uses_dot` marks kernels whose inner loop is a `tl.dot`,
    which must lower to `wgmma` on Hopper. `epilogue_flags` name boolean constexprs that only
    add code after the main loops (a bias, row sums): this build, with them True, stands for
    the launches that have them False.
    """

    name: str
    fn: Callable[..., Any]
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    uses_dot: bool = False
    divisible: tuple = ()
    epilogue_flags: tuple = ()

    def covers(self, launch: Launch) -> bool:
        """Whether this build compiles what `launch` runs."""
        if launch.fn is not self.fn or launch.num_warps != self.options.get("num_warps", 4) \
                or launch.num_stages != self.options.get("num_stages"):
            return False
        if any(self.signature.get(k) != t for k, t in launch.pointer_types):
            return False
        launched = dict(launch.constexprs)
        if set(launched) != set(self.constexprs):
            return False
        return all(launched[k] == v or (k in self.epilogue_flags and v is True and launched[k] is False)
                   for k, v in self.constexprs.items())


COMPILE_SPECS: list = []


def register_compile_spec(spec: CompileSpec) -> CompileSpec:
    COMPILE_SPECS.append(spec)
    return spec
