"""Environment speed, measured side by side in one run (record the output in benchmarks/RESULTS.md).

* reset: soft (``hard_reset=False`` + ``set_init_state``) vs hard (model reload), protocol wait steps excluded;
* steps/s of one env: rendering both cameras every step vs only every 8th step (a chunked policy) vs never;
* vector env steps/s with 1 and 2 subprocess workers (physics only, and rendering every 8th step);
* robosuite's step loop vs libero_env's fast step path (``make_env(fast_step=True)``), side by side: one env
  physics only for each fast ``physics`` variant, against the raw ``mj_step`` floor of the same model; rendering
  every 8th step; the vector env with 1 and 2 workers; and one PPO iteration (state mode, 2 envs, 105 chunk steps:
  rollout with the sampler, then the update) of ppo_diffusion.py's machinery;
* many envs on few cores (``--grouped``): env-steps/s and resident memory per env of the vector env with 2, 8, 16
  and 32 envs, one worker process per env vs the envs grouped over one worker per core (physics only, fast step),
  and one PPO iteration at the CPU recipe's batch (16 envs x 35 chunks) with grouped workers;
* stock vs fast stepping (``--stepping-only``): one env with robosuite's controller and the compiled one
  (fast_step.py), the raw ``mj_step`` floor, grouped workers at 8 and 16 envs, one PPO iteration at the convergence
  recipe's batch (16 envs x 140 chunks), stock and fast, and where the fast path's time goes.

    python benchmarks/env_speed.py --task-id 10 --image-size 128
    python benchmarks/env_speed.py --grouped-only
    python benchmarks/env_speed.py --stepping-only
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libero_env as le  # noqa: E402
import vector_env as ve  # noqa: E402


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
    ppo_steps: int = 105
    """chunk steps per env of the timed PPO iteration"""
    only_fast: bool = False
    """time only the stock-vs-fast comparison"""
    profile: bool = False
    """also print where the fast path's time goes (cProfile of one env, physics only, top functions)"""
    grouped_only: bool = False
    """time only the one-process-per-env vs grouped-workers comparison"""
    grouped_envs: tuple[int, ...] = (2, 8, 16, 32)
    """env counts of the grouped comparison (a count whose estimated memory exceeds what is free is skipped)"""
    grouped_chunks: int = 20
    """chunk steps (8 actions each) timed per env in the grouped comparison"""
    recipe_chunks: int = 140
    """chunk steps per env of the PPO iteration timed by ``--stepping-only`` (the recipe's: 140; 0: not timed)"""
    stepping_grouped: tuple[int, ...] = (8, 16)
    """env counts of ``--stepping-only``'s grouped-worker comparison (none: one env only)"""
    stepping_only: bool = False
    """only stock vs fast stepping: one env (each controller and physics variant, the raw mj_step floor), grouped
    workers at 8 and 16 envs, one PPO iteration at the convergence recipe's batch, and the fast path's profile"""


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
    if args.grouped_only:
        grouped_vs_per_process(args, task)
        return
    if args.stepping_only:
        stepping(args, task, actions)
        return
    if not args.only_fast:
        stock_speeds(args, task, rng, actions)
    fast_vs_stock(args, task, actions)
    grouped_vs_per_process(args, task)
    if args.profile:
        profile_fast_path(task, actions)


def stock_speeds(args: Args, task: le.Task, rng, actions: np.ndarray) -> None:
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
        with ve.VectorLiberoEnv(task, num_envs, obs_mode="rgb", image_size=args.image_size) as venv:
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


def env_steps_per_s(env: le.LiberoEnv, actions: np.ndarray, render_every) -> float:
    env.reset(0, 0, render=False)
    env.step_chunk(actions[:8], render=render_every is not None)  # warm-up
    start = time.perf_counter()
    chunk = render_every or 8
    for i in range(0, len(actions), chunk):
        env.step_chunk(actions[i : i + chunk], render=render_every is not None)
    return len(actions) / (time.perf_counter() - start)


