"""scripts/reproduction_report.py on a synthetic study tree: two tasks, evaluation JSONs, data-quality metrics, budgets
and PPO wall times written here, with numbers chosen so that every table cell and every claim verdict is known. The
two tasks use both layouts the report reads: one analyze.py report per source and the teacher's metrics exported by
convergence.sh (task 0), one report over all sources and the teacher's run directory (task 1)."""

import json
import os

from helpers import ROOT, run_script

TASKS = ("libero_object_task00", "libero_object_task01")
STUDY = ["--tasks", "libero_object:0", "libero_object:1"]  # the study's tasks: the two above
TEACHER = {"libero_object_task00": 95, "libero_object_task01": 80}  # diffusion PPO successes of 100; task01 < 90 %
STUDENTS = {"diffusion_rl": 90, "gaussian_rl": 50, "scripted_dart": 88, "scripted": 70}  # per task, of 100
QUALITY = {  # per source, the same on both tasks: (length mean, std), (jerk mean, std), (consistency, its SE)
    "diffusion_rl": ((100, 10), (500, 100), (0.25, 0.01)),
    "gaussian_rl": ((120, 10), (900, 100), (0.30, 0.01)),
    "scripted_dart": ((160, 20), (520, 100), (0.20, 0.01)),
    "scripted": ((115, 1), (170, 10), (0.02, 0.001)),
}


