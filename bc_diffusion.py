"""bc_diffusion.py — phase 1: behaviour-cloning warm start of a diffusion policy on a few LIBERO demonstrations.

The policy (Diffusion Policy, Chi et al. 2023; DPPO, Ren et al. 2024): a ResNet-18 image encoder with GroupNorm
and a spatial-softmax head per camera, whose features and the 8-d proprioception condition a 1-D U-Net over the
action chunk through FiLM. Training minimises the DDPM epsilon-prediction loss (eq. 1):

    L = E_{k ~ U{0..K-1}, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_k) a0 + sqrt(1 - abar_k) eps, k, s) ||^2

with K = 100 cosine ("squaredcos_cap_v2") steps. Sampling uses DDIM (5 steps by default, eta = 0 for
deterministic evaluation) or DDPM. ppo_diffusion.py fine-tunes this network; collect.py and evaluate.py call
``DiffusionPolicy.act``. The encoders and the data normaliser, shared with the Gaussian baseline, are networks.py's.

    python bc_diffusion.py --suite libero_object --task-id 0 --demo-source scripted --num-demos 20
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import demo_hdf5
import libero_env as le
import run_utils
import vector_env as ve
from networks import ObsEncoder, PolicyBase, mlp

ARCH_FIELDS = (
    "obs_mode", "image_size", "encoder", "encoder_head", "shared_encoder", "num_keypoints", "feature_dim",
    "state_encoder_dims", "denoiser", "unet_down_dims", "unet_kernel_size", "step_embed_dim", "mlp_dims",
    "horizon", "act_steps", "num_train_timesteps",
)  # fmt: skip


@dataclass
class Args:
    exp_name: str = "bc_diffusion"
    """name of this experiment (wandb run name)"""
    seed: int = 0
    """seed of the run (data sampling, noise, initialisation)"""
    torch_deterministic: bool = True
    """cudnn deterministic mode"""
    cuda: bool = True
    """train on CUDA when available"""
    track: bool = False
    """log to wandb (metrics.jsonl is always written)"""
    wandb_project_name: str = "diffusion-rl-libero"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""

    # task and data
    suite: str = "all"
    """libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | all (then --task-id is global)"""
    task_id: int = 10
    """task index (global 0-129 with --suite all, else within the suite)"""
    data_root: str = "data"
    """root of data/<source>/<suite>/<task_name>_demo.hdf5"""
    demo_source: str = "scripted"
    """source of the demos by the data convention (human | scripted | ...)"""
    demo_paths: Optional[list[str]] = None
    """explicit HDF5 files (overrides --demo-source)"""
    num_demos: Optional[int] = None
    """use only the first N demos of each file (the paper warm-starts on a few)"""
    run_root: str = "runs"
    """root of runs/bc_diffusion/<suite>/task<NN>__seed<S>/"""
    resume: str = "auto"
    """auto: continue from checkpoints/latest.pt if present; never; or a checkpoint path"""

    # observation and architecture
    obs_mode: Literal["rgb", "state"] = "rgb"
    """rgb: both cameras + proprio; state: LIBERO's object-state vector + proprio (no rendering)"""
    image_size: int = 128
    """camera images are resized to this (square)"""
    random_shift: int = 8
    """random-shift augmentation: pad by this many pixels and crop back (0 disables)"""
    encoder: Literal["resnet18", "vit"] = "resnet18"
    """image encoder: ResNet-18 with GroupNorm, or a small ViT (the paper's encoder ablation)"""
    encoder_head: Literal["spatial_softmax", "avgpool"] = "spatial_softmax"
    """ResNet head: spatial-softmax keypoints or global average pooling"""
    shared_encoder: bool = True
    """one image encoder for both cameras (off: one per camera)"""
    num_keypoints: int = 32
    """spatial-softmax keypoints per camera"""
    feature_dim: int = 64
    """feature size per camera (or of the object-state encoder)"""
    state_encoder_dims: tuple[int, ...] = (256, 256)
    """hidden sizes of the object-state MLP encoder (--obs-mode state)"""
    denoiser: Literal["unet", "mlp"] = "unet"
    """noise predictor: FiLM-conditioned 1-D U-Net, or an MLP (the paper's denoiser ablation)"""
    unet_down_dims: tuple[int, ...] = (32, 64, 128)
    """U-Net channel widths per resolution"""
    unet_kernel_size: int = 5
    """U-Net temporal convolution kernel"""
    step_embed_dim: int = 64
    """diffusion-step embedding size"""
    mlp_dims: tuple[int, ...] = (512, 512, 512)
    """hidden sizes of the MLP denoiser"""
    horizon: int = 16
    """predicted action-chunk length"""
    act_steps: int = 8
    """actions of each chunk executed before re-planning"""
    num_train_timesteps: int = 100
    """K, diffusion steps of the training schedule (cosine betas)"""

    # optimisation
    total_steps: int = 20_000
    """gradient steps"""
    batch_size: int = 64
    """samples per gradient step"""
    lr: float = 1e-4
    """AdamW peak learning rate"""
    betas: tuple[float, float] = (0.95, 0.999)
    """AdamW betas"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    warmup_steps: int = 500
    """linear warm-up steps before the cosine decay"""
    grad_clip: float = 1.0
    """max gradient norm (0 disables)"""
    ema_power: float = 0.75
    """EMA decay ramp 1 - (1 + step)^-power (Diffusion Policy)"""
    ema_max_decay: float = 0.9999
    """EMA decay ceiling"""
    amp: bool = True
    """bf16 autocast on CUDA"""
    compile: bool = False
    """torch.compile the training loss"""

    # logging, checkpoints, evaluation
    log_every: int = 100
    """steps between metrics lines"""
    save_every: int = 2_000
    """steps between latest.pt checkpoints"""
    eval_every: int = 5_000
    """steps between evaluation rollouts (0 disables; the final step is always evaluated when eval_episodes > 0)"""
    eval_episodes: int = 10
    """protocol episodes per evaluation (init states 0..N-1; 0 disables evaluation)"""
    eval_num_envs: int = 2
    """parallel environment workers for evaluation"""
    eval_ddim_steps: int = 5
    """DDIM steps of the deterministic evaluation sampler"""


# ================================================================================================================
# Noise schedule and samplers (epsilon prediction; timesteps 0..K-1 as in diffusers)
# ================================================================================================================
def cosine_betas(K: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2"), float64."""

    def abar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / K) / abar(i / K), max_beta) for i in range(K)], dtype=torch.float64)


