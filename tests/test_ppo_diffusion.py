"""ppo_diffusion.py: denoising log-probs, the clip schedule, first-minibatch ratios, NaN guards, the sampler (eager vs
CUDA graph on a GPU), a CLI smoke run on the real simulator; and ppo_core.py's GAE, returns and reward scaler."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, write_tiny_demo_file

import bc_diffusion as bc
import denoising_mdp as dm
import ppo_core as core
import ppo_diffusion as ppo
import run_utils

TINY = dict(
    obs_mode="state", image_size=32, encoder="resnet18", encoder_head="spatial_softmax", shared_encoder=True,
    num_keypoints=4, feature_dim=16, state_encoder_dims=[32], denoiser="unet", unet_down_dims=[16, 32],
    unet_kernel_size=3, step_embed_dim=16, mlp_dims=[64], horizon=8, act_steps=4, num_train_timesteps=100,
    object_state_dim=5,
)  # fmt: skip


def tiny_finetuned(ft_steps=5, sampler="ddim", steps=5, seed=0):
    torch.manual_seed(seed)
    bc_policy = bc.DiffusionPolicy(TINY)
    sched = dm.DenoisingSchedule(bc_policy.alphas_cumprod, sampler, steps, eta=1.0)
    return dm.FineTunedDiffusion(bc_policy, sched, ft_steps, TINY)


def obs_t(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"proprio": torch.randn(B, 8, generator=g), "object_state": torch.randn(B, 5, generator=g)}


def gae_reference(rewards, values, next_values, terminated, truncated, gamma, lam):
    """A plain per-env loop: A_t = sum_l (gamma lam)^l delta_{t+l} within the episode; both episode ends (success
    and time-out) have value 0."""
    T, E = rewards.shape
    adv = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total, discount = 0.0, 1.0
            for u in range(t, T):
                bootstrap = 0.0 if terminated[u, e] or truncated[u, e] else gamma * next_values[u, e]
                total += discount * (rewards[u, e] + bootstrap - values[u, e])
                if terminated[u, e] or truncated[u, e]:
                    break
                discount *= gamma * lam
            adv[t, e] = total
    return adv


def test_gae_matches_a_plain_loop_with_terminations_and_truncations():
    rng = np.random.default_rng(0)
    T, E = 12, 3
    rewards = (rng.random((T, E)) < 0.2).astype(float)
    values, next_values = rng.normal(size=(T, E)), rng.normal(size=(T, E))
    terminated = (rng.random((T, E)) < 0.15).astype(float)
    truncated = ((rng.random((T, E)) < 0.15) & (terminated == 0)).astype(float)
    assert terminated.sum() > 0 and truncated.sum() > 0
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    adv, ret = core.gae(*(as_t(x) for x in (rewards, values, next_values, terminated, truncated)), 0.99, 0.9)
    expected = gae_reference(rewards, values, next_values, terminated, truncated, 0.99, 0.9)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-10)


def test_returns_of_a_success_a_time_out_and_a_cut_against_hand_computed_values():
    """Three envs, three chunk steps, gamma 0.5, lambda 1 (advantages = discounted return - V):
    env 0 succeeds at step 1 (reward 1, terminal), env 1 reaches the step limit at step 2 without success (terminal,
    value 0: a time-blind critic's bootstrap here made a failure look like V), env 2 is still running when the
    iteration stops (the cut bootstraps from V(next observation) = 4)."""
    terminated = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0, 0]])
    truncated = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 1, 0]])
    rewards = terminated.clone()
    values = torch.tensor([[1.0, 2, 3], [1, 2, 3], [9, 2, 3]])  # env 0's step 2 starts a new episode
    next_values = torch.tensor([[1.0, 2, 3], [9, 2, 3], [5, 7, 4]])  # V after each step (the next row, then next_obs)
    adv, ret = core.gae(rewards, values, next_values, terminated, truncated, gamma=0.5, lam=1.0)
    expected_returns = torch.tensor(
        [
            [0.5 * 1, 0.0, 0.5**3 * 4],  # env 0: 1 discounted once; env 1: never rewarded; env 2: 0.5^3 * V_cut
            [1.0, 0.0, 0.5**2 * 4],
            [0.5 * 5, 0.0, 0.5 * 4],  # env 0's new episode is cut after one step: 0.5 * 5
        ]
    )
    torch.testing.assert_close(ret, expected_returns, rtol=0, atol=1e-6)
    torch.testing.assert_close(adv, expected_returns - values, rtol=0, atol=1e-6)
    # with lambda < 1 the time-out's last delta is still -V (no bootstrap), the cut's still bootstraps
    adv, _ = core.gae(rewards, values, next_values, terminated, truncated, gamma=0.5, lam=0.5)
    assert adv[2, 1].item() == -2.0 and adv[2, 2].item() == 0.5 * 4 - 3


def test_explained_variance():
    returns = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert core.explained_variance(returns.clone(), returns) == 1.0
    assert core.explained_variance(torch.full((4,), 0.5), returns) == 0.0  # the mean explains nothing
    assert core.explained_variance(1 - returns, returns) < 0
    assert np.isnan(core.explained_variance(returns, torch.ones(4)))


def test_the_critic_sees_the_elapsed_fraction():
    critic = ppo.Critic(TINY, [16])
    obs = obs_t(3)
    early, late = critic({**obs, "time": torch.zeros(3)}), critic({**obs, "time": torch.ones(3)})
    assert early.shape == (3,) and not torch.allclose(early, late)


def test_denoising_logprob_equals_torch_normal():
    policy = tiny_finetuned()
    sched = policy.sched
    B = 6
    cond = policy.ft.encode(obs_t(B))
    g = torch.Generator().manual_seed(1)
    x_k, x_next = torch.randn(B, 8, 7, generator=g), torch.randn(B, 8, 7, generator=g)
    k = torch.tensor([0, 1, 2, 3, 4, 4])
    got = dm.denoising_logprob(policy.ft, sched, cond, x_k, x_next, k, 0.1, 4, (-5.0, 2.0))
    for j in range(B):
        t = int(sched.t[k[j]])
        abar_t, abar_prev = policy.ft.alphas_cumprod[t].float(), sched.abar_prev[k[j]]
        eps = policy.ft.denoise(x_k[j : j + 1], sched.t[k[j : j + 1]], cond[j : j + 1])
        x0 = ((x_k[j] - (1 - abar_t).sqrt() * eps[0]) / abar_t.sqrt()).clamp(-1, 1)
        eps_c = (x_k[j] - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
        sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_c
        ref = torch.distributions.Normal(mean, max(float(sigma), 0.1)).log_prob(x_next[j]).clamp(-5, 2)[:4].mean()
        torch.testing.assert_close(got[j], ref, atol=1e-5, rtol=1e-5)


def test_clip_schedule_hits_its_ends():
    k = torch.arange(5)
    clip = ppo.clip_schedule(k, 5, 0.001, 0.01, 3.0, constant=False)
    assert math.isclose(clip[0].item(), 0.001, rel_tol=1e-6) and math.isclose(clip[-1].item(), 0.01, rel_tol=1e-6)
    assert torch.all(clip[1:] > clip[:-1])
    assert torch.all(ppo.clip_schedule(k, 5, 0.001, 0.01, 3.0, constant=True) == 0.01)


def test_the_deterministic_modes_depend_on_the_initial_noise_only():
    """eta0 and mean draw x_K and nothing after it: other noise for every later step leaves their chains unchanged,
    another x_K changes them; sample uses the later noise (a mode that drew noise after x_K fails here)."""
    policy = tiny_finetuned().eval()
    obs = obs_t(4)
    shape = (4, policy.sched.K + 1, policy.cfg["horizon"], 7)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    b = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    b[:, 0] = a[:, 0]  # the same x_K, other noise at every step after it
    other_start = a.clone()
    other_start[:, 0] = b[:, 1]  # another x_K, the same later noise
    for mode in ("eta0", "mean"):
        chain_a, actions_a = policy.sample_chain(obs, 3.0, 0.1, mode, a)
        chain_b, actions_b = policy.sample_chain(obs, 3.0, 0.1, mode, b)
        assert torch.equal(chain_a, chain_b) and torch.equal(actions_a, actions_b)
        assert chain_a.shape == (4, 6, 8, 7) and actions_a.shape == (4, 4, 7)
        _, actions_c = policy.sample_chain(obs, 3.0, 0.1, mode, other_start)
        assert (actions_c - actions_a).abs().max() > 1e-3
    _, sample_a = policy.sample_chain(obs, 3.0, 0.1, "sample", a)
    _, sample_b = policy.sample_chain(obs, 3.0, 0.1, "sample", b)
    assert (sample_a - sample_b).abs().max() > 1e-3


def test_the_action_modes_follow_the_trained_chain_or_ddim_eta0():
    """``sample`` with all noise after x_K zeroed is ``mean`` (the trained chain's means); ``eta0`` is another path;
    each step of ``sample`` is mean + max(sigma, min_std) * z."""
    policy = tiny_finetuned().eval()
    K, B = policy.sched.K, 3
    noise = torch.randn(B, K + 1, 8, 7, generator=torch.Generator().manual_seed(0))
    quiet = noise.clone()
    quiet[:, 1:] = 0
    chain_s, _ = policy.sample_chain(obs_t(B), 3.0, 0.1, "sample", quiet)
    chain_m, act_m = policy.sample_chain(obs_t(B), 3.0, 0.1, "mean", noise)
    chain_0, act_0 = policy.sample_chain(obs_t(B), 3.0, 0.1, "eta0", noise)
    torch.testing.assert_close(chain_s, chain_m, rtol=0, atol=0)
    assert torch.equal(chain_m[:, 0], chain_0[:, 0]) and not torch.allclose(act_m, act_0, atol=1e-3)
    chain, _ = policy.sample_chain(obs_t(B), 3.0, 0.1, "sample", noise)
    cond = policy.ft.encode(obs_t(B))
    for k in range(K):
        eps = policy.ft.denoise(chain[:, k], policy.sched.t[k].expand(B), cond)
        mean, sigma = policy.sched.mean(chain[:, k], eps, k)
        expected = mean + sigma.clamp(min=0.1) * noise[:, k + 1].clamp(-3, 3)
        torch.testing.assert_close(chain[:, k + 1], expected, rtol=1e-5, atol=1e-5)


def test_noise_scale_shrinks_the_trained_chains_noise_around_the_same_means(tmp_path):
    """--noise-scale c: each ``sample`` step is mean + max(c sigma, min_std) z with the eta = 1 means (so ``mean``
    mode is unchanged), the log-probs use that std, and a checkpoint restores c (older ones: 1)."""
    full, half = tiny_finetuned().eval(), tiny_finetuned().eval()
    half.sched.noise_scale = 0.5
    K, B = full.sched.K, 3
    noise = torch.randn(B, K + 1, 8, 7, generator=torch.Generator().manual_seed(0))
    chain_full_m, _ = full.sample_chain(obs_t(B), 3.0, 0.1, "mean", noise)
    chain_half_m, _ = half.sample_chain(obs_t(B), 3.0, 0.1, "mean", noise)
    torch.testing.assert_close(chain_half_m, chain_full_m, rtol=0, atol=0)
    chain, _ = half.sample_chain(obs_t(B), 3.0, 0.1, "sample", noise)
    cond = half.ft.encode(obs_t(B))
    sigmas = []
    for k in range(K):
        k_t = torch.full((B,), k)
        eps = half.ft.denoise(chain[:, k], half.sched.t[k].expand(B), cond)
        mean, _ = full.sched.mean(chain[:, k], eps, k_t)
        _, sigma = full.sched.mean(chain[:, k], eps, k)  # the eta = 1 sigma, unscaled
        sigmas.append(float(sigma))
        std = (0.5 * sigma).clamp(min=0.1)
        torch.testing.assert_close(chain[:, k + 1], mean + std * noise[:, k + 1].clamp(-3, 3), rtol=1e-5, atol=1e-5)
        expected = torch.distributions.Normal(mean, std).log_prob(chain[:, k + 1]).clamp(-5, 2)[:, :4].mean((1, 2))
        got = dm.denoising_logprob(half.ft, half.sched, cond, chain[:, k], chain[:, k + 1], k_t, 0.1, 4, (-5, 2))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sigmas[0] > 0.4  # the scale acts on the noisy steps (0.5 sigma above the 0.1 floor there)
    ckpt = {"format": "ppo_diffusion/v1", "model": half.state_dict(), "config": TINY,
            "ppo_config": dict(sampler="ddim", denoising_steps=5, ft_denoising_steps=5, eta=1.0),
            "args": dict(noise_clip=3.0, min_std=0.1, noise_scale=0.5)}  # fmt: skip
    run_utils.save_checkpoint(str(tmp_path / "final.pt"), ckpt)
    assert ppo.load_policy(str(tmp_path / "final.pt")).sched.noise_scale == 0.5
    del ckpt["args"]["noise_scale"]  # a run from before the flag
    run_utils.save_checkpoint(str(tmp_path / "old.pt"), ckpt)
    assert ppo.load_policy(str(tmp_path / "old.pt")).sched.noise_scale == 1.0


def test_actor_lr_holds_then_decays_by_cosine_to_its_minimum_at_the_last_iteration():
    """--actor-lr-decay-start f: --actor-lr for the first round(f x N) iterations, then a cosine that reaches
    --actor-lr-min at the last one; 1.0 (the default) holds it; --no-constant-lr decays over the whole run."""
    args = dict(actor_lr=1e-4, actor_lr_min=1e-5, constant_lr=True, actor_lr_decay_start=0.78, num_iterations=83)
    lrs = [core.actor_lr_at(args, it) for it in range(83)]
    assert lrs[:65] == [1e-4] * 65  # held: round(0.78 x 83) = 65 iterations
    assert lrs[82] == pytest.approx(1e-5, rel=1e-12)
    half = 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 9 / 18))  # iteration 73: 9 of the 18 decay steps
    assert lrs[73] == pytest.approx(half, rel=1e-12) and lrs[73] == pytest.approx(5.5e-5, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[64:], lrs[65:]))  # strictly decreasing once it starts
    assert core.actor_lr_at({**args, "actor_lr_decay_start": 1.0}, 82) == 1e-4  # the default holds it
    whole = [core.actor_lr_at({**args, "constant_lr": False}, it) for it in (0, 82)]
    assert whole[0] == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi / 83)))
    assert whole[1] == pytest.approx(1e-5)
    assert core.actor_lr_at({"actor_lr": 3e-4, "num_iterations": 10}, 9) == 3e-4  # args of runs before the flag


def test_noise_scale_final_applies_from_the_switch_iteration_and_checkpoints_follow_it(tmp_path):
    """--noise-scale-final c from round(switch x num_iterations) completed iterations on (0.78 x 83: the 66th
    iteration, as the branched run of docs/convergence.md); a checkpoint rebuilds the scale of its iteration."""
    args = dict(noise_scale=1.0, noise_scale_final=0.5, noise_scale_switch=0.78, num_iterations=83)
    assert [ppo.noise_scale_at(args, it) for it in (0, 64, 65, 82, 83)] == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert ppo.noise_scale_at({**args, "noise_scale_final": None}, 82) == 1.0  # no switch without a final scale
    assert ppo.noise_scale_at({**args, "noise_scale_switch": 0.0}, 0) == 0.5  # the final scale throughout
    policy = tiny_finetuned()
    ckpt = {"format": "ppo_diffusion/v2", "model": policy.state_dict(), "config": TINY,
            "ppo_config": dict(sampler="ddim", denoising_steps=5, ft_denoising_steps=5, eta=1.0),
            "args": dict(noise_clip=3.0, min_std=0.1, **args)}  # fmt: skip
    for step, scale in ((64, 1.0), (65, 0.5), (83, 0.5)):
        run_utils.save_checkpoint(str(tmp_path / f"it{step}.pt"), {**ckpt, "step": step})
        assert ppo.load_policy(str(tmp_path / f"it{step}.pt")).sched.noise_scale == scale


def test_act_takes_each_rows_noise_from_its_generator_and_the_rollout_settings_from_the_checkpoint(tmp_path):
    """Evaluation passes one seeded generator per row (its episode's): the same seeds give the same chunks, another
    seed others, a row's chunk does not depend on the other rows, and the global RNG is left as it was.
    load_policy restores the run's noise clip and std floor."""
    policy = tiny_finetuned(ft_steps=2).eval()
    obs = {"ee_pos": np.zeros((3, 3)), "ee_ori": np.zeros((3, 3)), "gripper_states": np.zeros((3, 2)),
           "object_state": np.linspace(-1, 1, 15).reshape(3, 5)}  # fmt: skip
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    row = lambda i: {k: v[i : i + 1] for k, v in obs.items()}  # noqa: E731
    torch.manual_seed(7)
    expected_global_draw = torch.rand(3)
    for mode in dm.ACTION_MODES:
        torch.manual_seed(7)
        a = policy.act(obs, mode, gens(1, 2, 3))
        assert torch.equal(torch.rand(3), expected_global_draw)  # the global RNG was not advanced
        assert np.array_equal(a, policy.act(obs, mode, gens(1, 2, 3))) and a.shape == (3, 4, 7)
        assert not np.array_equal(a[0], policy.act(obs, mode, gens(4, 2, 3))[0])
        # row 1 alone, with its own generator: the same chunk as in the batch (up to kernel rounding)
        np.testing.assert_allclose(policy.act(row(1), mode, gens(2)), a[1:2], rtol=0, atol=1e-5)
    ckpt = {"format": "ppo_diffusion/v1", "model": policy.state_dict(), "config": TINY,
            "ppo_config": dict(sampler="ddim", denoising_steps=5, ft_denoising_steps=2, eta=1.0),
            "args": dict(noise_clip=2.0, min_std=0.05)}  # fmt: skip
    run_utils.save_checkpoint(str(tmp_path / "final.pt"), ckpt)
    loaded = ppo.load_policy(str(tmp_path / "final.pt"))
    assert (loaded.noise_clip, loaded.min_std, loaded.ft_steps, loaded.frozen is not None) == (2.0, 0.05, 2, True)
    assert not np.array_equal(loaded.act(obs, "sample", gens(1, 2, 3)), policy.act(obs, "sample", gens(1, 2, 3)))
    policy.noise_clip, policy.min_std = 2.0, 0.05
    for mode in dm.ACTION_MODES:
        assert np.array_equal(loaded.act(obs, mode, gens(1, 2, 3)), policy.act(obs, mode, gens(1, 2, 3)))


def test_the_schedule_is_rebuilt_not_saved_and_older_checkpoints_with_it_still_load():
    policy = tiny_finetuned(ft_steps=2)
    state = policy.state_dict()
    assert not [k for k in state if k.startswith("sched.")]
    old = {**state, "sched.t": policy.sched.t, "sched.sigma": torch.zeros(5)}  # as written before this change
    fresh = tiny_finetuned(ft_steps=2, seed=1)
    fresh.load_state_dict(old)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    with pytest.raises(RuntimeError, match="Unexpected key"):  # anything else unexpected is still refused
        fresh.load_state_dict({**state, "ft.extra": torch.zeros(1)})


def ppo_args(**kw):
    base = dict(min_std=0.1, logprob_clip=(-5.0, 2.0), update_epochs=2, minibatch_size=16, gamma_denoising=0.9,
                clip_coef=0.01, clip_coef_base=0.001, clip_coef_rate=3.0, constant_clip=False, vf_coef=0.5,
                max_grad_norm=1.0, target_kl=None)  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def rollout_batch(policy, N=8, seed=0):
    torch.manual_seed(seed)
    obs = obs_t(N, seed)
    with torch.no_grad():
        chains, _ = policy.sample_chain(policy.ft.normalize_obs(obs), 3.0, 0.1, "sample")
    obs["time"] = torch.rand(N, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": obs,
        "chains": chains,
        "advantages": torch.randn(N, generator=g),
        "returns": torch.randn(N, generator=g),
    }


def make_opts(policy, critic):
    return torch.optim.AdamW(policy.ft.parameters(), lr=1e-4), torch.optim.AdamW(critic.parameters(), lr=1e-3)


def test_first_minibatch_ratios_are_one_and_clipped_equals_unclipped():
    policy = tiny_finetuned().train()
    critic = ppo.Critic(TINY, [16])
    stats, bad = ppo.ppo_update(
        policy, critic, rollout_batch(policy), ppo_args(), make_opts(policy, critic), True, "cpu"
    )
    # |ratio - 1| of the first minibatch, before any step: 0 up to float rounding. The old log-probs are computed
    # on other batch compositions than the minibatch's, and a different batch takes other BLAS/oneDNN kernel paths
    # (which differ between CPUs): 2.4e-7 was seen on an AMD EPYC. A real first-step ratio error would be >> 1e-5.
    assert bad is None and stats["ratio_first"] < 1e-5
    # The project's clipped objective: at ratio 1 it is the unclipped -mean(w_k A) (w_k = 0.9^(K-1-k)); a ratio past
    # the clip on the advantage's side earns no more than the clip allows; one on the other side is not clipped.
    args, k = ppo_args(), torch.arange(10) % 5
    adv, weights = torch.randn(10, generator=torch.Generator().manual_seed(0)), 0.9 ** (4 - k).float()
    loss, clip = ppo.denoising_pg_loss(torch.ones(10), adv, k, 5, 5, args)
    torch.testing.assert_close(loss, (-adv * weights).mean(), rtol=0, atol=1e-7)
    up = torch.full((10,), 1.5)
    loss_up, clip = ppo.denoising_pg_loss(up, adv.abs(), k, 5, 5, args)
    torch.testing.assert_close(loss_up, (-adv.abs() * weights * (1 + clip)).mean(), rtol=0, atol=1e-7)
    loss_down, _ = ppo.denoising_pg_loss(up, -adv.abs(), k, 5, 5, args)
    torch.testing.assert_close(loss_down, (adv.abs() * weights * 1.5).mean(), rtol=0, atol=1e-7)
    assert stats["epochs"] == 2 and np.isfinite(stats["pg_loss"]) and np.isfinite(stats["v_loss"])


def test_only_the_fine_tuned_steps_train_and_the_frozen_actor_stays():
    policy = tiny_finetuned(ft_steps=2).train()
    frozen_before = {k: v.clone() for k, v in policy.frozen.state_dict().items()}
    ft_before = {k: v.clone() for k, v in policy.ft.state_dict().items()}
    critic = ppo.Critic(TINY, [16])
    _, bad = ppo.ppo_update(policy, critic, rollout_batch(policy), ppo_args(), make_opts(policy, critic), True, "cpu")
    assert bad is None
    assert all(torch.equal(v, policy.frozen.state_dict()[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, policy.ft.state_dict()[k]) for k, v in ft_before.items())


def test_a_nan_reward_skips_the_update_and_names_the_tensor():
    policy = tiny_finetuned().train()
    critic = ppo.Critic(TINY, [16])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    T, E = 4, 2
    rewards = torch.zeros(T, E)
    rewards[2, 1] = float("nan")  # injected
    values, zeros = torch.zeros(T, E), torch.zeros(T, E)
    adv, ret = core.gae(rewards, values, values, zeros, zeros, 0.999, 0.95)
    batch = rollout_batch(policy, N=T * E)
    batch.update(advantages=adv.flatten(), returns=ret.flatten())
    stats, bad = ppo.ppo_update(policy, critic, batch, ppo_args(), make_opts(policy, critic), True, "cpu")
    assert bad == "advantages" and stats == {}
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())


def test_a_nan_parameter_skips_the_step_without_moving_the_critic():
    policy = tiny_finetuned().train()
    critic = ppo.Critic(TINY, [16])
    with torch.no_grad():
        next(policy.ft.denoiser.parameters()).view(-1)[0] = float("nan")
    critic_before = {k: v.clone() for k, v in critic.state_dict().items()}
    _, bad = ppo.ppo_update(policy, critic, rollout_batch(policy), ppo_args(), make_opts(policy, critic), True, "cpu")
    assert bad in ("loss", "ratio", "gradient")
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in critic_before.items())


def test_running_reward_scaler_state_round_trip():
    a = core.RunningRewardScaler(3, 0.99)
    a(np.tile([0.0, 1.0, 0.5], (5, 1)), np.tile([False, True, False], (5, 1)))
    b = core.RunningRewardScaler(3, 0.99)
    b.load_state_dict(a.state_dict())
    x = np.array([[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(a(x, np.zeros((1, 3), bool)), b(x, np.zeros((1, 3), bool)))  # same code and input


def test_a_last_minibatch_of_one_pair_is_dropped_not_a_skipped_update():
    """40 (env step, denoising step) pairs in minibatches of 13 leave one pair over: its advantage std is NaN, which
    made every such update non-finite (and five in a row stopped the run). Full minibatches only, as in DPPO."""
    policy = tiny_finetuned().train()
    critic = ppo.Critic(TINY, [16])
    batch = rollout_batch(policy, N=8)  # 8 env steps x 5 fine-tuned denoising steps = 40 pairs
    stats, bad = ppo.ppo_update(policy, critic, batch, ppo_args(minibatch_size=13), make_opts(policy, critic), True,
                                "cpu")  # fmt: skip
    assert bad is None and np.isfinite(stats["pg_loss"]) and stats["epochs"] == 2
    assert [len(mb) for mb in core.minibatches(40, 13, "cpu")] == [13, 13, 13]
    assert [len(mb) for mb in core.minibatches(40, 10, "cpu")] == [10] * 4
    assert [len(mb) for mb in core.minibatches(5, 10, "cpu")] == [5]  # fewer pairs than a minibatch: all of them
    mbs = torch.cat(core.minibatches(40, 13, "cpu"))
    assert len(set(mbs.tolist())) == 39  # a random permutation: no pair twice
    assert core.normalize_advantages(torch.tensor([3.0])).tolist() == [0.0]


def reward_scaler_reference(rewards, dones, gamma, clip, count=1e-4, mean=0.0, var=1.0):
    """The scaler's contract as a plain loop: per-env discounted returns (reset after an episode's end), one
    mean/variance merge over all T x E returns of the batch, every reward divided by the merged std, clipped."""
    T, E = rewards.shape
    returns, running = np.zeros((T, E)), np.zeros(E)
    for t in range(T):
        for e in range(E):
            running[e] = running[e] * gamma + rewards[t, e]
            returns[t, e] = running[e]
            if dones[t, e]:
                running[e] = 0.0
    n, m, v = returns.size, returns.mean(), returns.var()
    total = count + n
    var = (var * count + v * n + (m - mean) ** 2 * count * n / total) / total
    return np.clip(rewards / np.sqrt(var + 1e-8), -clip, clip), running


def test_reward_scaler_updates_once_per_batch_clips_and_resets():
    rng = np.random.default_rng(0)
    T, E = 30, 3
    rewards = (rng.random((T, E)) < 0.1).astype(float)
    rewards[5, 0] = 1.0
    dones = rewards > 0
    scaler = core.RunningRewardScaler(E, 0.99, clip=10.0)
    got = scaler(rewards, dones)
    expected, running = reward_scaler_reference(rewards, dones, 0.99, 10.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(scaler.ret, running, rtol=1e-12)
    # one factor for the whole iteration: the first success is scaled like the last
    factors = got[rewards > 0] / rewards[rewards > 0]
    assert len(factors) > 2 and np.ptp(factors) < 1e-12
    # clipped to +-clip: one reward after a long run of zeros has a tiny return variance
    lone = np.zeros((200, 1))
    lone[-1] = 1.0
    fresh = core.RunningRewardScaler(1, 0.99, clip=10.0)
    assert fresh(lone, lone > 0)[-1, 0] == 10.0
    # an evaluation that reset the envs zeroes their running returns
    scaler.ret[:] = 3.0
    scaler.reset()
    assert np.all(scaler.ret == 0.0)


def test_ddpm_fine_tuning_steps_are_checked_against_the_bc_checkpoints_schedule():
    args = SimpleNamespace(suite="libero_object", task_id=0, sampler="ddpm", denoising_steps=5, ft_denoising_steps=30,
                           num_envs=2, eval_num_envs=0, num_workers=1, batch_chunks=10, minibatch_size=10,
                           noise_scale=1.0, min_std=0.1,
                           noise_scale_final=None, noise_scale_switch=0.78)  # fmt: skip
    with pytest.raises(ValueError, match=r"--ft-denoising-steps must be in 1..20 .* 20 diffusion steps"):
        ppo.check_args(args, {**TINY, "num_train_timesteps": 20})
    ppo.check_args(args, {**TINY, "num_train_timesteps": 50})  # K = 50: 30 fine-tuned DDPM steps are fine
    args.sampler, args.ft_denoising_steps, args.denoising_steps = "ddim", 3, 3
    with pytest.raises(ValueError, match="--denoising-steps must divide"):
        ppo.check_args(args, {**TINY, "num_train_timesteps": 100})
    args.denoising_steps, args.noise_scale, args.min_std = 5, -0.5, 0.1
    with pytest.raises(ValueError, match="--noise-scale must be >= 0"):
        ppo.check_args(args, {**TINY, "num_train_timesteps": 100})
    args.noise_scale, args.noise_scale_final, args.min_std = 1.0, 0.0, 0.0
    with pytest.raises(ValueError, match=r"--noise-scale-final must be >= 0 \(and --min-std > 0 when it is 0"):
        ppo.check_args(args, {**TINY, "num_train_timesteps": 100})
    args.noise_scale_final, args.min_std, args.noise_scale_switch = 0.5, 0.1, 1.5
    with pytest.raises(ValueError, match=r"--noise-scale-switch is a fraction of --num-iterations"):
        ppo.check_args(args, {**TINY, "num_train_timesteps": 100})


def test_cli_refuses_ddpm_fine_tuning_beyond_the_bc_schedule_in_one_sentence(tmp_path):
    """The CLI path of the check above: a BC checkpoint with K = 20 and --ft-denoising-steps 30 stops before any
    environment starts (the old check assumed K = 100 and ran, silently fine-tuning all 20 steps)."""
    torch.manual_seed(0)
    path = str(tmp_path / "bc" / "final.pt")
    cfg = {**TINY, "num_train_timesteps": 20}
    run_utils.save_checkpoint(path, {"format": "bc_diffusion/v1", "model": bc.DiffusionPolicy(cfg).state_dict(),
                                     "ema": None, "config": cfg, "step": 0})  # fmt: skip
    proc = run_script(["ppo_diffusion.py", "--suite", "libero_object", "--task-id", "0", "--bc-ckpt", path,
                       "--sampler", "ddpm", "--ft-denoising-steps", "30", "--run-root", str(tmp_path / "runs")],
                      cwd=ROOT, check=False, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("error: --ft-denoising-steps must be in 1..20 for --sampler ddpm (the BC "
                                   "checkpoint has 20 diffusion steps).")  # fmt: skip
    assert not (tmp_path / "runs" / "ppo_diffusion").exists()


@pytest.mark.gpu
def test_graphed_sampler_equals_eager_and_survives_an_optimizer_step():
    """The graphed sampler against the eager one from the same CUDA RNG state. The first call of each (batch,
    mode) captures the graph after two eager warm-up passes, which advance the RNG; so every graph is captured
    first, and only then are both samplers run from the same seed (a replay draws its noise from the generator's
    current seed and offset, as the eager run does)."""
    device = torch.device("cuda")
    policy = tiny_finetuned().to(device).eval()
    graphed = dm.GraphedSampler(policy, 3.0, 0.1, enabled=True)
    eager = dm.GraphedSampler(policy, 3.0, 0.1, enabled=False)
    assert graphed.enabled

    def compare(B, mode, seed):
        obs = {k: v.to(device) for k, v in obs_t(B, seed=B).items()}
        graphed(obs, mode)  # capture (a no-op replay once captured)
        torch.manual_seed(seed)
        chain_g, act_g = graphed(obs, mode)
        torch.manual_seed(seed)
        chain_e, act_e = eager(obs, mode)
        # same kernels on the same inputs, but graph capture may pick other cuDNN/cuBLAS algorithms: 1e-5
        torch.testing.assert_close(chain_g, chain_e, atol=1e-5, rtol=0)
        torch.testing.assert_close(act_g, act_e, atol=1e-5, rtol=0)

    for B in (1, 8, 64):
        for mode in ("eta0", "sample"):
            compare(B, mode, seed=B)
    n_graphs = len(graphed.graphs)
    assert n_graphs == 6
    # replays read the parameters in place: after an optimiser step, still equal without re-capture
    opt = torch.optim.AdamW(policy.ft.parameters(), lr=1e-2)
    loss = sum(p.sum() for p in policy.ft.parameters())
    loss.backward()
    opt.step()
    for B in (1, 8, 64):
        for mode in ("eta0", "sample"):
            compare(B, mode, seed=0)
    assert len(graphed.graphs) == n_graphs


@pytest.mark.sim
def test_cli_pipeline_runs_an_iteration_and_checkpoints_each_envs_streams(tmp_path):
    """--pipeline through the CLI: one iteration with 2 envs on 2 workers; the checkpoint's rollout state holds every
    env's episode count and noise generator (what a resumed pipelined run continues from)."""
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    runs = str(tmp_path / "runs")
    tiny = "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16".split()
    run_script(["bc_diffusion.py", *tiny, "--obs-mode", "state", "--demo-paths", demo, "--run-root", runs,
                "--total-steps", "4", "--batch-size", "8", "--eval-episodes", "0"], cwd=ROOT)  # fmt: skip
    cli = (
        "ppo_diffusion.py --pipeline --num-envs 2 --num-workers 2 --num-steps 40 --num-iterations 1 --eval-every 0 "
        "--final-eval-episodes 0 --minibatch-size 100 --update-epochs 1 --critic-warmup-iters 0 --run-root"
    ).split()
    run_script([*cli, runs], cwd=ROOT, timeout=1200)  # fmt: skip
    run_dir = tmp_path / "runs" / "ppo_diffusion" / "libero_object" / "task00__seed0"
    update = [r for r in run_utils.read_metrics(str(run_dir)) if "pg_loss" in r][0]
    assert all(np.isfinite(update[k]) for k in ("pg_loss", "v_loss", "env_s", "policy_s", "update_s"))
    state = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["rollout"]
    # 40 chunk steps of 8 actions: each env's first episode times out at LIBERO-Object's 280 steps (35 chunks)
    assert state["env_episodes"] == [2, 2] and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])


@pytest.mark.sim
def test_cli_smoke_on_the_real_simulator(tmp_path):
    """BC (tiny, state mode) -> 2 PPO iterations with 2 envs; files written and metrics finite."""
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    runs = str(tmp_path / "runs")
    tiny = "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16".split()
    run_script(["bc_diffusion.py", *tiny, "--obs-mode", "state", "--demo-paths", demo, "--run-root", runs,
                "--total-steps", "4", "--batch-size", "8", "--eval-episodes", "0"], cwd=ROOT)  # fmt: skip
    cli = "ppo_diffusion.py --num-envs 2 --num-steps 3 --num-iterations 2 --eval-episodes 2 --minibatch-size 10"
    cli = [
        *cli.split(),
        *"--update-epochs 1 --critic-warmup-iters 1 --final-eval-episodes 2".split(),
        *"--noise-scale-final 0.5 --noise-scale-switch 0.5 --actor-lr-decay-start 0.5 --run-root".split(),
        runs,
    ]
    out = run_script(cli, cwd=ROOT, timeout=1200).stdout
    assert "iteration 0 (BC start): eval success mean" in out and "iteration 2: eval success mean" in out
    run_dir = tmp_path / "runs" / "ppo_diffusion" / "libero_object" / "task00__seed0"
    rows = run_utils.read_metrics(str(run_dir))
    updates = [r for r in rows if "pg_loss" in r]
    assert [r["step"] for r in updates] == [1, 2]
    assert [r["noise_scale"] for r in updates] == [1.0, 0.5] and "iteration 2: noise scale 0.5 from here on" in out
    for r in updates:
        for key in (
            "pg_loss",
            "v_loss",
            "approx_kl",
            "clipfrac",
            "env_s",
            "policy_s",
            "update_s",
            "explained_variance",
        ):
            assert np.isfinite(r[key]), key
        assert r["ratio_first"] < 1e-5  # 0 up to kernel rounding (see the unit test above)
    evals = [r for r in rows if "eval/success_rate" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval/episode_length"] == 280 for r in evals)
    assert all(r["eval/success_rate"] == r["eval_mean/success_rate"] and "eval_eta0/success_rate" in r for r in evals)
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["eval_mode"] == "mean" and final["episodes"] == 2 and final["iteration"] == 2
    assert set(dm.ACTION_MODES) <= set(final) and final["sample"]["episode_length"] == 280
    assert "action_std" in final["mean"] and "action_std" not in final["eta0"]  # the evaluated mode's spread
    for mode in dm.ACTION_MODES:  # each episode's outcome, in episode order, agrees with the rate
        assert len(final[mode]["successes"]) == 2 and np.mean(final[mode]["successes"]) == final[mode]["success_rate"]
    assert not any(isinstance(v, list) for r in rows for v in r.values())  # the metrics hold scalars only
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["format"] == "ppo_diffusion/v2" and ckpt["step"] == 2 and ckpt["env_steps"] > 0
    assert {"critic", "critic_optimizer", "reward_scaler", "optimizer"} <= set(ckpt)
    # the LR of each iteration: held for the first, decayed to --actor-lr-min by the last
    assert [r["actor_lr"] for r in updates] == pytest.approx([1e-4, 1e-5], rel=1e-9)
    loaded = ppo.load_policy(str(run_dir / "checkpoints" / "final.pt"))
    assert loaded.cfg["obs_mode"] == "state" and loaded.sched.noise_scale == 0.5
