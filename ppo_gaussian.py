"""ppo_gaussian.py — the Gaussian-policy baseline: same encoder, observation and procedure as the diffusion policy.

A head maps the observation features to the mean of the executed action chunk (act_steps x 7, tanh-squashed in
the normalised action space), with a learned state-independent log-std. It is warm-started by behaviour cloning
on the same demos with bc_diffusion.py's recipe (MSE on the mean; the same optimiser, schedule, EMA and steps),
then fine-tuned with PPO at the chunk level: one likelihood ratio per chunk, r = exp(log pi(a|s) - log pi_old(a|s)),
with log pi clamped per element and averaged over the chunk exactly as ppo_diffusion.py's denoising log-probs, the
same clip, optimiser settings and gradient steps per iteration. Rollouts, GAE, reward scaling and evaluation are
ppo_core.py's and the critic is ppo_diffusion.py's, the same code for both classes ("the same architecture and
training procedure"; tests/test_ppo_gaussian.py fails if the two scripts' shared defaults drift apart). Its data
is the paper's "Gaussian RL data".

    python ppo_gaussian.py --suite libero_object --task-id 0 --obs-mode state --num-envs 50
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

import demo_hdf5
import libero_env as le
import run_utils
import vector_env as ve
from networks import ObsEncoder, PolicyBase, mlp
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

CKPT_FORMATS = ("ppo_gaussian/v2", "ppo_gaussian/v1")  # v1 (critic without time): its actor still loads

ARCH_FIELDS = (
    "obs_mode", "image_size", "encoder", "encoder_head", "shared_encoder", "num_keypoints", "feature_dim",
    "state_encoder_dims", "act_steps", "head_dims",
)  # fmt: skip


@dataclass
class Args:
    exp_name: str = "ppo_gaussian"
    """name of this experiment (wandb run name)"""
    seed: int = 0
    """seed of the run"""
    torch_deterministic: bool = True
    """cudnn deterministic mode"""
    cuda: bool = True
    """use CUDA when available"""
    fast_step: bool = True
    """step the simulator on libero_env's fast path (as ppo_diffusion.py; --no-fast-step: robosuite's own loop)"""
    track: bool = False
    """log to wandb (metrics.jsonl is always written)"""
    wandb_project_name: str = "diffusion-rl-libero"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""

    # task and demos (the BC warm start)
    suite: str = "all"
    """libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | all (then --task-id is global)"""
    task_id: int = 10
    """task index (global 0-129 with --suite all, else within the suite)"""
    data_root: str = "data"
    """root of data/<source>/<suite>/<task_name>_demo.hdf5"""
    demo_source: str = "scripted"
    """source of the BC demos by the data convention"""
    demo_paths: Optional[list[str]] = None
    """explicit HDF5 files (overrides --demo-source)"""
    num_demos: Optional[int] = None
    """use only the first N demos of each file"""
    run_root: str = "runs"
    """root of runs/ppo_gaussian/<suite>/task<NN>__seed<S>/"""
    resume: str = "auto"
    """auto: continue from checkpoints/latest.pt if present; never; or a checkpoint path"""

    # architecture (the encoder options are bc_diffusion.py's)
    obs_mode: Literal["rgb", "state"] = "rgb"
    """rgb: both cameras + proprio; state: LIBERO's object-state vector + proprio"""
    image_size: int = 128
    """camera images are resized to this"""
    random_shift: int = 8
    """random-shift augmentation during BC (pixels; 0 disables)"""
    encoder: Literal["resnet18", "vit"] = "resnet18"
    """image encoder"""
    encoder_head: Literal["spatial_softmax", "avgpool"] = "spatial_softmax"
    """ResNet head"""
    shared_encoder: bool = True
    """one image encoder for both cameras"""
    num_keypoints: int = 32
    """spatial-softmax keypoints per camera"""
    feature_dim: int = 64
    """feature size per camera (or of the object-state encoder)"""
    state_encoder_dims: tuple[int, ...] = (256, 256)
    """object-state MLP encoder"""
    head_dims: tuple[int, ...] = (512, 512)
    """hidden sizes of the mean head"""
    act_steps: int = 8
    """actions per chunk (executed open loop)"""
    init_log_std: float = -2.3
    """initial log-std of the normalised action (exp(-2.3) = 0.1, the diffusion policy's std floor)"""

    # BC warm start: bc_diffusion.py's recipe (its --total-steps, --batch-size, --lr, --betas, ...)
    bc_steps: int = 20_000
    """gradient steps of the BC warm start (MSE on the mean)"""
    bc_batch_size: int = 64
    """BC batch size"""
    bc_lr: float = 1e-4
    """BC peak learning rate (AdamW, cosine with warm-up)"""
    bc_betas: tuple[float, float] = (0.95, 0.999)
    """BC AdamW betas"""
    bc_weight_decay: float = 1e-6
    """BC AdamW weight decay"""
    bc_warmup_steps: int = 500
    """BC linear warm-up steps"""
    bc_grad_clip: float = 1.0
    """BC max gradient norm (0 disables)"""
    bc_ema_power: float = 0.75
    """EMA decay ramp 1 - (1 + step)^-power; PPO starts from the EMA weights, as ppo_diffusion from BC's"""
    bc_ema_max_decay: float = 0.9999
    """EMA decay ceiling"""

    # PPO (rollout machinery and defaults as ppo_diffusion.py)
    num_envs: int = 50
    """parallel environments"""
    num_workers: int = 0
    """environment worker processes the envs are grouped over (0: one per CPU core, at most --num-envs)"""
    pipeline: bool = False
    """step every worker's envs on their own, the policy computing for one worker's envs while the others step,
    instead of all envs in lockstep; per-env seed and noise streams (ppo_core.Rollout)"""
    batch_chunks: int = 15_000
    """env steps (chunks) per iteration over all envs, kept constant when --num-envs changes"""
    num_steps: Optional[int] = None
    """chunk steps per env per iteration (default: batch_chunks // num_envs)"""
    num_iterations: int = 100
    """PPO iterations"""
    reset_at_iteration: bool = True
    """start every iteration from fresh episodes (as ppo_diffusion.py: exact resumes, no episode cut)"""
    train_layouts: Literal["sampled", "protocol"] = "sampled"
    """where training episodes start: sampled, layouts LIBERO's placement initializer draws from each episode's seed
    (never one of the protocol's 50 init states, which the evaluations hold out); protocol, the 50 themselves (as
    runs before the layout split did)"""
    gamma: float = 0.999
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.01
    """PPO clip (small, as for the diffusion policy's action step: fine-tuning, not learning from scratch)"""
    update_epochs: int = 10
    """epochs per iteration"""
    minibatch_size: int = 3000
    """chunks per gradient step: ppo_diffusion's 15,000 (env step, denoising step) pairs over its 5 fine-tuned
    steps, so both take the same number of gradient steps per iteration"""
    logprob_clip: tuple[float, float] = (-5.0, 2.0)
    """per-element clamp of the log-probs (averaged over the chunk, as the denoising log-probs)"""
    vf_coef: float = 0.5
    """value-loss weight"""
    ent_coef: float = 0.0
    """entropy bonus"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the actor and the critic apart (0 disables)"""
    target_kl: Optional[float] = 1.0
    """stop the epochs of an iteration once the approximate KL exceeds this"""
    critic_warmup_iters: int = 2
    """iterations that train only the critic"""
    actor_lr: float = 1e-4
    """actor learning rate (ppo_diffusion.py's)"""
    actor_lr_min: float = 1e-5
    """end of the cosine decay (--no-constant-lr or --actor-lr-decay-start)"""
    constant_lr: bool = True
    """hold the actor learning rate; --no-constant-lr: cosine annealing to --actor-lr-min"""
    actor_lr_decay_start: float = 1.0
    """fraction of --num-iterations after which the held actor LR decays (cosine to --actor-lr-min; 1.0: never)"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay of both PPO optimisers"""
    reward_scale: bool = True
    """divide rewards by a running std of the discounted return"""
    reward_clip: float = 10.0
    """clip the scaled rewards to +-this (DPPO)"""
    reward_until_limit: bool = False
    """a success pays its reward for every chunk left until the step limit (ppo_diffusion.py's flag)"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP head"""
    max_bad_updates: int = 5
    """stop after this many consecutive updates skipped for non-finite values"""

    # evaluation, logging
    eval_mode: Literal["sample", "mean"] = "mean"
    """how the policy acts in evaluations, and by default in collect.py / evaluate.py: mean, its mean chunk (as
    ppo_diffusion.py's --eval-mode); sample, the stochastic policy PPO trains"""
    eval_every: int = 10
    """iterations between evaluations (0: only at the end), in --eval-mode and with the other mode beside it"""
    eval_episodes: int = 50
    """protocol episodes per evaluation (init states 0..N-1, each with its own noise seed; 0 disables)"""
    final_eval_episodes: int = 200
    """at the end: both action modes over the same N protocol episodes, and the spread of --eval-mode's actions
    across its successful trajectories (0 disables)"""
    save_every: int = 1
    """iterations between latest.pt checkpoints"""
    log_every: int = 100
    """BC steps between metrics lines"""