def ddim_timesteps(K: int, num_steps: int) -> list[int]:
    """Evenly spaced ("leading") timesteps, noisiest first: K=100, 5 steps -> [80, 60, 40, 20, 0]."""
    return list(range(0, K, K // num_steps))[:num_steps][::-1]


def ddpm_loss(model: DiffusionPolicy, a0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    """Eq. 1: MSE between the injected noise and its prediction at a uniformly drawn step."""
    abar = model.alphas_cumprod[t].float().view(-1, 1, 1)
    x_t = abar.sqrt() * a0 + (1 - abar).sqrt() * eps
    return F.mse_loss(model.denoise(x_t, t, cond), eps)


def predict_x0(x_t, eps, abar_t, clip: bool = True):
    """x0 estimate from x_t and the predicted noise, clamped to the action range, and the noise recomputed from
    the clamped x0 (so the step stays consistent with the clamp; diffusers' use_clipped_model_output)."""
    x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    return x0, eps


def ddim_step(x_t, eps, abar_t, abar_prev, eta: float):
    """Mean and sigma of p(x_prev | x_t) for DDIM (Song et al.): sigma = eta * sqrt((1-ab_prev)/(1-ab_t)
    * (1 - ab_t/ab_prev)), mean = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps."""
    x0, eps = predict_x0(x_t, eps, abar_t)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    return mean, sigma


def ddpm_step(x_t, eps, abar_t, abar_prev):
    """Mean and sigma of the DDPM posterior q(x_{t-1} | x_t, x0_hat) with the "fixed_small" variance."""
    x0, _ = predict_x0(x_t, eps, abar_t)
    alpha_t = abar_t / abar_prev
    mean = (abar_prev.sqrt() * (1 - alpha_t) * x0 + alpha_t.sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)).clamp(min=1e-20).sqrt()
    return mean, sigma


def step_schedule(alphas_cumprod: torch.Tensor, sampler: str, num_steps: int) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_prev) per denoising step, noisiest first; abar_prev = 1 after the last step."""
    K = len(alphas_cumprod)
    ts = ddim_timesteps(K, num_steps) if sampler == "ddim" else list(range(K))[::-1]
    prevs = ts[1:] + [-1]
    return [
        (t, alphas_cumprod[t], alphas_cumprod[p] if p >= 0 else alphas_cumprod.new_tensor(1.0))
        for t, p in zip(ts, prevs)
    ]


@torch.no_grad()
def sample_actions(model: DiffusionPolicy, cond, x, sampler="ddim", num_steps=5, eta=0.0, generator=None):
    """Run the reverse chain from x = x_K (normalised action space). ``eta`` applies to DDIM; DDPM always adds
    its posterior noise except at the last step. Noise is drawn from ``generator`` (CPU)."""
    for t, abar_t, abar_prev in step_schedule(model.alphas_cumprod, sampler, num_steps):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model.denoise(x, tt, cond)
        abar_t, abar_prev = abar_t.to(x), abar_prev.to(x)
        if sampler == "ddim":
            mean, sigma = ddim_step(x, eps, abar_t, abar_prev, eta)
        else:
            mean, sigma = ddpm_step(x, eps, abar_t, abar_prev)
            sigma = sigma if t > 0 else torch.zeros_like(sigma)
        if float(sigma) > 0:
            x = mean + sigma * torch.randn(x.shape, generator=generator).to(x)
        else:
            x = mean
    return x


# ================================================================================================================
# Networks
# ================================================================================================================
class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], -1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(groups, cout), nn.Mish())

    def forward(self, x):
        return self.block(x)


class FiLMResBlock1D(nn.Module):
    """Residual block whose first conv's output is modulated by the condition: scale * h + bias (FiLM)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, k: int):
        super().__init__()
        self.conv1, self.conv2 = Conv1dBlock(cin, cout, k), Conv1dBlock(cout, cout, k)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond):
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        return self.conv2(scale * self.conv1(x) + bias) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """1-D U-Net over the action chunk (B, T, Da) -> predicted noise (B, T, Da), FiLM-conditioned on
    [step embedding, observation features] at every residual block (Diffusion Policy)."""

    def __init__(self, action_dim: int, cond_dim: int, down_dims, k: int, step_dim: int):
        super().__init__()
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_dim),
            nn.Linear(step_dim, 4 * step_dim),
            nn.Mish(),
            nn.Linear(4 * step_dim, step_dim),
        )
        cond_dim = cond_dim + step_dim
        dims = [action_dim, *down_dims]
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            down = nn.Conv1d(cout, cout, 3, 2, 1) if not last else nn.Identity()
            self.down.append(
                nn.ModuleList([FiLMResBlock1D(cin, cout, cond_dim, k), FiLMResBlock1D(cout, cout, cond_dim, k), down])
            )
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock1D(mid, mid, cond_dim, k), FiLMResBlock1D(mid, mid, cond_dim, k)])
        self.up = nn.ModuleList()
        for cout, cin in reversed(list(zip(dims[1:-1], dims[2:]))):
            up = nn.ConvTranspose1d(cout, cout, 4, 2, 1)
            self.up.append(
                nn.ModuleList([FiLMResBlock1D(2 * cin, cout, cond_dim, k), FiLMResBlock1D(cout, cout, cond_dim, k), up])
            )
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], k), nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, x, t, cond):
        c = torch.cat([self.step_embed(t), cond], -1)
        h, skips = x.transpose(1, 2), []  # (B, Da, T)
        for block1, block2, down in self.down:
            h = block2(block1(h, c), c)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, c)
        # as in Diffusion Policy, the deepest skip joins the first up block and the shallowest is unused
        for block1, block2, up in self.up:
            h = block2(block1(torch.cat([h, skips.pop()], 1), c), c)
            h = up(h)
        return self.final(h).transpose(1, 2)


