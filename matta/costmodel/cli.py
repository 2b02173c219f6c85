"""`matta cost`: predict one `matta train` step on a device card (a traced cost model).

    matta cost --model gpt2-medium --ffn-ta 8192 --extra-layers 12 --block-size 1024 --batch-size 16
    matta cost ... --card h200 --gpus 8 --optimizer shampoo --e-c 0.6 --json out.json
    matta cost ... --card cpu-card.json        # a CPU card written by benchmarks/calibrate_cost.py
    matta cost ... --card auto --json P.json   # on a GPU machine: the card of the GPU it runs on

It takes `matta train`'s model, batch and optimizer flags (the rest are accepted and
ignored) and prints the predicted time per phase, tokens/s, MFU, launches and host syncs per
step, the overhead share and the ops that cost most. On a GPU machine, `--card auto` prices
the GPU it runs on: `benchmarks/gpu_check.sh` prints that beside its measurement.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..train.config import ConfigError, make_config
from .cards import load_card
from .predict import format_prediction, predict, summary
from .step import trace_training_step

GPT2_VOCAB = 50257


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `matta cost` besides `matta train`'s (which cli.py adds)."""
    g = p.add_argument_group("cost model")
    g.add_argument("--card", default="h100",
                   help="h100, h200, a100, auto (the CUDA GPU here) or a card JSON file (default h100)")
    g.add_argument("--gpus", type=int, nargs="+", default=[1],
                   help="DDP processes to price the step for, one report each (default 1)")
    for name, what in (("e-c", "GEMM"), ("e-attn", "attention"), ("e-m", "memory-bandwidth"),
                       ("e-net", "NVLink")):
        g.add_argument(f"--{name}", type=float, default=None, help=f"{what} efficiency (default: the card's)")
    g.add_argument("--launch-us", type=float, default=None, help="microseconds per launch (default: the card's)")
    g.add_argument("--sync-us", type=float, default=None, help="microseconds per host sync (default: the card's)")
    g.add_argument("--newton-iterations", type=int, default=18, help="Newton iterations of a traced root step")
    g.add_argument("--top", type=int, default=12, help="rows of the costliest-ops table")
    g.add_argument("--where", action="store_true", help="group the ops table by source line (slower trace)")
    g.add_argument("--json", default=None, help="also write the prediction to this JSON file")


def card_from_args(args):
    try:
        return load_card(args.card).with_efficiencies(
            e_c=args.e_c, e_attn=args.e_attn, e_m=args.e_m, e_net=args.e_net,
            launch=None if args.launch_us is None else args.launch_us * 1e-6,
            sync=None if args.sync_us is None else args.sync_us * 1e-6)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run(args, train_values: dict) -> int:
    """`matta cost` with the parsed cost flags and the train flags as a config dict."""
    card = card_from_args(args)
    if any(n < 1 for n in args.gpus):
        raise ConfigError(f"--gpus must be >= 1, got {' '.join(map(str, args.gpus))}")
    cfg = make_config(train_values)
    vocab = cfg.vocab_size or GPT2_VOCAB
    summaries, trace = [], None
    for world in args.gpus:
        if trace is None or (trace.splits_over_ranks and trace.world != world):  # Shampoo: a trace per world
            trace = trace_training_step(cfg, vocab, card, world=world, newton_iterations=args.newton_iterations,
                                        with_locations=args.where)
        try:
            pred = predict(trace, card, world=world, top=args.top)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        print(format_prediction(pred, trace) + "\n")
        summaries.append(summary(pred))
    if cfg.vocab_size is None:
        print(f"  (vocabulary {GPT2_VOCAB}, GPT-2's: pass --vocab-size to price another)")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2) + "\n")
    return 0
