"""ppo_diffusion.py — phase 2: fine-tune the BC diffusion policy online with PPO over the denoising chain (DPPO).

Each environment step (one executed chunk of ``act_steps`` actions, rewards summed) is an outer MDP step; the
K = 5 DDIM denoising steps that produced its action chunk form an inner MDP whose actions are the intermediate
samples x_{k-1} ~ N(mu_theta(x_k, k, s), sigma_k^2). PPO's likelihood ratio is taken per denoising step:

    r_{t,k} = exp(log p_theta(x_{k-1} | x_k, s_t) - log p_old(x_{k-1} | x_k, s_t))          (eq. 2)
    L = E[max(-A_t g^(K-1-k) r_{t,k}, -A_t g^(K-1-k) clip(r_{t,k}, 1 - eps_k, 1 + eps_k))]  (eq. 3-4)
    + vf_coef * 0.5 * (V(s_t) - R_t)^2                                                        (eq. 5)

with chunk-level GAE advantages A_t (gamma 0.999, lambda 0.95), the denoising discount g = 0.9, and a clip eps_k
growing exponentially from 0.001 (noisiest step) to 0.01 (the step that emits the action). Success and the step
limit both end an episode with value 0; the critic V(s, t / limit) sees the elapsed fraction. Rollouts sample
with DDIM eta = 1 and a std floor of 0.1 (``--noise-scale`` shrinks the step sigmas around the same means,
``--noise-scale-final`` from a fraction of the run on), and evaluation runs that same policy without the noise after
x_K by default (``--eval-mode mean``; eta = 0 is another chain that PPO does not train). On CUDA the whole sampler
(encoder, all denoising steps, noise) is replayed as one CUDA graph per batch size. The denoising chain as a policy
(its schedule, per-step log-likelihoods, action modes and the CUDA-graphed sampler) is denoising_mdp.py's; the
rollouts, GAE, reward scale and protocol evaluation, the same for ppo_gaussian.py, are ppo_core.py's.

    python ppo_diffusion.py --suite libero_object --task-id 0 --num-envs 50
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

import libero_env as le
import run_utils
import vector_env as ve
from bc_diffusion import DiffusionPolicy
from bc_diffusion import load_policy as bc_load_policy
from denoising_mdp import ACTION_MODES, DenoisingSchedule, FineTunedDiffusion, GraphedSampler, denoising_logprob
from ppo_core import (
    Critic,
    Rollout,
    RunningRewardScaler,
    actor_lr_at,
    bootstrap_values,
    check_finite,
    check_resumed_layouts,
    eval_due,
    evaluate_modes,
    explained_variance,
    gae,
    in_run_evaluation,
    index_obs,
    mean_stats,
    minibatches,
    normalize_advantages,
    success_reward_fn,
    to_device,
    write_final_evaluation,
)


@dataclass
class Args:
    exp_name: str = "ppo_diffusion"
    """name of this experiment (wandb run name)"""
    seed: int = 0
    """seed of the run"""
    torch_deterministic: bool = True
    """cudnn deterministic mode"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to wandb (metrics.jsonl is always written)"""
    wandb_project_name: str = "diffusion-rl-libero"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""
    capture_video: bool = False
    """save an mp4 of the first evaluation episode of each evaluation (rgb policies)"""

    # task, checkpoints
    suite: str = "all"
    """libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | all (then --task-id is global)"""
    task_id: int = 10
    """task index (global 0-129 with --suite all, else within the suite)"""
    run_root: str = "runs"
    """root of runs/<phase>/<suite>/task<NN>__seed<S>/"""
    bc_ckpt: Optional[str] = None
    """phase-1 checkpoint (default: runs/bc_diffusion/<suite>/task<NN>__seed<S>/checkpoints/final.pt)"""
    resume: str = "auto"
    """auto: continue from checkpoints/latest.pt if present; never; or a checkpoint path"""

    # rollout
    num_envs: int = 50
    """parallel environments"""
    num_workers: int = 0
    """environment worker processes the envs are grouped over (0: one per CPU core, at most --num-envs)"""
    pipeline: bool = False
    """step every worker's envs on their own, the policy computing for one worker's envs while the others step,
    instead of all envs in lockstep; per-env seed and noise streams (ppo_core.Rollout)"""
    batch_chunks: int = 15_000
    """env steps (chunks) per iteration over all envs; DPPO's 50 envs x 300 steps. Kept constant when --num-envs
    changes (the paper's parallel-env ablation) unless --num-steps is given"""
    num_steps: Optional[int] = None
    """chunk steps per env per iteration (default: batch_chunks // num_envs)"""
    num_iterations: int = 100
    """PPO iterations"""
    reset_at_iteration: bool = True
    """start every iteration from fresh episodes (DPPO's reset_at_iteration): no episode spans two iterations, so a
    resumed run continues exactly as an uninterrupted one; with num_steps x act_steps >= the step limit every
    episode also ends inside its iteration (none is cut)"""
    train_layouts: Literal["sampled", "protocol"] = "sampled"
    """where training episodes start: sampled, layouts LIBERO's placement initializer draws from each episode's seed
    (never one of the protocol's 50 init states, which the evaluations hold out); protocol, the 50 themselves (as
    runs before the layout split did)"""
    sampler: Literal["ddim", "ddpm"] = "ddim"
    """denoising sampler of the rollouts (the paper's DDIM-5 vs DDPM ablation)"""
    denoising_steps: int = 5
    """DDIM steps (DDPM always runs all K training steps)"""
    ft_denoising_steps: int = 5
    """the last N denoising steps are fine-tuned (a trainable copy); earlier ones use the frozen BC actor"""
    eta: float = 1.0
    """DDIM eta of the rollouts (1: the DDPM-like variance)"""
    min_std: float = 0.1
    """floor of each denoising step's std during rollouts and in the log-probs"""
    noise_scale: float = 1.0
    """multiplies each denoising step's sigma (before the floor) in the rollouts and the log-probs: < 1 trains a less
    noisy chain around the same step means, so ``mean`` mode is unchanged"""
    noise_scale_final: Optional[float] = None
    """the noise scale from --noise-scale-switch of the run on (None: --noise-scale throughout): explore with the full
    chain, then train a quieter one once rollout success plateaus (docs/convergence.md, LIBERO-Spatial 0)"""
    noise_scale_switch: float = 0.78
    """fraction of --num-iterations after which --noise-scale-final applies (0.78 of 83: the last 18 iterations)"""
    noise_clip: float = 3.0
    """standard-normal draws are clamped to +-noise_clip"""
    logprob_clip: tuple[float, float] = (-5.0, 2.0)
    """per-element clamp of the denoising log-probs"""
    cuda_graph: bool = True
    """replay the rollout sampler as a CUDA graph per batch size (CUDA only; eager otherwise)"""
    fast_step: bool = True
    """step the simulator on libero_env's fast path (same dynamics up to MuJoCo's solver tolerance; --no-fast-step:
    robosuite's own loop). The in-training evaluations use it too; evaluate.py's protocol runs do not"""

    # PPO
    gamma: float = 0.999
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    gamma_denoising: float = 0.9
    """advantage weight g^(K-1-k) of denoising step k (the action-emitting step weighs most)"""
    clip_coef: float = 0.01
    """PPO clip on the last (action-emitting) denoising step"""
    clip_coef_base: float = 0.001
    """PPO clip on the noisiest fine-tuned step"""
    clip_coef_rate: float = 3.0
    """exponential interpolation rate of the clip between the two"""
    constant_clip: bool = False
    """use clip_coef on every denoising step"""
    update_epochs: int = 10
    """passes over the (env step, denoising step) pairs per iteration"""
    minibatch_size: int = 15_000
    """(env step, denoising step) pairs per gradient step: 50 steps per iteration of 15,000 chunks x 5 (the CPU
    recipe's 40 steps per iteration were stable at --actor-lr 1e-4, docs/convergence.md; DPPO tunes it per task)"""
    vf_coef: float = 0.5
    """value-loss weight"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the actor and the critic apart (0 disables)"""
    target_kl: Optional[float] = 1.0
    """stop the epochs of an iteration once the approximate KL exceeds this (None: never)"""
    critic_warmup_iters: int = 2
    """iterations that train only the critic before the actor moves"""
    actor_lr: float = 1e-4
    """actor learning rate (DPPO's current robomimic configs; measured here: 3e-4 collapsed the policy at its first
    update, 1e-4 did not)"""
    actor_lr_min: float = 1e-5
    """end of the cosine decay (--no-constant-lr or --actor-lr-decay-start)"""
    constant_lr: bool = True
    """hold the actor learning rate (DPPO's configs hold it too); --no-constant-lr: the paper's cosine annealing to
    --actor-lr-min over --num-iterations (a cosine that decays within a short run stops learning early)"""
    actor_lr_decay_start: float = 1.0
    """fraction of --num-iterations after which the held actor LR decays (cosine to --actor-lr-min by the last
    iteration; 1.0: never): hold while learning, settle the policy at the end"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay of both optimisers"""
    reward_scale: bool = True
    """divide rewards by a running std of the discounted return"""
    reward_clip: float = 10.0
    """clip the scaled rewards to +-this (DPPO)"""
    reward_until_limit: bool = False
    """a success pays its reward for every chunk left until the step limit (discounted; DPPO's no-early-termination
    reward in closed form, the episode still ends): an earlier success earns more, a time pressure the terminal
    reward of 1 lacks at gamma 0.999"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP head"""
    max_bad_updates: int = 5
    """stop the run after this many consecutive updates skipped for non-finite values"""

    # evaluation, logging
    eval_mode: Literal["sample", "mean", "eta0"] = "mean"
    """how the policy acts in evaluations, and by default in collect.py / evaluate.py (ACTION_MODES): mean, the
    trained chain's step means without its noise after x_K (measured best: 80.5 % against 57.5 % sample and 39.5 %
    eta0 on the same 200 episodes, docs/convergence.md); sample, the stochastic policy PPO trains; eta0, DDIM's
    eta = 0 path, which PPO does not train"""
    eval_every: int = 10
    """iterations between evaluations (0: only at the end), in --eval-mode and in eta0 beside it"""
    eval_episodes: int = 50
    """protocol episodes per evaluation (init states 0..N-1, each with its own noise seed; 0 disables)"""
    final_eval_episodes: int = 200
    """at the end: every action mode over the same N protocol episodes, and the spread of --eval-mode's actions
    across its successful trajectories (0 disables)"""
    eval_num_envs: int = 0
    """environment workers for evaluation (0: --num-envs)"""
    save_every: int = 1
    """iterations between latest.pt checkpoints"""