class MLPDenoiser(nn.Module):
    """The MLP ablation: [flattened x_t, step embedding, condition] -> flattened noise."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, dims, step_dim: int):
        super().__init__()
        self.shape = (horizon, action_dim)
        self.step_embed = nn.Sequential(SinusoidalEmbedding(step_dim), nn.Linear(step_dim, step_dim), nn.Mish())
        self.net = mlp([horizon * action_dim + step_dim + cond_dim, *dims, horizon * action_dim])

    def forward(self, x, t, cond):
        h = torch.cat([x.flatten(1), self.step_embed(t), cond], -1)
        return self.net(h).view(-1, *self.shape)


class DiffusionPolicy(PolicyBase):
    """Observation encoder + denoiser + noise schedule (+ the normaliser of PolicyBase), as one module."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.encoder = ObsEncoder(cfg)
        if cfg["denoiser"] == "unet":
            self.denoiser = ConditionalUnet1D(le.ACTION_DIM, self.encoder.out_dim, cfg["unet_down_dims"],
                                              cfg["unet_kernel_size"], cfg["step_embed_dim"])  # fmt: skip
        else:
            self.denoiser = MLPDenoiser(
                le.ACTION_DIM, cfg["horizon"], self.encoder.out_dim, cfg["mlp_dims"], cfg["step_embed_dim"]
            )
        betas = cosine_betas(cfg["num_train_timesteps"])
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))  # float64: exact schedule

    def encode(self, obs_t: dict) -> torch.Tensor:
        return self.encoder(obs_t)

    def denoise(self, x_t, t, cond):
        return self.denoiser(x_t, t, cond)

    @torch.no_grad()
    def act(self, obs: dict, sampler: str = "ddim", num_steps: int = 5, eta: float = 0.0, generator=None, noise=None):
        """Action chunk to execute, (B, act_steps, 7) in environment units, for a batch of observations.

        ``noise`` (B, horizon, 7) fixes x_K (else drawn from ``generator``); eta = 0 DDIM is deterministic.
        """
        cond = self.encode(self.obs_tensors(obs))
        shape = (cond.shape[0], self.cfg["horizon"], le.ACTION_DIM)
        x = (noise if noise is not None else torch.randn(shape, generator=generator)).to(cond)
        x0 = sample_actions(self, cond, x, sampler, num_steps, eta, generator)
        return self.unnormalize_actions(x0)[:, : self.cfg["act_steps"]].cpu().numpy()


