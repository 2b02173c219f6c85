"""Counts the aten ops one optimizer step dispatches (a TorchDispatchMode sees every one).

On a GPU nearly every non-view op is at least one kernel launch, so for a step whose
tensors are many and small the count is the cost. Two counts are printed: all dispatched
ops, and those that are not views (views launch nothing). A `torch._foreach_*` op counts
once, though a GPU runs it as one launch per chunk of its tensor list.

Parameter sets:
    blocks16  16 parameters of 1024 x 1024 (16 blocks of 1024)
    gpt2m     GPT-2 Medium MatTA's TA (d 1024, 36 layers, FFN 8192, vocabulary 50304):
              the matrices of `bench_shampoo.gpt2_medium_matta_shapes` (1541 blocks of 1024
              and one of 128 rows x 1024) with the biases and LayerNorm vectors of GPT-2

The step counted is a steady one: step 3 of a run with start_preconditioning_step = 2 and
precondition_frequency = 2, so preconditioning is on and no inverse root is due (step 2
computed the roots). `--scale K` divides every dimension and
`max_preconditioner_dim` by K: the block layout, hence the op sequence of a per-block
optimizer, is unchanged, and the tensors fit in memory. `--device meta` allocates nothing
(matta's Shampoo reads nothing on the host in a step, so it runs on meta; DistributedShampoo
does not, so it is counted on the CPU at a scale).

    python benchmarks/count_optimizer_ops.py --optimizer matta --params gpt2m --device meta
    python benchmarks/count_optimizer_ops.py --optimizer matta --params gpt2m --scale 16 --baseline OLD_SHAMPOO.py
    PYTHONPATH=/path/to/facebookresearch/optimizers \\
        python benchmarks/count_optimizer_ops.py --optimizer distributed_shampoo --params gpt2m --scale 16
"""
import argparse
import collections
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_shampoo import D_MODEL, TA_LAYERS, gpt2_medium_matta_shapes  # noqa: E402
from bench_shampoo_step import load_baseline  # noqa: E402

MAX_DIM = 1024


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops by overload name; `views` counts those that are views."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


def parameter_shapes(name, scale):
    if name == "blocks16":
        shapes = [(MAX_DIM, MAX_DIM)] * 16
    else:
        vectors = [(3 * D_MODEL,), (D_MODEL,), (8 * D_MODEL,), (D_MODEL,)] + [(D_MODEL,)] * 4  # biases, 2 LayerNorms
        shapes = gpt2_medium_matta_shapes() + vectors * TA_LAYERS + [(D_MODEL,)] * 2  # final LayerNorm
    return [tuple(d // scale for d in s) for s in shapes]


def make_optimizer(kind, params, max_dim, baseline=None):
    common = dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.0)
    if kind == "matta":
        from matta.optim import Shampoo

        if baseline:
            Shampoo = load_baseline(baseline)  # noqa: N806
        return Shampoo(params, **common, max_preconditioner_dim=max_dim, precondition_frequency=2,
                       start_preconditioning_step=2, grafting="adam", root_method="eigh")
    from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo

    return DistributedShampoo(params, **common, max_preconditioner_dim=max_dim, precondition_frequency=2,
                              start_preconditioning_step=2,
                              grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8))


def count_step(kind, shapes, device, max_dim, baseline=None, step=3):
    generator = torch.Generator().manual_seed(0)
    on_meta = torch.device(device).type == "meta"
    params = [torch.nn.Parameter(torch.empty(s, device=device) if on_meta else torch.randn(s, generator=generator) * 0.02)
              for s in shapes]
    opt = make_optimizer(kind, params, max_dim, baseline)
    for done in range(step):
        for p in params:
            p.grad = torch.empty_like(p) if on_meta else torch.randn(p.shape, generator=generator) * 1e-3
        if done < step - 1:
            opt.step()
    counter = OpCounter()
    with counter:
        opt.step()
    return counter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=["matta", "distributed_shampoo"], default="matta")
    parser.add_argument("--params", choices=["blocks16", "gpt2m"], default="blocks16")
    parser.add_argument("--device", default="cpu", help="cpu or meta (meta: nothing allocated)")
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension and the block size by this")
    parser.add_argument("--baseline", help="for --optimizer matta: a file with another Shampoo class (an older matta)")
    parser.add_argument("--root-step", action="store_true", help="count step 4, which roots every factor, instead")
    parser.add_argument("--top", type=int, default=12, help="how many of the most frequent ops to list")
    parser.add_argument("--json", help="write the counts to this JSON file")
    args = parser.parse_args()
    if MAX_DIM % args.scale:
        parser.error(f"--scale must divide {MAX_DIM}")

    shapes = parameter_shapes(args.params, args.scale)
    counter = count_step(args.optimizer, shapes, args.device, MAX_DIM // args.scale, args.baseline,
                         step=4 if args.root_step else 3)
    blocks = sum(-(-s[0] // (MAX_DIM // args.scale)) * -(-s[1] // (MAX_DIM // args.scale)) for s in shapes if len(s) == 2)
    name = f"{args.optimizer}{' (baseline ' + args.baseline + ')' if args.baseline else ''}"
    print(f"{name} on {args.params} (scale 1/{args.scale}, {args.device}): {len(shapes)} parameters, "
          f"{blocks} blocks; one {'root' if args.root_step else 'steady'} step dispatched {counter.total} aten ops "
          f"({counter.total / blocks:.1f} per block), {counter.total - counter.views} of them not views")
    for name, count in counter.ops.most_common(args.top):
        print(f"  {count:7d}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"optimizer": args.optimizer, "baseline": args.baseline, "root_step": args.root_step,
                       "params": args.params, "scale": args.scale, "device": args.device,
                       "parameters": len(shapes), "blocks": blocks, "ops": counter.total,
                       "non_view_ops": counter.total - counter.views, "by_op": dict(counter.ops)}, f, indent=2)


if __name__ == "__main__":
    main()
