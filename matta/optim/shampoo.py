"""Shampoo with blocked Kronecker factors, batched inverse roots and grafting.

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

The inverse roots are the costly part: every factor matrix that is due is stacked with the
others of its size into one (B, n, n) batch and rooted in one `matrix_inverse_root` call.
Under torch.distributed each rank roots a cost-balanced share of the matrices and broadcasts
its results, so the root work divides by the world size and every rank ends up with the same
preconditioners as a single process would.
"""
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.matrix_functions import METHODS, choose_root_method, matrix_inverse_root

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
# Per-parameter state entries kept on the CPU: bookkeeping read by Python, never by kernels.
_CPU_STATE = ("step", "block_bounds", "root_ready", "failures_consecutive", "failures_total")


@dataclass(frozen=True)
class RootSettings:
    """How inverse roots are computed and judged (one per optimizer).

    error_threshold: a root whose `matrix_inverse_root` error exceeds this (or which is not
        finite) is rejected; the block keeps its previous root.
    max_consecutive_failures: a factor that fails this many recomputations in a row raises.
    max_iterations, tolerance: the Newton iteration's cap and stopping threshold.
    """

    error_threshold: float = 0.1
    max_consecutive_failures: int = 5
    max_iterations: int = 100
    tolerance: float = 1e-6


@dataclass(frozen=True)
class _Due:
    """One factor matrix whose inverse root is due this step."""

    state: dict
    block: int
    side: int  # 0: left (rows), 1: right (columns)
    matrix: Tensor
    epsilon: float
    method: str
    where: str  # for error messages


