"""`matta study`: the --quick plumbing end to end (runs, resume, report, run directories that
`matta eval`/`extract` accept), and the statistics and readings of the report on runs with
known numbers."""
import json

import pytest

import matta.study_report as report
from matta.cli import main
from matta.study import (
    ARM_KINDS,
    Arm,
    Study,
    StudyError,
    StudySettings,
    parse_arms,
    parse_lrs,
    run_dir_of,
)
from matta._atomic import write_json_atomic as write_json
from matta.study_report import load_study, verdict, write_report
from matta.stats import mean_interval


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MATTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


QUICK = ["study", "--quick", "--seeds", "2", "--arms", "student-adamw,ta-adamw,matta-adamw", "--jobs", "2"]


@pytest.mark.slow
def test_quick_study_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "study"
    assert main([*QUICK, "--out", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "--quick" in text and "Not assessed" in text and (out / "study.png").stat().st_size > 10_000
    assert "the same initialisation and data order" in text
    state = json.loads((out / "study.json").read_text())
    assert state["chosen_lr"] == {"adamw": 0.003}
    runs = [out / rel for seeds in state["runs"].values() for rel in seeds.values()]
    assert len(runs) == 6 and all((r / "results.json").is_file() for r in runs)
    data = load_study(out)
    assert set(data.runs) == {"student-adamw", "ta-adamw", "matta-adamw"} and not data.missing
    matta_run = data.runs["matta-adamw"][1].run_dir
    # Every arm is an ordinary run directory.
    assert main(["eval", "--run", str(matta_run), "--models", "student"]) == 0
    assert main(["extract", "--run", str(matta_run), "--spec", "ta", "--out", str(tmp_path / "models")]) == 0

    # A killed study resumes: finished runs are kept, an unfinished one continues from its checkpoint.
    stamps = {r: (r / "results.json").stat().st_mtime_ns for r in runs}
    (matta_run / "results.json").unlink()
    capsys.readouterr()
    assert main([*QUICK, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "matta-adamw seed 1 lr 0.003: resuming" in said
    assert said.count(": starting") == 0
    assert all((r / "results.json").stat().st_mtime_ns == stamps[r] for r in runs if r != matta_run)
    assert "--resume" in (matta_run.with_name(matta_run.name + ".log")).read_text()
    assert len(json.loads(matta_run.with_name(matta_run.name + ".wall.json").read_text())["segments"]) == 2

    # The same directory with other settings is refused.
    capsys.readouterr()
    assert main([*QUICK, "--out", str(out), "--steps", "5"]) == 2
    assert "other settings" in capsys.readouterr().err

    # The compute-matched Student and the Teacher arms (a finished MatTA run is the Teacher).
    other = tmp_path / "teacher_study"
    arms = "student-flops-adamw,teacher-student-adamw,teacher-matta-adamw"
    assert main(["study", "--quick", "--seeds", "1", "--arms", arms, "--teacher", str(matta_run), "--jobs", "2",
                 "--out", str(other)]) == 0
    data = load_study(other)
    assert set(data.runs) == set(arms.split(","))
    assert data.runs["student-flops-adamw"][0].steps > data.runs["teacher-student-adamw"][0].steps == 4
    assert "Teacher-TA-Student beats Teacher-Student" not in (other / "RESULTS.md").read_text()  # --quick claims nothing
    config = json.loads((data.runs["teacher-matta-adamw"][0].run_dir / "config.json").read_text())
    assert config["teacher"] == str(matta_run) and config["mode"] == "matta"


@pytest.mark.parametrize("argv, message", [
    (["--arms", "student-sgd"], "unknown arm"),
    (["--arms", "teacher-matta-adamw"], "need --teacher"),
    (["--arms", ""], "names no arm"),
    (["--lr", "adamw=fast"], "OPTIMIZER=RATE"),
    (["--seeds", "0"], "at least 1"),
    (["--steps", "0"], "at least 1"),
    (["--lr-sweep", "per-arm", "--lr", "adamw=1e-3"], "give one of the two"),
    (["--lr-sweep", "per-arm", "--arms", "student-flops-adamw"], "does not take the student-flops"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    assert main(["study", "--quick", "--out", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def quick_study(out, *flags) -> dict:
    """Runs a --quick study with two jobs side by side; returns its study.json."""
    assert main(["study", "--quick", *flags, "--jobs", "2", "--out", str(out)]) == 0
    return json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_quick_classification_study_scores_arms_by_auc_loss(tmp_path):
    out = tmp_path / "classify"
    state = quick_study(out, "--task", "classify", "--seeds", "1", "--arms", "student-adamw,ta-adamw,matta-adamw")
    assert state["metric"] == "auc_loss" and state["settings"]["task"] == "classify"
    text = (out / "RESULTS.md").read_text()
    assert "metric: auc_loss" in text and "Student AucLoss" in text
    matta_run = out / state["runs"]["matta-adamw"]["0"]
    config = json.loads((matta_run / "config.json").read_text())
    assert config["task"] == "classify" and config["baseline"] is False  # the study's Student-alone arm is the baseline
    rows = json.loads((matta_run / "results.json").read_text())["models"]
    assert {r["spec"] for r in rows} >= {"student", "ta"} and all(0 < r["auc_loss"] < 1 for r in rows)


def test_arm_lists():
    assert [a.name for a in parse_arms("core", None)] == [
        "student-adamw", "student-shampoo", "ta-adamw", "ta-shampoo", "matta-adamw", "matta-shampoo"]
    names = [a.name for a in parse_arms("all", "/teacher")]
    assert "student-flops-adamw" in names and "teacher-matta-adamw" in names and len(names) == len(set(names))
    assert [a.name for a in parse_arms("matta-wd0-shampoo,core", None)][0] == "matta-wd0-shampoo"
    assert parse_lrs("adamw=1e-3, shampoo=2e-3") == {"adamw": 1e-3, "shampoo": 2e-3}
    with pytest.raises(StudyError):
        parse_lrs("adamw=-1")


# ----------------------------------------------------------------------------------------
# The report on runs with known numbers


FAMILY = [("student", 100, "Student"), ("wide_narrow_wide:0", 150, "wide-narrow-wide k=0"),
          ("wide_narrow_wide:2", 180, "wide-narrow-wide k=2"), ("ta", 200, "TA")]


def fake_run(out, arm: str, seed: int, lr: float, specs: dict):
    """A finished run directory whose models hold specs[spec][seed]; returns it."""
    run = run_dir_of(out, arm, seed, lr)
    run.mkdir(parents=True)
    rows = [{"name": name, "spec": spec, "params": params, "val_loss": specs[spec][seed]}
            for spec, params, name in FAMILY if spec in specs]
    write_json(run / "results.json", {"step": 10, "models": rows})
    write_json(run / "config.json", {"batch_size": 2, "block_size": 8, "grad_accum": 1})
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss_student": 7.0 + seed,
                                                   "loss_ta": 7.5 + seed}) + "\n")
    write_json(run.with_name(run.name + ".wall.json"), {"seconds": 12.0, "segments": []})
    return run


def fake_study(out, values: dict, seeds=3):
    """A study directory whose runs hold the given metrics: values[arm][spec] = per-seed list."""
    settings = StudySettings("tiny", seeds, 10, None, "builtin", "lm", False, None, {}, "cpu", 1)
    arms = [Arm(ARM_KINDS[name.rsplit("-", 1)[0]], name.rsplit("-", 1)[1]) for name in values]
    study = Study(settings, arms, out, 1, "matta study (test)", chosen_lr={"adamw": 0.003, "shampoo": 0.003},
                  sweep={"adamw": {0.003: 5.0}})
    for arm, specs in values.items():
        for seed in range(seeds):
            study.runs.setdefault(arm, {})[seed] = fake_run(out, arm, seed, 0.003, specs)
    study.save_state()
    return out


def fake_grid_study(out, values: dict, seeds: int, missing=()):
    """A --lr-sweep per-arm study: values[arm][lr][spec] = per-seed list; `missing` holds the
    (arm, lr, seed) runs left unfinished."""
    settings = StudySettings("tiny", seeds, 10, None, "builtin", "lm", False, None, {}, "cpu", 1, "per-arm")
    arms = [Arm(ARM_KINDS[name.rsplit("-", 1)[0]], name.rsplit("-", 1)[1]) for name in values]
    study = Study(settings, arms, out, 1, "matta study (test)")
    for arm, rates in values.items():
        for lr, specs in rates.items():
            for seed in range(seeds):
                if (arm, lr, seed) in missing:
                    study.grid.setdefault(arm, {}).setdefault(lr, {})[seed] = run_dir_of(out, arm, seed, lr)
                else:
                    study.grid.setdefault(arm, {}).setdefault(lr, {})[seed] = fake_run(out, arm, seed, lr, specs)
    study._choose_per_arm()
    return study


def test_report_readings_on_known_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_flops_per_token_by_mode", lambda data: {"student": 10.0, "ta": 20.0, "matta": 30.0})
    base = [5.0, 5.1, 5.2]
    values = {
        "student-adamw": {"student": base, "ta": [9, 9, 9]},
        # Shampoo alone: differences 0, +0.05, -0.1: the interval includes 0.
        "student-shampoo": {"student": [5.0, 5.15, 5.1]},
        # MatTA: 0.1 better on every seed (a zero-width interval below 0).
        "matta-adamw": {"student": [4.9, 5.0, 5.1], "wide_narrow_wide:0": [4.8, 4.9, 5.0],
                        "wide_narrow_wide:2": [4.7, 4.8, 4.9], "ta": [4.6, 4.7, 4.8]},
        # Worse than the baseline on every seed, by 0.2, 0.3, 0.25: the opposite is significant.
        "matta-shampoo": {"student": [5.2, 5.4, 5.45], "ta": [5.0, 5.0, 5.0]},
        "ta-adamw": {"student": [5.3, 5.4, 5.5], "wide_narrow_wide:0": [5.0, 5.1, 5.2],
                     "wide_narrow_wide:2": [4.75, 4.8, 4.95], "ta": [4.5, 4.6, 4.7]},
    }
    path = write_report(fake_study(tmp_path / "s", values))
    text = path.read_text()
    readings = {c: v for c, _, _, v in report.claims(load_study(tmp_path / "s"))}
    assert readings["Shampoo improves the Student trained alone"] == "not supported at this budget (the interval includes 0)"
    assert readings["the MatTA Student (adamw) beats the Student trained alone with AdamW"] == "held"
    assert readings["the MatTA Student (shampoo) beats the Student trained alone with AdamW"].endswith(
        "the opposite direction is significant")
    # interaction per seed: (5.2-5.0-4.9+5.0, 5.4-5.15-5.0+5.1, 5.45-5.1-5.1+5.2) = (0.3, 0.35, 0.45) > 0
    inter = [c for c in readings if c.startswith("MatTA and Shampoo combine")]
    assert readings[inter[0]].endswith("the opposite direction is significant")
    assert readings["the MatTA Mix'n'Match family (adamw) improves with every step up in size"] == "held"
    assert readings["every member of the MatTA family (adamw) beats the Student trained alone (student-adamw)"] == "held"
    # The TA slices: MatTA 4.6.. vs alone 4.5..: the TA member is worse, so not every member beats.
    assert readings["slices of the MatTA TA beat the same slices of the TA trained alone (adamw)"] == (
        "not supported at this budget")
    assert "the criterion margin > 2 x spread is met" in text  # 5.1 - 4.6 = 0.5 > 2 * 0.1
    assert "differs across arms by at most 0.00e+00" in text
    assert "| MatTA (AdamW) | 5.0000 ± 0.1000 | 148.41 | -0.1000 [-0.1000, -0.1000] | -1.96% |" in text
    assert "| 10 | 160 | 4.8k | 12 |" in text  # steps, tokens (10 x 2 x 8), FLOPs (30 x 160), wall
    assert (tmp_path / "s" / "study.png").stat().st_size > 10_000


def test_a_single_seed_claims_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_flops_per_token_by_mode", lambda data: {})
    fake_study(tmp_path / "s", {"student-adamw": {"student": [5.0]}, "matta-adamw": {"student": [4.0], "ta": [3.9]}}, seeds=1)
    readings = [v for *_, v in report.claims(load_study(tmp_path / "s"))]
    assert readings and all(v.startswith("not supported") for v in readings)
    assert verdict(mean_interval([-1.0, -1.1])) == "held"
    assert verdict(mean_interval([1.0, 1.1])).endswith("the opposite direction is significant")


# The question in numbers: at 3e-3 the Student alone has two bad seeds of five (1 and 4)
# and MatTA none; at 1e-3 the Student alone is steady and better on average.
STEADY_AT_1E3 = {
    "student-adamw": {0.001: {"student": [4.70, 4.71, 4.69, 4.72, 4.70]},
                      0.003: {"student": [4.60, 5.10, 4.62, 4.61, 5.00]},
                      0.01: {"student": [5.30, 5.40, 5.35, 5.33, 5.38]}},
    "matta-adamw": {0.001: {"student": [4.75, 4.76, 4.74, 4.77, 4.75], "ta": [4.7, 4.7, 4.7, 4.7, 4.7]},
                    0.003: {"student": [4.65, 4.66, 4.64, 4.66, 4.65], "ta": [4.6, 4.6, 4.6, 4.6, 4.6]},
                    0.01: {"student": [5.20, 5.25, 5.22, 5.21, 5.23], "ta": [5.1, 5.1, 5.1, 5.1, 5.1]}},
}


def test_per_arm_sweep_chooses_each_arms_rate_and_reads_stability_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_flops_per_token_by_mode", lambda data: {"student": 10.0, "ta": 20.0, "matta": 30.0})
    study = fake_grid_study(tmp_path / "s", STEADY_AT_1E3, seeds=5)
    # The Student alone: 1e-3 by its mean over seeds, though seed 0 alone prefers 3e-3 (the shared rate).
    assert study.arm_lr == {"student-adamw": 0.001, "matta-adamw": 0.003}
    assert study.chosen_lr == {"adamw": 0.003} and study.sweep["adamw"][0.003] == 4.60
    data = load_study(tmp_path / "s")
    assert report.arm_rates(data) == study.arm_lr
    assert report.shared_rates(data) == {"student-adamw": 0.003, "matta-adamw": 0.003}
    assert data.values("student-adamw", "student") == dict(enumerate(STEADY_AT_1E3["student-adamw"][0.001]["student"]))

    def stability(d):
        return next(r for r in report.claims(d) if r[0].startswith("MatTA stabilises training"))

    shared = data.picked(lambda arm, seed: report.shared_rates(data)[arm])
    # At the shared rate: std 0.0084 against 0.2437, F(4, 4): the ratio's interval lies below 1.
    _, _, measured, reading = stability(shared)
    assert reading == "held" and "runs far from the median: 0 vs 2 of 5" in measured
    # Each arm at its own rate: 0.0114 against 0.0084: the claim is refused.
    assert stability(data)[3] == "not supported at this budget (the interval includes 1)"
    assert report.far_runs(shared, "student-adamw", "student", report.far_threshold(shared)) == [1, 4]
    assert report.far_runs(data, "student-adamw", "student", report.far_threshold(data)) == []

    text = write_report(tmp_path / "s").read_text()
    assert "| Student alone (AdamW) | **4.7040 ± 0.0114 (5)** | 4.7860 ± 0.2437 (5) * | 5.3520 ± 0.0396 (5) | 0.001 | 0.003 |" in text
    assert "| MatTA (AdamW) | 4.7540 ± 0.0114 (5) | **4.6520 ± 0.0084 (5)** * |" in text
    assert "## Every arm at its own best rate" in text and "## Every arm at the shared rate" in text
    assert "## Each seed at the rate chosen on the other seeds" in text and "## Unfinished runs" not in text
    # Without seed 4, the Student alone's choice stays 1e-3 (4.705 against 4.7325): no seed switches.
    assert "- Student alone (AdamW): +0.0000 over 5 seeds (0 seed(s) would have had another rate)" in text
    assert "| student-adamw | 4 | 0.01 | 10 | 12 | runs/student-adamw/seed4-lr0.01 |" in text


def test_held_out_rate_removes_the_choice_from_its_own_seed(tmp_path):
    # One lucky seed decides the mean: 3e-3 wins over all seeds only through seed 2.
    values = {"student-adamw": {0.001: {"student": [4.70, 4.70, 4.70]}, 0.003: {"student": [4.72, 4.72, 4.50]}}}
    fake_grid_study(tmp_path / "s", values, seeds=3)
    data = load_study(tmp_path / "s")
    assert report.arm_rates(data) == {"student-adamw": 0.003}
    assert [report.held_out_rate(data, "student-adamw", s) for s in range(3)] == [0.003, 0.003, 0.001]
    held_out = data.picked(lambda arm, seed: report.held_out_rate(data, arm, seed))
    assert held_out.values("student-adamw", "student") == {0: 4.72, 1: 4.72, 2: 4.70}


def test_per_arm_choice_uses_only_seeds_finished_at_every_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_flops_per_token_by_mode", lambda data: {})
    values = {"student-adamw": {0.001: {"student": [4.9, 4.0, 4.0]}, 0.003: {"student": [4.8, 4.9, 4.9]}}}
    study = fake_grid_study(tmp_path / "s", values, seeds=3, missing={("student-adamw", 0.003, 1),
                                                                       ("student-adamw", 0.003, 2)})
    assert study.arm_lr == {"student-adamw": 0.003}  # seed 0 alone: 4.8 < 4.9
    data = load_study(tmp_path / "s")
    assert report.arm_rates(data) == {"student-adamw": 0.003}
    # A rate with no finished run leaves the arm without a choice, in the study and in its report.
    fake_grid_study(tmp_path / "t", values, seeds=1, missing={("student-adamw", 0.003, 0)})
    assert report.arm_rates(load_study(tmp_path / "t")) == {}
    assert sorted(data.missing) == [("student-adamw lr 0.003", 1), ("student-adamw lr 0.003", 2)]
    assert "## Unfinished runs" in write_report(tmp_path / "s").read_text()


def test_default_sweep_settings_resume_studies_made_before_per_arm():
    settings = StudySettings("tiny", 3, 10, None, "builtin", "lm", False, None, {}, "cpu", 1)
    assert "lr_sweep" not in settings.invariant()
    assert StudySettings("tiny", 3, 10, None, "builtin", "lm", False, None, {}, "cpu", 1, "per-arm").invariant()[
        "lr_sweep"] == "per-arm"


@pytest.mark.slow
def test_quick_per_arm_study(tmp_path):
    out = tmp_path / "per_arm"
    state = quick_study(out, "--lr-sweep", "per-arm", "--seeds", "2", "--arms", "student-adamw,matta-adamw")
    assert set(state["grid"]["matta-adamw"]) == {"0.003", "0.01"} and set(state["arm_lr"]) == {"student-adamw", "matta-adamw"}
    data = load_study(out)
    assert not data.missing and {len(r) for rates in data.grid.values() for r in rates.values()} == {2}
    arm = "student-adamw"
    assert state["runs"][arm]["1"] == f"runs/{arm}/seed1-lr{state['arm_lr'][arm]:g}"
    assert "## Each seed at the rate chosen on the other seeds" in (out / "RESULTS.md").read_text()


def test_far_threshold_pools_the_arms_robust_spread(tmp_path):
    # Deviations from the medians: Student alone 0, 1, 1; TA alone 0, 0.5, 0.5. Each odd sample's
    # own median is left out, so the pooled median deviation is 0.75 (not 0.5).
    fake_study(tmp_path / "s", {"student-adamw": {"student": [1.0, 2.0, 3.0]}, "ta-adamw": {"ta": [10.0, 10.5, 11.0]}})
    data = load_study(tmp_path / "s")
    assert report.far_threshold(data) == pytest.approx(report.FAR_SIGMAS * 1.4826 * 0.75)
    assert report.far_runs(data, "student-adamw", "student", 0.9) == [0, 2]
    assert report.far_runs(data, "student-adamw", "student", None) == []
