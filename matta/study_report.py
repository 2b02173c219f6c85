"""DIR/RESULTS.md and DIR/study.png of a `matta study` (see matta/study.py), from its runs.

Everything is read back from DIR (study.json, each run's results.json, config.json,
metrics.jsonl and wall time), so the report can be redrawn at any time.

Statistics: per arm, mean and sample standard deviation over seeds; against the Student-
alone baseline (AdamW when present), the per-seed paired difference with a two-sided 95%
t-interval (seeds are the pairs: same initialisation and data order), and the change in %.
A claim of the paper "held" only when its interval lies entirely on the paper's side of
zero; otherwise it is "not supported at this budget". With one seed there is no interval
and nothing is claimed. A --quick study claims nothing at all.

Stability: per arm, the seed spread (sample std) with a chi-square interval, and the runs
that end far from their arm's median; the claim "MatTA stabilises training" is the ratio of
the MatTA Student's spread to the Student alone's, held only when its F-interval lies below 1.

A --lr-sweep per-arm study is read three ways: every arm at its own best rate (the mean over
all seeds, as `matta.study.best_rate` chose it), every arm at the shared rate (the Student
alone's best on seed 0, the default sweep's choice), and with the rate of each seed chosen on
the other seeds (leave one seed out), which carries no selection bias into that seed's number.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ._atomic import write_atomic, write_json_atomic, write_text_atomic
from .stats import Interval, mean_interval, mean_std, paired_interval, spread_ratio_interval, std_interval
from .study import best_rate, flops_per_token, lr_tag, parse_arm, read_json, run_results, scored_spec
from .train.tasks import TASKS

LEVEL = 0.95
# A run is "far" from its arm's median beyond this many robust standard deviations of the
# study's ordinary seed noise (1.4826 x the median absolute deviation from the arm medians,
# pooled over every arm, so that an arm's own bad seeds cannot widen the yardstick they are
# measured by). For normal noise, 4 of them is passed by about 1 run in 10,000.
FAR_SIGMAS = 4.0


# ----------------------------------------------------------------------------------------
# Reading the runs


@dataclass
class RunInfo:
    arm: str
    seed: int
    run_dir: Path
    models: dict  # spec -> row of results.json
    steps: int
    tokens: int
    wall_s: float | None
    first_losses: dict  # the first logged losses (step 1: the initial weights on batch 0)


def _first_losses(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "train" and rec.get("step") == 1:
            return {k: rec.get(k) for k in ("loss_student", "loss_ta")}
    return {}


def read_run(arm: str, seed: int, run_dir: Path) -> RunInfo:
    results = run_results(run_dir)
    cfg = read_json(run_dir / "config.json") or {}
    per_step = cfg.get("batch_size", 0) * cfg.get("block_size", 0) * cfg.get("grad_accum", 1)
    wall = read_json(run_dir.with_name(run_dir.name + ".wall.json"))
    return RunInfo(arm, seed, run_dir, {row["spec"]: row for row in results["models"]}, int(results["step"]),
                   int(results["step"]) * per_step, None if wall is None else float(wall["seconds"]),
                   _first_losses(run_dir))


@dataclass
class StudyData:
    out: Path
    state: dict
    metric: str
    runs: dict  # arm -> {seed: RunInfo}
    missing: list  # (arm, seed) without results (and the rate, "arm lr LR", in a per-arm sweep)
    grid: dict = dataclasses.field(default_factory=dict)  # --lr-sweep per-arm: arm -> {lr: {seed: RunInfo}}

    @property
    def quick(self) -> bool:
        return bool(self.state["settings"]["quick"])

    @property
    def task(self) -> str:
        return self.state["settings"]["task"]

    def arms(self) -> list[str]:
        return [a for a in self.state["arms"] if a in self.runs and self.runs[a]]

    def values(self, arm: str, spec: str) -> dict[int, float]:
        return {s: float(r.models[spec][self.metric]) for s, r in self.runs.get(arm, {}).items()
                if spec in r.models and self.metric in r.models[spec]}

    def mode(self, arm: str) -> str:
        return parse_arm(arm).kind.mode

    def grid_values(self, arm: str) -> dict[float, dict[int, float]]:
        """{lr: {seed: metric of the arm's scored model}} over the finished runs, for every rate
        of the arm's grid (an empty dict for a rate with none finished)."""
        spec = scored_spec(parse_arm(arm))
        finished = self.grid.get(arm, {})
        return {float(lr): {s: float(r.models[spec][self.metric]) for s, r in finished.get(float(lr), {}).items()}
                for lr in self.state.get("grid", {}).get(arm, {})}

    def picked(self, rate_of) -> "StudyData":
        """The same study with the runs of `rate_of(arm, seed)` (None: that seed is left out)."""
        runs = {}
        for arm, rates in self.grid.items():
            for seed in sorted({s for seeds in rates.values() for s in seeds}):
                lr = rate_of(arm, seed)
                if lr is not None and seed in rates.get(lr, {}):
                    runs.setdefault(arm, {})[seed] = rates[lr][seed]
        return dataclasses.replace(self, runs=runs)


def load_study(out) -> StudyData:
    out = Path(out)
    state = read_json(out / "study.json")
    if state is None:
        raise FileNotFoundError(f"{out} holds no study.json; run `matta study --out {out}` first")
    runs, missing, grid = {}, [], {}
    if state.get("grid"):  # --lr-sweep per-arm: every rate, each arm read at its best (chosen here, from the runs)
        for arm, rates in state["grid"].items():
            for lr, seeds in rates.items():
                for seed, rel in seeds.items():
                    if (out / rel / "results.json").is_file():
                        grid.setdefault(arm, {}).setdefault(float(lr), {})[int(seed)] = read_run(arm, int(seed), out / rel)
                    else:
                        missing.append((f"{arm} lr {lr}", int(seed)))
        data = StudyData(out, state, state["metric"], {}, missing, grid)
        rates = arm_rates(data)
        return data.picked(lambda arm, seed: rates.get(arm))
    for arm, seeds in state.get("runs", {}).items():
        for seed, rel in seeds.items():
            run_dir = out / rel
            if (run_dir / "results.json").is_file():
                runs.setdefault(arm, {})[int(seed)] = read_run(arm, int(seed), run_dir)
            else:
                missing.append((arm, int(seed)))
    return StudyData(out, state, state["metric"], runs, missing)


# ----------------------------------------------------------------------------------------
# The rates of a per-arm sweep


def arm_rates(data: StudyData) -> dict[str, float]:
    """Each arm's best rate: the lowest mean over the seeds finished at every rate."""
    rates = {arm: best_rate(data.grid_values(arm)) for arm in data.grid}
    return {arm: lr for arm, lr in rates.items() if lr is not None}


def shared_rates(data: StudyData) -> dict[str, float]:
    """The default sweep's rate for every arm: its optimizer's Student alone, best on seed 0."""
    out = {}
    for arm in data.grid:
        seed0 = {lr: v[0] for lr, v in data.grid_values(f"student-{parse_arm(arm).optimizer}").items() if 0 in v}
        if seed0 and len(seed0) == len(data.grid[arm]):
            out[arm] = min(seed0, key=lambda lr: (seed0[lr], lr))
    return out


def held_out_rate(data: StudyData, arm: str, seed: int) -> float | None:
    """The arm's best rate chosen on every seed but `seed` (None: no other seed has every rate)."""
    values = data.grid_values(arm)
    others = {s for v in values.values() for s in v} - {seed}
    return best_rate(values, others) if others else None


# ----------------------------------------------------------------------------------------
# Statistics


def paired(data: StudyData, a: tuple[str, str], b: tuple[str, str]) -> tuple[Interval, float] | None:
    """Paired differences (arm_a spec_a) - (arm_b spec_b) over the seeds both have, and the
    mean change in % of b; None when no seed has both."""
    va, vb = data.values(*a), data.values(*b)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    xs, ys = [va[s] for s in seeds], [vb[s] for s in seeds]
    pct = sum(100.0 * (x - y) / y for x, y in zip(xs, ys)) / len(seeds)
    return paired_interval(xs, ys, LEVEL), pct


def interaction(data: StudyData) -> Interval | None:
    """Per seed: L(MatTA+Shampoo) - L(Student+Shampoo) - L(MatTA+AdamW) + L(Student+AdamW),
    Student metric. Negative: the two gains are super-additive."""
    parts = [data.values(a, "student") for a in ("matta-shampoo", "student-shampoo", "matta-adamw", "student-adamw")]
    seeds = sorted(set.intersection(*(set(p) for p in parts)))
    if not seeds:
        return None
    return mean_interval([parts[0][s] - parts[1][s] - parts[2][s] + parts[3][s] for s in seeds], LEVEL)


def verdict(iv: Interval | None) -> str:
    """For a claim "a is lower than b" and the interval of a - b: 'held' when the interval
    lies below zero, else 'not supported at this budget' (saying why)."""
    if iv is None or iv.n < 2:
        return "not supported at this budget (fewer than two seeds: no interval)"
    if iv.below_zero():
        return "held"
    if iv.above_zero():
        return "not supported at this budget: the opposite direction is significant"
    return "not supported at this budget (the interval includes 0)"


def fmt_iv(iv: Interval | None, digits: int = 4) -> str:
    if iv is None:
        return "-"
    if iv.low is None:
        return f"{iv.mean:+.{digits}f} (n=1)"
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def spread_ratio_verdict(ratio) -> str:
    """For the claim "a is less spread than b" and the interval of s_a / s_b."""
    if ratio.low is None:
        return "not supported at this budget (fewer than two seeds, or no spread in the baseline: no interval)"
    if ratio.below_one():
        return "held"
    if ratio.above_one():
        return "not supported at this budget: the opposite direction is significant"
    return "not supported at this budget (the interval includes 1)"


def fmt_ms(values, digits: int = 4) -> str:
    if not values:
        return "-"
    m, s = mean_std(list(values))
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# ----------------------------------------------------------------------------------------
# The report


def baseline_arm(data: StudyData) -> str | None:
    for arm in ("student-adamw", "student-shampoo"):
        if arm in data.runs:
            return arm
    return None


def _flops_per_token_by_mode(data: StudyData) -> dict:
    """Training FLOPs per token for each mode, read once from one finished run."""
    any_run = next((r for seeds in data.runs.values() for r in seeds.values()), None)
    if any_run is None:
        return {}
    return {mode: flops_per_token(any_run.run_dir, mode) for mode in ("student", "ta", "matta")}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node()}: {cpu}, {cores} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.platform()}")


