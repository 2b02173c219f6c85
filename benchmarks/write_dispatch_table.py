"""Write the PyTorch-vs-Triton dispatch table from benchmark timings.

    python benchmarks/write_dispatch_table.py nested_linear.json [more.json ...] \\
        [--out matta/ops/dispatch_table.json]

Reads the JSON that `bench_nested_linear.py --gpu --json` writes (rows with shape, T, dtype
key and median ms per variant, plus the device's capability). Per (op, capability, dtype,
token bucket) it sums the medians of each backend over the shapes timed there and records
the faster one. Entries of other capabilities, dtypes or ops already in the table are kept;
measured ones are replaced. matta.ops.backend reads the result (a bad file is refused there).
"""
import argparse
import datetime
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matta.ops.backend import DISPATCH_TABLE, load_dispatch_table, token_bucket  # noqa: E402

BACKEND_OF_VARIANT = {"triton": "triton", "torch": "torch"}


def entries_from_benchmark(result: dict) -> list:
    """Dispatch entries from one benchmark JSON: the faster backend per dtype and token bucket."""
    totals = defaultdict(lambda: defaultdict(float))
    shapes = defaultdict(lambda: defaultdict(set))
    for row in result["rows"]:
        backend = BACKEND_OF_VARIANT.get(row["variant"])
        if backend is None:
            continue
        key = (row["dtype_key"], token_bucket(row["T"]))
        totals[key][backend] += row["median_ms"]
        shapes[key][backend].add(row["shape"])
    entries = []
    for (dtype, tokens), ms in sorted(totals.items()):
        if set(ms) != {"triton", "torch"} or shapes[(dtype, tokens)]["triton"] != shapes[(dtype, tokens)]["torch"]:
            continue  # only buckets where both backends ran the same shapes
        entries.append({
            "op": result["op"], "capability": result["capability"], "dtype": dtype, "tokens": tokens,
            "backend": min(ms, key=ms.get), "triton_ms": round(ms["triton"], 4), "torch_ms": round(ms["torch"], 4),
            "device": result["device"], "date": result.get("date", datetime.date.today().isoformat()),
        })
    return entries


def merge(old_entries: list, new_entries: list) -> list:
    def key(e):
        return e["op"], e["capability"], e["dtype"], e["tokens"]

    fresh = {key(e) for e in new_entries}
    return sorted([e for e in old_entries if key(e) not in fresh] + new_entries, key=key)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", help="JSON files from bench_nested_linear.py --gpu --json")
    parser.add_argument("--out", default=str(DISPATCH_TABLE), help="table to update (default: the shipped one)")
    args = parser.parse_args(argv)
    new = []
    for path in args.benchmarks:
        with open(path) as f:
            new += entries_from_benchmark(json.load(f))
    table = {"about": "", "entries": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            table = json.load(f)
    table["entries"] = merge(table.get("entries", []), new)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    load_dispatch_table(tmp)  # refuse to install a table the dispatcher would reject
    os.replace(tmp, args.out)
    for e in new:
        print(f"{e['op']:<14} {e['capability']} {e['dtype']:<5} T<={e['tokens']:<6} -> {e['backend']:<6} "
              f"(triton {e['triton_ms']:.3f} ms, torch {e['torch_ms']:.3f} ms)")
    print(f"{len(new)} entries measured; {len(table['entries'])} in {args.out}")


if __name__ == "__main__":
    main()