def mj_step_floor(task: le.Task, n: int = 2000) -> float:
    """Env steps/s if a step were only its physics substeps (``mj_step`` with a fixed control), same model."""
    import mujoco

    env = le.make_env(task, obs_mode="state")
    env.reset(0, 0, render=False)
    model, data = env.env.sim.model._model, env.env.sim.data._data
    start = time.perf_counter()
    for _ in range(n):
        mujoco.mj_step(model, data)
    sec = (time.perf_counter() - start) / n
    substeps = env._fast.substeps
    env.close()
    return 1.0 / (sec * substeps)


def ppo_iteration_s(task: le.Task, fast: bool, steps: int, num_envs: int = 2, num_workers: int = 0,
                    minibatch: int = 525) -> tuple[float, float]:  # fmt: skip
    """Seconds of one PPO iteration (rollout of ``num_envs`` envs x ``steps`` chunks, then ppo_update) with an
    untrained state-mode diffusion policy (DPPO's MLP denoiser, as the learning check); (rollout s, update s)."""
    from types import SimpleNamespace

    import torch

    import bc_diffusion as bc
    import denoising_mdp as dm
    import ppo_core as core
    import ppo_diffusion as ppo

    torch.manual_seed(0)
    bc_args = bc.Args(obs_mode="state", denoiser="mlp")
    with ve.VectorLiberoEnv(task, num_envs, obs_mode="state", fast_step=fast, num_workers=num_workers) as venv:
        ids = list(range(num_envs))
        obs = venv.reset(ids, ids, ids, render=False)
        cfg = bc.policy_config(bc_args, len(obs[0]["object_state"]))
        policy = bc.DiffusionPolicy(cfg)
        g = np.random.default_rng(0)
        policy.fit_normalizer(
            g.uniform(-1, 1, (100, 7)), g.normal(size=(100, 8)), g.normal(size=(100, cfg["object_state_dim"]))
        )
        sched = dm.DenoisingSchedule(policy.alphas_cumprod, "ddim", 5, 1.0)
        ft = dm.FineTunedDiffusion(policy, sched, 5, cfg)
        critic = ppo.Critic(cfg, (256, 256))
        sampler = dm.GraphedSampler(ft, 3.0, 0.1, enabled=False)

        def act(obs_t):
            chain, actions = sampler(obs_t)
            return actions.numpy(), {"chains": chain}

        rollout = core.Rollout(venv, ft.ft.obs_tensors, 0, render=False)
        start = time.perf_counter()
        batch = rollout.collect(steps, act, {"env": 0.0, "policy": 0.0})
        t_rollout = time.perf_counter() - start
    T, E = batch["rewards"].shape
    flat = {"obs": {k: v.flatten(0, 1) for k, v in batch["obs"].items()}, "advantages": torch.randn(T * E),
            "chains": batch["extras"]["chains"].flatten(0, 1), "returns": torch.randn(T * E)}  # fmt: skip
    args = SimpleNamespace(min_std=0.1, logprob_clip=(-5.0, 2.0), update_epochs=10, minibatch_size=minibatch,
                           gamma_denoising=0.9, clip_coef=0.01, clip_coef_base=0.001, clip_coef_rate=3.0,
                           constant_clip=False, vf_coef=0.5, max_grad_norm=1.0, target_kl=None)  # fmt: skip
    opts = (torch.optim.AdamW(ft.ft.parameters(), lr=1e-6), torch.optim.AdamW(critic.parameters(), lr=1e-6))
    start = time.perf_counter()
    ppo.ppo_update(ft, critic, flat, args, opts, True, "cpu")
    return t_rollout, time.perf_counter() - start


