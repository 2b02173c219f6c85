"""The list of kernel configurations to compile ahead of time for GPU targets."""
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration: a `@triton.jit` function with its argument types.

    `signature` maps every argument to a Triton type string (`*bf16`, `i32`, `fp32`, ...;
    `constexpr` for constexpr arguments and for integers the launcher passes as 1, which
    Triton's JIT specialises to constants the same way); `constexprs` gives their values;
    `divisible` names the arguments that are multiples of 16 (pointers: 16-byte aligned), as
    the JIT marks them at run time on ordinary shapes; `options` holds launch options such as
    `num_warps` and `num_stages`. `uses_dot` marks kernels whose inner loop is a `tl.dot`,
    which must lower to `wgmma` on Hopper.
    """

    name: str
    fn: Callable[..., Any]
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    uses_dot: bool = False
    divisible: tuple = ()


COMPILE_SPECS: list = []


def register_compile_spec(spec: CompileSpec) -> CompileSpec:
    COMPILE_SPECS.append(spec)
    return spec
