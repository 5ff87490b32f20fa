"""Fault tests: what happens when things go wrong must be safe and said clearly.

Elsewhere: a SIGKILLed training run resumes from its last complete checkpoint (test_bc_diffusion), a killed
collection continues from its .partial (test_collect), a dead env worker raises a named error without orphans
(test_libero_env), a NaN reward skips the update and names the tensor (test_ppo_diffusion), a checkpoint of another
architecture is refused with the differing fields (test_bc_diffusion), a truncated HDF5 gives a named error
(test_demo_hdf5), pre-emption on SLURM checkpoints and requeues (test_slurm).
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, run_script, script_env, write_tiny_demo_file

import run_utils

TINY = ("--obs-mode state --feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16 "
        "--batch-size 8 --eval-episodes 0 --log-every 10").split()  # fmt: skip


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path):
    demo = write_tiny_demo_file(str(tmp_path / "d_demo.hdf5"), num_demos=2, T=12, state_dim=6)
    cli = ["bc_diffusion.py", *TINY, "--demo-paths", demo, "--run-root", str(tmp_path), "--save-every", "10"]
    run_script([*cli, "--total-steps", "30"], cwd=ROOT)
    ckpts = tmp_path / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints"
    assert torch.load(ckpts / "previous.pt", weights_only=True)["step"] == 30
    size = (ckpts / "latest.pt").stat().st_size
    with open(ckpts / "latest.pt", "r+b") as f:  # a half-written file, as after a crash during the write
        f.truncate(size // 3)
    proc = run_script([*cli, "--total-steps", "40"], cwd=ROOT)
    assert (
        "latest.pt is unreadable" in proc.stderr and "falling back to" in proc.stderr and "previous.pt" in proc.stderr
    )
    assert "at step 30" in proc.stdout
    assert torch.load(ckpts / "final.pt", weights_only=True)["step"] == 40


def test_a_checkpoint_without_fallback_is_one_clear_error(tmp_path):
    path = tmp_path / "final.pt"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(run_utils.CheckpointError, match=r"is unreadable \(UnpicklingError\); delete it\.$"):
        run_utils.load_checkpoint(str(path), ("bc_diffusion/v1",))
    torch.save({"format": "ppo_gaussian/v1"}, path)
    with pytest.raises(run_utils.CheckpointError, match="has format 'ppo_gaussian/v1', expected one of"):
        run_utils.load_checkpoint(str(path), ("bc_diffusion/v1",))


@pytest.mark.parametrize(
    "script", ["bc_diffusion.py", "ppo_diffusion.py", "ppo_gaussian.py", "collect.py", "evaluate.py"]
)
@pytest.mark.parametrize("cli, message", [
    (["--suite", "all", "--task-id", "130"], "Task id 130 is out of range for suite 'all' (valid: 0-129)"),
    (["--suite", "libero_100", "--task-id", "0"], "Unknown suite 'libero_100'"),
])  # fmt: skip
def test_bad_task_selection_fails_before_any_work_in_every_phase(tmp_path, script, cli, message):
    start = time.monotonic()
    proc = run_script([script, *cli, "--run-root", str(tmp_path)], cwd=ROOT, check=False)  # fmt: skip
    assert proc.returncode != 0 and message in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 30 and not os.listdir(tmp_path)


USER_GL = """
import os, libero_env as le
env = le.make_env(le.resolve_task("libero_object", 0), obs_mode="rgb", image_size=32)
image = env.reset(0, seed=0)["agentview_rgb"]
context = type(env.env.sim._render_context_offscreen.gl_ctx).__name__
print("MUJOCO_GL", os.environ["MUJOCO_GL"], os.environ.get("PYOPENGL_PLATFORM"), context, image.shape, image.std() > 0)
"""


@pytest.mark.sim
def test_a_user_set_mujoco_gl_is_respected():
    out = subprocess.run([sys.executable, "-c", USER_GL], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=script_env({"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MUJOCO_GL osmesa osmesa OSMesaGLContext (32, 32, 3) True" in out.stdout


@pytest.mark.sim
def test_libero_imports_and_builds_an_env_with_stdin_closed():
    """LIBERO's upstream package asks for a dataset path on stdin at first import; ours must never block."""
    code = (
        "import libero_env as le; e = le.make_env(le.resolve_task('libero_goal', 3), obs_mode='state'); "
        "print(e.reset(1, 1)['ee_pos'].shape)"
    )
    env = script_env()
    env.pop("LIBERO_CONFIG_PATH", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300, env={**env, "HOME": "/nonexistent-home"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(3,)" in out.stdout


def test_a_process_told_not_to_requeue_does_not_requeue_its_array_element():
    """finetune_vla.py: under torchrun only rank 0 requeues; the other ranks of an array element just leave."""
    code = "import run_utils; p = run_utils.Preemption(); p.signal_name = 'SIGUSR1'; p.exit(requeue=False)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=script_env({"SLURM_JOB_ID": "424242", "SLURM_ARRAY_JOB_ID": "424240",
                                         "SLURM_ARRAY_TASK_ID": "2"}))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "requeued" not in out.stdout
    assert "pre-empted (SIGUSR1): checkpoint written; rerun with --resume auto" in out.stdout


