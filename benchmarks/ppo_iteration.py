"""Whole PPO iterations of the CPU recipe, the lockstep rollout and the pipelined one side by side in one run.

One iteration = the rollout (``--num-envs`` envs x ``--num-steps`` chunk steps of 8 actions, state mode, the fast
step, envs grouped over one worker per core) and ppo_diffusion's update on it (10 epochs, minibatches of 2800
(chunk, denoising step) pairs), with an untrained state-mode diffusion policy (the MLP denoiser of the BC starts).
``lockstep`` steps every env and then queries the policy for all of them (ppo_core.Rollout's default);
``pipelined`` (``--pipeline`` in the PPO scripts) serves each worker as soon as its envs' chunks are done;
``pipelined-1thread`` the same with the main process's torch threads at one during the rollout (``Rollout`` now
does this itself when pipelined, so the two pipelined modes time the same code; the name kept for the record).
A mode may name its worker count, ``lockstep/4w`` (default: one worker per core): more workers than cores let the OS
fill the core a finished worker leaves while the lockstep waits for the slowest. The modes alternate, A B C A B C,
and each round's ratios to the first mode are printed; beside them, the raw physics floor (``mj_step`` alone, one
core, times the cores) of the same task, so the rates also read as a fraction of what the physics allows.

An untrained policy never succeeds, so its episodes all run to the step limit: no resets inside the rollout and no
imbalance between workers. ``--ckpt`` times a trained policy instead (a ppo_diffusion checkpoint of the same task,
e.g. a teacher), whose episodes end at different steps and reset to sampled layouts, as in a real run; lockstep
modes with the same policy and seeds collect the same episodes whatever the worker count (checked: the successes
and summed rewards are printed per mode).

    python benchmarks/ppo_iteration.py                      # 16 envs x 140 chunks, 2 rounds (~15 min on 2 cores)
    python benchmarks/ppo_iteration.py --num-steps 35 --pairs 1   # a quick look
    python benchmarks/ppo_iteration.py --suite libero_spatial --task-id 3 --ckpt runs/.../final.pt \
        --modes lockstep lockstep/4w pipelined-1thread pipelined-1thread/4w
"""

import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from env_speed import mj_step_floor  # noqa: E402

import bc_diffusion as bc  # noqa: E402
import denoising_mdp as dm  # noqa: E402
import libero_env as le  # noqa: E402
import ppo_core as core  # noqa: E402
import ppo_diffusion as ppo  # noqa: E402
import vector_env as ve  # noqa: E402


@dataclass
class Args:
    suite: str = "libero_object"
    task_id: int = 0
    num_envs: int = 16
    num_steps: int = 140
    """chunk steps per env and iteration (the CPU recipe's 140: 17,920 env steps)"""
    minibatch_size: int = 2800
    pairs: int = 2
    """rounds of the modes, alternating"""
    modes: tuple[str, ...] = ("lockstep", "pipelined")
    """lockstep | pipelined | pipelined-1thread (the main process's torch threads at 1 during the rollout, so that
    the policy does not compete with the workers for the cores; the update keeps them all), each optionally with
    /<N>w: N env workers (default one per core)"""
    ckpt: Optional[str] = None
    """a ppo_diffusion checkpoint of this task to roll out (default: an untrained policy, which never succeeds)"""


def policy_for(obs: dict, seed: int = 0):
    """An untrained state-mode diffusion policy (normaliser fitted on random data) and its critic."""
    torch.manual_seed(seed)
    cfg = bc.policy_config(bc.Args(obs_mode="state", denoiser="mlp"), len(obs["object_state"]))
    policy = bc.DiffusionPolicy(cfg)
    g = np.random.default_rng(seed)
    policy.fit_normalizer(
        g.uniform(-1, 1, (100, 7)), g.normal(size=(100, 8)), g.normal(size=(100, cfg["object_state_dim"]))
    )
    ft = dm.FineTunedDiffusion(policy, dm.DenoisingSchedule(policy.alphas_cumprod, "ddim", 5, 1.0), 5, cfg)
    return ft, ppo.Critic(cfg, (256, 256))


def parse_mode(mode: str) -> tuple[str, int]:
    """A mode -> (schedule, workers): "lockstep/4w" -> ("lockstep", 4); no suffix: 0 (one worker per core)."""
    schedule, _, workers = mode.partition("/")
    bad_workers = workers and not (workers.endswith("w") and workers[:-1].isdigit())
    if schedule not in ("lockstep", "pipelined", "pipelined-1thread") or bad_workers:
        raise ValueError(f"unknown mode {mode!r}: use lockstep, pipelined or pipelined-1thread, optionally with /<N>w")
    return schedule, int(workers[:-1]) if workers else 0


def trained_policy(path: str):
    """A ppo_diffusion checkpoint's policy, in training mode as the update sees it, and a fresh critic (the update's
    cost does not depend on the critic's weights)."""
    ft = ppo.load_policy(path).train()
    return ft, ppo.Critic(ft.cfg, (256, 256))