def load_policy(path: str, device="cpu") -> DiffusionPolicy:
    """A DiffusionPolicy from a bc_diffusion checkpoint (EMA weights when present)."""
    ckpt = run_utils.load_checkpoint(path, ("bc_diffusion/v1",))
    policy = DiffusionPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return policy.to(device).eval()


# ================================================================================================================
# Training helpers
# ================================================================================================================
def policy_config(args, object_state_dim: int = 0) -> dict:
    cfg = {k: getattr(args, k) for k in ARCH_FIELDS}
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    cfg["object_state_dim"] = object_state_dim if args.obs_mode == "state" else 0
    return cfg


def check_args(args) -> None:
    le.check_task_args(args.suite, args.task_id)
    if not 0 < args.act_steps <= args.horizon:
        raise ValueError(f"--act-steps must be in 1..--horizon ({args.horizon}), got {args.act_steps}.")
    if args.denoiser == "unet" and args.horizon % 2 ** (len(args.unet_down_dims) - 1):
        raise ValueError(f"--horizon {args.horizon} must be divisible by 2^(len(--unet-down-dims)-1) for the U-Net.")
    if args.num_train_timesteps % args.eval_ddim_steps:
        raise ValueError("--num-train-timesteps must be a multiple of --eval-ddim-steps (evenly spaced DDIM steps).")