def write_eval(results, tag, key, successes, n=100, length=100):
    suite, nn = key.rsplit("_task", 1)
    path = os.path.join(results, "eval", f"{tag}_seed0", suite, f"task{nn}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    episodes = [{"episode": e, "success": e < successes, "length": length} for e in range(n)]
    with open(path, "w") as f:
        json.dump({"tag": tag, "episodes": episodes, "success_rate": successes / n}, f)


SMOOTH = {"boundary": 0.02, "within": 0.004, "ratio": 5.0, "largest_at_boundary": 30, "trajectories": 50}


def report(study, out, *extra):
    """Run the report on a study tree made by make_study (its two tasks are the study's unless extra names others)."""
    tasks = [] if "--tasks" in extra else STUDY
    results = os.path.join(study, "results")
    return run_script(["scripts/reproduction_report.py", "--results", results, "--study-root", study,
                       "--convergence-root", os.path.join(study, "convergence_export"), "--out", out, *tasks, *extra],
                      cwd=ROOT)  # fmt: skip


def make_study(root):
    results = os.path.join(root, "results")
    for key in TASKS:
        suite, nn = key.rsplit("_task", 1)
        os.makedirs(os.path.join(results, "budget"), exist_ok=True)
        with open(os.path.join(results, "budget", f"{key}.env"), "w") as f:
            f.write('DEMOS=50\nBC_STEPS=8000\nPPO_ITERS=83\nEVAL_SEEDS="0"\nEVAL_EPISODES=100\nMAX_EPISODES=400\n'
                    "STUDENT_DEMOS=50\n")  # fmt: skip
        policies = {"diffusion_bc": 30, "diffusion_ppo": TEACHER[key], "gaussian_bc": 40, "gaussian_ppo": 60}
        for tag, k in policies.items():
            write_eval(results, tag, key, k)
        for src, k in STUDENTS.items():
            write_eval(results, f"student_{src}", key, k)
        metrics = {
            src: {"successful": 50, "trajectories": 50, "noop_steps": 0, "length_mean": ln[0], "length_std": ln[1],
                  "msj_mean": j[0], "msj_std": j[1], "consistency_mean_std_all": c[0], "consistency_se_all": c[1],
                  "chunk_smoothness": SMOOTH}
            for src, (ln, j, c) in QUALITY.items()
        }  # fmt: skip
        metrics["gaussian_rl"]["repeated"] = 3 if key == TASKS[0] else 0  # the noise-free policy replayed 3 on task 0
        per_source = key == TASKS[0]
        for src in QUALITY if per_source else [""]:  # analysis/<task>/<source>/ or analysis/<task>/
            os.makedirs(os.path.join(results, "analysis", key, src))
            with open(os.path.join(results, "analysis", key, src, "metrics.json"), "w") as f:
                json.dump({"per_task": {"some_task": {src: metrics[src]} if src else metrics}}, f)
        run = os.path.join(root, "ppo", "recipe", "ppo_diffusion", suite, f"task{nn}__seed0")
        if per_source:  # convergence.sh's export of the teacher
            run = os.path.join(root, "convergence_export", "tasks", key)
        os.makedirs(run)
        with open(os.path.join(run, "args.json"), "w") as f:
            json.dump({"num_envs": 16, "num_steps": 140}, f)  # the batch the teacher ran with
        with open(os.path.join(run, "wall_s.txt"), "w") as f:
            f.write("3600\n1800\n")  # two invocations of a resumed run
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            for i, s in enumerate((0.3, 0.6, 0.9)):
                f.write(json.dumps({"step": 10 * i, "env_steps": 179200 * i, "eval/success_rate": s}) + "\n")


def test_tables_marks_and_claims_of_a_synthetic_two_task_study(tmp_path):
    study, out = str(tmp_path / "study"), str(tmp_path / "docs")
    make_study(study)
    report(study, out)
    text = open(os.path.join(out, "reproduction.md")).read()
    assert "**Status: 2 of 2 tasks complete**" in text
    # each task's budget, wall time and command; the curves were drawn from the recipe layout's metrics
    assert "PPO 83 iterations x 16 envs x 140 chunks x 8 actions = 1,487,360 env steps per policy class" in text
    assert "Wall time: diffusion PPO 1.5 h." in text and "bash scripts/reproduce_cpu.sh libero_object:1`" in text
    for key in TASKS:  # both teachers' curves found (export and run directory) and every source's quality drawn
        for png in ("learning_curve.png", "quality.png"):
            assert os.path.getsize(os.path.join(out, "reproduction", key, png)) > 10_000
        assert f"| {key} | diffusion RL | 0.0200 | 0.0040 | 5.0 | 30/50 |" in text  # within vs across chunks
    assert "| DART demos (human stand-in) | 50 | 0 | 160.0 | 520.0 | 0.2000 |" in text
    task0, task1 = text.split("## libero_object 1")[0], text.split("## libero_object 1")[1].split("## Students")[0]
    assert "| Gaussian RL | 50 (3 repeated) | 0 | 120.0 | 900.0 | 0.3000 |" in task0
    assert "repeated: trajectories identical, action for action" in task0
    assert "| Gaussian RL | 50 | 0 |" in task1 and "repeated" not in task1
    # the teacher below 90 % is reported and its task's student column marked, the other not
    assert "**Teacher below 90 %**: diffusion PPO 80.0 ± 4.0 (80/100)" in text
    assert text.count("**Teacher below 90 %**") == 1
    table = text.split("## Students")[1].split("## Claims")[0].strip().splitlines()
    assert table[2] == "| training data | libero_object_task00 | libero_object_task01 ‡ | average |"
    assert all(line.startswith("|") for line in table[2:8]) and table[-1].startswith("‡: the task's diffusion teacher")
    # students pooled over both tasks
    assert "| diffusion RL | 90.0 ± 3.0 (90/100) | 90.0 ± 3.0 (90/100) | 90.0 ± 2.1 (180/200) |" in text
    claims = text.split("## Claims")[1].split("## Why")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in claims.splitlines() if line.startswith("| ")}

    def row(prefix):
        return next(v for k, v in rows.items() if k.startswith(prefix))

    # 0.90 vs 0.50 over 200 episodes each: se = sqrt(.9 * .1 / 200 + .5 * .5 / 200) = 4.1 points
    assert "holds (beyond noise) | 90.0 % vs 50.0 %, difference +40.0 ± 4.1 points" in row(
        "diffusion-RL data trains a better student than Gaussian"
    )
    assert "holds (within noise: < 2 standard errors) | 90.0 % vs 88.0 %, difference +2.0 ± 3.1 points" in row(
        "diffusion-RL data trains a better student than human"
    )
    # lengths: per task se 10/sqrt(50) and 20/sqrt(50); over two tasks /sqrt(2): 1.0 and 2.0 -> 2.2
    assert "holds (beyond noise) | 100 steps vs 160 steps, difference -60 ± 2.2 |" in row("RL trajectories are shorter")
    assert "holds (within noise: < 2 standard errors) | 500 vs 520, difference -20 ± 14 |" in row(
        "RL trajectories are smoother"
    )
    assert "holds (beyond noise) | 500 vs 900, difference -400 ± 14 |" in row("diffusion RL is smoother")
    # consistency: 0.25 vs 0.20 with se 0.01 / sqrt(2) each -> 0.01; the claim does not hold, beyond noise
    consistency = row("RL actions are more consistent")
    assert "does not hold (beyond noise) | 0.25 vs 0.2, difference +0.05 ± 0.01 |" in consistency
    # where a claim does not hold, the measurement that bears on it; where it holds, nothing
    assert consistency.endswith(
        "| action std across trajectories: the clean expert's (noise-free, so the spread of the init states alone) "
        "0.020, the DART demos' 0.200, diffusion RL's 0.250 |"
    )
    assert row("diffusion RL is smoother").endswith("|  |")


