"""denoising_mdp.py — the denoising chain as an MDP (DPPO, Ren et al. 2024): the policy ppo_diffusion.py fine-tunes.

Each of the K = 5 DDIM steps that turn x_K ~ N(0, I) into an action chunk is an action of an inner MDP:
x_{k-1} ~ N(mu_theta(x_k, k, s), sigma_k^2), whose log-likelihood (:func:`denoising_logprob`) gives PPO its
per-denoising-step ratio. :class:`DenoisingSchedule` holds each step's timestep, noise levels and mean (DDIM with the
rollout's eta, or DDPM); :class:`FineTunedDiffusion` is the trainable copy of bc_diffusion.py's policy for the last
``ft_steps`` steps (the frozen BC copy for the earlier ones) and samples the whole chain in one of three action
modes; :class:`GraphedSampler` replays that sampler as one CUDA graph per batch size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import libero_env as le
from bc_diffusion import DiffusionPolicy, ddim_step, ddpm_step, step_schedule

ACTION_MODES = ("sample", "mean", "eta0")  # see FineTunedDiffusion.sample_chain


class DenoisingSchedule(nn.Module):
    """Per denoising step k (0 = noisiest): timestep, abar_t, abar_prev; the step's mean and sigma (DDIM with
    the rollout eta, or the DDPM posterior), the sigma times ``noise_scale``."""

    def __init__(self, alphas_cumprod: torch.Tensor, sampler: str, num_steps: int, eta: float,
                 noise_scale: float = 1.0):  # fmt: skip
        super().__init__()
        steps = step_schedule(alphas_cumprod, sampler, num_steps)
        self.sampler, self.K = sampler, len(steps)
        # not saved: rebuilt from the checkpoint's ppo_config (buffers only to follow .to(device))
        self.register_buffer("t", torch.tensor([s[0] for s in steps]), persistent=False)
        self.register_buffer("abar_t", torch.stack([s[1] for s in steps]).float(), persistent=False)
        self.register_buffer("abar_prev", torch.stack([s[2] for s in steps]).float(), persistent=False)
        self.eta, self.noise_scale = eta, noise_scale

    def mean(self, x_k, eps, k: torch.Tensor, eta0: bool = False):
        """Mean and sigma of p(x_{k-1} | x_k) at denoising indices ``k`` (tensor, per sample or scalar); ``eta0``:
        DDIM's deterministic (eta = 0) step instead of the schedule's eta (DDPM has one mean either way)."""
        shape = (-1,) + (1,) * (x_k.dim() - 1)
        abar_t, abar_prev = self.abar_t[k].view(shape), self.abar_prev[k].view(shape)
        if self.sampler == "ddim":
            mean, sigma = ddim_step(x_k, eps, abar_t, abar_prev, 0.0 if eta0 else self.eta)
        else:
            mean, sigma = ddpm_step(x_k, eps, abar_t, abar_prev)
        return mean, sigma * self.noise_scale


def denoising_logprob(model, sched: DenoisingSchedule, cond, x_k, x_next, k, min_std, act_steps, clip):
    """log p_theta(x_{k-1} | x_k, s) of one denoising step: Normal(mu, max(sigma_k, min_std)), mu recomputed exactly
    as in the rollout; clamped per element, then averaged over the executed chunk entries and action dims."""
    eps = model.denoise(x_k, sched.t[k], cond)
    mean, sigma = sched.mean(x_k, eps, k)
    std = sigma.clamp(min=min_std).expand_as(mean)
    # no argument validation: a NaN must reach ppo_update's guard rather than raise here
    logp = torch.distributions.Normal(mean, std, validate_args=False).log_prob(x_next).clamp(*clip)
    return logp[:, :act_steps].mean(dim=(1, 2))  # (B,)


class FineTunedDiffusion(nn.Module):
    """The fine-tuned policy: a trainable copy for the last ``ft_steps`` denoising steps, the frozen BC actor for
    the earlier ones (DPPO). With ft_steps = K the frozen copy is never used and not kept."""

    def __init__(self, bc_policy: DiffusionPolicy, sched: DenoisingSchedule, ft_steps: int, cfg: dict,
                 noise_clip: float = 3.0, min_std: float = 0.1):  # fmt: skip
        super().__init__()
        self.cfg, self.ft_steps, self.sched = dict(cfg), ft_steps, sched
        self.noise_clip, self.min_std = noise_clip, min_std  # the rollout's, for act()
        self.ft = copy.deepcopy(bc_policy)
        self.frozen = copy.deepcopy(bc_policy).requires_grad_(False) if ft_steps < sched.K else None

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        # checkpoints written before the schedule stopped being saved hold sched.* entries: they are derived data
        state = {k: v for k, v in state.items() if not k.startswith("sched.")}
        return super().load_state_dict(state, strict, assign)

    def net(self, k: int) -> DiffusionPolicy:
        return self.ft if k >= self.sched.K - self.ft_steps else self.frozen

    def sample_chain(self, obs_t: dict, noise_clip: float, min_std: float, mode: str = "sample", noise=None):
        """The sampler: (chain (B, K+1, H, Da) normalised, actions (B, act_steps, Da) in env units).

        ``mode`` (ACTION_MODES): ``sample``, the policy PPO trains (the schedule's eta, each step's std floored
        at ``min_std``); ``mean``, the same chain's step means without the noise after x_K; ``eta0``, DDIM's
        deterministic path (eta = 0: other means than the trained chain's). ``noise`` (B, K+1, H, Da): the
        standard-normal draws to use (x_K, then one per step), else the global RNG's. No host syncs and no tensors
        created from Python numbers: the same code is captured as a CUDA graph.
        """
        cond_ft = self.ft.encode(obs_t)
        cond_frozen = self.frozen.encode(obs_t) if self.frozen is not None else None
        B, H = cond_ft.shape[0], self.cfg["horizon"]
        draw = lambda k, like: noise[:, k] if noise is not None else torch.randn_like(like)  # noqa: E731
        x = draw(0, cond_ft.new_empty(B, H, le.ACTION_DIM)).clamp(-noise_clip, noise_clip)
        chain = [x]
        for k in range(self.sched.K):
            net = self.net(k)
            cond = cond_ft if net is self.ft else cond_frozen
            eps = net.denoise(x, self.sched.t[k].expand(B), cond)
            mean, sigma = self.sched.mean(x, eps, k, eta0=mode == "eta0")
            if mode == "sample":
                x = mean + sigma.clamp(min=min_std) * draw(k + 1, mean).clamp(-noise_clip, noise_clip)
            else:
                x = mean
            chain.append(x)
        x0 = x.clamp(-1, 1)
        actions = self.ft.unnormalize_actions(x0)[:, : self.cfg["act_steps"]]
        return torch.stack(chain, 1), actions

    @torch.no_grad()
    def act(self, obs: dict, mode: str = "sample", generators: Optional[list] = None) -> np.ndarray:
        """Action chunks (B, act_steps, 7) for evaluation and collection, in ``mode`` (see :meth:`sample_chain`).
        ``generators``: one CPU ``torch.Generator`` per row, the noise stream of that row's episode (outcomes then
        depend neither on which rows share a batch nor on the global RNG, which stays untouched); else the global
        RNG draws."""
        obs_t = self.ft.obs_tensors(obs)
        noise = self.noise_from(generators) if generators is not None else None
        _, actions = self.sample_chain(obs_t, self.noise_clip, self.min_std, mode, noise)
        return actions.cpu().numpy()

    def noise_from(self, generators: list) -> torch.Tensor:
        """The chain's standard-normal draws (B, K+1, H, Da), row b from ``generators[b]`` (its episode's or env's
        stream), on the policy's device."""
        shape = (self.sched.K + 1, self.cfg["horizon"], le.ACTION_DIM)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.sched.t.device)

    def acting(self, mode: str) -> Callable:
        """``act`` in ``mode`` as the ``act(obs, generators)`` that evaluation and collection call."""
        return lambda obs, generators: self.act(obs, mode, generators)