def family_specs(data: StudyData, arm: str) -> list[tuple[str, int, str]]:
    """(spec, non-embedding params, name) of the models a run evaluated, smallest first."""
    run = next(iter(data.runs[arm].values()))
    rows = sorted(run.models.values(), key=lambda r: (r["params"], r["spec"] != "student"))
    return [(r["spec"], r["params"], r["name"]) for r in rows]


# (arm a, model of a, arm b, model of b, claim that a is lower than b, source); {o}: the optimizer
PAIRED_CLAIMS = (
    ("matta-{o}", "ta", "ta-{o}", "ta",
     "the MatTA TA ({o}) beats the TA trained alone (size-matched; not in the paper)", "this project"),
    ("matta-unshared-{o}", "student", "matta-{o}", "student",
     "an unshared Student ({o}) is better than the shared one (sharing costs a little)", "Table 4"),
    ("matta-unshared-{o}", "ta", "matta-{o}", "ta", "an unshared TA ({o}) is better than the shared one", "Table 4"),
    ("matta-{o}", "student", "matta-wd0-{o}", "student",
     "distillation helps the Student: MatTA beats MatTA with w_D = 0 ({o})", "this project (3.1)"),
    ("matta-{o}", "student", "student-flops-{o}", "student",
     "the MatTA Student beats a Student trained alone for the same FLOPs ({o}; not in the paper)", "this project"),
    ("teacher-matta-{o}", "student", "teacher-student-{o}", "student",
     "Teacher-TA-Student beats Teacher-Student ({o})", "Section 3 (the recipe)"),
)


