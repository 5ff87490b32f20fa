"""The coverage study's scripts without the simulator: the committed draw is the draw script's, and the report on
synthetic artefacts (a finished task below the gate with its failures, a finished one above it, one running; the
first recipe's runs and a recipe change beside them) gives the rows, per-suite means, goal count, failure reasons and
comparisons those numbers imply."""

import json
import os
import shutil

import pytest
from helpers import ROOT, run_script


def test_the_committed_draw_is_the_draw_scripts_and_excludes_the_tasks_run_before():
    out = run_script(["scripts/coverage_draw.py", "--check"], cwd=ROOT).stdout
    assert "the committed draw is this script's" in out
    draw = json.load(open(os.path.join(ROOT, "docs", "coverage", "draw.json")))
    suites = [spec.split(":")[0] for spec in draw["order"]]
    assert len(draw["order"]) == 10 and all(suites.count(s) == 2 for s in set(suites)) and len(set(suites)) == 5
    assert not set(draw["order"]) & set(draw["excluded"]) and "libero_goal:1" in draw["excluded"]


def write(path, name, obj):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "w") as f:
        if name.endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f)


def run_files(path, final_rates, curve, iterations=83, wall=3600):
    """A PPO run's exported artefacts: in-run evaluations (env steps, mean rate) and a final evaluation."""
    args = {"eval_mode": "mean", "num_envs": 16, "num_steps": 140, "actor_lr": 1e-4, "minibatch_size": 2800,
            "train_layouts": "sampled", "num_iterations": iterations}  # fmt: skip
    rows = [{"step": i, "env_steps": 17920 * i, "time": 1.8e9 + 60 * i, "eval/success_rate": p,
             "eval_eta0/success_rate": p / 2} for i, p in curve]  # fmt: skip
    write(path, "args.json", args)
    write(path, "metrics.jsonl", rows)
    if final_rates is not None:
        final = {"eval_mode": "mean", "episodes": 200, "env_steps": 17920 * iterations, "iteration": iterations}
        for mode, p in final_rates.items():
            final[mode] = {"success_rate": p, "successes": [1] * round(200 * p) + [0] * (200 - round(200 * p))}
        write(path, "final_eval.json", final)
    with open(os.path.join(path, "wall_s.txt"), "w") as f:
        f.write(f"{wall}\n")