class GraphedSampler:
    """``FineTunedDiffusion.sample_chain`` captured as one CUDA graph per (batch size, mode): static input
    buffers for the observation tensors, static outputs; replay after copying the inputs in.

    Graph replays read the parameters in place, so optimiser steps need no re-capture. Eager off-GPU or when
    disabled.
    """

    def __init__(self, policy: FineTunedDiffusion, noise_clip: float, min_std: float, enabled: bool):
        self.policy, self.noise_clip, self.min_std = policy, noise_clip, min_std
        self.enabled = enabled and torch.cuda.is_available() and next(policy.parameters()).is_cuda
        self.graphs: dict = {}

    def _eager(self, obs_t, mode):
        return self.policy.sample_chain(obs_t, self.noise_clip, self.min_std, mode)

    @torch.no_grad()
    def __call__(self, obs_t: dict, mode: str = "sample"):
        if not self.enabled:
            return self._eager(obs_t, mode)
        key = (next(iter(obs_t.values())).shape[0], mode)
        if key not in self.graphs:
            static_in = {k: v.clone() for k, v in obs_t.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuDNN algorithm choice)
                for _ in range(2):
                    self._eager(static_in, mode)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._eager(static_in, mode)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for k, v in obs_t.items():
            static_in[k].copy_(v)
        graph.replay()
        return tuple(o.clone() for o in static_out)