# ================================================================================================================
if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        check_args(args)
        task = le.resolve_task(args.suite, args.task_id)
        demo_hdf5.find_demo_files(args.demo_paths, args.data_root, args.demo_source, args.suite, args.task_id)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'")
    run_dir = run_utils.task_run_dir(args.run_root, "bc_diffusion", task.suite, task.local_id, args.seed)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    run_utils.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # Data and model
    paths = demo_hdf5.find_demo_files(args.demo_paths, args.data_root, args.demo_source, args.suite, args.task_id)
    dataset = demo_hdf5.load_chunk_dataset(paths, args.obs_mode, args.image_size, args.horizon, args.num_demos)
    cfg = policy_config(args, dataset.obs["object_state"].shape[1] if args.obs_mode == "state" else 0)
    dataset.to(device)  # batches are gathered and augmented on the training device
    print(f"data: {dataset.num_demos} demos, {dataset.num_samples} samples from {paths}")
    policy = DiffusionPolicy(cfg)
    policy.fit_normalizer(dataset.actions, dataset.obs["proprio"], dataset.obs.get("object_state"))
    policy.to(device)
    millions = lambda m: run_utils.count_parameters(m) / 1e6  # noqa: E731
    print(f"parameters: {millions(policy):.2f}M (encoder {millions(policy.encoder):.2f}M, "
          f"denoiser {millions(policy.denoiser):.2f}M)")  # fmt: skip
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, run_utils.cosine_with_warmup(args.warmup_steps, args.total_steps)
    )
    ema = run_utils.EMA(policy, args.ema_power, args.ema_max_decay)
    generator = torch.Generator().manual_seed(args.seed)  # every training draw: batches, shifts, steps, noise
    step = 0

    # Resume
    try:
        resume = run_utils.resume_path(args.resume, ckpt_dir)
        if resume is not None:
            ckpt = run_utils.load_checkpoint(resume, ("bc_diffusion/v1",))
            run_utils.check_same_architecture(resume, ckpt["config"], cfg)
            policy.load_state_dict(ckpt["model"])
            ema.model.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step = ckpt["step"]
            run_utils.set_rng_state(ckpt["rng"])
            generator.set_state(ckpt["rng"]["generator"])
            print(f"resumed from {resume} at step {step}")  # (or previous.pt, with a warning, if it was unreadable)
    except run_utils.CheckpointError as e:
        sys.exit(f"error: {e}")
    run_utils.write_json(os.path.join(run_dir, "args.json"), asdict(args))
    logger = run_utils.MetricsLogger(run_dir, asdict(args), args.track, args.wandb_project_name, args.wandb_entity,
                                     f"{args.exp_name}__{task.suite}_task{task.local_id:02d}__{args.seed}")  # fmt: skip

    def checkpoint(name: str) -> None:
        rng = run_utils.rng_state()
        rng["generator"] = generator.get_state()
        run_utils.save_checkpoint(
            os.path.join(ckpt_dir, name),
            {"format": "bc_diffusion/v1", "model": policy.state_dict(), "ema": ema.model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "args": asdict(args), "config": cfg, "normalizer": policy.normalizer(), "rng": rng,
             "task": {"suite": task.suite, "local_id": task.local_id, "name": task.name}},
            keep_previous=name == "latest.pt",
        )  # fmt: skip

    loss_fn = torch.compile(ddpm_loss) if args.compile else ddpm_loss
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    preemption = run_utils.Preemption()
    venv = None
    tqdm_bar = __import__("tqdm").tqdm(total=args.total_steps, initial=step, desc="bc", unit="step")
    # the loss is summed on the device and read back only at logging steps (no host sync per step)
    loss_sum, n_window, t_window = torch.zeros((), device=device), 0, time.time()
    policy.train()
    while step < args.total_steps:
        # ALGO LOGIC: one DDPM denoising-loss step (eq. 1)
        obs, actions = dataset.sample(args.batch_size, generator, shift=args.random_shift)
        t = torch.randint(0, cfg["num_train_timesteps"], (args.batch_size,), generator=generator)
        eps = torch.randn(actions.shape, generator=generator)
        obs = policy.normalize_obs(obs)
        a0 = policy.normalize_actions(actions)
        with autocast:
            loss = loss_fn(policy, a0, policy.encode(obs), t.to(device), eps.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        decay = ema.update(policy, step)
        step += 1
        tqdm_bar.update(1)
        loss_sum += loss.detach().float()
        n_window += 1

        if step % args.log_every == 0 or step == args.total_steps:
            sps = n_window * args.batch_size / (time.time() - t_window)
            mean_loss = loss_sum.item() / n_window
            logger.log(step, loss=mean_loss, grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0],
                       ema_decay=decay, samples_per_s=sps)  # fmt: skip
            tqdm_bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum, n_window, t_window = torch.zeros((), device=device), 0, time.time()
        evaluate_now = args.eval_episodes > 0 and (
            (args.eval_every > 0 and step % args.eval_every == 0) or step == args.total_steps
        )
        if evaluate_now:
            if venv is None:
                venv = ve.VectorLiberoEnv(task, args.eval_num_envs, obs_mode=args.obs_mode, image_size=args.image_size)
            act = lambda obs: ema.model.act(obs, "ddim", args.eval_ddim_steps, eta=0.0)  # noqa: E731
            stats = ve.evaluate_success(venv, act, args.eval_episodes, args.seed, cfg["act_steps"])
            logger.log(step, **{f"eval/{k}": v for k, v in stats.items()})
            print(f"step {step}: eval success {stats['success_rate']:.2f} over {args.eval_episodes} episodes")
        if step % args.save_every == 0 or preemption.requested:
            checkpoint("latest.pt")
        if preemption.requested:
            tqdm_bar.close()
            preemption.exit()
    tqdm_bar.close()
    checkpoint("latest.pt")
    checkpoint("final.pt")
    if venv is not None:
        venv.close()
    logger.close()
    print(f"done: {step} steps; checkpoints in {ckpt_dir}")