CKPT_FORMATS = ("ppo_diffusion/v2", "ppo_diffusion/v1")  # v1 (critic without time): its actor still loads


# ================================================================================================================
# PPO update
# ================================================================================================================
def clip_schedule(k: torch.Tensor, ft_steps: int, base: float, final: float, rate: float, constant: bool):
    """PPO clip per fine-tuned denoising index k (0 = noisiest): exponential from ``base`` to ``final``."""
    if constant or ft_steps == 1:
        return torch.full(k.shape, final, dtype=torch.float32, device=k.device)
    x = k.float() / (ft_steps - 1)
    return base + (final - base) * (torch.exp(rate * x) - 1) / (math.exp(rate) - 1)


def denoising_pg_loss(ratio, adv, k, K: int, ft: int, args):
    """PPO-clip loss (eq. 3-4) over (env step, denoising step) pairs; returns (loss, clip per pair).

    ``adv``: the pairs' normalised advantages, weighted here by the denoising discount g^(K-1-k) (the action-emitting
    step weighs most); ``k``: denoising indices (0 = noisiest); the clip grows from ``clip_coef_base`` on the
    noisiest fine-tuned step to ``clip_coef`` on the last (:func:`clip_schedule`)."""
    adv = adv * args.gamma_denoising ** (K - 1 - k).float()
    clip = clip_schedule(k - (K - ft), ft, args.clip_coef_base, args.clip_coef, args.clip_coef_rate, args.constant_clip)
    return torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean(), clip


