"""BC and PPO-update training throughput and DDIM inference latency of the default diffusion policy (record the
figures in RESULTS.md).

* BC training: samples/s of a full step as bc_diffusion.py runs it (a batch gathered and random-shifted from a
  ``ChunkDataset`` held on the training device, encoder, eq.-1 loss, backward, AdamW, EMA; the loss read back only
  every ``--log-every`` steps) for the default RGB model (two 128 x 128 cameras, ~12.5M parameters), batch 64;
* batch sampling alone, side by side: the dataset gathered on the host with a per-sample crop loop and copied to
  the device (before) vs gathered and shifted on the device with one indexing op (``ChunkDataset.sample``, now);
* PPO update: (env step, denoising step) pairs/s of ``ppo_diffusion.ppo_update`` (old log-probs, then one epoch of
  minibatches: actor log-prob, critic, backward, two AdamW steps) on a synthetic iteration of rgb observations;
* inference: latency of one DDIM-5 action chunk through ``DiffusionPolicy.act`` (observation conversion,
  encoder, 5 denoiser steps) at batch 1, 8 and 32.

Runs on CUDA when available (bf16 autocast for BC training, as bc_diffusion.py), else on the CPU.

    python benchmarks/bc_throughput.py
"""

import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bc_diffusion as bc  # noqa: E402
import demo_hdf5  # noqa: E402
import denoising_mdp as dm  # noqa: E402
import ppo_diffusion as ppo  # noqa: E402
import run_utils  # noqa: E402


