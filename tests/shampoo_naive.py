"""The per-block Shampoo step, one block and one parameter at a time: the oracle of the batched one.

This is the math `matta.optim.Shampoo` computed before it was batched (one matmul per block
and factor, one norm per block), kept readable: no packs, no distribution, no checkpoints,
no failure bookkeeping beyond keeping a rejected root.
"""
import math

import torch

from matta.ops.matrix_functions import matrix_inverse_root
from matta.optim import block_bounds, matrix_view_shape


class NaiveShampoo(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, momentum=0.0, nesterov=False,
                 weight_decay=0.0, max_preconditioner_dim=1024, precondition_frequency=20, start_preconditioning_step=20,
                 grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8, use_bias_correction=True,
                 root_method="eigh", factor_matmul_dtype="float32", *, block_splits=None, error_threshold=0.1):
        defaults = dict(lr=lr, betas=betas, epsilon=epsilon, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, max_preconditioner_dim=max_preconditioner_dim,
                        precondition_frequency=precondition_frequency,
                        start_preconditioning_step=start_preconditioning_step, grafting=grafting,
                        grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
                        use_bias_correction=use_bias_correction, root_method=root_method,
                        factor_matmul_dtype=factor_matmul_dtype)
        self.block_splits = dict(block_splits or {})
        self.error_threshold = error_threshold
        super().__init__(params, defaults)

    def _init(self, p, group):
        state = self.state[p]
        state["step"] = 0
        for name, kept in (("exp_avg", group["betas"][0] > 0),
                           ("graft_sq", group["grafting"] in ("adam", "adagrad", "rmsprop")),
                           ("momentum_buffer", group["momentum"] > 0)):
            if kept:
                state[name] = torch.zeros_like(p)
        if matrix_view_shape(p.shape):
            rows, cols = matrix_view_shape(p.shape)
            row_splits, col_splits = self.block_splits.get(p, ((), ()))
            dim = group["max_preconditioner_dim"]
            state["blocks"] = [(r0, r1, c0, c1) for r0, r1 in block_bounds(rows, row_splits, dim)
                               for c0, c1 in block_bounds(cols, col_splits, dim)]
            dtype = torch.promote_types(p.dtype, torch.float32)
            state["left"] = [torch.zeros(r1 - r0, r1 - r0, dtype=dtype) for r0, r1, _, _ in state["blocks"]]
            state["right"] = [torch.zeros(c1 - c0, c1 - c0, dtype=dtype) for _, _, c0, c1 in state["blocks"]]
            state["roots"] = [None] * len(state["blocks"])
        return state

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step(p, group, self.state[p] or self._init(p, group))

    def _step(self, p, group, state):
        state["step"] += 1
        t, grad = state["step"], p.grad
        beta1, beta2 = group["betas"]
        if "blocks" in state:
            g2 = grad.reshape(matrix_view_shape(p.shape)).to(state["left"][0].dtype)
            if group["factor_matmul_dtype"] == "bfloat16":
                g2 = g2.to(torch.bfloat16)
            for i, (r0, r1, c0, c1) in enumerate(state["blocks"]):
                b = g2[r0:r1, c0:c1]
                for factor, outer in ((state["left"][i], b @ b.T), (state["right"][i], b.T @ b)):
                    outer = outer.to(factor.dtype)
                    if beta2 < 1:
                        factor.mul_(beta2).add_(outer, alpha=1 - beta2)
                    else:
                        factor.add_(outer)
            start, every = group["start_preconditioning_step"], group["precondition_frequency"]
            if t >= start and (t - start) % every == 0:
                scale = 1 / (1 - beta2**t) if group["use_bias_correction"] and beta2 < 1 else 1.0
                for i in range(len(state["blocks"])):
                    pair = []
                    for factor in (state["left"][i], state["right"][i]):
                        root, diag = matrix_inverse_root(factor * scale, root=4, epsilon=group["epsilon"],
                                                         method=group["root_method"], return_diagnostics=True)
                        ok = bool(diag.finite) and float(diag.error) <= self.error_threshold
                        previous = state["roots"][i][len(pair)] if state["roots"][i] is not None else None
                        pair.append(root if ok else previous)
                    state["roots"][i] = tuple(pair) if all(r is not None for r in pair) else None
        filtered = grad
        if beta1 > 0:
            state["exp_avg"].lerp_(grad, 1 - beta1)
            filtered = state["exp_avg"]
            if group["use_bias_correction"]:
                filtered = filtered / (1 - beta1**t)
        grafting, graft_beta2 = group["grafting"], group["grafting_beta2"]
        if grafting in ("adam", "rmsprop"):
            state["graft_sq"].mul_(graft_beta2).addcmul_(grad, grad, value=1 - graft_beta2)
        elif grafting == "adagrad":
            state["graft_sq"].addcmul_(grad, grad)
        if grafting == "adam":
            graft = filtered / (state["graft_sq"].sqrt() / math.sqrt(1 - graft_beta2**t)).add_(group["grafting_epsilon"])
        elif grafting in ("adagrad", "rmsprop"):
            graft = filtered / state["graft_sq"].sqrt().add_(group["grafting_epsilon"])
        else:
            graft = filtered
        direction = graft
        if "blocks" in state and t >= group["start_preconditioning_step"]:
            shape2 = matrix_view_shape(p.shape)
            out = graft.reshape(shape2).clone()
            f2, g2 = filtered.reshape(shape2), graft.reshape(shape2)
            dtype = state["left"][0].dtype
            for i, (r0, r1, c0, c1) in enumerate(state["blocks"]):
                if state["roots"][i] is None:
                    continue
                left, right = state["roots"][i]
                block = left @ f2[r0:r1, c0:c1].to(dtype) @ right
                if grafting != "none":
                    graft_norm = torch.linalg.vector_norm(g2[r0:r1, c0:c1].to(dtype))
                    block = block * (graft_norm / torch.linalg.vector_norm(block).clamp_min(torch.finfo(dtype).tiny))
                out[r0:r1, c0:c1] = block.to(out.dtype)
            direction = out.view(p.shape)
        if group["momentum"] > 0:
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(direction)
            direction = direction.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])
