"""Shampoo with blocked Kronecker factors, batched over blocks of one shape, with no host reads in a step.

For a matrix-shaped gradient G (tensors of higher order are viewed as (d0, d1*d2*...)),
split into blocks G_b of at most `max_preconditioner_dim` rows and columns:

    L_b <- beta2 L_b + (1 - beta2) G_b G_b^T        R_b <- beta2 R_b + (1 - beta2) G_b^T G_b
    every `precondition_frequency` steps from `start_preconditioning_step` on:
        P_b = (L_b + eps I)^(-1/4),  Q_b = (R_b + eps I)^(-1/4)   (all blocks, one call per size)
    D_b = P_b F_b Q_b, rescaled to the norm of the grafting optimizer's step on the block,

where F is the gradient filtered with `betas[0]` (an EMA; the gradient itself when 0).
Before `start_preconditioning_step` (and for 1-D parameters always) the step is exactly the
grafting optimizer's. Then heavy-ball momentum (optionally Nesterov), decoupled weight decay
and `p <- p - lr * D`.

How a step is batched. The blocks of one shape (m, n) of the parameters of one param group
(with one step count) form a *pack*: their gradients are copied into one (B, m, n) tensor
(one strided view per rectangle of equal blocks of a parameter, one `_foreach_copy_` for
all), and the factor products, the preconditioning and the grafting norms are batched
matmuls and reductions over it. The first moment, grafting statistics and momentum of those
blocks live in the pack in the same layout, the 0-/1-D parameters of a group form one flat
pack per dtype, and the parameter update is one `_foreach_add_` over views. So a steady
step costs a few dozen ops per pack and one view per such rectangle, whatever the number of
blocks. The inverse roots due in a step are stacked per size across packs: one
`matrix_inverse_root` call per size. `state_dict()` gives the per-parameter, per-block
layout (the same as before packs existed), and `load_state_dict` takes it back.

No host reads in `step()`. A step never waits for the device:
- a NaN/inf gradient in any parameter (one whose L2 norm is not finite) makes the whole step
  a no-op (no parameter, moment, factor or root changes; masks on the device decide it),
  counted per parameter (`nonfinite_gradient_counts()`) and filed in the optimizer's `report`;
- a computed root is accepted on the device when finite with error <= the threshold (else
  the previous root stays, `torch.where`), failures are counted there (`root_failure_counts()`),
  and a factor failing `max_consecutive_failures` times in a row is filed in `report`;
- `report` (a `matta.ops.DeferredReport`, given or owned) is read by its owner, e.g. the
  training loop at a log step: `opt.report.check(RuntimeError)` raises naming what failed.
The step counts are host bookkeeping and advance on a skipped step too. The roots run
`sync_free` on every device (see `matrix_inverse_root`): a root that eigh cannot compute in
fp32 is rejected and reported like any failed root, not retried in float64 (finding it would
be a host read). Two host waits are not ours to remove: `root_method="auto"` times its
candidates once per size on its first root step, and on CUDA `torch.linalg.eigh` checks
cuSOLVER's status on the host (use "newton" to avoid it).

Under torch.distributed each rank owns a contiguous share of every pack's blocks: it keeps
their factors and roots, does their factor updates, preconditioning and grafting norms and
roots them, and the finished directions are all-gathered, so the optimizer's matrix work per
rank divides by the world size (the elementwise work, like DDP's AdamW, is replicated).
`state_dict()` is then a collective that every rank calls; it returns the whole state.
"""
import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.deferred import DeferredReport
from ..ops.matrix_functions import METHODS, choose_root_method, matrix_inverse_root

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
FACTOR_MATMUL_DTYPES = ("float32", "tf32", "bfloat16")
# Per-parameter entries of the state dict that live on the CPU.
_CPU_STATE = ("step", "block_bounds", "root_ready", "failures_consecutive", "failures_total")
_MOMENTS = ("exp_avg", "graft_sq", "momentum_buffer")
# Group settings that a state dict written before they existed may lack.
_OPTIONAL_GROUP_KEYS = {"factor_matmul_dtype": "float32"}
NONFINITE_MESSAGE = ("Shampoo: non-finite (NaN/inf) gradient; those steps were skipped (no parameter or optimizer "
                     "state changed); nonfinite_gradient_counts() says which parameters")


@dataclass(frozen=True)
class RootSettings:
    """How inverse roots are computed and judged (one per optimizer).

    error_threshold: a root whose `matrix_inverse_root` error exceeds this (or which is not
        finite) is rejected; the block keeps its previous root.
    max_consecutive_failures: a factor that fails this many recomputations in a row is
        filed in the optimizer's report (raised when its owner reads it).
    max_iterations, tolerance: the Newton iteration's cap and stopping threshold.
    """

    error_threshold: float = 0.1
    max_consecutive_failures: int = 5
    max_iterations: int = 100
    tolerance: float = 1e-6


def _method_key(device: torch.device, n: int, dtype: torch.dtype) -> str:
    """Key of a resolved "auto" choice: "device type:n:dtype"."""
    return f"{device.type}:{n}:{str(dtype).removeprefix('torch.')}"


def matrix_view_shape(shape) -> tuple:
    """The 2-D shape Shampoo preconditions a parameter of this shape as; () for 0-/1-D ones."""
    shape = tuple(shape)
    if len(shape) < 2:
        return ()
    return shape[0], math.prod(shape[1:])