def claims(data: StudyData) -> list[tuple[str, str, str, str]]:
    """(claim, source, measured difference with interval, verdict) for every claim the arms allow."""
    out = []
    have = set(data.runs)

    def add(text, source, a, b):
        result = paired(data, a, b)
        if result is not None:
            iv, pct = result
            out.append((text, source, f"{fmt_iv(iv)} ({pct:+.2f}%)", verdict(iv)))

    base = baseline_arm(data)
    if {"student-shampoo", "student-adamw"} <= have:
        add("Shampoo improves the Student trained alone", "Table 3, 'Shampoo only'",
            ("student-shampoo", "student"), ("student-adamw", "student"))
    for opt, row in (("adamw", "'MatTA without Shampoo'"), ("shampoo", "'MatTA with Shampoo'")):
        if f"matta-{opt}" in have and base:
            add(f"the MatTA Student ({opt}) beats the Student trained alone with AdamW", f"Tables 1-3, {row}",
                (f"matta-{opt}", "student"), (base, "student"))
        if f"matta-{opt}" in have and f"student-{opt}" in have and f"student-{opt}" != base:
            add(f"the MatTA Student beats the Student alone, both with {opt}", "Tables 1-3",
                (f"matta-{opt}", "student"), (f"student-{opt}", "student"))
    inter = interaction(data)
    if inter is not None:
        out.append(("MatTA and Shampoo combine super-additively: L(MatTA+Sh) - L(Sh) - L(MatTA) + L(base) < 0",
                    "Table 3", fmt_iv(inter), verdict(inter)))
    for opt in ("adamw", "shampoo"):
        for a, spec_a, b, spec_b, text, source in PAIRED_CLAIMS:
            a, b = a.format(o=opt), b.format(o=opt)
            if a in have and b in have:
                add(text.format(o=opt), source, (a, spec_a), (b, spec_b))
        family_claims(data, opt, out)
    return out + stability_claims(data)


