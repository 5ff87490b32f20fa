"""bc_diffusion.py — phase 1: behaviour-cloning warm start of a diffusion policy on a few LIBERO demonstrations.

The policy (Diffusion Policy, Chi et al. 2023; DPPO, Ren et al. 2024): a ResNet-18 image encoder with GroupNorm
and a spatial-softmax head per camera, whose features and the 8-d proprioception condition a 1-D U-Net over the
action chunk through FiLM. Training minimises the DDPM epsilon-prediction loss (eq. 1):

    L = E_{k ~ U{0..K-1}, eps ~ N(0, I)} || eps - eps_theta(sqrt(abar_k) a0 + sqrt(1 - abar_k) eps, k, s) ||^2

with K = 100 cosine ("squaredcos_cap_v2") steps. Sampling uses DDIM (5 steps by default, eta = 0 for
deterministic evaluation) or DDPM. ppo_diffusion.py fine-tunes this network; collect.py and evaluate.py call
``DiffusionPolicy.act``.

    python bc_diffusion.py --suite libero_object --task-id 0 --demo-source scripted --num-demos 20
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
import torch.nn.functional as F
import tyro

import demo_hdf5
import libero_env as le
import run_utils

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
def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(channels // 16, 1), channels)  # BatchNorm replaced: EMA and batch 1 are safe


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = group_norm(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 trunk (He et al.) with GroupNorm; (B, 3, H, W) -> (B, 512, H/32, W/32)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), group_norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(self.stem(x))


class SpatialSoftmax(nn.Module):
    """Keypoints: expected (x, y) image coordinates of each of ``num_kp`` learned attention maps."""

    def __init__(self, channels: int, size: int, num_kp: int):
        super().__init__()
        self.kp = nn.Conv2d(channels, num_kp, 1)
        lin = torch.linspace(-1, 1, size)
        grid_y, grid_x = torch.meshgrid(lin, lin, indexing="ij")
        self.register_buffer("pos", torch.stack([grid_x.flatten(), grid_y.flatten()], -1))  # (HW, 2)

    def forward(self, x):
        attn = self.kp(x).flatten(2).softmax(-1)  # (B, K, HW)
        return (attn @ self.pos).flatten(1)  # (B, 2K)


class ResNetEncoder(nn.Module):
    def __init__(self, image_size: int, head: str, num_kp: int, feature_dim: int):
        super().__init__()
        self.trunk = ResNet18()
        fmap = math.ceil(image_size / 32)
        if head == "spatial_softmax":
            self.head, out = SpatialSoftmax(512, fmap, num_kp), 2 * num_kp
        else:
            self.head, out = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512
        self.proj = nn.Linear(out, feature_dim)

    def forward(self, x):
        return self.proj(self.head(self.trunk(x)))


class ViTEncoder(nn.Module):
    """A small ViT (patch 16, width 128, depth 4): the paper's encoder ablation."""

    def __init__(self, image_size: int, feature_dim: int, patch: int = 16, width: int = 128, depth: int = 4):
        super().__init__()
        self.patchify = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, "gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, feature_dim)

    def forward(self, x):
        tokens = self.patchify(x).flatten(2).transpose(1, 2)  # (B, N, width)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.proj(self.norm(self.blocks(tokens)[:, 0]))