def ppo_update(policy: FineTunedDiffusion, critic: Critic, batch: dict, args, optimizers, train_actor: bool, device):
    """PPO epochs over random (env step, fine-tuned denoising step) pairs. Returns (stats, skip reason or None).

    ``batch``: obs (N, ...), chains (N, K+1, H, Da), advantages (N,), returns (N,). Old log-probs are recomputed
    here with the same function as the update (before any step), so every ratio of the first minibatch is 1.
    """
    sched, K, ft = policy.sched, policy.sched.K, policy.ft_steps
    bad = check_finite({"advantages": batch["advantages"], "returns": batch["returns"]})
    if bad:
        return {}, bad
    # the whole iteration goes to the device once (not once per minibatch); minibatches are gathered there
    obs, chains = to_device(batch["obs"], device), batch["chains"].to(device)
    advantages, returns = batch["advantages"].to(device), batch["returns"].to(device)
    N, act_steps = len(advantages), policy.cfg["act_steps"]
    pairs_i = torch.arange(N, device=device).repeat_interleave(ft)
    pairs_k = torch.arange(K - ft, K, device=device).repeat(N)  # fine-tuned denoising indices

    def logprob(i, k):
        obs_t = index_obs(obs, i)
        cond = policy.ft.encode(obs_t)
        x_k, x_next = chains[i, k], chains[i, k + 1]
        return denoising_logprob(
            policy.ft, sched, cond, x_k, x_next, k, args.min_std, act_steps, args.logprob_clip
        ), obs_t

    with torch.no_grad():
        mbs = range(0, len(pairs_i), args.minibatch_size)
        logp_old = torch.cat([logprob(pairs_i[s : s + args.minibatch_size], pairs_k[s : s + args.minibatch_size])[0]
                              for s in mbs])  # fmt: skip
    stats = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "ratio_first", "actor_grad_norm",
                             "critic_grad_norm")}  # fmt: skip
    actor_opt, critic_opt = optimizers
    actor_params = [p for p in policy.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    stop = False
    for epoch in range(args.update_epochs):
        for j, mb in enumerate(minibatches(len(pairs_i), args.minibatch_size, device)):
            i, k = pairs_i[mb], pairs_k[mb]
            logp_new, obs_t = logprob(i, k)
            ratio = (logp_new - logp_old[mb]).exp()
            pg_loss, clip = denoising_pg_loss(ratio, normalize_advantages(advantages[i]), k, K, ft, args)
            v_loss = 0.5 * ((critic(obs_t) - returns[i]) ** 2).mean()
            loss = (pg_loss if train_actor else 0.0) + args.vf_coef * v_loss
            with torch.no_grad():
                log_ratio = ratio.log()
                approx_kl = ((ratio - 1) - log_ratio).mean()
                stats["clipfrac"].append(((ratio - 1).abs() > clip).float().mean())
            if epoch == 0 and j == 0:
                stats["ratio_first"].append((ratio - 1).abs().max())
            bad = check_finite({"loss": loss, "ratio": ratio})
            if bad:
                return mean_stats(stats), bad
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in actor_params + critic_params if p.grad is not None]
            bad = check_finite({"gradient": torch.stack([g.norm() for g in grads])}) if grads else None
            if bad:
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                return mean_stats(stats), bad
            # actor and critic are clipped apart: the critic's larger gradient must not shrink the actor's step
            max_norm = args.max_grad_norm or float("inf")
            if train_actor:
                stats["actor_grad_norm"].append(nn.utils.clip_grad_norm_(actor_params, max_norm))
                actor_opt.step()
            stats["critic_grad_norm"].append(nn.utils.clip_grad_norm_(critic_params, max_norm))
            critic_opt.step()
            stats["pg_loss"].append(pg_loss.detach())
            stats["v_loss"].append(v_loss.detach())
            stats["approx_kl"].append(approx_kl)
            # the NaN guards and the KL check are the loop's host syncs; the stats are read back once, below
            if args.target_kl is not None and train_actor and approx_kl.item() > args.target_kl:
                stop = True
                break
        if stop:
            break
    return {**mean_stats(stats), "epochs": epoch + 1}, None