def student_alone(data: StudyData, opt: str) -> str | None:
    """The Student trained alone with this optimizer, else the baseline."""
    return f"student-{opt}" if f"student-{opt}" in data.runs else baseline_arm(data)


def family_claims(data: StudyData, opt: str, out: list) -> None:
    arm, alone, base = f"matta-{opt}", f"ta-{opt}", student_alone(data, opt)
    if arm not in data.runs:
        return
    members = [(spec, params) for spec, params, _ in family_specs(data, arm)]
    if len(members) < 2:
        return
    steps = [paired(data, (arm, big), (arm, small)) for (small, _), (big, _) in zip(members, members[1:])]
    resolved = sum(1 for s in steps if s is not None and s[0].below_zero())
    means = [mean_std(list(data.values(arm, spec).values()))[0] for spec, _ in members]
    monotone = all(b < a for a, b in zip(means, means[1:]))
    ok = resolved == len(steps)
    out.append((f"the MatTA Mix'n'Match family ({opt}) improves with every step up in size",
                "Figure 5", f"means monotone: {'yes' if monotone else 'no'}; {resolved} of {len(steps)} steps "
                f"resolved (interval < 0)", "held" if ok else "not supported at this budget"))
    if base:
        beats = [paired(data, (arm, spec), (base, "student")) for spec, _ in members]
        n_ok = sum(1 for b in beats if b is not None and b[0].below_zero())
        out.append((f"every member of the MatTA family ({opt}) beats the Student trained alone ({base})", "Figure 5",
                    f"{n_ok} of {len(members)} members (interval < 0)",
                    "held" if n_ok == len(members) else "not supported at this budget"))
    if alone in data.runs:
        diffs = [paired(data, (arm, spec), (alone, spec)) for spec, _ in members]
        n_ok = sum(1 for d in diffs if d is not None and d[0].below_zero())
        out.append((f"slices of the MatTA TA beat the same slices of the TA trained alone ({opt})",
                    "this project (Mix'n'Match)", f"{n_ok} of {len(members)} members (interval < 0)",
                    "held" if n_ok == len(members) else "not supported at this budget"))


def far_threshold(data: StudyData) -> float | None:
    """FAR_SIGMAS robust standard deviations of the seed noise pooled over the arms (the arm's
    scored model); None with fewer than three deviations to pool."""
    deviations = []
    for arm in data.arms():
        values = sorted(data.values(arm, scored_spec(parse_arm(arm))).values())
        if len(values) < 2:
            continue
        median = _median(values)
        devs = sorted(abs(v - median) for v in values)
        deviations += devs[1:] if len(values) % 2 else devs  # an odd sample's median is 0 from itself
    if len(deviations) < 3:
        return None
    return FAR_SIGMAS * 1.4826 * _median(deviations)


def _median(values) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def far_runs(data: StudyData, arm: str, spec: str, threshold: float | None) -> list[int]:
    """The seeds of `arm` whose `spec` ends more than `threshold` from the arm's median."""
    values = data.values(arm, spec)
    if threshold is None or len(values) < 2:
        return []
    median = _median(values.values())
    return sorted(s for s, v in values.items() if abs(v - median) > threshold)


def stability_claims(data: StudyData) -> list[tuple[str, str, str, str]]:
    """Per optimizer: the MatTA Student's seed spread against the Student alone's (F-interval
    of the ratio of standard deviations over the seeds both have), with the far runs."""
    out, threshold = [], far_threshold(data)
    for opt in ("adamw", "shampoo"):
        arm, base = f"matta-{opt}", student_alone(data, opt)
        if arm not in data.runs or base is None:
            continue
        ours, theirs = data.values(arm, "student"), data.values(base, "student")
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        ratio = spread_ratio_interval([ours[s] for s in seeds], [theirs[s] for s in seeds], LEVEL)
        bounds = "" if ratio.low is None else f" [{ratio.low:.3f}, {ratio.high:.3f}]"
        far = [len(far_runs(data, a, "student", threshold)) for a in (arm, base)]
        out.append((f"MatTA stabilises training: the MatTA Student ({opt}) varies less over seeds than the Student "
                    f"alone ({base})", "Section 3 ('regularization afforded by the Matryoshka structure')",
                    f"std ratio {ratio.ratio:.3f}{bounds}; runs far from the median: {far[0]} vs {far[1]} of "
                    f"{len(seeds)}", spread_ratio_verdict(ratio)))
    return out