def test_envs_that_cannot_fit_in_memory_are_refused_in_one_sentence_before_any_work(tmp_path, monkeypatch):
    """``--num-envs 50`` (ppo_diffusion.py's default) at ~0.8 GB per env does not fit 12 GB: every phase that builds
    envs stops before any worker starts, naming the largest count that fits and the CPU recipe."""
    import vector_env as ve

    demo = write_tiny_demo_file(str(tmp_path / "d_demo.hdf5"), num_demos=2, T=12, state_dim=6)
    run_script(["bc_diffusion.py", *TINY, "--demo-paths", demo, "--run-root", str(tmp_path / "bc"),
                "--total-steps", "2"], cwd=ROOT)  # fmt: skip
    bc = str(tmp_path / "bc" / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints" / "final.pt")
    task = ["--suite", "libero_object", "--task-id", "0", "--num-envs", "50"]
    commands = {
        "ppo_diffusion.py": ["--bc-ckpt", bc, "--run-root", str(tmp_path / "runs")],
        "ppo_gaussian.py": ["--demo-paths", demo, "--obs-mode", "state", "--run-root", str(tmp_path / "runs")],
        "collect.py": ["--policy", "scripted", "--data-root", str(tmp_path / "runs")],
        "evaluate.py": ["--policy", "scripted", "--results-root", str(tmp_path / "runs")],
    }
    workers = ve.default_num_workers(50)
    fits = max(n for n in range(1, 50) if n * ve.ENV_MEMORY_GB + min(workers, n) * ve.WORKER_MEMORY_GB <= 12)
    for script, extra in commands.items():
        start = time.monotonic()
        proc = run_script([script, *task, *extra], cwd=ROOT, check=False, env={"LIBERO_MEMORY_GB": "12"})
        err = proc.stderr.strip()
        assert proc.returncode != 0 and err.startswith("error: 50 environments need ~") and len(err.splitlines()) == 1
        assert "but 12 GB are available" in err and f"use --num-envs {fits} or fewer" in err, err
        assert "--num-envs 16 --num-steps 140 --minibatch-size 2800" in err
        assert time.monotonic() - start < 60 and not (tmp_path / "runs").exists()
    monkeypatch.setenv("LIBERO_MEMORY_GB", "12")  # restored after the test (a caller's own setting included)
    ve.check_memory(fits)  # the count the sentence names does fit
    monkeypatch.setenv("LIBERO_MEMORY_GB", "1")
    with pytest.raises(ve.ResourceError, match="not even one env fits"):
        ve.check_memory(2)