def noise_scale_at(args: dict, iteration: int) -> float:
    """The rollout chain's noise scale for the iteration that starts after ``iteration`` completed ones (and for a
    checkpoint saved after them): --noise-scale, then --noise-scale-final from round(switch x num_iterations) on."""
    final = args.get("noise_scale_final")
    if final is None or iteration < round(args.get("noise_scale_switch", 0.78) * args["num_iterations"]):
        return args.get("noise_scale", 1.0)
    return final


def load_policy(path: str, device="cpu") -> FineTunedDiffusion:
    """The fine-tuned policy of a ppo_diffusion checkpoint (for collect.py / evaluate.py)."""
    ckpt = run_utils.load_checkpoint(path, CKPT_FORMATS)
    cfg, ppo = ckpt["config"], ckpt["ppo_config"]
    bc_policy = DiffusionPolicy(cfg)
    args = ckpt["args"]
    sched = DenoisingSchedule(bc_policy.alphas_cumprod, ppo["sampler"], ppo["denoising_steps"], ppo["eta"],
                              noise_scale_at(args, ckpt.get("step", 0)))  # fmt: skip
    policy = FineTunedDiffusion(bc_policy, sched, ppo["ft_denoising_steps"], cfg, args["noise_clip"], args["min_std"])
    policy.load_state_dict(ckpt["model"])
    return policy.to(device).eval()