def fast_vs_stock(args: Args, task: le.Task, actions: np.ndarray) -> None:
    print("\nrobosuite's step loop vs the fast step path (fast_step=True), env-steps/s")
    floor = mj_step_floor(task)
    stock = env_steps_per_s(le.make_env(task, obs_mode="state"), actions, None)
    print(f"one env, physics only, stock            {stock:7.1f}")
    for physics in le.FAST_PHYSICS:
        sps = env_steps_per_s(le.make_env(task, obs_mode="state", fast_step=True, physics=physics), actions, None)
        ratios = f"({sps / stock:.2f}x stock, {sps / floor:.2f} of floor)"
        print(f"one env, physics only, fast '{physics:<9}'  {sps:7.1f}   {ratios}")
    print(f"raw mj_step floor (25 substeps)         {floor:7.1f}   ({floor / stock:.2f}x stock)")
    for fast in (False, True):
        env = le.make_env(task, obs_mode="rgb", image_size=args.image_size, fast_step=fast)
        sps = env_steps_per_s(env, actions, 8)
        env.close()
        print(f"one env, render every 8th, {'fast ' if fast else 'stock'}        {sps:7.1f}")
    for num_envs in (1, 2):
        for render_every in (None, 8):
            row = []
            for fast in (False, True):
                with ve.VectorLiberoEnv(task, num_envs, obs_mode="rgb" if render_every else "state",
                                        image_size=args.image_size, fast_step=fast) as venv:  # fmt: skip
                    ids = list(range(num_envs))
                    venv.reset(ids, ids, ids, render=False)
                    venv.step_chunk(ids, np.stack([actions[:8]] * num_envs), render=render_every is not None)
                    start = time.perf_counter()
                    for i in range(0, len(actions), 8):
                        venv.step_chunk(ids, np.stack([actions[i : i + 8]] * num_envs), render=render_every is not None)
                    row.append(num_envs * len(actions) / (time.perf_counter() - start))
            label = "physics only" if render_every is None else "render every 8th"
            speeds = f"stock {row[0]:7.1f}  fast {row[1]:7.1f}  ({row[1] / row[0]:.2f}x)"
            print(f"vector env, {num_envs} worker(s), {label:<17} {speeds}")
    times = {fast: ppo_iteration_s(task, fast, args.ppo_steps) for fast in (False, True)}
    for fast, (rollout, update) in times.items():
        path = "fast " if fast else "stock"
        print(f"PPO iteration (2 envs x {args.ppo_steps} chunks), {path}: rollout {rollout:5.1f} s + update "
              f"{update:5.1f} s = {rollout + update:5.1f} s")  # fmt: skip
    total = {fast: sum(t) for fast, t in times.items()}
    print(f"PPO iteration: fast / stock = {total[False] / total[True]:.2f}x faster")


def resident_mb(pids: list[int]) -> float:
    """Resident memory of these processes (MB, from /proc)."""
    return sum(int(open(f"/proc/{pid}/statm").read().split()[1]) for pid in pids) * os.sysconf("SC_PAGE_SIZE") / 1e6


def available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e3
    return float("inf")


def grouped_vs_per_process(args: Args, task: le.Task) -> None:
    """One worker process per env (the old vector env) vs envs grouped over one worker per core."""
    cores = ve.default_num_workers(10**6)
    print(
        f"\nmany envs on {cores} cores: one process per env vs grouped over {cores} workers (physics only, fast step)"
    )
    rng = np.random.default_rng(1)
    per_env_mb = {}  # resident memory per env at the last (smaller) count, per layout (to skip what cannot fit)
    for num_envs in args.grouped_envs:
        row = {}
        for layout, workers in (("per process", num_envs), ("grouped", min(cores, num_envs))):
            need = per_env_mb.get(layout, 0) * num_envs * 1.2
            if need > available_mb():
                row[layout] = None
                print(f"{num_envs:3d} envs, {layout:<11}: skipped, needs ~{need / 1e3:.0f} GB, "
                      f"{available_mb() / 1e3:.0f} GB available")  # fmt: skip
                continue
            with ve.VectorLiberoEnv(task, num_envs, obs_mode="state", fast_step=True, num_workers=workers) as venv:
                ids = list(range(num_envs))
                venv.reset(ids, [i % le.NUM_INIT_STATES for i in ids], ids, render=False)
                chunks = rng.uniform(-0.3, 0.3, (args.grouped_chunks, num_envs, 8, 7))
                venv.step_chunk(ids, chunks[0], render=False)  # warm-up
                start = time.perf_counter()
                for chunk in chunks:
                    venv.step_chunk(ids, chunk, render=False)
                sps = num_envs * 8 * len(chunks) / (time.perf_counter() - start)
                mb = resident_mb(venv.pids) / num_envs
            per_env_mb[layout] = mb  # grouping more envs per worker only lowers it
            row[layout] = sps
            print(f"{num_envs:3d} envs, {layout:<11}: {sps:7.1f} env-steps/s, {mb:6.0f} MB resident per env "
                  f"({workers} workers)")  # fmt: skip
        if row.get("per process") and row.get("grouped"):
            print(f"{num_envs:3d} envs: grouped / per process = {row['grouped'] / row['per process']:.2f}x")
    rollout, update = ppo_iteration_s(task, True, 35, num_envs=16, minibatch=700)
    print(f"PPO iteration at the CPU recipe's batch (16 envs x 35 chunks, grouped, fast): rollout {rollout:5.1f} s "
          f"+ update {update:5.1f} s = {rollout + update:5.1f} s")  # fmt: skip


