"""What a GPU runs where this CPU would run something else: the trace's stand-ins.

The trace runs on fake CPU tensors, so code that branches on the device takes its CPU branch.
Seven branches of matta's step differ on a GPU, and `gpu_lowering(card)` swaps each for what
the GPU runs, as one priced op or as the GPU branch itself:

1. The MatTA loss row pass (`fused_linear_matta_loss.loss_rows_pass`): on CUDA one Triton
   launch per chunk (kernels/matta_loss.py), on a CPU a block loop of PyTorch ops. Stand-in:
   `matta_cost::loss_rows`, one op (two passes over both chunks of logits with gradients,
   one without).
2. The fused loss's chunk size (`default_chunk_size`): its GPU rule, with the card's memory.
3. Its fp32-accumulating dW GEMM (`_add_mm`): on CUDA one GEMM with bf16 operands and an
   fp32 output; on a CPU the operands are widened first. Stand-in: `matta_cost::addmm_acc`.
4. Shampoo's "auto" root method (`choose_root_method`, which would time candidates): the
   card's method, "newton" on a GPU (batched coupled Newton; the Triton kernel serves
   n <= 128 only), "eigh" on a CPU.
5. The token-id check of the embedding (`ids_checked_on_host`): a CPU gathers with bounds
   checks; a GPU masks the ids and files the check in the step's report.
6. Shampoo's factor products with `factor_matmul_dtype="tf32"` (`factor_matmul_precision`):
   TF32 on a CUDA device only. Stand-in: its CUDA branch, which the formulas price at the
   card's TF32 peak.

7. The one-stream layers' dispatch (`one_stream_fused`, read by `linear` and `gelu_mlp` in
   TA-only blocks and one-model runs): on CUDA the nested Dense kernels (with GELU in their
   epilogues) where the dispatch table's default picks Triton for the compute dtype, on a
   CPU the unfused ops. Stand-in: that default.

Each patch names its target and fails loudly when the target is gone (a renamed function
must be renamed here too, not silently left out of the model).
"""
from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import torch
from torch import Tensor

from .formulas import CUSTOM_COSTS, GEMM, MEMORY, OpCost, _MATMUL_KEYS, tensor_bytes

# Per-element FLOPs of the loss row pass per stream (max, exp, sums; the gradient pass again).
_LOSS_ROW_FLOPS = 8


@torch.library.custom_op("matta_cost::loss_rows", mutates_args=("z_s", "z_ta", "out"))
def _loss_rows(z_s: Tensor, z_ta: Tensor, y: Tensor, out: Tensor, scale: Tensor, write_grad: bool) -> None:
    raise RuntimeError("matta_cost::loss_rows is a cost-model stand-in; it only runs on fake tensors")


@_loss_rows.register_fake
def _(z_s, z_ta, y, out, scale, write_grad):
    return None


@torch.library.custom_op("matta_cost::addmm_acc", mutates_args=("acc",))
def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
    raise RuntimeError("matta_cost::addmm_acc is a cost-model stand-in; it only runs on fake tensors")


@_addmm_acc.register_fake
def _(acc, a, b, beta):
    return None


def _loss_rows_cost(args, kwargs, card_kind):
    z_s, z_ta, y, out, scale, write_grad = args
    rows, cols = z_s.shape
    logits = tensor_bytes(z_s) + tensor_bytes(z_ta)
    passes = 2 if write_grad else 1
    read = passes * logits + tensor_bytes(y) + tensor_bytes(scale)
    written = (logits if write_grad else 0.0) + tensor_bytes(out)
    return OpCost("matta_cost::loss_rows", MEMORY, float(_LOSS_ROW_FLOPS * 2 * passes * rows * cols), read, written, 1,
                  shape=f"({rows}, {cols})")


def _addmm_acc_cost(args, kwargs, card_kind):
    acc, a, b, beta = args
    read = tensor_bytes(a) + tensor_bytes(b) + (tensor_bytes(acc) if beta else 0.0)
    return OpCost("matta_cost::addmm_acc", GEMM, 2.0 * a.shape[0] * a.shape[1] * b.shape[1], read, tensor_bytes(acc),
                  1, _MATMUL_KEYS.get(a.dtype, "fp32"), f"{tuple(a.shape)}@{tuple(b.shape)}->fp32",
                  min(a.shape[0], a.shape[1], b.shape[1]))


CUSTOM_COSTS["matta_cost::loss_rows"] = _loss_rows_cost
CUSTOM_COSTS["matta_cost::addmm_acc"] = _addmm_acc_cost


def _gpu_loss_rows_pass(z_s, z_ta, y, out, scale, **kw):
    torch.ops.matta_cost.loss_rows(z_s, z_ta, y, out, scale, bool(kw["write_grad"]))


def _gpu_add_mm(acc, a, b, overwrite):
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=0.0 if overwrite else 1.0)
    else:
        torch.ops.matta_cost.addmm_acc(acc, a, b, 0.0 if overwrite else 1.0)


def _patch(stack, target: str, new):
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(f"cost model: {target} is gone; update matta/costmodel/lowering.py to the new code")
    stack.enter_context(mock.patch.object(module, attr, new))


@contextlib.contextmanager
def device_lowering(card):
    """Inside: matta's step takes the branches `card`'s device takes (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        method = "newton" if card.kind == "gpu" else "eigh"
        _patch(stack, "matta.optim.shampoo.choose_root_method", lambda *args, **kwargs: method)
        if card.kind == "gpu":
            chunk_rule = importlib.import_module("matta.ops.fused_linear_matta_loss").default_chunk_size
            memory = card.memory

            def gpu_chunk_size(n_tokens, n_classes, width, dtype, device):
                # The GPU rule, with half the card's memory taken as free.
                with mock.patch.object(torch.cuda, "mem_get_info", lambda *_: (int(memory // 2), int(memory))):
                    return chunk_rule(n_tokens, n_classes, width, dtype, torch.device("cuda"))

            _patch(stack, "matta.ops.fused_linear_matta_loss.default_chunk_size", gpu_chunk_size)
            _patch(stack, "matta.ops.fused_linear_matta_loss.loss_rows_pass", _gpu_loss_rows_pass)
            _patch(stack, "matta.ops.fused_linear_matta_loss._add_mm", _gpu_add_mm)
            _patch(stack, "matta.models._common.ids_checked_on_host", lambda idx: False)
            backend = importlib.import_module("matta.ops.backend")
            _patch(stack, "matta.ops.nested_linear.one_stream_fused",
                   lambda weight, tokens, dtype: backend.default_backend(backend.dtype_key(dtype)) == "triton")
            factor_precision = importlib.import_module("matta.optim.shampoo").factor_matmul_precision
            _patch(stack, "matta.optim.shampoo.factor_matmul_precision",
                   lambda matmul_dtype, device: factor_precision(matmul_dtype, torch.device("cuda")))
        yield