def finetuning_start(bc_policy: DiffusionPolicy, denoising_steps: int = 5) -> FineTunedDiffusion:
    """A BC policy as the PPO run's iteration 0 sees it: the rollout chain of this script's defaults."""
    args = Args()
    sched = DenoisingSchedule(bc_policy.alphas_cumprod, "ddim", denoising_steps, args.eta, args.noise_scale)
    sched = sched.to(bc_policy.alphas_cumprod.device)
    return FineTunedDiffusion(bc_policy, sched, denoising_steps, bc_policy.cfg, args.noise_clip, args.min_std).eval()


def ppo_config(args) -> dict:
    return {k: getattr(args, k) for k in ("sampler", "denoising_steps", "ft_denoising_steps", "eta")}


def check_args(args, bc_cfg: dict) -> None:
    """The arguments against each other and against the BC checkpoint's config (its K fixes DDPM's chain)."""
    le.check_task_args(args.suite, args.task_id)
    K_train = bc_cfg["num_train_timesteps"]
    if args.sampler == "ddim" and (not 1 <= args.denoising_steps <= K_train or K_train % args.denoising_steps):
        raise ValueError(f"--denoising-steps must divide the BC checkpoint's {K_train} diffusion steps.")
    K = K_train if args.sampler == "ddpm" else args.denoising_steps
    if not 1 <= args.ft_denoising_steps <= K:
        raise ValueError(f"--ft-denoising-steps must be in 1..{K} for --sampler {args.sampler} (the BC checkpoint "
                         f"has {K_train} diffusion steps).")  # fmt: skip
    if args.num_envs < 1 or args.batch_chunks < args.num_envs:
        raise ValueError("--num-envs must be >= 1 and --batch-chunks >= --num-envs.")
    if args.minibatch_size < 1:
        raise ValueError("--minibatch-size must be >= 1.")
    separate_eval = args.eval_num_envs if args.eval_num_envs not in (0, args.num_envs) else 0  # a second venv
    ve.check_memory(args.num_envs + separate_eval, args.num_workers or None)
    for flag, scale in (("--noise-scale", args.noise_scale), ("--noise-scale-final", args.noise_scale_final)):
        if scale is not None and (scale < 0 or (scale == 0 and args.min_std <= 0)):
            raise ValueError(f"{flag} must be >= 0 (and --min-std > 0 when it is 0, or the rollouts have no noise).")
    if not 0 <= args.noise_scale_switch <= 1:
        raise ValueError("--noise-scale-switch is a fraction of --num-iterations: give a value in [0, 1].")