def stepping(args: Args, task: le.Task, actions: np.ndarray, repeats: int = 3) -> None:
    """Stock vs fast stepping, side by side: each variant timed ``repeats`` times in turn (best taken), so a load that
    comes and goes slows them alike."""
    variants = {"stock (robosuite's loop)": {}}
    variants["fast, robosuite controller"] = dict(fast_step=True, controller="robosuite")
    variants["fast, compiled, Python loop"] = dict(fast_step=True)  # each substep called from Python
    variants["fast, compiled controller"] = dict(fast_step=True)  # the default of fast_step=True
    variants["fast, compiled, split1"] = dict(fast_step=True, physics="split1")  # not robosuite's dynamics
    envs = {name: le.make_env(task, obs_mode="state", **kw) for name, kw in variants.items()}
    envs["fast, compiled, Python loop"]._fast.compiled_loop = False
    best = dict.fromkeys(envs, 0.0)
    floor = 0.0
    for _ in range(repeats):
        for name, env in envs.items():
            best[name] = max(best[name], env_steps_per_s(env, actions, None))
        floor = max(floor, mj_step_floor(task))
    for env in envs.values():
        env.close()
    stock = best["stock (robosuite's loop)"]
    print(f"\none env, physics only, env-steps/s (best of {repeats}, {len(actions)} steps in chunks of 8)")
    for name, sps in best.items():
        print(f"  {name:<28} {sps:7.1f}   {sps / stock:5.2f}x stock   {floor / sps:5.2f}x from the floor")
    print(f"  {'raw mj_step floor':<28} {floor:7.1f}   {floor / stock:5.2f}x stock")

    cores = ve.default_num_workers(10**6)
    rng = np.random.default_rng(1)
    for num_envs in args.stepping_grouped:
        row = {}
        for fast in (False, True):
            with ve.VectorLiberoEnv(task, num_envs, obs_mode="state", fast_step=fast) as venv:
                ids = list(range(num_envs))
                venv.reset(ids, ids, ids, render=False)
                chunks = rng.uniform(-0.3, 0.3, (args.grouped_chunks, num_envs, 8, 7))
                venv.step_chunk(ids, chunks[0], render=False)  # warm-up
                start = time.perf_counter()
                for chunk in chunks:
                    venv.step_chunk(ids, chunk, render=False)
                row[fast] = num_envs * 8 * len(chunks) / (time.perf_counter() - start)
        print(f"{num_envs:3d} envs grouped over {cores} workers: stock {row[False]:7.1f}  fast {row[True]:7.1f} "
              f"env-steps/s  ({row[True] / row[False]:.2f}x)")  # fmt: skip

    totals = {}
    for fast in (False, True) if args.recipe_chunks > 0 else ():
        rollout, update = ppo_iteration_s(task, fast, args.recipe_chunks, num_envs=16, minibatch=2800)
        totals[fast] = rollout + update
        path = "fast " if fast else "stock"
        print(f"PPO iteration at the convergence recipe's batch (16 envs x {args.recipe_chunks} chunks), {path}: "
              f"rollout {rollout:6.1f} s + update {update:5.1f} s = {totals[fast]:6.1f} s")  # fmt: skip
    if totals:
        print(f"PPO iteration: stock / fast = {totals[False] / totals[True]:.2f}x")
    profile_fast_path(task, actions)


def profile_fast_path(task: le.Task, actions: np.ndarray, top: int = 14) -> None:
    import cProfile
    import pstats

    env = le.make_env(task, obs_mode="state", fast_step=True)
    env.reset(0, 0, render=False)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(0, len(actions), 8):
        env.step_chunk(actions[i : i + 8], render=False)
    profiler.disable()
    env.close()
    print(f"\nwhere the fast path's time goes ({len(actions)} steps, physics only; by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main(tyro.cli(Args))
