"""Rollout-sampler latency: our eager DDIM chain, our CUDA-graphed chain, and diffusers' DDIMScheduler loop.

All three run the same network (the default ~12.5M-parameter RGB policy, two 128 x 128 cameras) on the same
observations and produce one action chunk: encoder once, then K = 5 DDIM denoiser steps with eta = 1 and the
rollout's std floor (``FineTunedDiffusion.sample_chain``, as ppo_diffusion.py collects with), or eta = 0 with
``--deterministic``. The diffusers loop is the usual way of writing a sampler:

    for t in scheduler.timesteps: x = scheduler.step(net(x, t, cond), t, x, eta=eta).prev_sample

It prints latency per chunk at batch 1/8/64/256 and the ratios, measured side by side in one run. The graphed
sampler needs CUDA; off-GPU the script runs the eager vs diffusers pair and says so. With ``--deterministic`` it
also prints the largest difference between eager and diffusers actions (same x_K, eta = 0: they must agree).

    python benchmarks/sampler.py                       # record the output in benchmarks/RESULTS.md
    python benchmarks/sampler.py --obs-mode state      # the low-dimensional policy of the learning check
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from diffusers import DDIMScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bc_diffusion as bc  # noqa: E402
import denoising_mdp as dm  # noqa: E402
import libero_env as le  # noqa: E402
import ppo_diffusion as ppo  # noqa: E402
import run_utils  # noqa: E402


@dataclass
class Args:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    """batch sizes (parallel environments) to time"""
    repeats: int = 20
    """timed chunks per sampler and batch size (after 3 warm-up chunks); fewer are run on the CPU"""
    obs_mode: Literal["rgb", "state"] = "rgb"
    """policy observation: two 128x128 cameras (default model) or the object-state vector"""
    deterministic: bool = False
    """eta = 0 (evaluation) instead of the rollout's eta = 1, and check that the three samplers agree"""
    cuda: bool = True
    """use CUDA when available"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_obs(policy: bc.DiffusionPolicy, B: int, device) -> dict:
    """Normalised observation tensors of batch B, as the rollout passes them to the sampler."""
    g = torch.Generator().manual_seed(B)
    obs = {"proprio": torch.rand(B, 8, generator=g) * 2 - 1}
    if policy.cfg["obs_mode"] == "state":
        obs["object_state"] = torch.rand(B, policy.cfg["object_state_dim"], generator=g) * 2 - 1
    else:
        S = policy.cfg["image_size"]
        for key in le.CAMERAS:
            obs[key] = torch.randint(0, 255, (B, 3, S, S), generator=g, dtype=torch.uint8)
    return {k: v.to(device) for k, v in obs.items()}


def diffusers_sampler(ft: dm.FineTunedDiffusion, noise_clip: float, deterministic: bool):
    """The same chunk through diffusers' DDIMScheduler.step loop (x0 clipped to [-1, 1] at each step, as ours)."""
    sched = DDIMScheduler(
        num_train_timesteps=ft.cfg["num_train_timesteps"],
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        prediction_type="epsilon",
        set_alpha_to_one=True,
        steps_offset=0,
    )
    sched.set_timesteps(ft.sched.K)
    eta = 0.0 if deterministic else ft.sched.eta

    @torch.no_grad()
    def sample(obs_t: dict, x: torch.Tensor) -> torch.Tensor:
        cond = ft.ft.encode(obs_t)
        for t in sched.timesteps:
            eps = ft.ft.denoise(x, t.to(x.device).expand(x.shape[0]), cond)
            x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True).prev_sample
        return ft.ft.unnormalize_actions(x.clamp(-1, 1))[:, : ft.cfg["act_steps"]]

    return sample


@torch.no_grad()  # as in the rollouts (GraphedSampler.__call__ runs the eager chain without autograd)
def timed(fn, repeats: int, device) -> float:
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def main(args: Args) -> None:
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    repeats = args.repeats if device.type == "cuda" else max(1, args.repeats // 10)
    torch.manual_seed(0)
    cfg = bc.policy_config(bc.Args(obs_mode=args.obs_mode), object_state_dim=40)
    policy = bc.DiffusionPolicy(cfg).eval()
    ppo_args = ppo.Args()
    sched = dm.DenoisingSchedule(policy.alphas_cumprod, "ddim", ppo_args.denoising_steps, ppo_args.eta)
    ft = dm.FineTunedDiffusion(policy, sched, ppo_args.ft_denoising_steps, cfg).to(device).eval()
    graphed = dm.GraphedSampler(ft, ppo_args.noise_clip, ppo_args.min_std, enabled=True)
    reference = diffusers_sampler(ft, ppo_args.noise_clip, args.deterministic)
    millions = run_utils.count_parameters(policy) / 1e6
    print(f"device: {name}; {args.obs_mode} model {millions:.2f}M parameters; DDIM-{sched.K}, "
          f"eta {0.0 if args.deterministic else sched.eta}; {repeats} timed chunks each")  # fmt: skip
    if not graphed.enabled:
        print("CUDA graphs: not measured (no CUDA device); eager vs diffusers only")

    header = f"{'batch':>5}  {'eager ms':>9}  {'graphed ms':>10}  {'diffusers ms':>12}  {'eager/graphed':>13}  "
    print(header + f"{'diffusers/eager':>15}  {'diffusers/graphed':>17}")
    mode = "eta0" if args.deterministic else "sample"  # sample: the rollouts' chain, eta = 1 and its std floor
    for B in args.batch_sizes:
        obs_t = make_obs(policy, B, device)
        x = torch.randn(B, cfg["horizon"], le.ACTION_DIM, device=device)
        eager_ms = timed(lambda: graphed._eager(obs_t, mode), repeats, device)  # noqa: B023
        diff_ms = timed(lambda: reference(obs_t, x), repeats, device)  # noqa: B023
        graph_ms = None
        if graphed.enabled:
            graph_ms = timed(lambda: graphed(obs_t, mode), repeats, device)  # noqa: B023
        g = f"{graph_ms:10.2f}" if graph_ms else f"{'-':>10}"
        r1 = f"{eager_ms / graph_ms:12.2f}x" if graph_ms else f"{'-':>13}"
        r3 = f"{diff_ms / graph_ms:16.2f}x" if graph_ms else f"{'-':>17}"
        print(f"{B:5d}  {eager_ms:9.2f}  {g}  {diff_ms:12.2f}  {r1}  {diff_ms / eager_ms:14.2f}x  {r3}")
        if args.deterministic:  # same x_K in all three: the chains must agree
            torch.manual_seed(B)
            with torch.no_grad():
                _, eager_a = graphed._eager(obs_t, mode)
            torch.manual_seed(B)
            clip = ppo_args.noise_clip
            x_K = torch.randn(B, cfg["horizon"], le.ACTION_DIM, device=device).clamp(-clip, clip)
            diff = (reference(obs_t, x_K) - eager_a).abs().max().item()
            print(f"       max |diffusers - eager| actions: {diff:.2e} (graphed vs eager: tests/test_ppo_diffusion.py)")


if __name__ == "__main__":
    main(tyro.cli(Args))
