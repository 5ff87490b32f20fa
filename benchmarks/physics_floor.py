"""The raw physics floor on the states a policy visits, beside the fast step on the same states.

benchmarks/env_speed.py's floor (``mj_step`` alone, 25 substeps per env step) is timed at the reset state with a
fixed control: the arm in free space, nothing in the gripper. A trained policy's episodes spend much of their time
grasping and carrying, where MuJoCo has more contacts to solve. This script runs a policy's episodes in one env
(state mode, the fast step) and, before every env step, times the same 25 substeps as raw ``mj_step`` calls from
that step's exact state (``mj_getState``/``mj_setState`` with MuJoCo's whole integration state, so the episode
itself is untouched), then the fast step itself. Printed: env steps/s of both on the visited states, the floor at
the reset state as env_speed.py measures it, and the contacts per step.

    python benchmarks/physics_floor.py --suite libero_spatial --task-id 3 --ckpt runs/.../final.pt
    python benchmarks/physics_floor.py                      # no --ckpt: random actions (the untrained case)
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import mujoco
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from env_speed import mj_step_floor  # noqa: E402

import collect  # noqa: E402
import libero_env as le  # noqa: E402
import vector_env as ve  # noqa: E402


@dataclass
class Args:
    suite: str = "libero_object"
    task_id: int = 0
    ckpt: Optional[str] = None
    """a bc_diffusion / ppo_diffusion checkpoint of this task (default: uniform random actions)"""
    action_mode: str = "mean"
    episodes: int = 3
    seed: int = 3_000_000
    """env seed of the first episode (sampled layouts; the coverage study's sampled-evaluation seeds)"""


def main(args: Args) -> None:
    task = le.resolve_task(args.suite, args.task_id)
    policy = None
    if args.ckpt:
        policy = collect.load_learned_policy("diffusion", args.ckpt, task, args.action_mode, cuda=False)
    reset_floor = mj_step_floor(task)
    env = le.make_env(task, obs_mode="state", fast_step=True)
    model, data = env.env.sim.model._model, env.env.sim.data._data
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec))
    substeps = env._fast.substeps
    rng = np.random.default_rng(0)
    raw_s, fast_s, contacts, successes = [], [], [], 0
    for episode in range(args.episodes):
        obs = env.reset(le.SAMPLED, args.seed + episode, render=False)
        if policy is not None:
            policy.reset([0], [episode])
        done = False
        while not done and env.t < task.max_steps:
            chunk = policy(ve.stack_obs([obs]), [0])[0] if policy is not None else rng.uniform(-1, 1, (8, 7))
            for action in chunk:
                mujoco.mj_getState(model, data, state, spec)
                start = time.perf_counter()
                for _ in range(substeps):
                    mujoco.mj_step(model, data)
                raw_s.append(time.perf_counter() - start)
                contacts.append(data.ncon)
                mujoco.mj_setState(model, data, state, spec)
                start = time.perf_counter()
                out = env.step_chunk(action[None], render=False)
                fast_s.append(time.perf_counter() - start)
                obs, done = out.obs, out.done
                if done or env.t >= task.max_steps:
                    break
        successes += int(done)
    env.close()
    raw, fast = 1.0 / np.mean(raw_s), 1.0 / np.mean(fast_s)
    print(f"{task.suite} {task.local_id}, policy {args.ckpt or 'random actions'} ({args.action_mode}): "
          f"{args.episodes} episodes on sampled layouts, {successes} successes, {len(raw_s)} env steps")  # fmt: skip
    print(f"raw mj_step floor at the reset state (env_speed.py): {reset_floor:7.1f} env steps/s, one core")
    print(f"raw mj_step floor on the visited states:             {raw:7.1f} env steps/s "
          f"({raw / reset_floor:.2f}x the reset-state floor; contacts per step: mean {np.mean(contacts):.1f}, "
          f"max {np.max(contacts)})")  # fmt: skip
    print(
        f"the fast step on the same states:                    {fast:7.1f} env steps/s "
        f"({raw / fast:.2f}x from the visited-state floor, {reset_floor / fast:.2f}x from the reset-state one)"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