def test_a_student_claim_that_does_not_hold_names_teachers_and_transfer(tmp_path):
    study, out = str(tmp_path / "study"), str(tmp_path / "docs")
    make_study(study)
    for key in TASKS:  # the Gaussian-RL students now beat the diffusion-RL ones on both tasks
        write_eval(os.path.join(study, "results"), "student_gaussian_rl", key, 95)
    report(study, out)
    claims = open(os.path.join(out, "reproduction.md")).read().split("## Claims")[1].split("## Why")[0]
    row = next(line for line in claims.splitlines() if "better student than Gaussian" in line)
    # teachers pooled over both tasks: diffusion (95 + 80) / 200, Gaussian 60 / 100 twice; students 90 % and 95 %:
    # se = sqrt(.9 * .1 / 200 + .95 * .05 / 200) = 2.6 points, a difference of 5.0 within two of them
    assert "| does not hold (within noise: < 2 standard errors) | 90.0 % vs 95.0 %, difference -5.0 ± 2.6 points" in row
    assert row.endswith(
        "| teachers (final policies) 87.5 % diffusion vs 60.0 % Gaussian; their students keep 103 % and 158 % of "
        "that success (table 1 below) |"
    )


def test_a_task_beyond_the_study_is_reported_marked_and_not_pooled_and_a_study_task_without_results_shows(tmp_path):
    study, out = str(tmp_path / "study"), str(tmp_path / "docs")
    make_study(study)
    results = os.path.join(study, "results")
    for tag, k in {"diffusion_bc": 30, "diffusion_ppo": 60, "gaussian_bc": 40, "gaussian_ppo": 60}.items():
        write_eval(results, tag, "libero_goal_task01", k)  # a task tried beside the study's: every policy, no students
    write_eval(results, "student_diffusion_rl", "libero_goal_task01", 10)
    with open(os.path.join(results, "budget", "libero_goal_task06.env"), "w") as f:  # started, no teacher run yet
        f.write('DEMOS=50\nBC_STEPS=8000\nPPO_ITERS=83\nEVAL_SEEDS="0"\nEVAL_EPISODES=100\nSTUDENT_DEMOS=50\n')
    report(study, out, "--tasks", "libero_object:0", "libero_object:1", "libero_goal:6")
    text = open(os.path.join(out, "reproduction.md")).read()
    # two of the three study tasks are complete; the third has a section of dashes; the task beyond them is named
    assert "**Status: 2 of 3 tasks complete** (libero_object_task00, libero_object_task01)" in text
    assert "Also reported, not pooled (not one of the study's tasks §): libero_goal_task01." in text
    goal6 = text.split("## libero_goal 6")[1].split("## libero_object 0")[0]
    assert "| Diffusion, PPO | – |" in goal6 and "Learning curves: none yet" in goal6
    assert "PPO 83 iterations (the batch is read from the teacher's run once it has started) per policy class" in goal6
    goal1 = text.split("## libero_goal 1")[1].split("## libero_goal 6")[0]
    assert "Not one of the study's tasks (`--tasks`): § its results are reported here" in goal1
    assert "| Diffusion, PPO | 60.0 ± 4.9 (60/100) |" in goal1 and "**Teacher below 90 %**" in goal1
    table = text.split("## Students")[1].split("## Claims")[0]
    header = "| training data | libero_goal_task01 ‡ § | libero_goal_task06 | libero_object_task00 |"
    assert header + " libero_object_task01 ‡ | average |" in table
    assert "§: not one of the study's tasks; not in the average." in table
    # its student (10 %) is shown but the average is the two study tasks' alone, as are the claims
    students = "| 10.0 ± 3.0 (10/100) | – | 90.0 ± 3.0 (90/100) | 90.0 ± 3.0 (90/100) | 90.0 ± 2.1 (180/200) |"
    assert f"| diffusion RL {students}" in table
    assert "90.0 % vs 50.0 %, difference +40.0 ± 4.1 points" in text.split("## Claims")[1]


