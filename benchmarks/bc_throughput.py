"""BC training throughput and DDIM inference latency of the default diffusion policy (record in RESULTS.md).

* training: samples/s of a full step (augmentation, encoder, eq.-1 loss, backward, AdamW, EMA) for the default
  RGB model (two 128 x 128 cameras, ~12.5M parameters), batch 64;
* inference: latency of one DDIM-5 action chunk through ``DiffusionPolicy.act`` (observation conversion,
  encoder, 5 denoiser steps) at batch 1, 8 and 32.

Runs on CUDA when available (bf16 autocast for training, as bc_diffusion.py), else on the CPU.

    python benchmarks/bc_throughput.py
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bc_diffusion as bc  # noqa: E402
import demo_hdf5  # noqa: E402
import run_utils  # noqa: E402


@dataclass
class Args:
    batch_size: int = 64
    """training batch"""
    train_steps: int = 10
    """timed training steps (after 2 warm-up steps)"""
    latency_repeats: int = 10
    """timed act() calls per batch size (after 2 warm-up calls)"""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    """inference batch sizes"""
    cuda: bool = True
    """use CUDA when available"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_obs(B: int, size: int, rng) -> dict:
    return {
        "agentview_rgb": rng.integers(0, 255, (B, size, size, 3), dtype=np.uint8),
        "eye_in_hand_rgb": rng.integers(0, 255, (B, size, size, 3), dtype=np.uint8),
        "ee_pos": rng.normal(size=(B, 3)),
        "ee_ori": rng.normal(size=(B, 3)),
        "gripper_states": rng.normal(size=(B, 2)),
    }


def main(args: Args) -> None:
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cfg = bc.policy_config(bc.Args())
    policy = bc.DiffusionPolicy(cfg).to(device)
    millions = run_utils.count_parameters(policy) / 1e6
    print(f"device: {name}; model {millions:.2f}M parameters, image {cfg['image_size']}")
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    ema = run_utils.EMA(policy, 0.75, 0.9999)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    B, S = args.batch_size, cfg["image_size"]
    images = {k: torch.randint(0, 255, (B, S, S, 3), dtype=torch.uint8) for k in ("agentview_rgb", "eye_in_hand_rgb")}

    def train_step(step):
        obs = {k: demo_hdf5.random_shift(v.permute(0, 3, 1, 2), 8, g) for k, v in images.items()}
        obs["proprio"] = torch.randn(B, 8)
        obs = {k: v.to(device) for k, v in obs.items()}
        a0 = torch.rand(B, cfg["horizon"], 7, device=device) * 2 - 1
        t = torch.randint(0, 100, (B,), device=device)
        with autocast:
            loss = bc.ddpm_loss(policy, a0, policy.encode(obs), t, torch.randn_like(a0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(policy, step)

    for i in range(2):
        train_step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(args.train_steps):
        train_step(i)
    sync(device)
    sec = (time.perf_counter() - start) / args.train_steps
    print(f"training: {B / sec:8.1f} samples/s ({sec * 1e3:.0f} ms per step of {B})")

    policy.eval()
    for b in args.batch_sizes:
        obs = fake_obs(b, S, rng)
        for _ in range(2):
            policy.act(obs)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.latency_repeats):
            policy.act(obs)
        sync(device)
        ms = (time.perf_counter() - start) / args.latency_repeats * 1e3
        print(f"DDIM-5 chunk, batch {b:3d}: {ms:8.1f} ms ({ms / b:.1f} ms per env)")


if __name__ == "__main__":
    main(tyro.cli(Args))
