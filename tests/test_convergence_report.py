"""scripts/convergence_report.py on synthetic run artefacts: a task run and an ablation branched from another run's
checkpoint, with numbers chosen so that the table rows are known."""

import json
import os

from helpers import ROOT, run_script

T0 = 1.8e9  # the first metrics row's time stamp


def write_run(path, args, rows, final=None, wall=None, branch=None):
    os.makedirs(path)
    with open(os.path.join(path, "args.json"), "w") as f:
        json.dump(args, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for name, content in (("final_eval.json", final), ("branch.json", branch)):
        if content is not None:
            with open(os.path.join(path, name), "w") as f:
                json.dump(content, f)
    if wall:
        with open(os.path.join(path, "wall_s.txt"), "w") as f:
            f.write(wall)


ARGS = {"eval_mode": "mean", "num_envs": 16, "num_steps": 140, "actor_lr": 1e-4, "constant_lr": True,
        "clip_coef": 0.01, "clip_coef_base": 0.001, "constant_clip": False, "min_std": 0.1, "gamma": 0.999,
        "target_kl": 1.0, "update_epochs": 10, "minibatch_size": 2800, "ft_denoising_steps": 5}  # fmt: skip


def evaluation(step, rate, eta0, minutes):
    return {"step": step, "env_steps": 17920 * step, "time": T0 + 60 * minutes, "eval/success_rate": rate,
            "eval_eta0/success_rate": eta0}  # fmt: skip


def update(step, success, ev):
    return {"step": step, "env_steps": 17920 * step, "time": T0 + step, "train_success_rate": success,
            "explained_variance": ev}  # fmt: skip


def test_task_and_branched_ablation_rows(tmp_path):
    root = tmp_path / "convergence"
    rows = [evaluation(0, 0.14, 0.12, 0), *[update(i, 0.5, 0.4) for i in range(1, 21)], evaluation(10, 0.85, 0.3, 10),
            evaluation(20, 0.96, 0.3, 20)]  # fmt: skip
    final = {"episodes": 200, "eval_mode": "mean", "env_steps": 358400, "sample": {"success_rate": 0.5},
             "mean": {"success_rate": 0.935, "action_std": 0.175}, "eta0": {"success_rate": 0.3}}  # fmt: skip
    # 13 failures of the 200 mean-mode episodes: init state 7 in 3 of its 4 episodes (7, 57, 107), state 9 in 2
    # (9, 159), and 8 init states once each (episodes 10-17)
    final["mean"]["successes"] = [e not in {7, 57, 107, 9, 159, *range(10, 18)} for e in range(200)]
    write_run(str(root / "tasks" / "libero_object_task00"), ARGS, rows, final, wall="3600\n2520\n")
    # an ablation branched at iteration 5: its row covers only iterations 6-10 and the evaluations from 5 on
    rows = [evaluation(0, 0.36, 0.22, 0), *[update(i, 0.7, 0.2) for i in range(1, 6)], evaluation(5, 0.84, 0.48, 5),
            *[update(i, 0.8, 0.5) for i in range(6, 11)], evaluation(10, 0.9, 0.5, 10)]  # fmt: skip
    write_run(str(root / "ablations" / "G_lowstd__libero_spatial_task00"), {**ARGS, "min_std": 0.05, "gamma": 0.99,
                                                                              "noise_scale": 0.5},
              rows, branch={"from": "tasks/libero_spatial_task00", "iteration": 5})  # fmt: skip
    # a whole run whose chain's noise is halved from 0.78 of its 20 iterations on (the 17th iteration)
    write_run(str(root / "ablations" / "S_switch__libero_object_task00"),
              {**ARGS, "noise_scale_final": 0.5, "noise_scale_switch": 0.78, "num_iterations": 20,
               "reward_until_limit": True}, rows)  # fmt: skip
    # a Gaussian run: its noise-free mean repeats each init state's episode, so 200 episodes are 50 independent ones
    gfinal = {"episodes": 200, "eval_mode": "mean", "env_steps": 358400, "sample": {"success_rate": 0.95},
              "mean": {"success_rate": 0.98, "action_std": 0.138}}  # fmt: skip
    start = {"step": 0, "env_steps": 0, "time": T0, "eval/success_rate": 0.34}  # a Gaussian policy has no eta0
    grows = [start, *[update(i, 0.9, 0.6) for i in range(1, 21)]]
    write_run(str(root / "gaussian" / "libero_object_task00"), ARGS, grows, gfinal, wall="7200\n")
    # a variation of the Gaussian baseline (no denoising steps: one (chunk) pair per chunk, no min std or chain noise)
    gargs = {k: v for k, v in ARGS.items() if k not in ("ft_denoising_steps", "min_std", "clip_coef_base")}
    write_run(str(root / "ablations" / "V_glr__libero_object_task00"), {**gargs, "actor_lr": 3e-4,
                                                                        "minibatch_size": 560}, grows)  # fmt: skip
    # BC starts of candidate tasks: 3 of 50 in mean mode, 1 of 50 in eta0; a task with only its mean evaluated
    os.makedirs(root / "bc_starts")
    for name, k in (("libero_goal_task00_mean", 3), ("libero_goal_task00_eta0", 1), ("libero_goal_task04_mean", 25)):
        episodes = [{"success": e < k} for e in range(50)]
        (root / "bc_starts" / f"{name}.json").write_text(json.dumps({"episodes": episodes}))
    out = tmp_path / "convergence.md"
    run_script(["scripts/convergence_report.py", "--root", str(root), "--out", str(out)], cwd=ROOT)
    text = out.read_text()
    assert ("| libero_object_task00 | mean | 14 / 12 | 358k | 1.7 h | 179k (10 min) | 358k (20 min) | 358k (20 min) | "
            "50.0 ± 3.5 | 93.5 ± 1.7 | 30.0 ± 3.2 | 0.175 |") in text  # fmt: skip
    assert ("| G_lowstd (from iteration 5 of tasks/libero_spatial_task00) | libero_spatial_task00 | 16 x 140 | "
            "0.0001 const | 0.001 -> 0.01 | 0.05 | 0.5 | 0.99 | 1.0 | 40 (10 x 4) | 179k | 80 → 80 | 84 → 90; "
            "48 → 50 | 0.50 | – |") in text  # fmt: skip
    switch_row = "| S_switch | libero_object_task00 | 16 x 140 | 0.0001 const | 0.001 -> 0.01 | 0.1 | 1 → 0.5 from"
    assert switch_row + " iteration 17 | 0.999 (until the limit) | 1.0 |" in text
    assert ("| libero_object_task00 | mean | 34 / – | 358k | 2.0 h | not reached | not reached | not reached | "
            "95.0 ± 1.5 | 98.0 ± 2.0 † | – | 0.138 |") in text  # fmt: skip
    assert ("| V_glr | libero_object_task00 (Gaussian) | 16 x 140 | 0.0003 const | 0.01 | – | – | 0.999 | 1.0 | "
            "40 (10 x 4) | 358k | 90 → 90 | 34 | 0.60 | – |") in text  # fmt: skip
    assert "| libero_goal_task00 | 6 % (3/50) | 2 % (1/50) |\n| libero_goal_task04 | 50 % (25/50) | – |" in text
    assert "| tasks/libero_object_task00 | mean | 13 / 200 | 10 of 50 | 7 (3/4), 9 (2/4) |" in text
    assert "ablations/G_lowstd" not in text.split("Where the evaluated policy fails")[1]  # no per-episode outcomes
    for png in ("tasks/libero_object_task00", "ablations/G_lowstd__libero_spatial_task00"):
        assert os.path.getsize(root / png / "learning_curve.png") > 10_000


def load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convergence_report", os.path.join(ROOT, "scripts", "convergence_report.py")
    )
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_running_time_leaves_out_the_pause_of_a_resumed_run():
    """Time to X % counts the run's own running time: an iteration logged a day after the row before it (stopped,
    resumed in a later session) adds its env + policy + update seconds, not the pause."""
    report = load_report()
    it = {"env_s": 100.0, "policy_s": 2.0, "update_s": 8.0}
    rows = [{"time": T0}, {"time": T0 + 110, **it}, {"time": T0 + 400},  # an evaluation: 290 s, counted
            {"time": T0 + 86_400, **it}, {"time": T0 + 86_510, **it}]  # resumed a day later  # fmt: skip
    assert report.running_seconds(rows) == [0.0, 110.0, 400.0, 510.0, 620.0]