def test_no_results_is_a_one_sentence_error_that_keeps_the_page(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "reproduction.md").write_text("the earlier study")
    result = run_script(["scripts/reproduction_report.py", "--results", str(tmp_path / "none"), "--out", str(out)],
                        cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 1
    assert f"error: no study results under {tmp_path / 'none'}; run scripts/reproduce_cpu.sh first" in result.stderr
    assert (out / "reproduction.md").read_text() == "the earlier study"
    result = run_script(["scripts/reproduction_report.py", "--out", str(out), "--tasks", "libero_goal"], cwd=ROOT,
                        check=False)  # fmt: skip
    assert result.returncode == 1
    assert "error: --tasks takes suite:id pairs (e.g. libero_goal:6), not 'libero_goal'." in result.stderr


def test_a_noise_free_policys_repeated_episodes_count_once_in_its_standard_error(tmp_path):
    study, out = str(tmp_path / "study"), str(tmp_path / "docs")
    make_study(study)
    results = os.path.join(study, "results")
    for tag in ("gaussian_ppo", "diffusion_ppo"):  # task 0, two evaluation seeds x 50 init states, 90 of 100 succeed
        for seed in (0, 100):
            path = os.path.join(results, "eval", f"{tag}_seed{seed}", "libero_object", "task00.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            jitter = seed // 100 if tag == "diffusion_ppo" else 0  # the sampled chain's episodes differ per seed
            episodes = [{"episode": i, "init_state": i, "seed": seed + i, "success": i < 45, "length": 100 + i + jitter}
                        for i in range(50)]  # fmt: skip
            with open(path, "w") as f:
                json.dump({"tag": tag, "episodes": episodes, "success_rate": 0.9}, f)
    report(study, out)
    text = open(os.path.join(out, "reproduction.md")).read()
    task0 = text.split("## libero_object 0")[1].split("## libero_object 1")[0]
    # identical repeats: the error over the 50 init states, sqrt(.9 * .1 / 50) = 4.2 points, and the note
    assert "| Gaussian, PPO | 90.0 ± 4.2 † (90/100) |" in task0
    assert "†: each init state's episodes are identical across the evaluation seeds" in task0
    # episodes that differ between seeds are independent samples: sqrt(.9 * .1 / 100) = 3.0 points
    assert "| Diffusion, PPO | 90.0 ± 3.0 (90/100) |" in task0
    # task 1's evaluations carry no init states: every episode counts, no mark
    assert "†" not in text.split("## libero_object 1")[1].split("## Students")[0]
    teachers = text.split("**1. Teachers and their students.**")[1].split("**2. Length.**")[0]
    assert "| libero_object_task00 | 90.0 ± 3.0 (90/100) | 90.0 ± 3.0 (90/100) | 90.0 ± 4.2 † (90/100) |" in teachers
    assert teachers.count("†: each init state's episodes") == 1


def test_a_class_not_yet_evaluated_by_the_study_shows_no_wall_time_from_an_earlier_run(tmp_path):
    study, out = str(tmp_path / "study"), str(tmp_path / "docs")
    make_study(study)
    earlier = os.path.join(study, "convergence_export", "gaussian", "libero_object_task00")  # found for task 0
    os.makedirs(earlier)
    with open(os.path.join(earlier, "wall_s.txt"), "w") as f:
        f.write("7200\n")
    with open(os.path.join(earlier, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "env_steps": 0, "eval/success_rate": 0.3}) + "\n")
    report(study, out)
    task0 = open(os.path.join(out, "reproduction.md")).read().split("## libero_object 1")[0]
    assert "Wall time: diffusion PPO 1.5 h, gaussian PPO 2.0 h." in task0  # the study evaluated its final policy
    for seed_dir in os.listdir(os.path.join(study, "results", "eval")):  # not yet: the run found is not the study's
        if seed_dir.startswith("gaussian_ppo"):
            os.remove(os.path.join(study, "results", "eval", seed_dir, "libero_object", "task00.json"))
    report(study, out)
    task0 = open(os.path.join(out, "reproduction.md")).read().split("## libero_object 1")[0]
    assert "Wall time: diffusion PPO 1.5 h." in task0 and "| Gaussian, PPO | – |" in task0