# ================================================================================================================
if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        le.check_task_args(args.suite, args.task_id)
        task = le.resolve_task(args.suite, args.task_id)
        bc_dir = run_utils.task_run_dir(args.run_root, "bc_diffusion", task.suite, task.local_id, args.seed)
        args.bc_ckpt = args.bc_ckpt or os.path.join(bc_dir, "checkpoints", "final.pt")
        bc_policy = bc_load_policy(args.bc_ckpt)
        check_args(args, bc_policy.cfg)
    except (ValueError, run_utils.CheckpointError) as e:
        sys.exit(f"error: {e}")
    num_steps = args.num_steps or max(1, args.batch_chunks // args.num_envs)
    print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'")
    print(f"BC checkpoint: {args.bc_ckpt}; {args.num_envs} envs x {num_steps} chunk steps per iteration")
    run_dir = run_utils.task_run_dir(args.run_root, "ppo_diffusion", task.suite, task.local_id, args.seed)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    run_utils.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    cfg = bc_policy.cfg
    render = cfg["obs_mode"] == "rgb"

    # Networks and optimisers
    sched = DenoisingSchedule(bc_policy.alphas_cumprod, args.sampler, args.denoising_steps, args.eta, args.noise_scale)
    policy = FineTunedDiffusion(bc_policy, sched, args.ft_denoising_steps, cfg, args.noise_clip, args.min_std)
    policy = policy.to(device)
    critic = Critic(cfg, args.critic_hidden).to(device)
    millions = lambda m: run_utils.count_parameters(m) / 1e6  # noqa: E731
    print(f"actor {millions(policy.ft):.2f}M, critic {millions(critic):.2f}M parameters; "
          f"fine-tuning the last {args.ft_denoising_steps} of {sched.K} {args.sampler} steps")  # fmt: skip
    actor_opt = torch.optim.AdamW(policy.ft.parameters(), lr=args.actor_lr, weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    scaler = RunningRewardScaler(args.num_envs, args.gamma, args.reward_clip)
    iteration, env_steps, bad_updates, rollout_state = 0, 0, 0, None
    evaluated_at = -1  # the iteration of the last finished in-run evaluation (a pre-emption may cut one short)

    try:
        resume = run_utils.resume_path(args.resume, ckpt_dir)
        if resume is not None:
            ckpt = run_utils.load_checkpoint(resume, CKPT_FORMATS[:1])
            check_resumed_layouts(resume, ckpt["args"], args.train_layouts)
            run_utils.check_same_architecture(
                resume, {**ckpt["config"], **ckpt["ppo_config"]}, {**cfg, **ppo_config(args)}
            )
            policy.load_state_dict(ckpt["model"])
            critic.load_state_dict(ckpt["critic"])
            actor_opt.load_state_dict(ckpt["optimizer"])
            critic_opt.load_state_dict(ckpt["critic_optimizer"])
            scaler.load_state_dict(ckpt["reward_scaler"])
            iteration, env_steps, rollout_state = ckpt["step"], ckpt["env_steps"], ckpt.get("rollout")
            evaluated_at = ckpt.get("evaluated_at", iteration or -1)  # (older checkpoints: evaluated when saved)
            run_utils.set_rng_state(ckpt["rng"])
            print(f"resumed from {resume} at iteration {iteration} ({env_steps} env steps)")
    except run_utils.CheckpointError as e:
        sys.exit(f"error: {e}")
    run_utils.write_json(os.path.join(run_dir, "args.json"), asdict(args))
    logger = run_utils.MetricsLogger(run_dir, asdict(args), args.track, args.wandb_project_name, args.wandb_entity,
                                     f"{args.exp_name}__{task.suite}_task{task.local_id:02d}__{args.seed}")  # fmt: skip

    def checkpoint(name: str) -> None:
        run_utils.save_checkpoint(
            os.path.join(ckpt_dir, name),
            {"format": CKPT_FORMATS[0], "model": policy.state_dict(), "ema": None, "critic": critic.state_dict(),
             "optimizer": actor_opt.state_dict(), "critic_optimizer": critic_opt.state_dict(),
             "reward_scaler": scaler.state_dict(), "step": iteration,
             "env_steps": env_steps, "args": asdict(args), "config": cfg, "ppo_config": ppo_config(args),
             "normalizer": policy.ft.normalizer(), "rng": run_utils.rng_state(), "bc_ckpt": args.bc_ckpt,
             "rollout": rollout.state_dict(), "evaluated_at": evaluated_at},
            keep_previous=name == "latest.pt",
        )  # fmt: skip

    sampler = GraphedSampler(policy, args.noise_clip, args.min_std, args.cuda_graph)
    preprocess = policy.ft.obs_tensors  # normalised observation tensors on the device

    def act(obs_t, generators=None):
        if generators is None:  # lockstep: the batch's noise from the global RNG, in the (CUDA-graphed) sampler
            chain, actions = sampler(obs_t)
        else:  # pipelined: each row's noise from its env's own generator
            with torch.no_grad():
                chain, actions = policy.sample_chain(
                    obs_t, args.noise_clip, args.min_std, "sample", policy.noise_from(generators)
                )
        return actions.cpu().numpy(), {"chains": chain.cpu()}

    env_kwargs = dict(obs_mode=cfg["obs_mode"], image_size=cfg["image_size"], fast_step=args.fast_step)
    venv = ve.VectorLiberoEnv(task, args.num_envs, num_workers=args.num_workers, **env_kwargs)
    eval_venv = venv if args.eval_num_envs in (0, args.num_envs) else ve.VectorLiberoEnv(
        task, args.eval_num_envs, num_workers=args.num_workers, **env_kwargs)  # fmt: skip
    print(f"{args.num_envs} envs over {venv.num_workers} worker processes")
    rollout = Rollout(
        venv,
        preprocess,
        args.seed,
        render,
        success_reward_fn(args, task.max_steps, cfg["act_steps"]),
        args.train_layouts,
        args.pipeline,
    )
    if rollout_state is not None:
        rollout.load_state_dict(rollout_state)
    preemption = run_utils.Preemption()

    def run_eval(modes, episodes: int, record_mode: Optional[str] = None, partial_path: Optional[str] = None) -> dict:
        """{mode: stats} over the same protocol episodes (per-episode noise seeds; the training RNG is untouched); a
        pre-emption stops it within one chunk step (ve.Interrupted)."""
        policy.eval()
        out = evaluate_modes(eval_venv, policy.acting, modes, episodes, args.seed, cfg["act_steps"], record_mode,
                             lambda: preemption.requested, partial_path)  # fmt: skip
        if eval_venv is venv and not args.reset_at_iteration:  # the evaluation cut the training episodes short
            rollout.reset_all()
            scaler.reset()
        return out

    eval_modes = list(dict.fromkeys([args.eval_mode, "eta0"]))
    if eval_due(args, iteration) and evaluated_at != iteration:  # the BC start, or an evaluation cut short
        evaluated_at = in_run_evaluation(
            run_eval, eval_modes, logger, iteration, env_steps, args, checkpoint, preemption
        )
    while iteration < args.num_iterations:
        timers = {"env": 0.0, "policy": 0.0, "update": 0.0}
        noise_scale = noise_scale_at(vars(args), iteration)
        if noise_scale != sched.noise_scale:  # --noise-scale-final from here on (or again after a resume)
            sched.noise_scale = noise_scale
            sampler.graphs.clear()  # the captured graphs hold the old scale
            print(f"iteration {iteration + 1}: noise scale {noise_scale:g} from here on")
        for group in actor_opt.param_groups:
            group["lr"] = actor_lr_at(vars(args), iteration)
        # ALGO LOGIC: rollout with the stochastic denoising chain (the whole chain is stored)
        policy.eval()
        if args.reset_at_iteration:
            scaler.reset()  # every episode's running return starts with it
        batch = rollout.collect(num_steps, act, timers, reset=args.reset_at_iteration)
        T, E = batch["rewards"].shape
        env_steps += T * E * cfg["act_steps"]
        raw_rewards = batch["rewards"].clone()
        if args.reward_scale:
            dones = (batch["terminated"] + batch["truncated"]).clamp(max=1).numpy().astype(bool)
            batch["rewards"] = torch.as_tensor(scaler(batch["rewards"].numpy(), dones), dtype=torch.float32)
        # ALGO LOGIC: GAE at chunk level; success and time-out terminal, an episode cut by the iteration bootstraps
        t0 = time.perf_counter()
        obs = to_device({k: v.flatten(0, 1) for k, v in batch["obs"].items()}, device)  # once per iteration
        values, next_values = bootstrap_values(batch, obs, critic, args.minibatch_size, device)
        advantages, returns = gae(batch["rewards"], values, next_values, batch["terminated"], batch["truncated"],
                                  args.gamma, args.gae_lambda)  # fmt: skip
        # ALGO LOGIC: PPO update over (env step, denoising step) pairs
        policy.train()
        flat = {
            "obs": obs,
            "chains": batch["extras"]["chains"].flatten(0, 1),
            "advantages": advantages.flatten(),
            "returns": returns.flatten(),
        }
        train_actor = iteration >= args.critic_warmup_iters
        stats, bad = ppo_update(policy, critic, flat, args, (actor_opt, critic_opt), train_actor, device)
        timers["update"] = time.perf_counter() - t0
        iteration += 1
        if bad:
            bad_updates += 1
            print(f"iteration {iteration}: update skipped, non-finite {bad} ({bad_updates} in a row)")
            logger.log(iteration, skipped_update=1, nonfinite=bad, env_steps=env_steps)
            if bad_updates >= args.max_bad_updates:
                logger.close()
                sys.exit(f"error: {bad_updates} consecutive updates had non-finite {bad}; stopped with the last good "
                         f"checkpoint in {ckpt_dir}.")  # fmt: skip
            if preemption.requested:  # no non-finite step was applied, so the weights are safe to save
                checkpoint("latest.pt")
                preemption.exit()
            continue
        bad_updates = 0
        n_eps = len(rollout.episode_returns)
        logger.log(
            iteration, env_steps=env_steps, actor_lr=actor_opt.param_groups[0]["lr"], noise_scale=noise_scale,
            reward_mean=raw_rewards.mean().item(),
            train_success_rate=float(np.mean(rollout.episode_returns)) if n_eps else float("nan"),
            train_episode_length=float(np.mean(rollout.episode_lengths)) if n_eps else float("nan"),
            value_mean=values.mean().item(), explained_variance=explained_variance(values, returns),
            env_s=timers["env"], policy_s=timers["policy"], update_s=timers["update"], **stats,
        )  # fmt: skip
        print(f"iteration {iteration}: train success {np.mean(rollout.episode_returns) if n_eps else float('nan'):.3f} "
              f"({n_eps} episodes), ev {explained_variance(values, returns):.2f}, kl {stats.get('approx_kl', 0):.4f}, "
              f"clipfrac {stats.get('clipfrac', 0):.2f}, env {timers['env']:.0f}s policy {timers['policy']:.0f}s "
              f"update {timers['update']:.0f}s")  # fmt: skip
        rollout.episode_returns, rollout.episode_lengths = [], []
        if eval_due(args, iteration):
            evaluated_at = in_run_evaluation(run_eval, eval_modes, logger, iteration, env_steps, args, checkpoint,
                                             preemption)  # fmt: skip
        if iteration % args.save_every == 0 or preemption.requested:
            checkpoint("latest.pt")
        if preemption.requested:
            preemption.exit()
    checkpoint("latest.pt")
    checkpoint("final.pt")
    final_path = os.path.join(run_dir, "final_eval.json")
    if args.final_eval_episodes > 0 and not os.path.exists(final_path):
        # ALGO LOGIC: every action mode over the same episodes, and how consistent the evaluated mode's actions are
        print(f"final evaluation: {', '.join(ACTION_MODES)} over {args.final_eval_episodes} protocol episodes")
        partial = os.path.join(run_dir, "final_eval.partial.json")  # the modes finished before a pre-emption
        try:
            results = run_eval(ACTION_MODES, args.final_eval_episodes, args.eval_mode, partial)
        except ve.Interrupted:
            preemption.exit()  # final.pt is written: the resumed run only evaluates the modes missing from partial
        write_final_evaluation(final_path, logger, results, iteration, env_steps, args)
        os.remove(partial)
    venv.close()
    if eval_venv is not venv:
        eval_venv.close()
    logger.close()
    print(f"done: {iteration} iterations, {env_steps} env steps; checkpoints in {ckpt_dir}")