def _method_key(matrix: Tensor) -> str:
    """Key of a resolved "auto" choice: "device type:n:dtype"."""
    return f"{matrix.device.type}:{matrix.shape[-1]}:{str(matrix.dtype).removeprefix('torch.')}"


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


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo (DistributedShampoo-like) with batched inverse roots; see the module doc.

    Args:
        params: parameters or param groups (every argument below but `block_splits`,
            `root_settings`, `distributed` and `process_group` can be set per group).
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
        block_splits: {parameter: (row split points, column split points)}: block boundaries
            that come first (e.g. `nested_block_splits(model)` for the Student/TA boundary).
        root_settings: a `RootSettings` (failure threshold, Newton settings).
        distributed: share the root work over the ranks of `process_group`; None: when
            torch.distributed is initialised with more than one rank. Gradients must already
            be identical on every rank (as after DDP's all-reduce).
        process_group: the group for `distributed` (default: the world).

    Raises FloatingPointError on a NaN/inf gradient (before touching any state) and
    RuntimeError when a factor's root fails `max_consecutive_failures` times in a row.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, momentum=0.0, nesterov=False,
        weight_decay=0.0, max_preconditioner_dim=1024, precondition_frequency=20,
        start_preconditioning_step=20, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
        use_bias_correction=True, root_method="auto", *, block_splits=None,
        root_settings: RootSettings = RootSettings(), distributed=None, process_group=None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), epsilon=epsilon, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            use_bias_correction=use_bias_correction, root_method=root_method,
        )
        if not isinstance(root_settings, RootSettings):
            raise TypeError(f"root_settings must be a RootSettings, got {type(root_settings).__name__}")
        self.root_settings = root_settings
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
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self._check_splits_cover_params()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _check_splits_cover_params(self):
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for param in self._block_splits:
            if id(param) not in known:
                raise ValueError(f"block_splits names a parameter of shape {tuple(param.shape)} that the optimizer does not hold")

    # -------------------------------------------------------------------------------
    # State

    def _layout(self, param, group) -> Tensor:
        shape = matrix_view_shape(param.shape)
        rows_split, cols_split = self._block_splits.get(param, ((), ()))
        max_dim = group["max_preconditioner_dim"]
        bounds = [
            (r0, r1, c0, c1)
            for r0, r1 in block_bounds(shape[0], rows_split, max_dim)
            for c0, c1 in block_bounds(shape[1], cols_split, max_dim)
        ]
        return torch.tensor(bounds, dtype=torch.int64).reshape(-1, 4)

    @staticmethod
    def _factor_dtype(param):
        return torch.promote_types(param.dtype, torch.float32)

    def _init_state(self, param, group):
        state = self.state[param]
        state["step"] = torch.tensor(0, dtype=torch.int64)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["grafting"] in ("adam", "adagrad", "rmsprop"):
            state["graft_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if not matrix_view_shape(param.shape):
            return state
        bounds = self._layout(param, group)
        dtype = self._factor_dtype(param)
        for i, (r0, r1, c0, c1) in enumerate(bounds.tolist()):
            for side, size in (("left", r1 - r0), ("right", c1 - c0)):
                state[f"factor_{side}.{i}"] = torch.zeros(size, size, dtype=dtype, device=param.device)
                state[f"root_{side}.{i}"] = torch.eye(size, dtype=dtype, device=param.device)
        state["block_bounds"] = bounds
        state["root_ready"] = torch.zeros(len(bounds), 2, dtype=torch.bool)
        state["failures_consecutive"] = torch.zeros(len(bounds), 2, dtype=torch.int64)
        state["failures_total"] = torch.zeros(len(bounds), 2, dtype=torch.int64)
        return state

    def root_failure_counts(self) -> list:
        """Per group, per parameter: the (blocks, 2) total failed roots (left, right), or None (1-D)."""
        return [
            [self.state[p]["failures_total"].clone() if "failures_total" in self.state.get(p, {}) else None
             for p in group["params"]]
            for group in self.param_groups
        ]

    # -------------------------------------------------------------------------------
    # Step

    def _check_gradients(self):
        named = [
            (gi, pi, p) for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"]) if p.grad is not None
        ]
        for gi, pi, p in named:
            if p.grad.is_sparse:
                raise TypeError(f"Shampoo does not support sparse gradients (group {gi}, parameter {pi})")
        if not named:
            return
        flags = [torch.isfinite(p.grad).all() for _, _, p in named]
        finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()  # one sync
        if not bool(finite.all()):
            gi, pi, p = named[int((~finite).nonzero()[0])]
            raise FloatingPointError(
                f"non-finite (NaN/inf) gradient in parameter {pi} of param group {gi} "
                f"(shape {tuple(p.shape)}); the optimizer state and parameters were left unchanged"
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                state = self.state[param] if self.state.get(param) else self._init_state(param, group)
                state["step"] += 1
                self._update_factors(param, group, state)
                work.append((gi, pi, group, param, state))
        # All factors first, so that every root due this step goes into one batched call.
        self._compute_roots(work)
        for _, _, group, param, state in work:
            self._apply(param, group, state, *self._grafting_step(param, group, state))
        return loss

    def _update_factors(self, param, group, state):
        if "block_bounds" not in state:
            return
        beta2 = group["betas"][1]
        g2 = param.grad.reshape(matrix_view_shape(param.shape)).to(self._factor_dtype(param))
        for i, (r0, r1, c0, c1) in enumerate(state["block_bounds"].tolist()):
            block = g2[r0:r1, c0:c1]
            for side, outer in (("left", block @ block.T), ("right", block.T @ block)):
                factor = state[f"factor_{side}.{i}"]
                if beta2 < 1:
                    factor.mul_(beta2).add_(outer, alpha=1 - beta2)
                else:
                    factor.add_(outer)

    def _grafting_step(self, param, group, state):
        """Update the first moment and the grafting statistics; return (filtered grad, graft direction)."""
        grad = param.grad
        step = int(state["step"])
        beta1 = group["betas"][0]
        filtered = grad
        if beta1 > 0:
            state["exp_avg"].lerp_(grad, 1 - beta1)
            filtered = state["exp_avg"]
            if group["use_bias_correction"]:
                filtered = filtered / (1 - beta1**step)
        grafting, graft_beta2 = group["grafting"], group["grafting_beta2"]
        if grafting in ("adam", "rmsprop"):
            state["graft_sq"].mul_(graft_beta2).addcmul_(grad, grad, value=1 - graft_beta2)
        elif grafting == "adagrad":
            state["graft_sq"].addcmul_(grad, grad)
        if grafting == "adam":
            denom = (state["graft_sq"].sqrt() / math.sqrt(1 - graft_beta2**step)).add_(group["grafting_epsilon"])
            graft = filtered / denom
        elif grafting in ("adagrad", "rmsprop"):
            graft = filtered / state["graft_sq"].sqrt().add_(group["grafting_epsilon"])
        else:
            graft = filtered
        return filtered, graft

    def _apply(self, param, group, state, filtered, graft):
        direction = graft
        step = int(state["step"])
        if "block_bounds" in state and step >= group["start_preconditioning_step"]:
            shape2 = matrix_view_shape(param.shape)
            out2 = graft.reshape(shape2).clone(memory_format=torch.contiguous_format)
            direction = out2.view(param.shape)
            filtered2 = filtered.reshape(shape2)
            graft2 = graft.reshape(shape2)
            dtype = self._factor_dtype(param)
            ready = state["root_ready"].all(dim=1).tolist()
            for i, (r0, r1, c0, c1) in enumerate(state["block_bounds"].tolist()):
                if not ready[i]:
                    continue  # no root yet for this block: its grafting step stands
                block = state[f"root_left.{i}"] @ filtered2[r0:r1, c0:c1].to(dtype) @ state[f"root_right.{i}"]
                if group["grafting"] != "none":
                    graft_norm = torch.linalg.vector_norm(graft2[r0:r1, c0:c1].to(dtype))
                    block = block * (graft_norm / torch.linalg.vector_norm(block).clamp_min(torch.finfo(dtype).tiny))
                out2[r0:r1, c0:c1] = block.to(out2.dtype)
        if group["momentum"] > 0:
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(direction)
            direction = direction.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(direction, alpha=-group["lr"])

    # -------------------------------------------------------------------------------
    # Inverse roots

    def _due_matrices(self, work) -> list:
        due = []
        for gi, pi, group, param, state in work:
            step = int(state["step"])
            start, every = group["start_preconditioning_step"], group["precondition_frequency"]
            if "block_bounds" not in state or step < start or (step - start) % every:
                continue
            beta2 = group["betas"][1]
            scale = 1.0 / (1 - beta2**step) if group["use_bias_correction"] and beta2 < 1 else 1.0
            for i in range(len(state["block_bounds"])):
                for side, name in enumerate(("left", "right")):
                    factor = state[f"factor_{name}.{i}"]
                    due.append(_Due(
                        state=state, block=i, side=side, matrix=factor * scale if scale != 1.0 else factor,
                        epsilon=float(group["epsilon"]), method=group["root_method"],
                        where=f"param group {gi}, parameter {pi} (shape {tuple(param.shape)}), block {i} {name} factor",
                    ))
        return due

    def _resolve_methods(self, due):
        """Replace "auto" by a concrete method per (device, size, dtype), the same on every rank."""
        counts = defaultdict(int)
        for d in due:
            if d.method == "auto":
                counts[(d.matrix.device, d.matrix.shape[-1], d.matrix.dtype)] += 1
        missing = {}
        for (device, n, dtype), count in counts.items():
            key = _method_key(torch.empty(0, n, device=device, dtype=dtype))
            if key not in self._root_methods:
                missing[key] = choose_root_method(n, count, device, dtype)
        if missing and self.distributed:
            shared = [missing]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(self._group(), 0), group=self.process_group)
            missing = shared[0]
        self._root_methods.update(missing)
        return [d if d.method != "auto" else replace(d, method=self._root_methods[_method_key(d.matrix)]) for d in due]

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _root_batches(self, due) -> list:
        """[(root, error, finite)] for the given matrices: one call per (size, dtype, device, eps, method)."""
        batches = defaultdict(list)
        for index, d in enumerate(due):
            batches[(d.matrix.shape[-1], d.matrix.dtype, d.matrix.device, d.epsilon, d.method)].append(index)
        results = [None] * len(due)
        settings = self.root_settings
        for (_, _, _, epsilon, method), indices in batches.items():
            stacked = torch.stack([due[i].matrix for i in indices])
            roots, diagnostics = matrix_inverse_root(
                stacked, root=4, epsilon=epsilon, method=method, max_iterations=settings.max_iterations,
                tolerance=settings.tolerance, return_diagnostics=True,
            )
            for j, i in enumerate(indices):
                results[i] = (roots[j], diagnostics.error[j], diagnostics.finite[j])
        return results

    def _assign_ranks(self, due, world) -> list:
        """Rank per matrix: largest first to the least-loaded rank (cost n^3), deterministic."""
        load = [0.0] * world
        owner = [0] * len(due)
        for i in sorted(range(len(due)), key=lambda i: (-due[i].matrix.shape[-1], i)):
            rank = min(range(world), key=lambda r: (load[r], r))
            owner[i] = rank
            load[rank] += float(due[i].matrix.shape[-1]) ** 3
        return owner

    def _distributed_roots(self, due) -> list:
        group = self._group()
        world, me = dist.get_world_size(group), dist.get_rank(group)
        owner = self._assign_ranks(due, world)
        mine = [i for i in range(len(due)) if owner[i] == me]
        computed = dict(zip(mine, self._root_batches([due[i] for i in mine])))
        results = [None] * len(due)
        for rank in range(world):
            theirs = [i for i in range(len(due)) if owner[i] == rank]
            by_kind = defaultdict(list)
            for i in theirs:
                by_kind[(due[i].matrix.dtype, due[i].matrix.device)].append(i)
            for (dtype, device), indices in by_kind.items():
                # Packed per matrix: the root, its error, its finite flag.
                sizes = [due[i].matrix.numel() + 2 for i in indices]
                if rank == me:
                    buffer = torch.cat([
                        torch.cat([computed[i][0].reshape(-1), computed[i][1].to(dtype).reshape(1),
                                   computed[i][2].to(dtype).reshape(1)])
                        for i in indices
                    ])
                else:
                    buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
                dist.broadcast(buffer, src=dist.get_global_rank(group, rank), group=self.process_group)
                for i, chunk in zip(indices, buffer.split(sizes)):
                    n = due[i].matrix.shape[-1]
                    results[i] = (chunk[:-2].view(n, n), chunk[-2], chunk[-1] > 0.5)
        return results

    def _compute_roots(self, work):
        due = self._due_matrices(work)
        if not due:
            return
        due = self._resolve_methods(due)
        results = self._distributed_roots(due) if self.distributed else self._root_batches(due)
        errors = torch.stack([error.float().cpu() for _, error, _ in results]).tolist()
        finite = torch.stack([ok.cpu() for _, _, ok in results]).tolist()
        threshold = self.root_settings.error_threshold
        limit = self.root_settings.max_consecutive_failures
        given_up = []
        for d, (root, _, _), error, ok in zip(due, results, errors, finite):
            state, name = d.state, ("left", "right")[d.side]
            if ok and error <= threshold:  # NaN error fails this comparison
                state[f"root_{name}.{d.block}"].copy_(root)
                state["root_ready"][d.block, d.side] = True
                state["failures_consecutive"][d.block, d.side] = 0
                continue
            state["failures_consecutive"][d.block, d.side] += 1
            state["failures_total"][d.block, d.side] += 1
            if int(state["failures_consecutive"][d.block, d.side]) >= limit:
                given_up.append(f"{d.where} (last error {error!r}, finite={ok}, method {d.method!r})")
        if given_up:
            raise RuntimeError(
                f"Shampoo: inverse roots failed {limit} times in a row (error threshold {threshold}) for "
                f"{len(given_up)} factor(s): " + "; ".join(given_up[:4]) + ("; ..." if len(given_up) > 4 else "")
                + ". Check the loss for divergence, raise epsilon, or use root_method='eigh'"
            )

    # -------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self):
        """Torch's optimizer state dict plus the resolved root methods; every value is a tensor
        or a plain Python scalar/string/tuple, so it saves with torch.save as it is."""
        state_dict = super().state_dict()
        state_dict["root_methods"] = dict(self._root_methods)
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a `state_dict()` exactly: tensors keep their dtype (factors stay float32 for
        bf16 parameters) and move to their parameter's device; bookkeeping stays on the CPU."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}")
        by_id = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {gi}: state dict has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(group['params'])}"
                )
            by_id.update(zip(saved["params"], group["params"]))
        new_state = defaultdict(dict)
        for key, values in state_dict["state"].items():
            param = by_id[int(key)]
            new_state[param] = {
                name: (value.to("cpu" if name in _CPU_STATE else param.device, copy=True)
                       if isinstance(value, Tensor) else value)
                for name, value in values.items()
            }
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
            _check_group(group)
            for param in group["params"]:
                loaded = new_state.get(param, {}).get("block_bounds")
                if loaded is not None and not torch.equal(loaded, self._layout(param, group)):
                    raise ValueError(
                        f"param group {gi}: the saved block layout {loaded.tolist()} of a parameter of shape "
                        f"{tuple(param.shape)} differs from this optimizer's {self._layout(param, group).tolist()} "
                        "(max_preconditioner_dim or block_splits changed)"
                    )
        self.state = new_state
        self._root_methods = dict(state_dict.get("root_methods", {}))