def block_bounds(size: int, splits, max_dim: int) -> list:
    """[(start, stop)] covering range(size): cut at each split point, then every max_dim."""
    points = sorted({int(s) for s in splits if 0 < int(s) < size})
    bounds = []
    for start, stop in zip([0, *points], [*points, size]):
        bounds.extend((lo, min(lo + max_dim, stop)) for lo in range(start, stop, max_dim))
    return bounds


def _equal_runs(bounds) -> list:
    """[(first interval index, start, size, count)]: the bounds as runs of equal-size intervals."""
    runs = []
    for index, (lo, hi) in enumerate(bounds):
        if runs and runs[-1][2] == hi - lo and runs[-1][1] + runs[-1][2] * runs[-1][3] == lo:
            first, start, size, count = runs[-1]
            runs[-1] = (first, start, size, count + 1)
        else:
            runs.append((index, lo, hi - lo, 1))
    return runs


def nested_block_splits(module: torch.nn.Module) -> dict:
    """{weight: ((N_S,), (M_S,))} for every nested layer (a module with `student_features`).

    Passed as `Shampoo(..., block_splits=...)`, Student rows/columns and TA-only ones fall
    into separate blocks. Layers with an unshared Student (`share_weights=False`) are skipped:
    their TA weight holds no Student block.
    """
    splits = {}
    for layer in module.modules():
        if not hasattr(layer, "student_features") or not getattr(layer, "share_weights", True):
            continue
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:
            n_s, m_s = layer.student_features
            splits[weight] = ((int(n_s),), (int(m_s),))
    return splits