class GaussianPolicy(PolicyBase):
    """pi(a | s) = N(tanh(head(encoder(s))), exp(log_std)^2) over the flattened normalised chunk (act_steps x 7)."""

    def __init__(self, cfg: dict, init_log_std: float = -2.3):
        super().__init__(cfg)
        self.encoder = ObsEncoder(cfg)
        self.dim = cfg["act_steps"] * le.ACTION_DIM
        self.head = mlp([self.encoder.out_dim, *cfg["head_dims"], self.dim])
        self.log_std = nn.Parameter(torch.full((self.dim,), float(init_log_std)))

    def dist(self, obs_t: dict) -> torch.distributions.Normal:
        mean = torch.tanh(self.head(self.encoder(obs_t)))
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean), validate_args=False)

    def to_actions(self, a_norm: torch.Tensor) -> torch.Tensor:
        """Flattened normalised chunk -> (B, act_steps, 7) in environment units (clamped to the data range)."""
        return self.unnormalize_actions(a_norm.clamp(-1, 1).view(-1, self.cfg["act_steps"], le.ACTION_DIM))

    @torch.no_grad()
    def act(self, obs: dict, deterministic: bool = True, generators: Optional[list] = None) -> np.ndarray:
        """The mean chunk, or a sample; ``generators``: one CPU generator per row (its episode's noise stream), else
        the global RNG draws."""
        d = self.dist(self.obs_tensors(obs))
        if deterministic:
            return self.to_actions(d.mean).cpu().numpy()
        if generators is None:
            z = torch.randn(d.mean.shape)
        else:
            z = torch.stack([torch.randn(self.dim, generator=g) for g in generators])
        return self.to_actions(d.mean + d.stddev * z.to(d.mean)).cpu().numpy()

    def acting(self, mode: str):
        """``act`` in ``mode`` (sample | mean; eta0 is the mean) as the ``act(obs, generators)`` of evaluation."""
        return lambda obs, generators: self.act(obs, mode != "sample", generators)