def test_the_report_on_synthetic_artefacts(tmp_path):
    docs = tmp_path / "docs"
    root = docs / "coverage"
    os.makedirs(root)
    shutil.copy(os.path.join(ROOT, "docs", "coverage", "draw.json"), root / "draw.json")
    order = json.load(open(root / "draw.json"))["order"]
    name = lambda spec: f"{spec.split(':')[0]}_task{int(spec.split(':')[1]):02d}"  # noqa: E731
    below, above, running = order[0], order[5], order[1]  # two of the first suite, one of the second
    assert below.split(":")[0] == above.split(":")[0]
    run_files(str(root / "tasks" / name(below)), {"mean": 0.9, "sample": 0.7, "eta0": 0.4},
              [(0, 0.3), (10, 0.82), (20, 0.88), (83, 0.9)])  # fmt: skip
    write(str(root / "tasks" / name(below)), "sampled_eval.json", {"success_rate": 0.95, "num_episodes": 200})
    fails = [{"episode": e, "init_state": e % 50, "length": 220, "gripper_closes": c, "max_lift_m": lift,
              "final_lift_m": end, "final_target_xy_m": xy, "final_above_target_m": above}
             for e, (c, lift, end, xy, above) in enumerate(
                 [(0, 0, 0, 0.2, 0.0)] * 2 + [(1, 0.01, 0, 0.12, 0.0)] * 3 + [(4, 0.1, 0.0, 0.05, 0.01)] * 10
                 + [(1, 0.12, 0.1, 0.01, 0.03)] * 4 + [(1, 0.12, 0.1, 0.02, 0.05)])]  # fmt: skip
    for e, fail in enumerate(fails[-5:]):  # the five over the plate: there from step 80 + e for 140 - e steps
        fail.update(
            first_over_target_step=80 + e,
            steps_over_target=140 - e,
            z_cmd_over_target_mean=-0.01 * (e + 1),
            z_cmd_over_target_down=0.5 + 0.01 * e,
            open_cmds_over_target=e,
        )
    write(str(root / "tasks" / name(below)), "failures.json", {"object": "bowl", "target": "plate", "episodes": fails})
    demos_of_below = {"scripted_placement": "release", "scripted_noise": 0.3, "num_demos": 50, "num_attempts": 54,
                      "success_rate": 0.94, "mean_length": 128.0}  # fmt: skip
    write(str(root / "tasks" / name(below)), "demos.json", demos_of_below)
    run_files(str(root / "tasks" / name(above)), {"mean": 0.985, "sample": 0.8, "eta0": 0.5},
              [(0, 0.5), (10, 0.96), (83, 1.0)], wall=7200)  # fmt: skip
    run_files(str(root / "tasks" / name(running)), None, [(0, 0.2), (10, 0.5)])
    drawer = order[2]  # a goal on a fixture's joint: three failures short of the threshold
    run_files(str(root / "tasks" / name(drawer)), {"mean": 0.8, "sample": 0.5, "eta0": 0.1}, [(0, 0.0), (83, 0.8)])
    joint = [{"episode": e, "init_state": e, "length": 300, "gripper_closes": 2, "max_lift_m": 0.0,
              "final_lift_m": 0.0, "joint_predicate": "open", "joint_max_progress": b, "joint_final_progress": f,
              "joint_first_moved_step": m}
             for e, (b, f, m) in enumerate([(0.02, 0.0, None), (0.3, 0.2, 120), (0.7, 0.6, 95)])]  # fmt: skip
    for e, (held, success) in enumerate([([False, True], False), ([False, False], False), ([False, True], True)]):
        joint[e].update(final_goal_atoms=held, success=success)  # the third succeeded when replayed
    atoms = ["Open drawer_1", "In bowl_1 drawer_1"]
    write(str(root / "tasks" / name(drawer)), "failures.json",
          {"object": "drawer", "target": None, "goal_atoms": atoms, "episodes": joint})  # fmt: skip
    # the first recipe's runs (recipe-v1/): the same artefacts, but the task below the gate finished lower there
    shutil.copytree(root / "tasks", root / "recipe-v1" / "tasks")
    run_files(str(root / "recipe-v1" / "tasks" / name(below)), {"mean": 0.85, "sample": 0.6, "eta0": 0.3},
              [(0, 0.3), (83, 0.85)])  # fmt: skip
    bc_final = [{"episode": e, "success": e >= 10} for e in range(200)]  # the BC start: 190 of 200, the final 180
    write(str(root / "tasks" / name(below)), "bc_start_final.json", {"success_rate": 0.95, "episodes": bc_final})
    bc_only = order[3]  # the recipe's BC start measured alone (coverage.sh BC_ONLY=1), no PPO run yet
    write(str(root / "tasks" / name(bc_only)), "demos.json", {**demos_of_below, "num_attempts": 67, "mean_length": 298})
    for mode, p in (("mean", 0.0), ("eta0", 0.04)):
        write(str(root / "tasks" / name(bc_only)), f"bc_start_{mode}.json", {"success_rate": p, "num_episodes": 50})
    # a recipe change: the missed task run again with it; the other task it ran stopped at the BC start
    lifted = root / "lift" / "set-down" / "tasks"
    run_files(str(lifted / name(below)), {"mean": 0.97, "sample": 0.9, "eta0": 0.6}, [(0, 0.96), (83, 0.98)])
    demos = {"scripted_placement": "set-down", "scripted_noise": 0.1, "num_demos": 50, "num_attempts": 56,
             "success_rate": 0.89, "mean_length": 118.8}  # fmt: skip
    write(str(lifted / name(below)), "demos.json", demos)
    for mode, p in (("mean", 0.98), ("eta0", 0.4)):
        write(str(lifted / name(above)), f"bc_start_{mode}.json", {"success_rate": p, "num_episodes": 50})
    run_script(["scripts/coverage_report.py", "--docs", str(docs)], cwd=ROOT)
    page = (docs / "coverage.md").read_text()
    per_task = page[page.index("## Per task") : page.index("## Per suite")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in per_task.splitlines() if line.startswith("| libero")}  # fmt: skip
    row = rows[below]
    # columns: instruction, demos, BC start, to 80 / 90 / 95 %, final mean, sample, eta0, sampled, steps, wall, status
    assert row[1] == "50 of 54 (94 %), 128 steps" and row[2] == "30 / 15"
    assert row[3] == "179k, 0.2 h" and row[4] == "1487k, 1.4 h" and row[5] == "not reached"  # 90 % at the end
    assert row[6] == "90.0 ± 2.1" and row[7] == "70.0 ± 3.2" and row[9] == "95.0 ± 1.5" and row[12] == "**< 95 %**"
    assert row[10] == "1487k" and row[11] == "1.0 h"
    assert rows[above][12] == "**≥ 95 %**" and rows[above][3] == "179k, 0.2 h"
    assert rows[running][12] == "not finished (iteration 10 of 83)"
    assert rows[bc_only][1:3] == ["50 of 67 (94 %), 298 steps", "0 / 4"] and rows[bc_only][12] == "BC start only"
    assert rows[order[4]][1:3] == ["–", "–"] and rows[order[4]][12] == "not started"
    suite = [line for line in page.splitlines() if line.startswith(f"| {below.split(':')[0]} |")][0]
    assert "| 2 of 2 | 94.2 % | 1 |" in suite  # (90.0 + 98.5) / 2
    assert "1 of 3 finished tasks (10 drawn) at ≥ 95 %" in page and "1 reached 95 %" in page
    reason = [line for line in page.splitlines() if line.startswith(f"- **{drawer}**")][0]
    head = "fixture `drawer`: 0 never closed the gripper; 0 closed it 3 or more times (re-grasp loops; median 2"
    assert head in reason
    assert "lifted" not in reason  # a fixture is not lifted: no lift counts for it
    assert (
        "Its joint, toward LIBERO's `open` threshold (fraction of the way from where it started): 1 never moved it "
        "10 % of the way, 1 got 10-50 %, 1 half way or further (at most 0.70); at the end 0.20 of the way (median); "
        "those that moved it first did at env step 95-120." in reason
    )
    below_reason = [line for line in page.splitlines() if line.startswith(f"- **{below}**")][0]
    assert below_reason.endswith(  # final: episodes 0-179 succeed; BC start: 10-199
        "The BC start on the same 200 episodes (`mean`): 95.0 % (190 of 200); PPO's final policy fails 20 it "
        "succeeded in and succeeds in 10 it failed."
    )
    assert reason.endswith(
        "At the last step, of the goal's 2 atoms: 2 held `In bowl_1 drawer_1` only; 1 held none. Replayed, 1 of the "
        "3 succeeded (the replay is not bit-exact with the final run)."
    )
    reason = [line for line in page.splitlines() if line.startswith(f"- **{below}**")][0]
    assert "20 failed episodes on 20 of 50 init states" in reason and "2 never closed the gripper" in reason
    assert "3 closed it but never lifted" in reason
    assert "10 lifted it and ended less than 2 cm above its start" in reason
    assert "5 2 cm or more above it" in reason and "10 closed the gripper 3 or more times" in reason
    assert "Against the target `plate`: 5 ended with the object's centre within 3 cm (xy) of the target's" in reason
    assert "3.0-5.0 cm above it (median 3.0)" in reason and "; 5 ended 10 cm or more from it." in reason
    assert (
        "they got there at env step 80-84 and stayed over it 136-140 steps, commanding z -0.05 to -0.01 on "
        "average there (down in 50-54 % of its steps), and commanding the gripper open there in 0-4 of those "
        "steps" in reason
    )
    assert (root / f"{name(below)}.png").exists() and (root / f"{name(running)}.png").exists()
    assert (root / "recipe-v1" / f"{name(below)}.png").exists()
    first = page[page.index("## The first recipe") : page.index("## The layout split")]
    assert "(`docs/coverage/recipe-v1/`; demonstrations: placement release, DART noise 0.3)" in first
    v1 = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in first.splitlines() if line.startswith("| libero")}  # fmt: skip
    assert v1[below][6] == "85.0 ± 2.5" and v1[above][6] == "98.5 ± 0.9" and v1[below][12] == "**< 95 %**"
    assert len(v1) == 4  # the tasks the first recipe ran (demos or a run), not the untouched six
    assert sum(line.startswith(f"- **{below}** (85.0 %") for line in first.splitlines()) == 1
    assert "(placement release, DART noise 0.3), reached the gate on 1 of the 3 tasks it finished" in page
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in first.splitlines() if line.startswith("| set-down")}  # fmt: skip
    # columns: demos, BC start, the first recipe's BC start, final, the first recipe's final, status
    assert rows[below] == ["set-down, 0.1, 50 of 56, 119 steps", "96 / 48", "30 / 15", "97.0 ± 1.2", "85.0 ± 2.5",
                           "**≥ 95 %**"]  # fmt: skip
    assert rows[above] == ["–", "98 / 40", "50 / 25", "–", "98.5 ± 0.9", "BC start only"]


@pytest.mark.sim
def test_the_layout_spread_of_a_task(tmp_path):
    """scripts/layout_spread.py on LIBERO-Object 5 with 4 sampled layouts: every sampled layout lies at least
    MIN_PROTOCOL_DISTANCE from the nearest protocol state, objects' ranges are centimetres, a rerun skips the task."""
    import libero_env as le

    cmd = ["scripts/layout_spread.py", "--tasks", "libero_object:5", "--num-layouts", "4", "--out", str(tmp_path)]
    out = run_script(cmd, cwd=ROOT).stdout
    assert "libero_object:5: sampled -> nearest protocol state" in out
    result = json.loads((tmp_path / "libero_object_task05.json").read_text())
    assert result["num_sampled"] == 4 and sum(result["draws"]) == 4
    assert result["sampled_to_nearest_protocol_cm"]["min"] >= 100 * le.MIN_PROTOCOL_DISTANCE
    for obj in result["objects"].values():
        assert all(0 <= r < 20 for r in obj["protocol_xy_range_cm"] + obj["sampled_xy_range_cm"])
    assert run_script(cmd, cwd=ROOT).stdout.strip() == ""  # resumable: done tasks are skipped
