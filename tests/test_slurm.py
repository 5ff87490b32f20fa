"""SLURM scale-out on a real single-node cluster (tests/slurm_cluster.sh): array jobs and pre-emption + requeue."""

import os
import shutil
import subprocess
import time

import pytest
import torch
from helpers import ROOT, run_script, script_env, write_tiny_demo_file

import libero_env as le

pytestmark = pytest.mark.slurm

TINY = ("--obs-mode state --feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16 "
        "--batch-size 8 --eval-episodes 0 --log-every 50").split()  # fmt: skip
SMALL_NODE = ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=00:20:00"]  # the templates ask for GPU nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd runs jobs as their user); CI runs as root")
    directory = tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "tests", "slurm_cluster.sh")
    subprocess.run(["bash", script, "start", str(directory)], check=True, timeout=300)
    env = script_env(
        {"SLURM_CONF": str(directory / "slurm.conf"), "PYTHON": os.path.join(ROOT, ".venv", "bin", "python")}
    )
    if not os.path.exists(env["PYTHON"]):
        env["PYTHON"] = shutil.which("python3")
    yield env
    subprocess.run(["bash", script, "stop", str(directory)], check=True, timeout=120)


def demos(root, local_ids):
    for i in local_ids:
        task = le.resolve_task("libero_object", i)
        write_tiny_demo_file(str(root / "data" / "scripted" / "libero_object" / f"{task.name}_demo.hdf5"),
                             num_demos=3, T=20, state_dim=98, seed=i)  # fmt: skip


def sbatch(env, args):
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_array_job_runs_one_task_per_element(cluster, tmp_path):
    demos(tmp_path, [0, 1])
    runs = tmp_path / "runs"
    args = [*SMALL_NODE, "--array=10-11", f"--output={tmp_path}/log_%A_%a.txt", "--wait", "slurm/bc_diffusion.sbatch",
            "--data-root", str(tmp_path / "data"), "--run-root", str(runs), "--total-steps", "5", *TINY]  # fmt: skip
    sbatch(cluster, args)
    for local_id in (0, 1):
        ckpt = runs / "bc_diffusion" / "libero_object" / f"task{local_id:02d}__seed0" / "checkpoints" / "final.pt"
        state = torch.load(ckpt, weights_only=True)
        assert state["step"] == 5 and state["task"]["local_id"] == local_id
    logs = sorted(p.read_text() for p in tmp_path.glob("log_*.txt"))
    assert len(logs) == 2 and all("done: 5 steps" in log for log in logs)


def test_preemption_signal_checkpoints_requeues_and_resumes_to_the_same_result(cluster, tmp_path):
    demos(tmp_path, [0])
    steps = ["--total-steps", "600", "--save-every", "20"]
    reference = tmp_path / "reference"
    run_script(["bc_diffusion.py", "--data-root", str(tmp_path / "data"), "--run-root", str(reference), *steps, *TINY],
               cwd=ROOT)  # fmt: skip
    runs = tmp_path / "runs"
    ckpts = runs / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints"
    job = sbatch(cluster, [*SMALL_NODE, "--array=10", f"--output={tmp_path}/log.txt", "slurm/bc_diffusion.sbatch",
                           "--data-root", str(tmp_path / "data"), "--run-root", str(runs), *steps, *TINY])  # fmt: skip
    wait_for(lambda: (ckpts / "latest.pt").exists(), 180, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_10"], env=cluster, check=True)  # SLURM's warning
    wait_for(lambda: job_state(cluster, f"{job}_10") == "COMPLETED", 600, "the requeued job to complete")
    log = (tmp_path / "log.txt").read_text()
    assert "pre-empted (SIGUSR1): checkpoint written, requeued" in log
    assert "(restart 1)" in log and "resumed from" in log and "done: 600 steps" in log
    final = torch.load(ckpts / "final.pt", weights_only=True)
    expected = torch.load(reference / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints" / "final.pt",
                          weights_only=True)  # fmt: skip
    assert final["step"] == expected["step"] == 600
    for name, tensor in expected["model"].items():  # exact: same code, batches and kernels on this one machine
        assert torch.equal(tensor, final["model"][name]), name


def test_two_process_pi0_job_is_preempted_requeued_and_resumed(cluster, tmp_path):
    """slurm/finetune_vla.sbatch with 2 torchrun processes (DDP on gloo; GPUS sets the process count): SLURM's
    warning signal reaches the workers as SIGTERM, both checkpoint at the same step, process 0 requeues the job,
    and the requeued job resumes from that step to the end."""
    root = tmp_path / "data" / "scripted" / "libero_object"
    write_tiny_demo_file(str(root / "a_demo.hdf5"), num_demos=3, T=20, image_size=32)
    runs = tmp_path / "runs"
    latest = runs / "finetune_vla" / "pi0__seed0" / "checkpoints" / "latest" / "training_state.pt"
    cli = ("--config-only tiny --image-size 32 --batch-size 4 --num-workers 0 --total-steps 600 --save-every 20 "
           "--log-every 100").split()  # fmt: skip
    env = {**cluster, "GPUS": "2"}
    job = sbatch(env, [*SMALL_NODE, "--cpus-per-task=2", f"--output={tmp_path}/log.txt", "slurm/finetune_vla.sbatch",
                       *cli, "--data", str(tmp_path / "data"), "--run-root", str(runs)])  # fmt: skip
    wait_for(latest.exists, 300, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_for(lambda: job_state(cluster, job) == "COMPLETED", 600, "the requeued job to complete")
    log = (tmp_path / "log.txt").read_text()
    assert "2 process(es)" in log and "pre-empted (SIGTERM): checkpoint written, requeued" in log
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert "(restart 1)" in log and len(resumed) == 1 and "done: 600 steps" in log
    killed_at = int(resumed[0].rsplit(" ", 1)[1])
    assert 0 < killed_at < 600
    final = torch.load(latest.parent.parent / "final" / "training_state.pt", weights_only=True)
    assert final["step"] == 600