def chunk_logprob(d: torch.distributions.Normal, a: torch.Tensor, clip: tuple[float, float]) -> torch.Tensor:
    """log pi(a | s) of a flattened chunk, clamped per element and averaged over its act_steps x 7 elements: the
    scale of ppo_diffusion's denoising log-probs, so the same PPO clip and target KL bind alike (a sum over the 56
    elements made the log-ratio 56x larger)."""
    return d.log_prob(a).clamp(*clip).mean(-1)  # (B,)


def load_policy(path: str, device="cpu") -> GaussianPolicy:
    ckpt = run_utils.load_checkpoint(path, CKPT_FORMATS)
    policy = GaussianPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["model"])
    return policy.to(device).eval()


def gaussian_ppo_update(policy: GaussianPolicy, critic, batch: dict, args, optimizers, train_actor: bool, device):
    """CleanRL's PPO epochs over chunks; same contract as ppo_diffusion.ppo_update (stats, skip reason)."""
    bad = check_finite({"advantages": batch["advantages"], "returns": batch["returns"]})
    if bad:
        return {}, bad
    # the whole iteration goes to the device once (not once per minibatch); minibatches are gathered there
    obs, actions = to_device(batch["obs"], device), batch["actions"].to(device)
    advantages, returns = batch["advantages"].to(device), batch["returns"].to(device)
    N = len(advantages)

    def forward(idx):
        obs_t = index_obs(obs, idx)
        d = policy.dist(obs_t)
        return chunk_logprob(d, actions[idx], args.logprob_clip), d.entropy().mean(-1), obs_t

    with torch.no_grad():
        logp_old = torch.cat([forward(torch.arange(s, min(s + args.minibatch_size, N), device=device))[0]
                              for s in range(0, N, args.minibatch_size)])  # fmt: skip
    actor_opt, critic_opt = optimizers
    actor_params = [p for p in policy.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    stats = {k: [] for k in ("pg_loss", "v_loss", "approx_kl", "clipfrac", "entropy", "ratio_first",
                             "actor_grad_norm", "critic_grad_norm")}  # fmt: skip
    stop = False
    for epoch in range(args.update_epochs):
        for j, mb in enumerate(minibatches(N, args.minibatch_size, device)):
            logp_new, entropy, obs_t = forward(mb)
            log_ratio = logp_new - logp_old[mb]
            ratio = log_ratio.exp()
            adv = normalize_advantages(advantages[mb])
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            v_loss = 0.5 * ((critic(obs_t) - returns[mb]) ** 2).mean()
            loss = (pg_loss - args.ent_coef * entropy.mean() if train_actor else 0.0) + args.vf_coef * v_loss
            with torch.no_grad():
                approx_kl = ((ratio - 1) - log_ratio).mean()
            if epoch == 0 and j == 0:
                stats["ratio_first"].append((ratio - 1).abs().max())
            bad = check_finite({"loss": loss, "ratio": ratio})
            if bad:
                return mean_stats(stats), bad
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad.norm() for p in actor_params + critic_params if p.grad is not None]
            if grads and check_finite({"gradient": torch.stack(grads)}):
                return mean_stats(stats), "gradient"
            max_norm = args.max_grad_norm or float("inf")  # actor and critic clipped apart, as in ppo_diffusion
            if train_actor:
                stats["actor_grad_norm"].append(nn.utils.clip_grad_norm_(actor_params, max_norm))
                actor_opt.step()
            stats["critic_grad_norm"].append(nn.utils.clip_grad_norm_(critic_params, max_norm))
            critic_opt.step()
            for key, value in (("pg_loss", pg_loss), ("v_loss", v_loss), ("approx_kl", approx_kl),
                               ("entropy", entropy.mean())):  # fmt: skip
                stats[key].append(value.detach())
            stats["clipfrac"].append(((ratio - 1).abs() > args.clip_coef).float().mean().detach())
            if args.target_kl is not None and train_actor and approx_kl.item() > args.target_kl:
                stop = True
                break
        if stop:
            break
    return {**mean_stats(stats), "epochs": epoch + 1}, None