@dataclass
class Args:
    batch_size: int = 64
    """BC training batch"""
    train_steps: int = 10
    """timed BC training steps (after 2 warm-up steps)"""
    log_every: int = 100
    """BC steps between loss read-backs (as bc_diffusion.py's --log-every)"""
    sample_repeats: int = 20
    """timed batch draws per sampling path"""
    demos: int = 10
    """synthetic demos in the BC dataset"""
    demo_len: int = 100
    """steps per synthetic demo"""
    ppo_chunks: int = 100
    """env steps (chunks) of the synthetic PPO iteration (x 5 fine-tuned denoising steps = pairs)"""
    ppo_minibatch: int = 250
    """(env step, denoising step) pairs per PPO gradient step (ppo_diffusion.py's default is 1000)"""
    latency_repeats: int = 10
    """timed act() calls per batch size (after 2 warm-up calls)"""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    """inference batch sizes"""
    cuda: bool = True
    """use CUDA when available"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> float:
    """Seconds per call of ``fn`` (after one warm-up call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def fake_obs(B: int, size: int, rng) -> dict:
    return {
        "agentview_rgb": rng.integers(0, 255, (B, size, size, 3), dtype=np.uint8),
        "eye_in_hand_rgb": rng.integers(0, 255, (B, size, size, 3), dtype=np.uint8),
        "ee_pos": rng.normal(size=(B, 3)),
        "ee_ori": rng.normal(size=(B, 3)),
        "gripper_states": rng.normal(size=(B, 2)),
    }


def host_sample(dataset: demo_hdf5.ChunkDataset, B: int, generator, pad: int, device):
    """The sampling path before the dataset moved to the device: numpy gather, one crop per sample in a Python
    loop on float images, then a host-to-device copy of the batch."""
    idx = torch.randint(0, dataset.num_samples, (B,), generator=generator).numpy()
    chunk = np.minimum(idx[:, None] + np.arange(dataset.horizon), dataset.episode_end[idx, None] - 1)
    obs = {k: torch.from_numpy(v[idx]) for k, v in dataset.obs.items()}
    for key in ("agentview_rgb", "eye_in_hand_rgb"):
        images = obs[key].permute(0, 3, 1, 2)
        H, W = images.shape[-2:]
        padded = F.pad(images.float(), (pad, pad, pad, pad), mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)
        obs[key] = torch.stack([padded[i, :, y : y + H, x : x + W] for i, (y, x) in enumerate(offsets.tolist())])
    return {k: v.to(device) for k, v in obs.items()}, torch.from_numpy(dataset.actions[chunk]).to(device)


def main(args: Args) -> None:
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cfg = bc.policy_config(bc.Args())
    policy = bc.DiffusionPolicy(cfg).to(device)
    millions = run_utils.count_parameters(policy) / 1e6
    print(f"device: {name}; model {millions:.2f}M parameters, image {cfg['image_size']}")
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    S, B = cfg["image_size"], args.batch_size
    demos = [{"obs": fake_obs(args.demo_len, S, rng), "actions": rng.uniform(-1, 1, (args.demo_len, 7))}
             for _ in range(args.demos)]  # fmt: skip
    dataset = demo_hdf5.ChunkDataset(demos, "rgb", S, cfg["horizon"]).to(device)

    # Batch sampling alone, both paths
    t_host = timed(lambda: host_sample(dataset, B, g, 8, device), args.sample_repeats, device)
    t_dev = timed(lambda: dataset.sample(B, g, shift=8), args.sample_repeats, device)
    print(f"BC batch sampling ({B}, shift 8): host loop + copy {t_host * 1e3:.1f} ms, on-device gather "
          f"{t_dev * 1e3:.1f} ms ({t_host / t_dev:.1f}x)")  # fmt: skip

    # BC training steps, as bc_diffusion.py's loop
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    ema = run_utils.EMA(policy, 0.75, 0.9999)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    state = {"step": 0}

    def train_step():
        nonlocal loss_sum
        obs, actions = dataset.sample(B, g, shift=8)
        obs = policy.normalize_obs(obs)
        a0 = policy.normalize_actions(actions)
        t = torch.randint(0, cfg["num_train_timesteps"], (B,), generator=g).to(device)
        eps = torch.randn(a0.shape, generator=g).to(device)
        with autocast:
            loss = bc.ddpm_loss(policy, a0, policy.encode(obs), t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        ema.update(policy, state["step"])
        loss_sum += loss.detach().float()
        state["step"] += 1
        if state["step"] % args.log_every == 0:
            loss_sum.item()

    sec = timed(train_step, args.train_steps, device)
    print(f"BC training: {B / sec:8.1f} samples/s ({sec * 1e3:.0f} ms per step of {B})")

    # PPO update over a synthetic iteration (default rgb actor and critic)
    sched = dm.DenoisingSchedule(policy.alphas_cumprod, "ddim", 5, 1.0)
    ft_policy = dm.FineTunedDiffusion(policy, sched, 5, cfg).to(device)
    critic = ppo.Critic(cfg, (256, 256)).to(device)
    N = args.ppo_chunks
    obs = ft_policy.ft.obs_tensors(fake_obs(N, S, rng))
    obs["time"] = torch.rand(N, generator=torch.Generator().manual_seed(0)).to(device)  # the critic sees t / limit
    with torch.no_grad():
        chains = torch.cat([ft_policy.sample_chain({k: v[i : i + 50] for k, v in obs.items()}, 3.0, 0.1)[0]
                            for i in range(0, N, 50)])  # fmt: skip
    batch = {"obs": {k: v.cpu() for k, v in obs.items()}, "chains": chains.cpu(), "advantages": torch.randn(N),
             "returns": torch.randn(N)}  # fmt: skip
    ppo_args = SimpleNamespace(min_std=0.1, logprob_clip=(-5.0, 2.0), update_epochs=1, gamma_denoising=0.9,
                               minibatch_size=args.ppo_minibatch, clip_coef=0.01, clip_coef_base=0.001,
                               clip_coef_rate=3.0, constant_clip=False, vf_coef=0.5, max_grad_norm=1.0,
                               target_kl=None)  # fmt: skip
    opts = (torch.optim.AdamW(ft_policy.ft.parameters(), lr=1e-6), torch.optim.AdamW(critic.parameters(), lr=1e-6))
    ft_policy.train()
    pairs = (N * 5 // args.ppo_minibatch) * args.ppo_minibatch  # full minibatches only
    sec = timed(lambda: ppo.ppo_update(ft_policy, critic, batch, ppo_args, opts, True, device), 1, device)
    print(f"PPO update: {pairs / sec:8.1f} (env step, denoising step) pairs/s ({N} chunks x 5 steps, minibatch "
          f"{args.ppo_minibatch}, 1 epoch incl. old log-probs: {sec:.1f} s)")  # fmt: skip

    policy.eval()
    for b in args.batch_sizes:
        obs_b = fake_obs(b, S, rng)
        ms = timed(lambda obs_b=obs_b: policy.act(obs_b), args.latency_repeats, device) * 1e3
        print(f"DDIM-5 chunk, batch {b:3d}: {ms:8.1f} ms ({ms / b:.1f} ms per env)")


if __name__ == "__main__":
    main(tyro.cli(Args))
