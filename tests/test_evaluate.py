"""evaluate.py: Table I/II summaries checked number by number, and the protocol on the real simulator."""

import csv
import json
import os

import numpy as np
import pytest
from helpers import ROOT, run_script, write_tiny_demo_file

import evaluate
import libero_env as le
import run_utils


def test_an_evaluation_on_sampled_layouts_gets_its_own_default_tag():
    for policy, phase, expected in (("diffusion", "ppo", "diffusion_ppo"), ("scripted", "ppo", "scripted")):
        assert evaluate.default_tag(evaluate.Args(policy=policy, ckpt_phase=phase)) == expected
        assert evaluate.default_tag(evaluate.Args(policy=policy, ckpt_phase=phase, layouts="sampled")) == (
            expected + "_sampled"
        )
    assert evaluate.default_tag(evaluate.Args(tag="mine", layouts="sampled")) == "mine"


def write_task(root, tag, suite, local_id, rate, info=None, layouts=None):
    task = le.resolve_task(suite, local_id)
    n = 50
    successes = round(rate * n)
    report = {"tag": tag, "policy": "vla", "policy_info": info or {},
              "task": {"suite": suite, "local_id": local_id, "global_id": task.global_id, "name": task.name},
              "success_rate": successes / n, "num_episodes": n}  # fmt: skip
    if layouts is not None:
        report["protocol"] = {"layouts": layouts}
    run_utils.write_json(evaluate.task_result_path(str(root), tag, task), report)
    return successes / n