def test_a_rate_of_0_or_100_percent_gives_its_one_sided_bound_not_a_zero_error():
    """The binomial error sqrt(p (1 - p) / n) is 0 at p = 0 or 1, which would claim certainty: there the rate carries
    the exact one-sided 95 % bound (n successes of n: p >= 0.05^(1/n)); between, the error as before."""
    rate = load_report().rate
    assert rate(1.0, 50) == "100.0 (≥ 94.2 at 95 %)"  # 0.05 ** (1 / 50) = 0.9418
    assert rate(0.0, 200) == "0.0 (≤ 1.5 at 95 %)"  # 1 - 0.05 ** (1 / 200) = 0.0149
    assert rate(0.5, 200) == "50.0 ± 3.5"
    assert rate(None, 50) == "–"


def test_findings_figures_are_computed_from_the_runs_and_a_wrong_run_name_stops_the_report(tmp_path):
    """findings.md's ``{{kind group/run params}}`` become the figures of that run's committed files (the same numbers
    as its table row); a name that is no run stops the report with one sentence and writes nothing."""
    root = tmp_path / "convergence"
    rows = [evaluation(0, 0.14, 0.12, 0), *[update(i, 0.3 if i <= 10 else 0.7, 0.4 if i <= 10 else 0.6)
                                            for i in range(1, 21)],
            evaluation(10, 0.85, 0.3, 10), evaluation(20, 0.96, 0.34, 20)]  # fmt: skip
    final = {"episodes": 200, "eval_mode": "mean", "env_steps": 358400,
             "sample": {"success_rate": 0.5, "episode_length": 201.4},
             "mean": {"success_rate": 0.935, "episode_length": 155.6, "action_std": 0.175}}  # fmt: skip
    write_run(str(root / "tasks" / "libero_object_task00"), ARGS, rows, final, wall="3600\n2520\n")
    run = "tasks/libero_object_task00"
    (root / "findings.md").write_text(
        f"From {{{{start {run}}}}} / {{{{start {run} eta0}}}} % to **{{{{final {run} mean}}}} %** (`sample` "
        f"{{{{pct {run} sample}}}} %, {{{{length {run} mean}}}} against {{{{length {run} sample}}}} steps, std "
        f"{{{{std {run}}}}}); in-run {{{{curve {run}}}}} % (eta0 {{{{curve {run} eta0}}}}), 90 % at "
        f"{{{{reached {run} 0.9}}}}; rollouts {{{{rollout {run} first}}}} → {{{{rollout {run} last}}}} %, per block "
        f"{{{{blocks {run}}}}} %, EV {{{{ev {run}}}}} ({{{{ev {run} 11 20}}}} late); {{{{steps {run}}}}} env steps "
        f"in {{{{wall {run}}}}} h ({{{{minutes {run}}}}} min). At 10: {{{{curve {run} at=10}}}} %, "
        f"{{{{final {run} mean at=10}}}} %.\n"
    )
    at10 = {"episodes": 200, "eval_mode": "mean", "mean": {"success_rate": 0.8}}  # the evaluation kept at iteration 10
    (root / "tasks" / "libero_object_task00" / "final_eval_iteration10.json").write_text(json.dumps(at10))
    out = tmp_path / "convergence.md"
    run_script(["scripts/convergence_report.py", "--root", str(root), "--out", str(out)], cwd=ROOT)
    assert ("From 14 / 12 % to **93.5 ± 1.7 %** (`sample` 50.0 %, 156 against 201 steps, std 0.175); in-run "
            "14 / 85 / 96 % (eta0 12 / 30 / 34), 90 % at 358k; rollouts 30 → 70 %, per block 30 / 70 %, EV 0.50 "
            "(0.60 late); 358,400 env steps in 1.7 h (102 min). At 10: 14 / 85 %, 80.0 ± 2.8 %."
            ) in out.read_text()  # fmt: skip
    out.unlink()
    (root / "findings.md").write_text("{{final tasks/libero_object_task01 mean}}\n")
    proc = run_script(["scripts/convergence_report.py", "--root", str(root), "--out", str(out)], cwd=ROOT, check=False)
    assert proc.returncode != 0 and not out.exists()
    assert proc.stderr.strip() == ("error: findings.md names tasks/libero_object_task01, which is no run of the "
                                   "report; fix the name.")  # fmt: skip