def stability_table(data: StudyData) -> list[str]:
    threshold = far_threshold(data)
    far_text = "-" if threshold is None else f"{threshold:.4f}"
    lines = [f"Far from the median: more than {far_text} ({FAR_SIGMAS:g} x 1.4826 x the median absolute deviation "
             "from the arm medians, pooled over the arms; see `FAR_SIGMAS`).", "",
             f"| arm | model | seeds | median | std [{LEVEL:.0%} chi-square CI] | runs far from the median |",
             "|---|---|---|---|---|---|"]
    for arm in data.arms():
        spec = scored_spec(parse_arm(arm))
        values = data.values(arm, spec)
        if not values:
            continue
        spread = std_interval(list(values.values()), LEVEL)
        bounds = "" if spread.low is None else f" [{spread.low:.4f}, {spread.high:.4f}]"
        far = far_runs(data, arm, spec, threshold)
        far_cells = ", ".join(f"seed {s}: {values[s]:.4f}" for s in far) or "none"
        lines.append(f"| {parse_arm(arm).label} | {spec} | {len(values)} | {_median(values.values()):.4f} | "
                     f"{spread.std:.4f}{bounds} | {len(far)} ({far_cells}) |")
    return lines


def budget_check(data: StudyData) -> list[str]:
    """Per optimizer: whether TA alone beats Student alone by more than twice the seed spread."""
    out = []
    for opt in ("adamw", "shampoo"):
        s, t = data.values(f"student-{opt}", "student"), data.values(f"ta-{opt}", "ta")
        if len(s) >= 2 and len(t) >= 2:
            ms, ss = mean_std(list(s.values()))
            mt, st = mean_std(list(t.values()))
            spread = max(ss, st)
            margin = ms - mt
            met = margin > 2 * spread
            out.append(f"TA alone ({opt}) beats Student alone by {margin:.4f} against a seed spread (largest std) of "
                       f"{spread:.4f}: the criterion margin > 2 x spread is {'met' if met else 'NOT met'} at this budget"
                       f"{'' if met else f'; the {opt} comparisons below may be limited by the budget'}.")
    return out


def init_check(data: StudyData) -> str:
    """Per seed, the first logged loss of every run must agree (same init, same first batch)."""
    worst, compared = 0.0, 0
    for key, modes in (("loss_student", ("student", "matta")), ("loss_ta", ("ta", "matta"))):
        for seed in range(data.state["settings"]["seeds"]):
            # Teacher arms are left out: their loss is measured against the Teacher's labels.
            values = [runs[seed].first_losses.get(key) for arm, runs in data.runs.items()
                      if seed in runs and data.mode(arm) in modes and not parse_arm(arm).kind.teacher]
            values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
            if len(values) > 1:
                compared += 1
                worst = max(worst, max(values) - min(values))
    if compared == 0:
        return "Initialisation check: not possible (no two runs of a seed logged their first loss)."
    same = worst <= 1e-5
    return (f"Initialisation check: per seed, the loss at step 1 (initial weights, first batch) differs across "
            f"arms by at most {worst:.2e} ({'the same initialisation and data order' if same else 'NOT the same: arms of a seed did not start alike'}).")