def test_summarize_builds_table_one_and_two_and_flags_missing_tasks(tmp_path):
    rng = np.random.default_rng(0)
    complete = {}
    for suite, _ in evaluate.SUITE_COLUMNS:
        rates = [write_task(tmp_path, "diffusion_rl", suite, i, rng.random()) for i in range(le.SUITE_SIZES[suite])]
        complete[suite] = 100 * np.mean(rates)
    partial = [write_task(tmp_path, "human", "libero_object", i, 0.5 + 0.05 * i) for i in range(3)]
    write_task(tmp_path, "human", "libero_spatial", 0, 1.0)
    # evaluations on sampled layouts (the training distribution) never enter the protocol's tables
    write_task(tmp_path, "human_sampled", "libero_spatial", 1, 0.3, layouts="sampled")
    write_task(tmp_path, "human", "libero_spatial", 1, 0.1, layouts="sampled")  # even under the same tag
    ood = {s: [write_task(tmp_path, "rl_ood", s, i, 0.02 * (i % 3), {"suites": ["libero_90"]})
               for i in range(10)] for s in ("libero_10", "libero_goal", "libero_object")}  # fmt: skip
    md = evaluate.summarize(str(tmp_path))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| policy")}  # fmt: skip
    # Table I: a complete row has every suite mean and their average
    full = rows["diffusion_rl"]
    for (suite, _), cell in zip(evaluate.SUITE_COLUMNS, full):
        assert cell == f"{complete[suite]:.2f}"
    assert full[-1] == f"{np.mean(list(complete.values())):.2f}"
    # missing tasks are flagged, never averaged over
    human = rows["human"]
    assert human[1] == f"{100 * np.mean(partial):.2f}* (3/10 tasks)" and human[0] == "100.00* (1/10 tasks)"
    assert human[2] == "—" and human[-1] == "n/a (incomplete)"
    assert "human_sampled" not in rows
    # Table II: the policy trained on LIBERO-90 only, on Long / Goal / Object
    table2 = md[md.index("## Table II") :]
    line = next(line for line in table2.splitlines() if line.startswith("| rl_ood"))
    cells = [c.strip() for c in line.split("|")[2:-1]]
    means = [100 * np.mean(ood[s]) for s in ("libero_10", "libero_goal", "libero_object")]
    assert cells == [f"{m:.2f}" for m in means] + [f"{np.mean(means):.2f}"]
    with open(tmp_path / "eval" / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    obj = next(r for r in csv_rows if r["policy"] == "human" and r["suite"] == "libero_object")
    assert obj["tasks"] == "3" and obj["complete"] == "False"
    assert float(obj["success_rate"]) == pytest.approx(100 * np.mean(partial), abs=0.01)


def test_bad_selection_fails_before_any_environment(tmp_path):
    proc = run_script(["evaluate.py", "--policy", "scripted", "--suite", "libero_goal", "--task-id", "9",
                       "--results-root", str(tmp_path)], cwd=ROOT, check=False)  # fmt: skip
    assert proc.returncode != 0 and "The scripted expert cannot do task" in proc.stderr
    proc = run_script(["evaluate.py", "--suite", "all", "--task-id", "130"], cwd=ROOT, check=False)
    assert "Task id 130 is out of range" in proc.stderr
    proc = run_script(["evaluate.py", "--policy", "diffusion", "--task-id", "0", "--run-root", str(tmp_path)], cwd=ROOT,
                      check=False)  # fmt: skip
    assert proc.returncode != 0 and "error: No checkpoint at" in proc.stderr


def read_report(root, tag, suite, local_id):
    with open(evaluate.task_result_path(str(root), tag, le.resolve_task(suite, local_id))) as f:
        return json.load(f)


@pytest.mark.sim
def test_protocol_assignment_is_independent_of_workers_and_matches_collect(tmp_path):
    reports = []
    for num_envs in (1, 2):
        root = tmp_path / f"envs{num_envs}"
        cli = "evaluate.py --policy scripted --suite libero_spatial --task-id 4 --num-episodes 4 --num-envs".split()
        run_script([*cli, str(num_envs), "--results-root", str(root)], cwd=ROOT)
        reports.append(read_report(root, "scripted", "libero_spatial", 4))
    for report in reports:
        assert [e["init_state"] for e in report["episodes"]] == [0, 1, 2, 3]
        assert [e["seed"] for e in report["episodes"]] == [0, 1, 2, 3]
    assert reports[0]["episodes"] == reports[1]["episodes"]  # same successes and lengths, episode by episode
    out = run_script("collect.py --policy scripted --suite libero_spatial --task-id 4 --num-success 4 --max-episodes 4"
                     " --obs-mode state --no-save --num-envs 2 --layouts protocol".split(),
                     cwd=ROOT).stdout  # fmt: skip
    successes = sum(e["success"] for e in reports[0]["episodes"])
    assert f"success rate {successes / 4:.3f} ({successes}/4 episodes, {successes} kept)" in out
    # the training distribution beside it: sampled layouts, under their own tag, the split recorded
    run_script([*cli, "2", "--results-root", str(tmp_path), "--layouts", "sampled"], cwd=ROOT)
    report = read_report(tmp_path, "scripted_sampled", "libero_spatial", 4)
    assert report["protocol"]["layouts"] == "sampled" and report["num_episodes"] == 4
    assert [e["init_state"] for e in report["episodes"]] == [le.SAMPLED] * 4


@pytest.mark.sim
def test_failing_episodes_run_exactly_the_step_limit_and_simultaneous_ends_all_count(tmp_path):
    """An untrained policy never succeeds: every episode runs exactly 280 steps after the 10 wait steps, and the
    episodes that end on the same step (all of them) are all recorded."""
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    runs = str(tmp_path / "runs")
    tiny = "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16"
    run_script(["bc_diffusion.py", *tiny.split(), "--obs-mode", "state", "--demo-paths", demo, "--run-root", runs,
                "--total-steps", "2", "--batch-size", "4", "--eval-episodes", "0"], cwd=ROOT)  # fmt: skip
    run_script(["evaluate.py", "--policy", "diffusion", "--ckpt-phase", "bc", "--task-id", "0", "--num-episodes", "3",
                "--num-envs", "3", "--run-root", runs, "--results-root", str(tmp_path)], cwd=ROOT)  # fmt: skip
    report = read_report(tmp_path, "diffusion_bc", "libero_object", 0)
    assert report["num_episodes"] == 3 and report["success_rate"] == 0.0
    assert [e["length"] for e in report["episodes"]] == [280, 280, 280]
    assert report["protocol"] == {
        "max_steps": 280,
        "num_wait_steps": 10,
        "replan_steps": 8,
        "seed": 0,
        "layouts": "protocol",
    }  # the held-out split, recorded
    assert os.path.exists(tmp_path / "eval" / "summary.md")