def mlp(dims: list[int], act=nn.Mish) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class ObsEncoder(nn.Module):
    """Observation -> conditioning vector [camera features..., proprio] (rgb) or [state features, proprio]."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        if cfg["obs_mode"] == "state":
            self.state = mlp([cfg["object_state_dim"], *cfg["state_encoder_dims"], cfg["feature_dim"]])
            self.out_dim = cfg["feature_dim"] + le.PROPRIO_DIM
            return

        def make():
            if cfg["encoder"] == "vit":
                return ViTEncoder(cfg["image_size"], cfg["feature_dim"])
            return ResNetEncoder(cfg["image_size"], cfg["encoder_head"], cfg["num_keypoints"], cfg["feature_dim"])

        n = 1 if cfg["shared_encoder"] else len(le.CAMERAS)
        self.cameras = nn.ModuleList([make() for _ in range(n)])
        self.out_dim = len(le.CAMERAS) * cfg["feature_dim"] + le.PROPRIO_DIM

    def forward(self, obs: dict) -> torch.Tensor:
        """``obs``: normalised ``proprio`` (B, 8), and ``object_state`` (B, D) or uint8 images (B, 3, H, W)."""
        if self.cfg["obs_mode"] == "state":
            return torch.cat([self.state(obs["object_state"]), obs["proprio"]], -1)
        feats = []
        for i, key in enumerate(le.CAMERAS):
            image = obs[key].float() / 127.5 - 1.0
            feats.append(self.cameras[0 if self.cfg["shared_encoder"] else i](image))
        return torch.cat([*feats, obs["proprio"]], -1)


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


STATE_MIN_SPAN = 0.1  # object-state normaliser: smallest span mapped to [-1, 1] (m for positions, quaternion units)


class PolicyBase(nn.Module):
    """What every policy on LIBERO observations shares: the data normaliser (fitted on the demos, saved in the
    state dict) and the conversion of environment observations into normalised tensors."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        # x_normalised = (x - mid) * scale, into [-1, 1] per dimension
        for name, dim in (
            ("action", le.ACTION_DIM),
            ("proprio", le.PROPRIO_DIM),
            ("state", cfg.get("object_state_dim", 0)),
        ):
            self.register_buffer(f"{name}_mid", torch.zeros(dim))
            self.register_buffer(f"{name}_scale", torch.ones(dim))

    def fit_normalizer(self, actions: np.ndarray, proprio: np.ndarray, state: Optional[np.ndarray]) -> None:
        for name, x in (("action", actions), ("proprio", proprio), ("state", state)):
            if x is None:
                continue
            lo, hi = torch.as_tensor(x.min(0)).float(), torch.as_tensor(x.max(0)).float()
            span = torch.where(hi - lo > 1e-4, hi - lo, torch.full_like(lo, 2.0))  # constant dims -> 0
            if name == "state":  # object poses that barely varied in the demos (a quaternion spanning 0.005) must
                span = span.clamp(min=STATE_MIN_SPAN)  # not turn a bump in closed loop into an input of 100s
            getattr(self, f"{name}_mid").copy_((lo + hi) / 2)
            getattr(self, f"{name}_scale").copy_(2.0 / span)

    def normalizer(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k.endswith(("_mid", "_scale"))}

    def normalize_actions(self, a):
        return (a - self.action_mid) * self.action_scale

    def unnormalize_actions(self, a):
        return a / self.action_scale + self.action_mid

    def obs_tensors(self, obs: dict) -> dict:
        """Environment/HDF5 observations (numpy, HDF5 naming) -> normalised tensors on the model's device."""
        inputs = le.policy_obs(obs, self.cfg["image_size"] if self.cfg["obs_mode"] == "rgb" else None)
        dev = self.action_mid.device
        out = {"proprio": torch.as_tensor(inputs["proprio"], device=dev)}
        if self.cfg["obs_mode"] == "state":
            out["object_state"] = torch.as_tensor(inputs["object_state"], device=dev)
        else:
            for key in le.CAMERAS:
                out[key] = torch.as_tensor(inputs[key], device=dev).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return self.normalize_obs(out)

    def normalize_obs(self, obs_t: dict) -> dict:
        """Proprio and object state into [-1, 1] (images are scaled inside the encoder)."""
        out = dict(obs_t)
        out["proprio"] = (obs_t["proprio"] - self.proprio_mid) * self.proprio_scale
        if "object_state" in obs_t:
            out["object_state"] = (obs_t["object_state"] - self.state_mid) * self.state_scale
        return out


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
                venv = le.VectorLiberoEnv(task, args.eval_num_envs, obs_mode=args.obs_mode, image_size=args.image_size)
            act = lambda obs: ema.model.act(obs, "ddim", args.eval_ddim_steps, eta=0.0)  # noqa: E731
            stats = le.evaluate_success(venv, act, args.eval_episodes, args.seed, cfg["act_steps"])
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