def arm_table(data: StudyData, fpt: dict) -> list[str]:
    task = TASKS[data.task]
    with_ppl = any(c.key == "perplexity" for c in task.columns)  # a language model's metric is a loss
    base = baseline_arm(data)
    name = task.eval_label
    head = ["arm", f"Student {name}"] + (["ppl"] if with_ppl else []) + [
        f"Δ vs {base or 'baseline'} (95% CI)", "Δ %", f"TA {name}", "steps", "tokens", "FLOPs", "wall s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in data.arms():
        mode = data.mode(arm)
        s_vals = data.values(arm, "student") if mode != "ta" else {}
        t_vals = data.values(arm, "ta") if mode != "student" else {}
        runs = list(data.runs[arm].values())
        diff = paired(data, (arm, "student"), (base, "student")) if base and s_vals and arm != base else None
        cells = [parse_arm(arm).label + ("" if parse_arm(arm).kind.in_paper else " †"), fmt_ms(s_vals.values())]
        if with_ppl:
            cells.append(f"{math.exp(mean_std(list(s_vals.values()))[0]):.2f}" if s_vals else "-")
        cells += [fmt_iv(diff[0]) if diff else "-", f"{diff[1]:+.2f}%" if diff else "-", fmt_ms(t_vals.values())]
        steps = sorted({r.steps for r in runs})
        tokens = sorted({r.tokens for r in runs})
        flops = fpt.get(mode, 0.0) * tokens[0] if tokens and fpt else float("nan")
        walls = [r.wall_s for r in runs if r.wall_s is not None]
        cells += ["/".join(map(str, steps)), _si(tokens[0]) if tokens else "-", _si(flops) if flops == flops else "-",
                  f"{sum(walls) / len(walls):.0f}" if walls else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def family_table(data: StudyData) -> list[str]:
    lines = []
    for opt in ("adamw", "shampoo"):
        arm, alone, base = f"matta-{opt}", f"ta-{opt}", student_alone(data, opt)
        if arm not in data.runs:
            continue
        lines += ["", f"**Mix'n'Match family, {opt}** ({data.metric}; mean ± std over seeds; Δ is paired, 95% CI)", "",
                  f"| model | non-emb params | MatTA TA slices | TA-alone slices | Δ (MatTA - alone) | Δ vs {base} |",
                  "|---|---|---|---|---|---|"]
        for spec, params, name in family_specs(data, arm):
            ours, theirs = data.values(arm, spec), data.values(alone, spec) if alone in data.runs else {}
            d_alone = paired(data, (arm, spec), (alone, spec)) if theirs else None
            d_base = paired(data, (arm, spec), (base, "student")) if base else None
            lines.append(f"| {name} | {params / 1e6:.3f}M | {fmt_ms(ours.values())} | {fmt_ms(theirs.values())} | "
                         f"{fmt_iv(d_alone[0]) if d_alone else '-'} | {fmt_iv(d_base[0]) if d_base else '-'} |")
    return lines


def learning_rate_lines(data: StudyData) -> list[str]:
    """The default sweep: the Student alone's rates on seed 0 and the rate chosen for every arm."""
    lines = ["Per optimizer, a small sweep on the Student-alone arm of seed 0 only (Student "
             f"{data.metric} per rate); the best rate is reused for every arm and seed. A fixed rate (--lr, --quick) "
             "has no sweep.", ""]
    sweep = data.state.get("sweep", {})
    for opt, chosen in data.state["chosen_lr"].items():
        results = sweep.get(opt)
        if results:
            cells = ", ".join(f"{lr} -> {v:.4f}" for lr, v in sorted(results.items(), key=lambda kv: float(kv[0])))
            lines.append(f"- {opt}: {cells}; chosen {chosen:g}")
        else:
            lines.append(f"- {opt}: {chosen:g} (fixed)")
    return lines


def grid_lines(data: StudyData) -> list[str]:
    """--lr-sweep per-arm: the whole grid (arm x rate), each arm's choice, the shared rate, and
    what choosing the best of the grid on the reported seeds is worth (its selection bias)."""
    chosen, shared = arm_rates(data), shared_rates(data)
    rates = sorted({lr for arm in data.grid for lr in data.grid[arm]})
    lines = ["Every arm and seed was trained at every rate of the grid. Each arm is read at the rate with the lowest "
             "mean (over the seeds finished at every rate) of its own model's "
             f"{data.metric} (the Student; the TA for TA alone), **bold**; the shared rate (*) is the one the default "
             "sweep would pick for every arm: the Student alone's best on seed 0. Cells: mean ± std over seeds (n).",
             "", "| arm | " + " | ".join(lr_tag(lr) for lr in rates) + " | own best | shared |",
             "|---|" + "---|" * (len(rates) + 2)]
    for arm in (a for a in data.state["arms"] if a in data.grid):
        values = data.grid_values(arm)
        cells = []
        for lr in rates:
            v = values.get(lr, {})
            cell = f"{fmt_ms(v.values())} ({len(v)})" if v else "-"
            cell = f"**{cell}**" if chosen.get(arm) == lr else cell
            cells.append(cell + (" *" if shared.get(arm) == lr else ""))
        lines.append(f"| {parse_arm(arm).label} | " + " | ".join(cells) +
                     f" | {lr_tag(chosen[arm]) if arm in chosen else '-'} | {lr_tag(shared[arm]) if arm in shared else '-'} |")
    lines += ["", "Selection bias: the own-best rate is the best of the grid on the very seeds it is then reported on, "
              "so its mean is optimistic by about the luck of that choice, and more so for an arm whose seeds vary "
              "more. Leaving each seed out of its own choice removes the bias from that seed's number; per arm, the "
              "own-best mean minus the mean with the rate chosen on the other seeds (negative: the own-best reading "
              "is optimistic by that much):", ""]
    held_out = data.picked(lambda arm, seed: held_out_rate(data, arm, seed))
    for arm in (a for a in data.state["arms"] if a in chosen):
        spec = scored_spec(parse_arm(arm))
        own, fair = data.values(arm, spec), held_out.values(arm, spec)
        seeds = sorted(set(own) & set(fair))
        if seeds:
            switched = sum(1 for s in seeds if held_out_rate(data, arm, s) != chosen[arm])
            lines.append(f"- {parse_arm(arm).label}: {sum(own[s] - fair[s] for s in seeds) / len(seeds):+.4f} over "
                         f"{len(seeds)} seeds ({switched} seed(s) would have had another rate)")
    return lines


ARM_TABLE_NOTE = ("Mean ± std over seeds. Δ: per-seed paired difference from the baseline (95% t-interval), and the "
                  "mean change in %. † not reported in the paper (an honest baseline: the Student alone for as "
                  "many training FLOPs as the MatTA run). FLOPs: training FLOPs (6 N per token and stream, plus "
                  "attention) of one run.")
CLAIMS_NOTE = ("A claim held only if its 95% interval excludes 0 in the paper's direction (for a ratio of spreads: "
               "lies below 1); otherwise it is not supported at this budget (which is not evidence against it).")


def readings_lines(data: StudyData, fpt: dict, heading: str, notes: bool = True, family: bool = True) -> list[str]:
    """The arm table, the family tables, the claims and the seed spread of one reading of the
    runs; `heading` ("##", "###") marks its parts, `notes` explains the tables."""
    lines = [ARM_TABLE_NOTE, ""] if notes else []
    lines += arm_table(data, fpt)
    if family:
        lines += family_table(data)
    lines += ["", f"{heading} What held", ""]
    if data.quick:
        return lines + ["Not assessed: --quick runs a few steps and claims nothing."]
    lines += [CLAIMS_NOTE, ""] if notes else []
    lines += ["| claim | source | measured (a - b, 95% CI) | reading |", "|---|---|---|---|"]
    lines += [f"| {c} | {s} | {m} | {v} |" for c, s, m, v in claims(data)]
    return lines + ["", f"{heading} Seed spread", ""] + stability_table(data)


def write_report(out) -> Path:
    """Writes DIR/RESULTS.md and DIR/study.png; returns the RESULTS.md path."""
    data = load_study(out)
    st = data.state["settings"]
    fpt = _flops_per_token_by_mode(data) if data.runs else {}
    budget = f"--tokens {st['tokens']}" if st["tokens"] is not None else f"--steps {st['steps']}"
    lines = [f"# matta study: preset {st['preset']}, {st['seeds']} seed(s), {budget}", ""]
    if data.quick:
        lines += ["> **--quick: a plumbing check of a few steps on a very small model. Nothing here is evidence "
                  "for or against any claim of the paper.**", ""]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines += [
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {machine()}",
        f"- Load average at the start / at this report: {data.state.get('load_at_start', '?')} / "
        f"{'-' if load is None else ', '.join(f'{x:.2f}' for x in load)}",
        f"- Command: `{data.state['command']}`",
        f"- Data: {st['data']}" + (f" ({json.dumps(data.state['data_provenance'])})" if data.state.get("data_provenance") else ""),
        f"- Task: {st['task']} (metric: {data.metric}, lower is better)",
        "- Every arm is an ordinary `matta train` run directory under `runs/` (`matta eval --run DIR`, "
        "`matta extract --run DIR` accept each).",
        "",
        "## Learning rates",
        "",
    ]
    lines += grid_lines(data) if data.grid else learning_rate_lines(data)
    lines += ["", init_check(data), ""]
    for check in budget_check(data):
        lines += [f"Budget: {check}", ""]
    if data.grid:
        shared = shared_rates(data)
        lines += ["## Every arm at its own best rate", ""] + readings_lines(data, fpt, "###")
        lines += ["", "## Every arm at the shared rate", "",
                  "The rate of the default sweep (the Student alone's best on seed 0) for every arm: "
                  f"{', '.join(sorted({lr_tag(lr) for lr in shared.values()})) or 'none (no Student-alone arm)'}.", ""]
        lines += readings_lines(data.picked(lambda arm, seed: shared.get(arm)), fpt, "###", notes=False, family=False)
        lines += ["", "## Each seed at the rate chosen on the other seeds", "",
                  "Per arm and seed, the rate with the best mean over the other seeds: no seed's number took part in "
                  "choosing its own rate.", ""]
        lines += readings_lines(data.picked(lambda arm, seed: held_out_rate(data, arm, seed)), fpt, "###", notes=False,
                                family=False)
    else:
        lines += ["## Arms", ""] + readings_lines(data, fpt, "##")
    if data.missing:
        lines += ["", "## Unfinished runs", ""] + [f"- {arm} seed {seed}" for arm, seed in data.missing]
    lines += ["", "## Time per run", ""] + time_table(data) + ["", "![study](study.png)", ""]
    if data.grid:
        write_grid_json(data)
    path = data.out / "RESULTS.md"
    write_text_atomic(path, "\n".join(lines))
    plot(data)
    return path


def write_grid_json(data: StudyData) -> Path:
    """DIR/grid.json: every finished run's metrics and wall time, arm -> rate -> seed, small enough
    to commit beside RESULTS.md when the run directories are not."""
    grid = {arm: {lr_tag(lr): {str(seed): {"models": {spec: row[data.metric] for spec, row in r.models.items()
                                                      if data.metric in row}, "wall_s": r.wall_s}
                                for seed, r in sorted(seeds.items())}
                  for lr, seeds in sorted(rates.items())} for arm, rates in data.grid.items()}
    path = data.out / "grid.json"
    write_json_atomic(path, {"metric": data.metric, "arm_lr": arm_rates(data), "shared_lr": shared_rates(data),
                             "runs": grid})
    return path


def time_table(data: StudyData) -> list[str]:
    lines = ["| arm | seed | lr | steps | wall s | run directory |", "|---|---|---|---|---|---|"]
    grid = data.grid or {arm: {None: seeds} for arm, seeds in data.runs.items()}
    for arm in (a for a in data.state["arms"] if a in grid):
        for lr, seeds in sorted(grid[arm].items(), key=lambda kv: kv[0] or 0.0):
            for seed, r in sorted(seeds.items()):
                wall = "-" if r.wall_s is None else f"{r.wall_s:.0f}"
                rate = lr_tag(lr) if lr is not None else lr_tag(data.state["chosen_lr"].get(parse_arm(arm).optimizer, 0))
                lines.append(f"| {arm} | {seed} | {rate} | {r.steps} | {wall} | {r.run_dir.relative_to(data.out)} |")
    return lines


def plot(data: StudyData) -> Path:
    """study.png: non-embedding parameters vs the metric (Figure 5), one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = [o for o in ("adamw", "shampoo") if any(a.endswith(o) for a in data.runs)]
    fig, axes = plt.subplots(1, max(1, len(opts)), figsize=(6.5 * max(1, len(opts)), 4.8), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for arm, label, style in ((f"matta-{opt}", "MatTA TA slices (Mix'n'Match)", "o-"),
                                  (f"ta-{opt}", "slices of the TA trained alone", "s--")):
            if arm not in data.runs:
                continue
            pts = []
            for spec, params, _ in family_specs(data, arm):
                vals = list(data.values(arm, spec).values())
                if vals:
                    pts.append((params / 1e6, *mean_std(vals)))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                            capsize=3, label=label, ms=5)
        for arm, spec, label, marker in ((f"student-{opt}", "student", "Student trained alone", "*"),
                                         (f"ta-{opt}", "ta", "TA trained alone", "D")):
            if arm in data.runs:
                vals = list(data.values(arm, spec).values())
                params = next(iter(data.runs[arm].values())).models[spec]["params"] / 1e6
                if vals:
                    m, s = mean_std(vals)
                    ax.errorbar([params], [m], yerr=[s], fmt=marker, ms=12, capsize=3, label=label, zorder=3)
        ax.set_xlabel("non-embedding parameters (M)")
        ax.set_ylabel(f"{TASKS[data.task].metric_label} (mean ± std over seeds)")
        ax.set_title(f"{opt}{' (--quick: plumbing only)' if data.quick else ''}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = data.out / "study.png"
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
