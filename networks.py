"""networks.py — the observation side every policy here shares: encoders and the normalising policy base.

Diffusion Policy's vision encoder (Chi et al. 2023): a ResNet-18 per camera with GroupNorm instead of BatchNorm and
a spatial-softmax keypoint head (or a small ViT), whose features and the 8-d proprioception (and, in state mode, the
simulator's object states through an MLP) form the conditioning vector (:class:`ObsEncoder`). :class:`PolicyBase`
holds the data normaliser fitted on the demos (saved in the state dict) and turns environment observations into
normalised tensors. bc_diffusion.py's diffusion policy, ppo_gaussian.py's Gaussian policy and ppo_core.py's critic
are built on them, so the two PPO baselines differ only in their action heads.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import libero_env as le


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
