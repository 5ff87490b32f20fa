"""scripts/convergence.sh end to end on the real simulator at a tiny budget: DART demos, the weak BC start, one PPO
iteration under another seed (reported as the ablation "seed1", beside the recipe's run, not over it), the
export of its small artefacts, a rerun that finds every output and skips the work (and keeps another run's export
found at its place as a replicate), and the BC start's evaluation alone (BC_ONLY)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, script_env

TINY = dict(ITERS="1", EVAL_EVERY="1", EVAL_EPISODES="2", FINAL_EPISODES="2", BC_STEPS="20", GAUSSIAN="",
            RECIPE="--num-envs 2 --num-steps 4 --minibatch-size 10 --critic-warmup-iters 0")  # fmt: skip


def run_study(root, export, **env):
    out = subprocess.run(
        ["bash", "scripts/convergence.sh", "libero_object:0"], cwd=ROOT, capture_output=True, text=True,
        timeout=1200, env=script_env({**TINY, "CONV_ROOT": str(root), "EXPORT": str(export), "PY": sys.executable,
                                      "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), **env}),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.sim
def test_a_second_seed_runs_beside_the_recipe_exports_and_resumes_as_a_no_op(tmp_path):
    root, export = tmp_path / "conv", tmp_path / "export"
    out = run_study(root, export, SEED="1")
    assert "iteration 1: train success" in out
    run = root / "ppo" / "seed1" / "ppo_diffusion" / "libero_object" / "task00__seed1"
    assert (run / "checkpoints" / "final.pt").is_file()
    assert (root / "runs" / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints" / "final.pt").is_file()
    dest = export / "ablations" / "seed1__libero_object_task00"
    args = json.loads((dest / "args.json").read_text())
    assert args["seed"] == 1 and args["num_iterations"] == 1 and args["num_envs"] == 2
    final = json.loads((dest / "final_eval.json").read_text())
    assert final["episodes"] == 2 and {"sample", "mean", "eta0"} <= set(final)
    assert len((dest / "wall_s.txt").read_text().split()) == 1 and (dest / "metrics.jsonl").is_file()
    assert not (export / "tasks").exists()  # the recipe's own (seed 0) run is untouched
    # a rerun finds the demos, the BC start and the final evaluation: no work, one more export
    again = run_study(root, export, SEED="1")
    assert "train success" not in again and "bc_diffusion" not in again and again.count("done") == 1
    assert sorted(p.name for p in (export / "ablations").iterdir()) == ["seed1__libero_object_task00"]  # same run
    # an export of another run there (a rerun of the recipe on a new machine replaces it) is kept as a replicate
    # under its start date, and a branch that named it follows it
    earlier = '{"step": 0, "time": 1796000000.0, "env_steps": 0}\n'
    (dest / "metrics.jsonl").write_text(earlier)
    (dest / "final_eval.json").write_text('{"earlier": true}')
    branch = export / "ablations" / "X_from1__libero_object_task00"
    branch.mkdir()
    (branch / "branch.json").write_text('{"from": "ablations/seed1__libero_object_task00", "iteration": 1}')
    out = run_study(root, export, SEED="1")
    kept = export / "ablations" / "seed1_run20261130-0053__libero_object_task00"
    assert f"the earlier run exported at {dest} moved to {kept}" in out
    assert (kept / "metrics.jsonl").read_text() == earlier and json.loads((kept / "final_eval.json").read_text())
    assert (dest / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()  # this run's, in its place
    assert json.loads((dest / "final_eval.json").read_text())["episodes"] == 2
    assert json.loads((branch / "branch.json").read_text())["from"] == f"ablations/{kept.name}"
    # BC_ONLY: the BC start (found) evaluated in mean and eta0 on the in-run episodes, exported for the report
    starts = run_study(root, export, BC_ONLY="1")
    assert "BC start done" in starts and "train success" not in starts
    for mode in ("mean", "eta0"):
        result = json.loads((export / "bc_starts" / f"libero_object_task00_{mode}.json").read_text())
        assert len(result["episodes"]) == 2
