"""What a run shows at its end: the final table, and RUN_DIR/report.png (matplotlib).

The table: one row per extracted model (and the baseline), with its non-embedding
parameters, the task's columns and what the row is.
report.png: left, the three MatTA loss terms per step (L_S, L_TA, L_D); middle, the task's
validation metric of the Student and the TA, and of the Student trained alone when the run
has a baseline (RUN_DIR/baseline); right, that metric against the non-embedding parameters
of the extracted models (Student, wide-narrow-wide family, TA; the baseline as a black x),
as in the paper's Figure 5.
"""
from __future__ import annotations

import json
from pathlib import Path

from .._atomic import write_atomic
from ..extraction import parse_spec
from .objective import streams_of
from .run_dir import read_metrics, read_results
from .tasks import Column, task_for


def describe(spec: str, mode: str, shared: bool = True) -> str:
    """What a row of the final table is, in words."""
    if spec == "student" and not shared:
        return "Student of the unshared MatTA run (its own weights)"
    if spec == "student":
        return {"matta": "Student cut from the MatTA TA", "ta": "Student slice of a TA trained alone",
                "student": "Student trained alone"}[mode]
    if spec == "ta":
        return "TA trained alone" if mode == "ta" else "TA of the MatTA run"
    _, k = parse_spec(spec)
    return f"lowest {k // 2} and highest {k // 2} layers wide, the rest narrow"


def format_table(rows: list[dict], columns: tuple[Column, ...], title: str = "") -> str:
    """The final table: model, parameters (non-embedding), the task's columns, what it is."""
    head = ("model", "params (non-emb)", *(c.title for c in columns), "what it is")
    lines = [[r["name"], f"{r['params'] / 1e6:.3f}M", *(format(r[c.key], c.fmt) for c in columns), r.get("about", "")]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(fmt(head))
    return "\n".join(([title] if title else []) + [fmt(head), rule] + [fmt(line) for line in lines])


def make_report(run_dir, path=None) -> Path:
    """Draws the report of `run_dir` (metrics.jsonl, results.json) into report.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / "report.png"
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    results = read_results(run_dir) or {"models": []}

    fig, (ax_loss, ax_val, ax_size) = plt.subplots(1, 3, figsize=(17, 4.8))
    steps = [r["step"] for r in train]
    # The TA is drawn dashed over the Student: early in training the two curves coincide.
    for key, label, color, style in (("loss_student", "L_S (Student vs labels)", "tab:blue", "-"),
                                     ("loss_ta", "L_TA (TA vs labels)", "tab:orange", "--"),
                                     ("loss_distill", "L_D (Student vs TA's predictions)", "tab:green", "-")):
        values = [r[key] for r in train]
        if any(v for v in values):
            ax_loss.plot(steps, values, style, label=label, color=color, lw=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats / token)")
    ax_loss.set_title("training losses")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)

    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    mode = config.get("mode", "matta")
    task = task_for(config.get("task", "lm"))
    key, metric, metric_label = task.eval_key + "_", task.metric, task.metric_label
    streams = streams_of(mode, config.get("loss_weights", (1.0, 1.0, 1.0)))
    if evals:
        e_steps = [r["step"] for r in evals]
        if "student" in streams:
            ax_val.plot(e_steps, [r[key + "student"] for r in evals], "o-", color="tab:blue", ms=5,
                        label="Student (MatTA)" if mode == "matta" else "Student")
        if "ta" in streams:
            ax_val.plot(e_steps, [r[key + "ta"] for r in evals], "s--", color="tab:orange", ms=4,
                        label="TA (MatTA)" if mode == "matta" else "TA")
    baseline = [r for r in read_metrics(run_dir / "baseline") if r.get("kind") == "eval"]
    if baseline:
        ax_val.plot([r["step"] for r in baseline], [r[key + "student"] for r in baseline], "x:", color="black",
                    label="Student trained alone", ms=6)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel(metric_label)
    ax_val.set_title("what MatTA bought the Student" if baseline else "validation")
    ax_val.grid(alpha=0.3)
    if evals or baseline:
        ax_val.legend(fontsize=8)

    everything = sorted(results.get("models", []), key=lambda m: m["params"])
    models = [m for m in everything if m["spec"] != "baseline"]  # the line joins the models cut from one TA
    if everything:
        xs = [m["params"] / 1e6 for m in everything]
        ys = [m[metric] for m in everything]
        ax_size.plot([m["params"] / 1e6 for m in models], [m[metric] for m in models], "-", color="0.6", zorder=1)
        for m, x, y in zip(everything, xs, ys):
            style = {"student": ("tab:blue", "o", 80), "ta": ("tab:orange", "s", 80),
                     "baseline": ("black", "x", 80)}.get(m["spec"], ("tab:purple", "^", 40))
            ax_size.scatter([x], [y], color=style[0], marker=style[1], s=style[2], zorder=2)
            name = m["name"].replace("wide-narrow-wide ", "WNW ")
            ax_size.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax_size.set_xlabel("non-embedding parameters (M)")
    ax_size.set_ylabel(metric_label)
    ax_size.set_title("size vs quality of extracted models (Mix'n'Match)")
    ax_size.grid(alpha=0.3)

    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
