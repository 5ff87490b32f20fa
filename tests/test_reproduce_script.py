"""scripts/reproduce_cpu.sh end to end on the real simulator at a tiny budget: a demonstration source (demos, its
data quality, its BC student and the student's evaluation) and an RL source (the Gaussian teacher through
convergence.sh, its BC start and final policy evaluated, its collection attempted), the small results written to
RESULTS, and a rerun on a "new machine" (checkpoints and HDF5 gone, RESULTS kept) that finds a finished source
there and does no work for it; and, without the simulator, the default command against the committed results (every
study task continued at the budget its results record)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, script_env

TINY = dict(DEMOS="3", BC_STEPS="20", PPO_ITERS="1", EVAL_SEEDS="0", EVAL_EPISODES="2", MAX_EPISODES="2",
            STUDENT_DEMOS="2", FINAL_EPISODES="2", EVAL_EVERY="1", GAUSSIAN_MINIBATCH="4", EXPORT="",
            RECIPE="--num-envs 2 --num-steps 4 --minibatch-size 10 --critic-warmup-iters 0")  # fmt: skip


def run_study(tmp_path, sources, expect_rc=0, **budget):
    env = {**TINY, **budget, "STUDY_ROOT": str(tmp_path / "study"), "TEACHERS": str(tmp_path / "teachers"),
           "RESULTS": str(tmp_path / "results"), "SOURCES": sources, "PY": sys.executable,
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}  # fmt: skip
    out = subprocess.run(["bash", "scripts/reproduce_cpu.sh", "libero_object:0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=1500, env=script_env(env))  # fmt: skip
    assert out.returncode == expect_rc, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.sim
def test_sources_write_their_results_and_a_new_machine_skips_what_is_done(tmp_path):
    results = tmp_path / "results"
    out = run_study(tmp_path, "scripted_dart gaussian_rl")
    # the demonstration source: its analysis (one source, no figures) and its student, evaluated
    analysis = results / "analysis" / "libero_object_task00" / "scripted_dart"
    assert sorted(os.listdir(analysis)) == ["metrics.json", "report.md"]
    metrics = next(iter(json.loads((analysis / "metrics.json").read_text())["per_task"].values()))["scripted_dart"]
    assert metrics["trajectories"] == 3 and metrics["chunk_smoothness"]["trajectories"] == 3
    student = results / "eval" / "student_scripted_dart_seed0" / "libero_object" / "task00.json"
    student = json.loads(student.read_text())
    assert len(student["episodes"]) == 2
    # the RL source: the Gaussian teacher at the study's budget, its BC start and final policy evaluated alike
    args = json.loads((tmp_path / "teachers" / "ppo" / "recipe" / "ppo_gaussian" / "libero_object" / "task00__seed0" /
                       "args.json").read_text())  # fmt: skip
    assert args["num_iterations"] == 1 and args["actor_lr"] == pytest.approx(1e-4) and args["minibatch_size"] == 4
    assert "iteration 1: train success" in out
    for tag in ("gaussian_bc", "gaussian_ppo"):
        assert (results / "eval" / f"{tag}_seed0" / "libero_object" / "task00.json").is_file()
    assert not (tmp_path / "teachers" / "ppo" / "recipe" / "ppo_diffusion").exists()  # only the sources asked for
    assert "DEMOS=3" in (results / "budget" / "libero_object_task00.env").read_text()
    # a new machine: only RESULTS survives; the finished demonstration source is not redone
    shutil.rmtree(tmp_path / "study")
    shutil.rmtree(tmp_path / "teachers")
    again = run_study(tmp_path, "scripted_dart")
    assert "scripted_dart already done" in again
    assert "collect" not in again and "bc:" not in again and not (tmp_path / "study" / "data").exists()
    # bad input stops before any work
    bad = run_study(tmp_path, "scripted_dart human", expect_rc=2)
    assert "error: unknown source 'human' in SOURCES" in bad
    # a task is not continued at another budget than the one it started with (its sources would not compare)
    other = run_study(tmp_path, "scripted_dart gaussian_rl", expect_rc=2, PPO_ITERS="2")
    assert "error: libero_object:0's study started with another budget" in other and "PPO_ITERS=1 " in other
    assert "===" not in other and "PPO_ITERS=1\n" in (results / "budget" / "libero_object_task00.env").read_text()


def test_the_default_command_continues_every_committed_task_at_its_recorded_budget(tmp_path):
    """The committed results/budget/ files are what the default command runs with (83 PPO iterations, 120 on
    LIBERO-Spatial 0): with no budget variable set, every study task is continued (its finished source is skipped)
    rather than refused, and overriding a task's recorded budget is refused before any work."""
    budgets = ("DEMOS", "BC_STEPS", "PPO_ITERS", "EVAL_SEEDS", "EVAL_EPISODES", "MAX_EPISODES", "STUDENT_DEMOS",
               "GAUSSIAN_LR", "EVAL_MODE")  # fmt: skip
    env = {k: v for k, v in script_env().items() if k not in budgets}
    env.update(SOURCES="scripted_dart", STUDY_ROOT=str(tmp_path / "study"), TEACHERS=str(tmp_path / "teachers"),
               PY=sys.executable)  # fmt: skip
    out = subprocess.run(["bash", "scripts/reproduce_cpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for task in ("libero_object 0", "libero_object 1", "libero_spatial 0", "libero_goal 7"):
        assert f"{task}: scripted_dart already done" in out.stdout
    assert not (tmp_path / "study").exists() and not (tmp_path / "teachers").exists()  # no work done
    with open(os.path.join(ROOT, "docs", "reproduction", "results", "budget", "libero_spatial_task00.env")) as f:
        assert "PPO_ITERS=120\n" in f.read()
    env["PPO_ITERS"] = "83"
    out = subprocess.run(["bash", "scripts/reproduce_cpu.sh", "libero_spatial:0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 2 and "error: libero_spatial:0's study started with another budget" in out.stderr
    assert "===" not in out.stdout