def _check_group(group):
    lr, betas = group["lr"], group["betas"]
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and 0 <= betas[0] < 1 and 0 < betas[1] <= 1):
        raise ValueError(f"betas must be (beta1 in [0, 1), beta2 in (0, 1]), got {betas!r}")
    for name in ("epsilon", "grafting_epsilon", "weight_decay", "momentum"):
        value = group[name]
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    if group["momentum"] >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
    if not (0 < group["grafting_beta2"] <= 1):
        raise ValueError(f"grafting_beta2 must be in (0, 1], got {group['grafting_beta2']!r}")
    for name in ("max_preconditioner_dim", "precondition_frequency"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    start = group["start_preconditioning_step"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"start_preconditioning_step must be an int >= 1, got {start!r}")
    if group["grafting"] not in GRAFTINGS:
        raise ValueError(f"grafting must be one of {GRAFTINGS}, got {group['grafting']!r}")
    if group["root_method"] not in METHODS:
        raise ValueError(f"root_method must be one of {METHODS}, got {group['root_method']!r}")
    if group["factor_matmul_dtype"] not in FACTOR_MATMUL_DTYPES:
        raise ValueError(f"factor_matmul_dtype must be one of {FACTOR_MATMUL_DTYPES}, got {group['factor_matmul_dtype']!r}")


def _matrix_strides(t: Tensor):
    """(row stride, column stride) of `t` seen as its `matrix_view_shape`, or None when that
    view would need a copy (trailing dimensions not laid out as one)."""
    if t.dim() == 2:
        return t.stride()
    expected = 1
    for size, stride in reversed(list(zip(t.shape[1:], t.stride()[1:]))):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.stride(0), 1


@contextlib.contextmanager
def factor_matmul_precision(matmul_dtype: str, device: torch.device):
    """TF32 tensor cores for the fp32 factor products when asked for on a CUDA device."""
    if matmul_dtype != "tf32" or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = before


# ---------------------------------------------------------------------------------------
# Packs


class _Member:
    """One parameter's share of a pack: a rectangle of equal blocks (matrix packs), or the
    whole parameter flattened (flat packs), at `first` (block or element) in the pack."""

    def __init__(self, param, first, rect=None):
        self.param, self.first, self.rect = param, first, rect
        self.param_view = None
        self.param_key = None

    @property
    def size(self) -> int:
        """Blocks (matrix) or elements (flat) this member holds in its pack."""
        if self.rect is None:
            return self.param.numel()
        return self.rect["count_r"] * self.rect["count_c"]

    def natural_view(self, t: Tensor) -> Tensor:
        """The member's part of a parameter-shaped tensor, shaped like `pack_view`'s result."""
        if self.rect is None:
            return t.as_strided((t.numel(),), (t.stride(0) if t.dim() else 1,), t.storage_offset())
        strides = _matrix_strides(t)
        if strides is None:
            raise ValueError(f"Shampoo needs the trailing dimensions of a parameter of shape {tuple(t.shape)} laid "
                             f"out as one (its strides are {t.stride()}); make it contiguous")
        s0, s1 = strides
        r = self.rect
        m, n = r["m"], r["n"]
        return t.as_strided((r["count_r"], r["count_c"], m, n), (m * s0, n * s1, s0, s1),
                            t.storage_offset() + r["r0"] * s0 + r["c0"] * s1)

    def pack_view(self, packed: Tensor) -> Tensor:
        """The member's part of a contiguous pack tensor ((B, m, n) or (N,))."""
        if self.rect is None:
            return packed.as_strided((self.param.numel(),), (1,), packed.storage_offset() + self.first)
        r = self.rect
        m, n = r["m"], r["n"]
        return packed.as_strided((r["count_r"], r["count_c"], m, n), (r["count_c"] * m * n, m * n, n, 1),
                                 packed.storage_offset() + self.first * m * n)

    def cached_param_view(self) -> Tensor:
        """`natural_view(param)`, rebuilt only when the parameter's storage moved."""
        key = (self.param.data_ptr(), self.param.stride(), self.param.storage_offset())
        if key != self.param_key:
            self.param_view, self.param_key = self.natural_view(self.param.detach()), key
        return self.param_view

    def block_indices(self, n_col_blocks: int) -> list:
        """Indices into the parameter's `block_bounds` of this member's blocks, in pack order."""
        r = self.rect
        return [(r["row_index"] + a) * n_col_blocks + r["col_index"] + b
                for a in range(r["count_r"]) for b in range(r["count_c"])]


class _Pack:
    """All blocks of one shape (matrix) or all 0-/1-D parameters of one dtype (flat) of one cohort.

    `grad` holds the step's gathered gradients, then its final directions. `tensors` holds the
    moments of every block (replicated on every rank); a matrix pack also holds the factors,
    roots and root bookkeeping of the blocks [lo, hi) this rank owns.
    """

    def __init__(self, key, members, size, device, dtype, rank, world):
        self.key, self.members, self.size, self.device, self.dtype = key, members, size, device, dtype
        self.matrix = members[0].rect is not None
        shape = (size, key[0], key[1]) if self.matrix else (size,)
        self.shape = shape
        self.grad = torch.empty(shape, dtype=dtype, device=device)
        self.grad_views = [m.pack_view(self.grad) for m in members]
        self.tensors = {}
        self.share = -(-size // world)
        self.lo, self.hi = min(size, rank * self.share), min(size, (rank + 1) * self.share)
        if self.matrix:
            self.factor_dtype = torch.promote_types(dtype, torch.float32)
        if self.matrix and world > 1:
            self.send = torch.empty((self.share, *shape[1:]), dtype=dtype, device=device)
            self.gathered = torch.empty((self.share * world, *shape[1:]), dtype=dtype, device=device)

    @property
    def owned(self) -> int:
        return self.hi - self.lo

    def own(self, t: Tensor) -> Tensor:
        """The rows [lo, hi) of a tensor over all the pack's blocks (no op when it is all of them)."""
        return t if (self.lo, self.hi) == (0, self.size) else t[self.lo:self.hi]


class _Cohort:
    """The parameters of one param group with one step count: its packs and its step."""

    def __init__(self, group, step, params):
        self.group, self.params = group, params
        self.t = step  # the step count, read by Python; mirrored in the CPU tensor every state["step"] shares
        self.step = torch.tensor(step, dtype=torch.int64)
        self.packs = []


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo (DistributedShampoo-like), batched over block shapes; see the module doc.

    Args:
        params: parameters or param groups (every argument below but `block_splits`,
            `root_settings`, `distributed`, `process_group` and `report` can be set per group).
        lr: learning rate.
        betas: (beta1, beta2): beta1 filters the gradient (EMA, bias-corrected); beta2 is the
            EMA of the factors L, R (1.0: a plain sum, as in AdaGrad).
        epsilon: added to L and R before their inverse roots.
        momentum, nesterov: heavy-ball momentum on the final direction (as torch.optim.SGD).
        weight_decay: decoupled (AdamW-style): p <- p (1 - lr * weight_decay).
        max_preconditioner_dim: the largest block side; the last block of a side is ragged.
        precondition_frequency: steps between root recomputations.
        start_preconditioning_step: the first step that uses Shampoo's direction (roots are
            first computed then); before it the optimizer is exactly the grafting one.
        grafting: "adam", "adagrad", "rmsprop", "sgd" or "none": whose step norm each
            block's direction takes, and the optimizer used for 1-D parameters.
        grafting_beta2, grafting_epsilon: the grafting optimizer's beta2/alpha and epsilon.
        use_bias_correction: divide the filtered gradient by (1 - beta1^t) and the factors by
            (1 - beta2^t) (the Adam grafting is always bias-corrected, as Adam is).
        root_method: `matrix_inverse_root` method ("auto", "eigh", "eigh_loop", "newton").
            "auto" is resolved once per device and size and the choice is kept in the
            state dict, so a resumed run roots the same way.
        factor_matmul_dtype: the products G G^T, G^T G of the factor updates: "float32"
            (default, exact), "tf32" (TF32 tensor cores on CUDA; the same as float32 on a
            CPU) or "bfloat16" (the gradient blocks cast to bf16, products rounded to bf16,
            accumulated into float32 factors). Factors and roots stay float32.
        block_splits: {parameter: (row split points, column split points)}: block boundaries
            that come first (e.g. `nested_block_splits(model)` for the Student/TA boundary).
        root_settings: a `RootSettings` (failure threshold, Newton settings).
        distributed: share the matrix work over the ranks of `process_group`; None: when
            torch.distributed is initialised with more than one rank. Gradients must already
            be identical on every rank (as after DDP's all-reduce).
        process_group: the group for `distributed` (default: the world).
        report: the `DeferredReport` to file device-side failures in (default: a new one);
            `self.report` either way.

    `step()` raises nothing about the values it computes (that would need a host read):
    NaN/inf gradients and roots that keep failing go to `report` (see the module doc).
    It raises TypeError on a sparse gradient and ValueError on parameters on more than one
    device.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, momentum=0.0, nesterov=False,
        weight_decay=0.0, max_preconditioner_dim=1024, precondition_frequency=20,
        start_preconditioning_step=20, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
        use_bias_correction=True, root_method="auto", factor_matmul_dtype="float32", *, block_splits=None,
        root_settings: RootSettings = RootSettings(), distributed=None, process_group=None,
        report: DeferredReport | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), epsilon=epsilon, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            use_bias_correction=use_bias_correction, root_method=root_method,
            factor_matmul_dtype=factor_matmul_dtype,
        )
        if not isinstance(root_settings, RootSettings):
            raise TypeError(f"root_settings must be a RootSettings, got {type(root_settings).__name__}")
        if report is not None and not isinstance(report, DeferredReport):
            raise TypeError(f"report must be a matta.ops.DeferredReport, got {type(report).__name__}")
        self.root_settings = root_settings
        self.report = report if report is not None else DeferredReport()
        self._block_splits = {}
        for param, splits in dict(block_splits or {}).items():
            try:
                rows, cols = (tuple(int(s) for s in side) for side in splits)
            except (TypeError, ValueError):
                raise TypeError(f"block_splits values must be (row splits, column splits), got {splits!r}") from None
            self._block_splits[param] = (rows, cols)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        self.distributed = bool(distributed)
        self.process_group = process_group
        # "auto" resolved per "device type:n:dtype"; saved in the state dict.
        self._root_methods: dict = {}
        self._cohorts = None  # the packed state, built by a step for its set of parameters
        self._plan_key = None
        self._nonfinite = None  # per parameter (in param_groups order): steps skipped for it
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self._check_splits_cover_params()

    def add_param_group(self, param_group):
        if getattr(self, "_cohorts", None) is not None:
            self._unpack()
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])
        self._nonfinite = None

    def _check_splits_cover_params(self):
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for param in self._block_splits:
            if id(param) not in known:
                raise ValueError(f"block_splits names a parameter of shape {tuple(param.shape)} that the optimizer does not hold")

    # -------------------------------------------------------------------------------
    # Layout

    def _bounds(self, param, group):
        """(row bounds, column bounds) of the parameter's blocks."""
        shape = matrix_view_shape(param.shape)
        rows_split, cols_split = self._block_splits.get(param, ((), ()))
        max_dim = group["max_preconditioner_dim"]
        return block_bounds(shape[0], rows_split, max_dim), block_bounds(shape[1], cols_split, max_dim)

    def _layout(self, param, group) -> Tensor:
        rows, cols = self._bounds(param, group)
        bounds = [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]
        return torch.tensor(bounds, dtype=torch.int64).reshape(-1, 4)

    def _expected_state(self, param, group) -> dict:
        """{key: (shape, on the CPU)} of a parameter's entry in `state_dict()`."""
        expected = {"step": ((), True)}
        moments = {"exp_avg": group["betas"][0] > 0, "graft_sq": group["grafting"] in ("adam", "adagrad", "rmsprop"),
                   "momentum_buffer": group["momentum"] > 0}
        expected.update({name: (tuple(param.shape), False) for name, kept in moments.items() if kept})
        if matrix_view_shape(param.shape):
            layout = self._layout(param, group)
            expected["block_bounds"] = (tuple(layout.shape), True)
            for name in ("root_ready", "failures_consecutive", "failures_total"):
                expected[name] = ((len(layout), 2), True)
            for i, (r0, r1, c0, c1) in enumerate(layout.tolist()):
                for side, size in (("left", r1 - r0), ("right", c1 - c0)):
                    expected[f"factor_{side}.{i}"] = ((size, size), False)
                    expected[f"root_{side}.{i}"] = ((size, size), False)
        return expected

    def _world(self):
        if not self.distributed:
            return 0, 1
        group = self._group()
        return dist.get_rank(group), dist.get_world_size(group)

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _build_plan(self, active):
        """Packs for the parameters `active` [(group index, param index, param)], from their
        per-parameter state in `self.state` (or fresh state)."""
        rank, world = self._world()
        by_cohort = defaultdict(list)
        for gi, _, param in active:
            step = self.state[param]["step"] if "step" in self.state.get(param, {}) else None
            by_cohort[(gi, int(step) if step is not None else 0)].append(param)
        cohorts = []
        for (gi, step), members in by_cohort.items():
            group = self.param_groups[gi]
            cohort = _Cohort(group, step, members)
            layout = defaultdict(list)  # pack key -> members
            sizes = defaultdict(int)
            for param in members:
                if not matrix_view_shape(param.shape):
                    key = ("flat", param.dtype)
                    layout[key].append(_Member(param, sizes[key]))
                    sizes[key] += param.numel()
                    continue
                rows, cols = self._bounds(param, group)
                for ri, r0, m, count_r in _equal_runs(rows):
                    for ci, c0, n, count_c in _equal_runs(cols):
                        key = (m, n, param.dtype)
                        rect = dict(r0=r0, c0=c0, m=m, n=n, count_r=count_r, count_c=count_c, row_index=ri, col_index=ci)
                        member = _Member(param, sizes[key], rect)
                        layout[key].append(member)
                        sizes[key] += member.size
            for key, pack_members in layout.items():
                dtype = key[-1]
                pack = _Pack(key, pack_members, sizes[key], pack_members[0].param.device, dtype, rank, world)
                self._fill_pack(pack, group)
                cohort.packs.append(pack)
            for param in cohort.params:
                self.state[param] = {"step": cohort.step}
            cohorts.append(cohort)
        self._cohorts = cohorts

    def _fill_pack(self, pack, group):
        """The pack's tensors, from the members' per-parameter state where there is one."""
        names = [name for name, kept in (("exp_avg", group["betas"][0] > 0),
                                         ("graft_sq", group["grafting"] in ("adam", "adagrad", "rmsprop")),
                                         ("momentum_buffer", group["momentum"] > 0)) if kept]
        states = [self.state.get(m.param, {}) for m in pack.members]
        for name in names:
            packed = torch.zeros(pack.shape, dtype=pack.dtype, device=pack.device)
            for member, state in zip(pack.members, states):
                if name in state:
                    member.pack_view(packed).copy_(member.natural_view(state[name].to(pack.device)))
            pack.tensors[name] = packed
        if not pack.matrix:
            return
        m, n = pack.key[0], pack.key[1]
        owned, dtype, device = pack.owned, pack.factor_dtype, pack.device
        t = pack.tensors
        t["factor_left"] = torch.zeros(owned, m, m, dtype=dtype, device=device)
        t["factor_right"] = torch.zeros(owned, n, n, dtype=dtype, device=device)
        t["root_left"] = torch.eye(m, dtype=dtype, device=device).repeat(owned, 1, 1)
        t["root_right"] = torch.eye(n, dtype=dtype, device=device).repeat(owned, 1, 1)
        t["root_ready"] = torch.zeros(owned, 2, dtype=torch.bool, device=device)
        t["failures_consecutive"] = torch.zeros(owned, 2, dtype=torch.int64, device=device)
        t["failures_total"] = torch.zeros(owned, 2, dtype=torch.int64, device=device)
        for member, state in zip(pack.members, states):
            if "block_bounds" not in state:
                continue
            n_cols = len(self._bounds(member.param, group)[1])
            counts = {name: state[name].to(device) for name in ("root_ready", "failures_consecutive", "failures_total")}
            for j, i in enumerate(member.block_indices(n_cols), start=member.first):
                if not pack.lo <= j < pack.hi:
                    continue
                k = j - pack.lo
                for name in ("factor_left", "factor_right", "root_left", "root_right"):
                    t[name][k].copy_(state[f"{name}.{i}"])
                for name, values in counts.items():
                    t[name][k].copy_(values[i])

    def _gathered(self, pack, t: Tensor) -> Tensor:
        """A tensor over the owned blocks, gathered from every rank into one over all blocks."""
        if not self.distributed:
            return t
        _, world = self._world()
        send = torch.zeros((pack.share, *t.shape[1:]), dtype=t.dtype, device=t.device)
        send[:pack.owned].copy_(t)
        out = torch.empty((pack.share * world, *t.shape[1:]), dtype=t.dtype, device=t.device)
        _all_gather(out, send, self.process_group)
        return out[:pack.size]

    def _natural_state(self) -> dict:
        """{param: per-parameter state dict} of the packed state (copies; a collective when distributed)."""
        natural = {}
        for cohort in self._cohorts or []:
            group = cohort.group
            for param in cohort.params:
                natural[param] = {"step": cohort.step.clone()}
            for pack in cohort.packs:
                for name in _MOMENTS:
                    if name not in pack.tensors:
                        continue
                    for member in pack.members:
                        state = natural[member.param]
                        if name not in state:
                            state[name] = torch.empty(member.param.shape, dtype=pack.dtype, device=pack.device)
                        member.natural_view(state[name]).copy_(member.pack_view(pack.tensors[name]))
                if not pack.matrix:
                    continue
                full = {name: self._gathered(pack, pack.tensors[name]) for name in
                        ("factor_left", "factor_right", "root_left", "root_right")}
                full.update({name: self._gathered(pack, pack.tensors[name]).cpu() for name in
                             ("root_ready", "failures_consecutive", "failures_total")})  # one copy each
                for member in pack.members:
                    state = natural[member.param]
                    if "block_bounds" not in state:
                        state["block_bounds"] = self._layout(member.param, group)
                        blocks = len(state["block_bounds"])
                        state["root_ready"] = torch.zeros(blocks, 2, dtype=torch.bool)
                        state["failures_consecutive"] = torch.zeros(blocks, 2, dtype=torch.int64)
                        state["failures_total"] = torch.zeros(blocks, 2, dtype=torch.int64)
                    n_cols = len(self._bounds(member.param, group)[1])
                    for j, i in enumerate(member.block_indices(n_cols), start=member.first):
                        for name in ("factor_left", "factor_right", "root_left", "root_right"):
                            state[f"{name}.{i}"] = full[name][j].clone()
                        for name in ("root_ready", "failures_consecutive", "failures_total"):
                            state[name][i] = full[name][j]
        for param, values in self.state.items():
            if param not in natural and values:
                natural[param] = dict(values)  # loaded but not yet stepped
        return natural

    def _unpack(self):
        """Moves the packed state back into `self.state` (per parameter) and drops the packs."""
        natural = self._natural_state()
        self.state = defaultdict(dict, natural)
        self._cohorts, self._plan_key = None, None

    # -------------------------------------------------------------------------------
    # Step

    def _active(self):
        active = []
        device = None
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"Shampoo does not support sparse gradients (group {gi}, parameter {pi})")
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise ValueError(f"Shampoo needs every parameter on one device; parameter {pi} of param group "
                                     f"{gi} is on {p.device}, an earlier one on {device}")
                active.append((gi, pi, p))
        return active, device

    def _global_index(self):
        """{id(param): position in param_groups order}."""
        return {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active, device = self._active()
        if not active:
            return loss
        key = tuple(id(p) for _, _, p in active)
        if key != self._plan_key:
            if self._cohorts is not None:
                self._unpack()
            self._build_plan(active)
            self._plan_key = key
            index = self._global_index()
            positions = [index[id(p)] for _, _, p in active]
            # arange when every parameter steps (no host-to-device copy, which would wait on CUDA)
            self._plan_index = (torch.arange(len(positions), device=device) if positions == list(range(len(index)))
                                else torch.tensor(positions, device=device))
        if self._nonfinite is None or self._nonfinite.device != device:
            self._nonfinite = torch.zeros(len(self._global_index()), dtype=torch.int64, device=device)

        grads = [p.grad for _, _, p in active]
        # The L2 norm is NaN/inf exactly when an entry is (or when squares overflow: entries
        # near 1e19, hopeless anyway); it is the fast foreach norm (the max-norm is 10-100x slower).
        bad_each = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
        self._nonfinite.index_add_(0, self._plan_index, bad_each.to(torch.int64))
        bad = bad_each.any()
        self.report.add(bad, NONFINITE_MESSAGE)
        ok = ~bad

        sources, targets = [], []
        for cohort in self._cohorts:
            cohort.t += 1
            cohort.step += 1
            for pack in cohort.packs:
                for member, view in zip(pack.members, pack.grad_views):
                    grad = member.param.grad
                    if pack.matrix and _matrix_strides(grad) is None:
                        grad = grad.contiguous()
                    sources.append(grad if grad.dim() == 1 else member.natural_view(grad))  # 1-D: the view is itself
                    targets.append(view)
        torch._foreach_copy_(targets, sources)
        for cohort in self._cohorts:
            for pack in cohort.packs:
                pack.grad.masked_fill_(bad, 0)  # a skipped step: every update below sees a zero gradient
        for cohort in self._cohorts:
            self._update_factors(cohort, ok)
        self._compute_roots(ok)
        for cohort in self._cohorts:
            self._apply(cohort, ok)
        return loss

    def _update_factors(self, cohort, ok):
        group = cohort.group
        beta2 = group["betas"][1]
        matmul_dtype = group["factor_matmul_dtype"]
        for pack in cohort.packs:
            if not pack.matrix or not pack.owned:
                continue
            g = pack.own(pack.grad).to(pack.factor_dtype)
            if matmul_dtype == "bfloat16":
                g = g.to(torch.bfloat16)
            # A skipped step keeps the factors: beta2 becomes 1 there (and the gradient is 0).
            keep = torch.full((), beta2, dtype=pack.factor_dtype, device=pack.device).masked_fill_(~ok, 1.0)
            with factor_matmul_precision(matmul_dtype, pack.device):
                for name, outer in (("factor_left", lambda: torch.bmm(g, g.mT)), ("factor_right", lambda: torch.bmm(g.mT, g))):
                    product = outer().to(pack.factor_dtype)
                    factor = pack.tensors[name]
                    if beta2 < 1:
                        factor.mul_(keep).add_(product, alpha=1 - beta2)
                    else:
                        factor.add_(product)

    def _first_order(self, pack, group, step, ok):
        """Update the first moment and the grafting statistics; return (filtered grad, graft direction)."""
        grad = pack.grad
        beta1 = group["betas"][0]
        filtered = grad
        if beta1 > 0:
            exp_avg = pack.tensors["exp_avg"]
            exp_avg.lerp_(torch.where(ok, grad, exp_avg), 1 - beta1)  # towards itself on a skipped step: unchanged
            filtered = exp_avg
            if group["use_bias_correction"]:
                filtered = filtered / (1 - beta1**step)
        grafting, graft_beta2 = group["grafting"], group["grafting_beta2"]
        if grafting in ("adam", "rmsprop"):
            graft_sq = pack.tensors["graft_sq"]
            updated = graft_sq.mul(graft_beta2).addcmul_(grad, grad, value=1 - graft_beta2)
            torch.where(ok, updated, graft_sq, out=graft_sq)
        elif grafting == "adagrad":
            pack.tensors["graft_sq"].addcmul_(grad, grad)  # + 0 on a skipped step
        if grafting == "adam":
            denom = (pack.tensors["graft_sq"].sqrt() / math.sqrt(1 - graft_beta2**step)).add_(group["grafting_epsilon"])
            graft = filtered / denom
        elif grafting in ("adagrad", "rmsprop"):
            graft = filtered / pack.tensors["graft_sq"].sqrt().add_(group["grafting_epsilon"])
        else:
            graft = filtered
        return filtered, graft

    def _precondition(self, pack, group, filtered, graft):
        """Shampoo's direction for the pack's blocks (the graft direction where a block has no root yet)."""
        t = pack.tensors
        dtype = pack.factor_dtype
        own_graft = pack.own(graft)
        if pack.owned:
            block = torch.bmm(torch.bmm(t["root_left"], pack.own(filtered).to(dtype)), t["root_right"])
            if group["grafting"] != "none":
                # Over (B, m*n) views: the same sums as over dims (1, 2), 10x faster on a CPU.
                graft_norm = torch.linalg.vector_norm(own_graft.to(dtype).flatten(1), dim=1)
                norm = torch.linalg.vector_norm(block.flatten(1), dim=1).clamp_min(torch.finfo(dtype).tiny)
                block = block * (graft_norm / norm).view(-1, 1, 1)
            own = torch.where(t["root_ready"].all(dim=1).view(-1, 1, 1), block.to(pack.dtype), own_graft)
        else:
            own = own_graft
        if not self.distributed:
            return own
        pack.send[:pack.owned].copy_(own)
        _all_gather(pack.gathered, pack.send, self.process_group)
        return pack.gathered[:pack.size]

    def _apply(self, cohort, ok):
        group = cohort.group
        step = cohort.t
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        preconditioned = step >= group["start_preconditioning_step"]
        params, param_views, directions = [], [], []
        for pack in cohort.packs:
            filtered, direction = self._first_order(pack, group, step, ok)
            if pack.matrix and preconditioned:
                direction = self._precondition(pack, group, filtered, direction)
            if momentum > 0:
                buffer = pack.tensors["momentum_buffer"]
                torch.where(ok, buffer.mul(momentum).add_(direction), buffer, out=buffer)
                direction = direction.add(buffer, alpha=momentum) if group["nesterov"] else buffer
            # The gradient is used up: its buffer takes the final direction (zero on a skipped step).
            torch.where(ok, direction, torch.zeros((), dtype=pack.dtype, device=pack.device), out=pack.grad)
            for member, view in zip(pack.members, pack.grad_views):
                param_views.append(member.cached_param_view())
                directions.append(view)
        if weight_decay:
            by_dtype = defaultdict(list)
            for param in cohort.params:
                by_dtype[param.dtype].append(param)
            for dtype, same in by_dtype.items():
                decay = torch.full((), 1 - lr * weight_decay, dtype=torch.promote_types(dtype, torch.float32),
                                   device=same[0].device).masked_fill_(~ok, 1.0)
                torch._foreach_mul_(same, decay)
        torch._foreach_add_(param_views, directions, alpha=-lr)

    # -------------------------------------------------------------------------------
    # Inverse roots

    def _due(self):
        """[(pack, side, matrix)] of the factors whose roots are due, with bias correction applied."""
        due = []
        for cohort in self._cohorts:
            group = cohort.group
            step = cohort.t
            start, every = group["start_preconditioning_step"], group["precondition_frequency"]
            if step < start or (step - start) % every:
                continue
            beta2 = group["betas"][1]
            scale = 1.0 / (1 - beta2**step) if group["use_bias_correction"] and beta2 < 1 else 1.0
            for pack in cohort.packs:
                if pack.matrix:
                    for side, name in enumerate(("factor_left", "factor_right")):
                        due.append((cohort, pack, side, pack.tensors[name], scale))
        return due

    def _resolve_methods(self, due):
        """A concrete method per (device, size, dtype) for "auto", the same on every rank
        (counted over every rank's blocks, measured on rank 0)."""
        counts = defaultdict(int)
        for cohort, pack, side, _, _ in due:
            if cohort.group["root_method"] == "auto":
                counts[(pack.device, pack.key[side], pack.factor_dtype)] += pack.size
        missing = {}
        for (device, n, dtype), count in counts.items():
            key = _method_key(device, n, dtype)
            if key not in self._root_methods:
                missing[key] = choose_root_method(n, count, device, dtype)
        if missing and self.distributed:  # the same keys on every rank: the counts are global
            shared = [missing]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(self._group(), 0), group=self.process_group)
            missing = shared[0]
        self._root_methods.update(missing)

    def _compute_roots(self, ok):
        due = self._due()
        if not due:
            return
        if any(cohort.group["root_method"] == "auto" for cohort, *_ in due):
            self._resolve_methods(due)
        batches = defaultdict(list)
        for entry in due:
            cohort, pack, side, factor, scale = entry
            method = cohort.group["root_method"]
            if method == "auto":
                method = self._root_methods[_method_key(pack.device, pack.key[side], pack.factor_dtype)]
            if pack.owned:
                batches[(pack.key[side], pack.factor_dtype, pack.device, float(cohort.group["epsilon"]), method)].append(entry)
        settings = self.root_settings
        for (_, _, device, epsilon, method), entries in batches.items():
            stacked = torch.cat([factor * scale if scale != 1.0 else factor for _, _, _, factor, scale in entries])
            roots, diagnostics = matrix_inverse_root(
                stacked, root=4, epsilon=epsilon, method=method, max_iterations=settings.max_iterations,
                tolerance=settings.tolerance, return_diagnostics=True, sync_free=True,
            )
            accepted = diagnostics.finite & (diagnostics.error <= settings.error_threshold) & ok  # NaN error: False
            offset = 0
            for _, pack, side, factor, _ in entries:
                count = factor.shape[0]
                take = slice(offset, offset + count)
                offset += count
                root = pack.tensors[("root_left", "root_right")[side]]
                accept = accepted[take]
                torch.where(accept.view(-1, 1, 1), roots[take], root, out=root)
                pack.tensors["root_ready"][:, side].bitwise_or_(accept)
                failed = ~accept & ok  # a skipped step does not count
                consecutive = pack.tensors["failures_consecutive"][:, side]
                consecutive.mul_(~accept).add_(failed)
                pack.tensors["failures_total"][:, side].add_(failed)
        self._file_given_up(due)

    def _file_given_up(self, due):
        limit = self.root_settings.max_consecutive_failures
        worst = [pack.tensors["failures_consecutive"].amax() for pack in {id(p): p for _, p, *_ in due}.values()
                 if pack.owned]
        device = due[0][1].device
        worst = torch.stack(worst).amax() if worst else torch.zeros((), dtype=torch.int64, device=device)
        if self.distributed:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.process_group)
        self.report.add(worst >= limit, (
            f"Shampoo: an inverse root failed {limit} times in a row (error threshold "
            f"{self.root_settings.error_threshold}); root_failure_counts() says which. Check the loss for "
            "divergence, raise epsilon, or use root_method='eigh'"))

    # -------------------------------------------------------------------------------
    # Reads (host syncs: call them where the loop reads the device anyway)

    def root_failure_counts(self) -> list:
        """Per group, per parameter: the (blocks, 2) total failed roots (left, right) as a CPU
        tensor, or None (1-D, or no state yet). A host read; a collective when distributed."""
        natural = self._natural_state()
        return [[natural[p]["failures_total"].clone() if "failures_total" in natural.get(p, {}) else None
                 for p in group["params"]] for group in self.param_groups]

    def nonfinite_gradient_counts(self) -> list:
        """Per group, per parameter: how many steps it had a NaN/inf gradient (each skipped the
        whole step). A host read."""
        counts = self._nonfinite.tolist() if self._nonfinite is not None else None
        flat = iter(range(sum(len(g["params"]) for g in self.param_groups)))
        return [[counts[next(flat)] if counts else 0 for _ in group["params"]] for group in self.param_groups]

    # -------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self):
        """Torch's optimizer state dict, per parameter and block (factor_left.{i}, ...), plus
        the resolved root methods; every value is a tensor or a plain Python scalar, string or
        tuple, so it saves with torch.save or safetensors as it is. When distributed, a
        collective: every rank calls it and gets the whole state."""
        held = self.state
        self.state = defaultdict(dict, self._natural_state())
        try:
            state_dict = super().state_dict()
        finally:
            self.state = held
        state_dict["root_methods"] = dict(self._root_methods)
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a `state_dict()` exactly: tensors keep their dtype (factors stay float32 for
        bf16 parameters) and move to their parameter's device; bookkeeping stays on the CPU.
        Raises ValueError naming the parameter when the state is not this optimizer's: another
        optimizer's, or a Shampoo state of other shapes, settings or block layout."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}")
        needed = set(self.defaults) - set(_OPTIONAL_GROUP_KEYS)
        by_id, where = {}, {}
        groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            missing = sorted(needed - saved.keys())
            if missing:
                raise ValueError(f"param group {gi} of the state dict lacks Shampoo's settings {missing}: "
                                 "it is not a Shampoo state dict")
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {gi}: state dict has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(group['params'])}"
                )
            merged = {**_OPTIONAL_GROUP_KEYS, **{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
            merged["betas"] = tuple(merged["betas"])
            _check_group(merged)
            groups.append(merged)
            for pi, (key, param) in enumerate(zip(saved["params"], group["params"])):
                by_id[key] = param
                where[key] = (gi, pi)
        new_state = defaultdict(dict)
        for key, values in state_dict["state"].items():
            if key not in by_id:
                raise ValueError(f"state dict has state for parameter id {key!r}, which no param group lists")
            gi, pi = where[key]
            param = by_id[key]
            self._check_loaded(gi, pi, param, groups[gi], values)
            new_state[param] = {
                name: (value.to("cpu" if name in _CPU_STATE else param.device, copy=True)
                       if isinstance(value, Tensor) else value)
                for name, value in values.items()
            }
        for group, merged in zip(self.param_groups, groups):
            group.update(merged)
        self.state = new_state
        self._cohorts, self._plan_key = None, None
        self._root_methods = dict(state_dict.get("root_methods", {}))

    def _check_loaded(self, gi, pi, param, group, values):
        where = f"param group {gi}, parameter {pi} (shape {tuple(param.shape)})"
        expected = self._expected_state(param, group)
        bounds = values.get("block_bounds")
        if isinstance(bounds, Tensor) and not torch.equal(bounds.cpu(), self._layout(param, group)):
            raise ValueError(
                f"{where}: the saved block layout {bounds.tolist()} differs from this optimizer's "
                f"{self._layout(param, group).tolist()} (max_preconditioner_dim or block_splits changed)")
        if set(values) != set(expected):
            raise ValueError(f"{where}: the state dict's entries do not fit Shampoo's with these settings "
                             f"(missing {_describe(set(expected) - set(values))}, unexpected "
                             f"{_describe(set(values) - set(expected))}): another optimizer's state, or other "
                             "settings (betas, grafting, momentum)?")
        for name, (shape, _) in expected.items():
            value = values[name]
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: {name} is a {type(value).__name__}, not a tensor")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, expected {shape}")
            if name == "step" and (value.dtype.is_floating_point or value.dtype == torch.bool):
                raise ValueError(f"{where}: step is a {value.dtype} tensor, Shampoo counts steps in integers "
                                 "(another optimizer's state?)")
            if name in _MOMENTS or name.startswith(("factor_", "root_left", "root_right")):
                if not value.is_floating_point():
                    raise ValueError(f"{where}: {name} has dtype {value.dtype}, expected a floating dtype")


def _describe(keys) -> str:
    """State keys for an error message: the per-block ones ("factor_left.3") only counted."""
    plain = sorted(k for k in keys if "." not in str(k))
    blocks = len(keys) - len(plain)
    return str(plain) + (f" and {blocks} per-block entries" if blocks else "")


def _all_gather(out: Tensor, send: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, send, group=group)