# ================================================================================================================
if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        le.check_task_args(args.suite, args.task_id)
        task = le.resolve_task(args.suite, args.task_id)
        demo_hdf5.find_demo_files(args.demo_paths, args.data_root, args.demo_source, args.suite, args.task_id)
        ve.check_memory(args.num_envs, args.num_workers or None)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    num_steps = args.num_steps or max(1, args.batch_chunks // args.num_envs)
    print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'")
    run_dir = run_utils.task_run_dir(args.run_root, "ppo_gaussian", task.suite, task.local_id, args.seed)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    run_utils.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # Data, model, optimisers
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(args, k)) for k in ARCH_FIELDS)}
    cfg["horizon"] = args.act_steps  # BC chunks are exactly the executed chunk
    paths = demo_hdf5.find_demo_files(args.demo_paths, args.data_root, args.demo_source, args.suite, args.task_id)
    dataset = demo_hdf5.load_chunk_dataset(paths, args.obs_mode, args.image_size, args.act_steps, args.num_demos)
    dataset.to(device)  # BC batches are gathered and augmented on the training device
    cfg["object_state_dim"] = dataset.obs["object_state"].shape[1] if args.obs_mode == "state" else 0
    policy = GaussianPolicy(cfg, args.init_log_std)
    policy.fit_normalizer(dataset.actions, dataset.obs["proprio"], dataset.obs.get("object_state"))
    policy.to(device)
    critic = Critic(cfg, args.critic_hidden).to(device)
    print(f"data: {dataset.num_demos} demos from {paths}; policy {run_utils.count_parameters(policy) / 1e6:.2f}M, "
          f"critic {run_utils.count_parameters(critic) / 1e6:.2f}M parameters")  # fmt: skip
    # BC: bc_diffusion.py's optimiser, schedule and EMA
    bc_opt = torch.optim.AdamW(
        policy.parameters(), lr=args.bc_lr, betas=args.bc_betas, weight_decay=args.bc_weight_decay
    )
    bc_sched = torch.optim.lr_scheduler.LambdaLR(
        bc_opt, run_utils.cosine_with_warmup(args.bc_warmup_steps, args.bc_steps)
    )
    ema = run_utils.EMA(policy, args.bc_ema_power, args.bc_ema_max_decay)
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=args.actor_lr, weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    scaler = RunningRewardScaler(args.num_envs, args.gamma, args.reward_clip)
    generator = torch.Generator().manual_seed(args.seed)
    bc_step, iteration, env_steps, bad_updates, rollout_state = 0, 0, 0, 0, None
    evaluated_at = -1  # the iteration of the last finished in-run evaluation (a pre-emption may cut one short)
    modules = {"model": policy, "ema": ema.model, "critic": critic, "bc_optimizer": bc_opt, "bc_scheduler": bc_sched,
               "optimizer": actor_opt, "critic_optimizer": critic_opt,
               "reward_scaler": scaler}  # fmt: skip

    try:
        resume = run_utils.resume_path(args.resume, ckpt_dir)
        if resume is not None:
            ckpt = run_utils.load_checkpoint(resume, CKPT_FORMATS[:1])
            check_resumed_layouts(resume, ckpt["args"], args.train_layouts)
            run_utils.check_same_architecture(resume, ckpt["config"], cfg)
            for name, module in modules.items():
                if ckpt.get(name) is not None:  # (runs from before the BC EMA hold none)
                    module.load_state_dict(ckpt[name])
            bc_step, iteration, env_steps = ckpt["bc_step"], ckpt["step"], ckpt["env_steps"]
            evaluated_at = ckpt.get("evaluated_at", iteration or -1)  # (older checkpoints: evaluated when saved)
            rollout_state = ckpt.get("rollout")
            run_utils.set_rng_state(ckpt["rng"])
            generator.set_state(ckpt["rng"]["generator"])
            print(f"resumed from {resume} at BC step {bc_step}, PPO iteration {iteration}")
    except run_utils.CheckpointError as e:
        sys.exit(f"error: {e}")
    run_utils.write_json(os.path.join(run_dir, "args.json"), asdict(args))
    logger = run_utils.MetricsLogger(run_dir, asdict(args), args.track, args.wandb_project_name, args.wandb_entity,
                                     f"{args.exp_name}__{task.suite}_task{task.local_id:02d}__{args.seed}")  # fmt: skip

    def checkpoint(name: str) -> None:
        rng = run_utils.rng_state()
        rng["generator"] = generator.get_state()
        state = {k: m.state_dict() for k, m in modules.items()}
        run_utils.save_checkpoint(
            os.path.join(ckpt_dir, name),
            {"format": CKPT_FORMATS[0], **state, "step": iteration, "bc_step": bc_step,
             "env_steps": env_steps, "args": asdict(args), "config": cfg, "normalizer": policy.normalizer(),
             "rng": rng, "rollout": rollout.state_dict() if rollout is not None else None,
             "evaluated_at": evaluated_at},
            keep_previous=name == "latest.pt",
        )  # fmt: skip

    preemption = run_utils.Preemption()
    rollout = None  # the PPO phase's (its state goes into the checkpoints from then on)

    # ALGO LOGIC: behaviour-cloning warm start (MSE on the mean chunk)
    if bc_step < args.bc_steps:
        bar = tqdm(total=args.bc_steps, initial=bc_step, desc="bc", unit="step")
        policy.train()
        while bc_step < args.bc_steps:
            obs, actions = dataset.sample(args.bc_batch_size, generator, shift=args.random_shift)
            obs = policy.normalize_obs(obs)
            target = policy.normalize_actions(actions).flatten(1)
            loss = ((torch.tanh(policy.head(policy.encoder(obs))) - target) ** 2).mean()
            bc_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), args.bc_grad_clip or float("inf"))
            bc_opt.step()
            bc_sched.step()
            ema.update(policy, bc_step)
            bc_step += 1
            bar.update(1)
            if bc_step % args.log_every == 0 or bc_step == args.bc_steps:
                logger.log(0, bc_step=bc_step, bc_loss=loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if preemption.requested:
                checkpoint("latest.pt")
                preemption.exit()
        bar.close()
        policy.load_state_dict(ema.model.state_dict())  # PPO starts from the EMA weights, as ppo_diffusion does
        checkpoint("bc.pt")  # the BC start, for evaluate.py (ppo_diffusion's is bc_diffusion's final.pt)
        checkpoint("latest.pt")

    venv = ve.VectorLiberoEnv(task, args.num_envs, obs_mode=args.obs_mode, image_size=args.image_size,
                              fast_step=args.fast_step, num_workers=args.num_workers)  # fmt: skip
    render = args.obs_mode == "rgb"
    preprocess = policy.obs_tensors

    def act(obs_t, generators=None):  # generators: one per row when pipelined (its env's noise stream)
        with torch.no_grad():
            d = policy.dist(obs_t)
            if generators is None:
                a_norm = d.sample()
            else:
                z = torch.stack([torch.randn(d.mean.shape[1:], generator=g) for g in generators]).to(d.mean)
                a_norm = d.mean + d.stddev * z
        return policy.to_actions(a_norm).cpu().numpy(), {"actions": a_norm.cpu()}

    def run_eval(modes, episodes: int, record_mode: Optional[str] = None, partial_path: Optional[str] = None) -> dict:
        """{mode: stats} over the same protocol episodes (per-episode noise seeds; the training RNG is untouched); a
        pre-emption stops it within one chunk step (ve.Interrupted)."""
        policy.eval()
        out = evaluate_modes(venv, policy.acting, modes, episodes, args.seed, cfg["act_steps"], record_mode,
                             lambda: preemption.requested, partial_path)  # fmt: skip
        if not args.reset_at_iteration:  # the evaluation cut the training episodes short
            rollout.reset_all()
            scaler.reset()
        return out

    eval_modes = list(dict.fromkeys([args.eval_mode, "sample"]))
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
    if eval_due(args, iteration) and evaluated_at != iteration:  # the BC start, or an evaluation cut short
        evaluated_at = in_run_evaluation(
            run_eval, eval_modes, logger, iteration, env_steps, args, checkpoint, preemption
        )
    while iteration < args.num_iterations:
        timers = {"env": 0.0, "policy": 0.0, "update": 0.0}
        for group in actor_opt.param_groups:
            group["lr"] = actor_lr_at(vars(args), iteration)
        # ALGO LOGIC: rollout, GAE, PPO update (chunk-level)
        policy.eval()
        if args.reset_at_iteration:
            scaler.reset()
        batch = rollout.collect(num_steps, act, timers, reset=args.reset_at_iteration)
        T, E = batch["rewards"].shape
        env_steps += T * E * args.act_steps
        raw_rewards = batch["rewards"].clone()
        if args.reward_scale:
            dones = (batch["terminated"] + batch["truncated"]).clamp(max=1).numpy().astype(bool)
            batch["rewards"] = torch.as_tensor(scaler(batch["rewards"].numpy(), dones), dtype=torch.float32)
        t0 = time.perf_counter()
        obs = to_device({k: v.flatten(0, 1) for k, v in batch["obs"].items()}, device)  # once per iteration
        values, next_values = bootstrap_values(batch, obs, critic, args.minibatch_size, device)
        advantages, returns = gae(batch["rewards"], values, next_values, batch["terminated"], batch["truncated"],
                                  args.gamma, args.gae_lambda)  # fmt: skip
        flat = {"obs": obs,
                "actions": batch["extras"]["actions"].flatten(0, 1), "advantages": advantages.flatten(),
                "returns": returns.flatten()}  # fmt: skip
        policy.train()
        train_actor = iteration >= args.critic_warmup_iters
        stats, bad = gaussian_ppo_update(policy, critic, flat, args, (actor_opt, critic_opt), train_actor, device)
        timers["update"] = time.perf_counter() - t0
        iteration += 1
        if bad:
            bad_updates += 1
            print(f"iteration {iteration}: update skipped, non-finite {bad} ({bad_updates} in a row)")
            logger.log(iteration, skipped_update=1, nonfinite=bad, env_steps=env_steps)
            if bad_updates >= args.max_bad_updates:
                sys.exit(f"error: {bad_updates} consecutive updates had non-finite {bad}; stopped with the last good "
                         f"checkpoint in {ckpt_dir}.")  # fmt: skip
            if preemption.requested:  # no non-finite step was applied, so the weights are safe to save
                checkpoint("latest.pt")
                preemption.exit()
            continue
        bad_updates = 0
        n_eps = len(rollout.episode_returns)
        train_success = float(np.mean(rollout.episode_returns)) if n_eps else float("nan")
        logger.log(iteration, env_steps=env_steps, actor_lr=actor_opt.param_groups[0]["lr"],
                   reward_mean=raw_rewards.mean().item(), train_success_rate=train_success,
                   train_episode_length=float(np.mean(rollout.episode_lengths)) if n_eps else float("nan"),
                   log_std=policy.log_std.mean().item(), value_mean=values.mean().item(),
                   explained_variance=explained_variance(values, returns), env_s=timers["env"],
                   policy_s=timers["policy"], update_s=timers["update"], **stats)  # fmt: skip
        print(f"iteration {iteration}: train success {train_success:.3f} ({n_eps} episodes), "
              f"ev {explained_variance(values, returns):.2f}, kl {stats.get('approx_kl', 0):.4f}")  # fmt: skip
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
        print(f"final evaluation: sample, mean over {args.final_eval_episodes} protocol episodes")
        partial = os.path.join(run_dir, "final_eval.partial.json")  # the modes finished before a pre-emption
        try:
            results = run_eval(("sample", "mean"), args.final_eval_episodes, args.eval_mode, partial)
        except ve.Interrupted:
            preemption.exit()  # final.pt is written: the resumed run only evaluates the modes missing from partial
        write_final_evaluation(final_path, logger, results, iteration, env_steps, args)
        os.remove(partial)
    venv.close()
    logger.close()
    print(f"done: BC {bc_step} steps, PPO {iteration} iterations, {env_steps} env steps; checkpoints in {ckpt_dir}")