def iteration(venv: ve.VectorLiberoEnv, mode: str, args: Args) -> dict:
    """Seconds of one whole iteration (a fresh rollout, then the update) on ``venv``'s workers."""
    pipelined = mode.startswith("pipelined")
    if args.ckpt:
        ft, critic = trained_policy(args.ckpt)
    else:
        ft, critic = policy_for(venv.reset([0], [0], [0], render=False)[0])
    torch.manual_seed(0)  # the lockstep's policy noise: the same for every worker count
    sampler = dm.GraphedSampler(ft, 3.0, 0.1, enabled=False)
    cfg = ft.cfg

    def act(obs_t, generators=None):  # as ppo_diffusion.py's
        if generators is None:
            chain, actions = sampler(obs_t)
        else:
            with torch.no_grad():
                chain, actions = ft.sample_chain(obs_t, 3.0, 0.1, "sample", ft.noise_from(generators))
        return actions.numpy(), {"chains": chain}

    rollout = core.Rollout(venv, ft.ft.obs_tensors, 0, render=False, pipelined=pipelined)
    rollout.reset_all()  # (outside the timing: both schedules start their episodes alike)
    timers = {"env": 0.0, "policy": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if mode.endswith("1thread") else threads)
    start = time.perf_counter()
    batch = rollout.collect(args.num_steps, act, timers)
    rollout_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    T, E = batch["rewards"].shape
    flat = {"obs": {k: v.flatten(0, 1) for k, v in batch["obs"].items()}, "advantages": torch.randn(T * E),
            "chains": batch["extras"]["chains"].flatten(0, 1), "returns": torch.randn(T * E)}  # fmt: skip
    ppo_args = SimpleNamespace(min_std=0.1, logprob_clip=(-5.0, 2.0), update_epochs=10,
                               minibatch_size=args.minibatch_size, gamma_denoising=0.9, clip_coef=0.01,
                               clip_coef_base=0.001, clip_coef_rate=3.0, constant_clip=False, vf_coef=0.5,
                               max_grad_norm=1.0, target_kl=None)  # fmt: skip
    opts = (torch.optim.AdamW(ft.ft.parameters(), lr=1e-6), torch.optim.AdamW(critic.parameters(), lr=1e-6))
    start = time.perf_counter()
    ppo.ppo_update(ft, critic, flat, ppo_args, opts, True, "cpu")
    update_s = time.perf_counter() - start
    steps = T * E * cfg["act_steps"]
    return {"rollout_s": rollout_s, "update_s": update_s, "policy_s": timers["policy"], "env_steps": steps,
            "rate": steps / (rollout_s + update_s), "successes": int(batch["terminated"].sum()),
            "reward": float(batch["rewards"].sum())}  # fmt: skip


def main(args: Args) -> None:
    task = le.resolve_task(args.suite, args.task_id)
    workers = {mode: parse_mode(mode)[1] or ve.default_num_workers(args.num_envs) for mode in args.modes}
    for n in set(workers.values()):
        ve.check_memory(args.num_envs, n)
    if args.ckpt:
        trained_policy(args.ckpt)  # a wrong path or format fails before the envs start
    cores = ve.default_num_workers(args.num_envs)
    floor = mj_step_floor(task) * cores
    print(f"{task.suite} {task.local_id}, {args.num_envs} envs x {args.num_steps} chunk steps, policy "
          f"{args.ckpt or 'untrained'}; raw physics floor {floor:.0f} env steps/s on {cores} cores")  # fmt: skip
    ratios = {mode: [] for mode in args.modes[1:]}
    venv = None
    try:
        for pair in range(args.pairs):
            result = {}
            for mode in args.modes:
                if venv is None or venv.num_workers != workers[mode]:  # started outside the timing
                    if venv is not None:
                        venv.close()
                    venv = ve.VectorLiberoEnv(task, args.num_envs, obs_mode="state", fast_step=True,
                                              num_workers=workers[mode])  # fmt: skip
                r = result[mode] = iteration(venv, parse_mode(mode)[0], args)
                print(f"round {pair + 1} {mode:>22}: {r['rate']:6.0f} env steps/s of iteration "
                      f"({100 * r['rate'] / floor:.0f} % of the physics floor; rollout {r['rollout_s']:.1f} s, "
                      f"of it policy {r['policy_s']:.1f} s; update {r['update_s']:.1f} s; {workers[mode]} workers; "
                      f"{r['successes']} successes, reward {r['reward']:.1f})", flush=True)  # fmt: skip
            for mode in args.modes[1:]:
                ratios[mode].append(result[mode]["rate"] / result[args.modes[0]]["rate"])
                print(f"round {pair + 1}: {mode} / {args.modes[0]} = {ratios[mode][-1]:.2f}x", flush=True)
    finally:
        if venv is not None:
            venv.close()
    for mode, values in ratios.items():
        print(f"{mode} / {args.modes[0]} over {len(values)} rounds: {', '.join(f'{r:.2f}x' for r in values)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
