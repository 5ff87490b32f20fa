"""Helpers shared by the tests (imported as `from helpers import ...`)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env(extra=None):
    """Environment for scripts started by tests: unbuffered, and one intra-op thread (tiny models run several
    times faster that way on two cores, and leave the other core to environment workers)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra or {}))


def run_script(args, cwd, timeout=900, env=None, check=True):
    """Run a repo script through its real CLI (python <script> ...) and return the CompletedProcess."""
    full_env = script_env(env)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def write_tiny_demo_file(
    path,
    layout="ours",
    num_demos=3,
    T=12,
    image_size=16,
    state_dim=6,
    seed=0,
    instruction="pick up the tiny thing and place it in the basket",
    source="scripted",
):
    """A small trajectory file in our layout (pre-action observations) or LIBERO's original (post-action).

    Actions follow a smooth per-demo curve so that models have something learnable.
    """
    import json

    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        problem = {"language_instruction": instruction, "problem_name": "libero_floor_manipulation"}
        data.attrs["problem_info"] = json.dumps(problem)
        data.attrs["env_args"] = json.dumps({"type": 1})
        data.attrs["bddl_file_name"] = "tiny.bddl"
        if layout == "ours":
            data.attrs["obs_alignment"] = "pre_action"
            data.attrs["source"] = source
            data.attrs["image_size"] = image_size
        for i in range(num_demos):
            t = np.arange(T)[:, None]
            actions = np.concatenate([0.5 * np.sin(t / 3 + i + np.arange(6)), np.where(t < T // 2, -1.0, 1.0)], 1)
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=actions)
            g.create_dataset("states", data=rng.normal(size=(T, 10)))
            g.create_dataset("robot_states", data=rng.normal(size=(T, 9)))
            rewards = np.zeros(T, np.uint8)
            rewards[-1] = 1
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=rewards)
            pos = np.cumsum(0.01 * actions[:, :3], 0)
            g.create_dataset("obs/ee_pos", data=pos)
            g.create_dataset("obs/ee_ori", data=np.tile([np.pi, 0, 0], (T, 1)) + 0.01 * rng.normal(size=(T, 3)))
            g.create_dataset("obs/ee_states", data=np.concatenate([pos, np.tile([np.pi, 0, 0], (T, 1))], 1))
            g.create_dataset("obs/gripper_states", data=np.tile([0.04, -0.04], (T, 1)))
            g.create_dataset("obs/joint_states", data=rng.normal(size=(T, 7)))
            for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                g.create_dataset(
                    f"obs/{cam}", data=rng.integers(0, 255, (T, image_size, image_size, 3), dtype=np.uint8)
                )
            if layout == "ours":
                g.create_dataset("obs/object_state", data=np.tile(np.eye(state_dim)[i % state_dim], (T, 1)))
                g.attrs["init_state_index"] = i
            g.attrs["num_samples"] = T
        data.attrs["total"] = num_demos * T
        data.attrs["num_demos"] = num_demos
    return path
