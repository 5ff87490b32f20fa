"""Environment speed, measured side by side in one run (record the output in benchmarks/RESULTS.md).

* reset: soft (``hard_reset=False`` + ``set_init_state``) vs hard (model reload), protocol wait steps excluded;
* steps/s of one env: rendering both cameras every step vs only every 8th step (a chunked policy) vs never;
* vector env steps/s with 1 and 2 subprocess workers (physics only, and rendering every 8th step).

    python benchmarks/env_speed.py --task-id 10 --image-size 128
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libero_env as le  # noqa: E402


@dataclass
class Args:
    suite: str = "all"
    """suite of the task (``all``: global ids)"""
    task_id: int = 10
    """task to time (default: LIBERO-Object task 0)"""
    image_size: int = 128
    """camera resolution"""
    num_resets: int = 10
    """resets timed per reset mode"""
    num_steps: int = 240
    """steps timed per rendering mode (a multiple of 8)"""


def timed(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main(args: Args) -> None:
    task = le.resolve_task(args.suite, args.task_id)
    print(f"task: {task.suite} {task.local_id} '{task.instruction}', image {args.image_size}, cpus {os.cpu_count()}")
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.3, 0.3, (args.num_steps, 7))

    # -- resets ----------------------------------------------------------------------------------------------------
    rows = []
    for hard in (False, True):
        env = le.make_env(task, obs_mode="rgb", image_size=args.image_size, hard_reset=hard, num_wait_steps=0)
        env.reset(0, 0)
        sec = timed(lambda env=env: env.reset(int(rng.integers(50)), 0, render=False), args.num_resets)
        rows.append(("hard" if hard else "soft", sec))
        if not hard:
            soft_env = env
        else:
            env.close()
    print(
        f"\nreset (+set_init_state)  soft {rows[0][1] * 1e3:8.1f} ms   hard {rows[1][1] * 1e3:8.1f} ms   "
        f"hard/soft = {rows[1][1] / rows[0][1]:.0f}x"
    )

    # -- one env, rendering modes -------------------------------------------------------------------------------------
    env = soft_env
    results = {}
    for name, every in (("render every step", 1), ("render every 8th step", 8), ("no rendering", None)):
        env.reset(0, 0, render=False)
        env.step_chunk(actions[:8], render=True)  # warm-up: first render, JIT-compiled transforms
        start = time.perf_counter()
        if every is None:
            env.step_chunk(actions, render=False)
        else:
            for i in range(0, args.num_steps, every):
                env.step_chunk(actions[i : i + every], render=True)
        results[name] = args.num_steps / (time.perf_counter() - start)
    env.close()
    base = results["render every step"]
    print()
    for name, sps in results.items():
        print(f"{name:<24} {sps:7.1f} steps/s   ({sps / base:4.1f}x of render-every-step)")

    # -- vector env ---------------------------------------------------------------------------------------------------
    print()
    vec = {}
    for num_envs in (1, 2):
        with le.VectorLiberoEnv(task, num_envs, obs_mode="rgb", image_size=args.image_size) as venv:
            ids = list(range(num_envs))
            for render_every in (None, 8):
                venv.reset(ids, ids, ids, render=False)
                chunk = 8
                venv.step_chunk(ids, np.stack([actions[:chunk]] * num_envs), render=True)  # warm-up
                start = time.perf_counter()
                for i in range(0, args.num_steps, chunk):
                    venv.step_chunk(ids, np.stack([actions[i : i + chunk]] * num_envs), render=render_every is not None)
                sps = num_envs * args.num_steps / (time.perf_counter() - start)
                vec[(num_envs, render_every)] = sps
                label = "physics only" if render_every is None else "render every 8th"
                print(f"vector env, {num_envs} worker(s), {label:<17} {sps:7.1f} env-steps/s")
    for render_every in (None, 8):
        label = "physics only" if render_every is None else "render every 8th"
        print(f"2 workers / 1 worker ({label}): {vec[(2, render_every)] / vec[(1, render_every)]:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
