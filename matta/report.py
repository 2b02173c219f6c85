"""RUN_DIR/report.png: training curves and the size-vs-quality curve of a run (matplotlib).

Left: the three MatTA loss terms per step (L_S, L_TA, L_D). Middle: validation losses of
the Student and the TA, and of the Student trained alone when the run has a baseline
(RUN_DIR/baseline). Right: validation loss against non-embedding parameters of the
extracted models (Student, wide-narrow-wide family, TA; the baseline as a black x), as in
the paper's Figure 5.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"models": []}

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
    # A classifier (--task classify) is judged by AucLoss, a language model by its loss.
    key, metric, label = (("auc_loss_", "auc_loss", "validation AucLoss (1 - AUROC)") if config.get("task") == "classify"
                          else ("val_", "val_loss", "validation loss"))
    if evals:
        e_steps = [r["step"] for r in evals]
        if mode != "ta":
            ax_val.plot(e_steps, [r[key + "student"] for r in evals], "o-", color="tab:blue", ms=5,
                        label="Student (MatTA)" if mode == "matta" else "Student")
        if mode != "student":
            ax_val.plot(e_steps, [r[key + "ta"] for r in evals], "s--", color="tab:orange", ms=4,
                        label="TA (MatTA)" if mode == "matta" else "TA")
    baseline = [r for r in read_metrics(run_dir / "baseline") if r.get("kind") == "eval"]
    if baseline:
        ax_val.plot([r["step"] for r in baseline], [r[key + "student"] for r in baseline], "x:", color="black",
                    label="Student trained alone", ms=6)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel(label)
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
            label = m["name"].replace("wide-narrow-wide ", "WNW ")
            ax_size.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax_size.set_xlabel("non-embedding parameters (M)")
    ax_size.set_ylabel(label)
    ax_size.set_title("size vs quality of extracted models (Mix'n'Match)")
    ax_size.grid(alpha=0.3)

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
