"""One MatTA training step of a nested GPT-2 vs. the Student alone plus the TA alone.

Forward + backward of: the NestedGPT2 (both streams, cross-entropy of each), against two
separate plain GPT2 models of the Student's and the TA's sizes (one step each). Target:
the MatTA step at most 1.0x the sum of the two separate steps. Also timed: the nested
model running one stream alone (`stream="student"` / `"ta"`, what `matta train --mode
student|ta` runs), which should cost what the plain model of that size costs.

    python benchmarks/bench_models.py                       # tiny preset, CPU, fp32
    python benchmarks/bench_models.py --gpu --json out.json # GPT-2 Medium MatTA, bf16 autocast

The GPU run is the paper's setting: Student 24 layers FFN 4096, TA 36 layers FFN 8192
(12 interleaved TA-only layers), 4 x 1024 tokens. The nested model is timed with the
default backend (Triton kernels on CUDA) and with MATTA_BACKEND=torch; a failing backend
is reported, not fatal.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from matta.models import GPT2, GPT2Config, NestedGPT2, NestingConfig  # noqa: E402
from partial_results import PartialResults  # noqa: E402


def _ce(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _step_fn(model, idx, target, nested, autocast_dtype, stream=None):
    device_type = idx.device.type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if not nested:
                loss = _ce(model(idx), target)
            else:
                out = model(idx, stream=stream)
                loss = sum(_ce(z, target) for z in out if z is not None)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _time_interleaved(steps: dict, device, warmup, reps, on_round=lambda medians, rounds: None):
    """Median ms of each step; the steps take turns in every round, so that load from
    other processes on a shared machine falls on all of them alike. `on_round` gets the
    medians so far after every round (a run killed at its time limit keeps them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
        on_round({name: statistics.median(t) * 1e3 for name, t in times.items()}, len(times[name]))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _runs(nested_step, backend):
    """The nested step under one MATTA_BACKEND, or the error it raises."""
    def step():
        previous = os.environ.get("MATTA_BACKEND")
        os.environ["MATTA_BACKEND"] = backend
        try:
            nested_step()
        finally:
            if previous is None:
                os.environ.pop("MATTA_BACKEND", None)
            else:
                os.environ["MATTA_BACKEND"] = previous

    try:
        step()
        return step, None
    except Exception as exc:  # a backend that cannot run here is reported, not fatal
        return None, f"{type(exc).__name__}: {exc}"[:500]


def run(config, nest, batch, seq, device, autocast_dtype, warmup, reps, backends, results):
    """The medians (ms) of every step, also saved into `results` after every round."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: GPT-2 Medium MatTA is ~1.9B parameters in all
        nested = NestedGPT2(config, nest)
        student = GPT2(config)
        ta = GPT2(nested.ta_config)
    idx = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    target = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    steps = {
        "student": _step_fn(student, idx, target, False, autocast_dtype),
        "ta": _step_fn(ta, idx, target, False, autocast_dtype),
        "nested_student_only": _step_fn(nested, idx, target, True, autocast_dtype, stream="student"),
        "nested_ta_only": _step_fn(nested, idx, target, True, autocast_dtype, stream="ta"),
    }
    result = {}
    for backend in backends:
        step, error = _runs(_step_fn(nested, idx, target, True, autocast_dtype), backend)
        if error is None:
            steps[f"matta_{backend}"] = step
        else:
            result[f"matta_{backend}_error"] = error
    results.set(**result)  # a backend's error, before the timing starts

    def save(medians, rounds):
        results.set(rounds=rounds, **{f"{name}_ms": ms for name, ms in medians.items()})

    medians = _time_interleaved(steps, device, warmup, reps, save)
    result.update({f"{name}_ms": ms for name, ms in medians.items()})
    separate = result["student_ms"] + result["ta_ms"]
    result["separate_sum_ms"] = separate
    for backend in backends:
        if f"matta_{backend}_ms" in result:
            result[f"matta_{backend}_ratio"] = result[f"matta_{backend}_ms"] / separate
    result.update(
        student_params=student.num_parameters(),
        ta_params=ta.num_parameters(),
        nested_params=nested.num_parameters(),
        tokens=batch * seq,
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPT-2 Medium MatTA in bf16 on CUDA")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--preset", default=None, help="GPT-2 preset (default: gpt2-tiny on CPU, gpt2-medium on GPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()

    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
        device, dtype = torch.device("cuda"), torch.bfloat16
        preset, batch, seq, reps, warmup = args.preset or "gpt2-medium", args.batch or 4, args.seq or 1024, args.reps or 10, 3
        backends = ("auto", "torch")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        device, dtype = torch.device("cpu"), None
        preset, batch, seq, reps, warmup = args.preset or "gpt2-tiny", args.batch or 4, args.seq or 64, args.reps or 7, 2
        backends = ("auto",)
    config = GPT2Config.preset(preset)
    # The paper's MatTA GPT-2 Medium: FFN x2 and half as many layers again, TA-only, interleaved.
    nest = NestingConfig(ffn_ta=2 * config.n_inner, extra_layers=config.n_layer // 2, extra_layer_positions="interleave")
    results = PartialResults(
        args.json,
        benchmark="bench_models",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        torch=torch.__version__,
        preset=preset,
        student=f"{config.n_layer} layers, d {config.n_embd}, FFN {config.n_inner}",
        ta=f"{config.n_layer + nest.extra_layers} layers, d {config.n_embd}, FFN {nest.ffn_ta}",
        batch=batch,
        seq=seq,
        precision="bf16 autocast" if dtype is not None else "fp32",
    )
    result = run(config, nest, batch, seq, device, dtype, warmup, reps, backends, results)
    results.set(**result)
    results.finish()
    print(f"{'model step (fwd+bwd)':<28}{'median ms':>12}")
    print(f"{'Student alone':<28}{result['student_ms']:>12.2f}")
    print(f"{'TA alone':<28}{result['ta_ms']:>12.2f}")
    print(f"{'Student + TA (separate)':<28}{result['separate_sum_ms']:>12.2f}")
    print(f"{'nested, Student stream only':<28}{result['nested_student_only_ms']:>12.2f}   "
          f"{result['nested_student_only_ms'] / result['student_ms']:.3f}x the plain Student")
    print(f"{'nested, TA stream only':<28}{result['nested_ta_only_ms']:>12.2f}   "
          f"{result['nested_ta_only_ms'] / result['ta_ms']:.3f}x the plain TA")
    for backend in backends:
        if f"matta_{backend}_ms" in result:
            ms, ratio = result[f"matta_{backend}_ms"], result[f"matta_{backend}_ratio"]
            print(f"{'MatTA nested (' + backend + ')':<28}{ms:>12.2f}   {ratio:.3f}x the separate sum")
        else:
            print(f"MatTA nested ({backend}): {result[f'matta_{backend}_error']}")


if __name__ == "__main__":
    main()
