"""What makes an RL run quietly fail to learn, guarded: the direction of a PPO update (both policy classes), the
denoising weights and clips by hand, a bandit with a known optimum, the critic's targets at episode ends through the
Rollout, and the reward scaler over several iterations and a checkpoint. Fast: no simulator (a scripted fake vector
env stands behind VectorLiberoEnv's interface)."""

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, script_env, write_tiny_demo_file

import bc_diffusion as bc
import denoising_mdp as dm
import libero_env as le
import ppo_core as core
import ppo_diffusion as ppo
import ppo_gaussian as pg
import run_utils
import vector_env as ve

TINY_MLP = dict(
    obs_mode="state", image_size=32, encoder="resnet18", encoder_head="spatial_softmax", shared_encoder=True,
    num_keypoints=4, feature_dim=16, state_encoder_dims=[32], denoiser="mlp", unet_down_dims=[16, 32],
    unet_kernel_size=3, step_embed_dim=16, mlp_dims=[128, 128], horizon=4, act_steps=4, num_train_timesteps=100,
    object_state_dim=5,
)  # fmt: skip
GAUSS = dict(obs_mode="state", image_size=32, encoder="resnet18", encoder_head="spatial_softmax", shared_encoder=True,
             num_keypoints=4, feature_dim=16, state_encoder_dims=[32], act_steps=4, head_dims=[32],
             object_state_dim=5)  # fmt: skip


def diffusion_policy(seed=0):
    torch.manual_seed(seed)
    base = bc.DiffusionPolicy(TINY_MLP)
    return dm.FineTunedDiffusion(base, dm.DenoisingSchedule(base.alphas_cumprod, "ddim", 5, 1.0), 5, TINY_MLP)


def update_args(**kw):
    base = dict(min_std=0.1, logprob_clip=(-5.0, 2.0), update_epochs=1, minibatch_size=10_000, gamma_denoising=0.9,
                clip_coef=0.01, clip_coef_base=0.001, clip_coef_rate=3.0, constant_clip=False, vf_coef=0.5,
                max_grad_norm=0.0, target_kl=None, ent_coef=0.0)  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def observations(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"proprio": torch.randn(N, 8, generator=g), "object_state": torch.randn(N, 5, generator=g),
            "time": torch.zeros(N)}  # fmt: skip


def diffusion_logp(policy, obs, chains):
    """Sum over the fine-tuned denoising steps of each sample's log-prob (what PPO moves), (N,)."""
    with torch.no_grad():
        cond = policy.ft.encode(obs)
        total = torch.zeros(len(chains))
        for k in range(policy.sched.K):
            kk = torch.full((len(chains),), k)
            total += dm.denoising_logprob(policy.ft, policy.sched, cond, chains[:, k], chains[:, k + 1], kk, 0.1,
                                           4, (-5.0, 2.0))  # fmt: skip
    return total


# ---------------------------------------------------------------------------------------------------------------
# The loss and the direction of an update
# ---------------------------------------------------------------------------------------------------------------
def test_denoising_weights_and_clips_against_hand_computed_values():
    """Pairs (denoising index k, ratio, normalised advantage) with K = 5, g = 0.9, clip 0.001 -> 0.01 (rate 3):
    the weight is 0.9^(4-k) and the clip 0.001 + 0.009 (e^(3k/4) - 1) / (e^3 - 1)."""
    k = torch.tensor([0, 4, 4, 2])
    ratio = torch.tensor([1.5, 1.5, 0.5, 1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, clip = ppo.denoising_pg_loss(ratio, adv, k, 5, 5, update_args())
    clip_k2 = 0.001 + 0.009 * (math.exp(1.5) - 1) / (math.exp(3) - 1)
    torch.testing.assert_close(clip, torch.tensor([0.001, 0.01, 0.01, clip_k2]), rtol=1e-6, atol=0)
    per_pair = [
        max(-0.6561 * 1.5, -0.6561 * 1.001),  # k = 0: weight 0.9^4, ratio clipped to 1 + 0.001
        max(-1.0 * 1.5, -1.0 * 1.01),  # the action-emitting step: weight 1, clip 0.01
        max(1.0 * 0.5, 1.0 * 0.99),  # negative advantage, ratio below 1 - clip: the clipped (pessimistic) term
        -2.0 * 0.81 * 1.0,  # ratio 1: unclipped, weight 0.9^2
    ]
    assert loss.item() == pytest.approx(sum(per_pair) / 4, rel=1e-6)
    # fine-tuning only the last 2 of 5 steps: the clip starts at the first fine-tuned one
    _, clip = ppo.denoising_pg_loss(torch.ones(2), torch.ones(2), torch.tensor([3, 4]), 5, 2, update_args())
    torch.testing.assert_close(clip, torch.tensor([0.001, 0.01]), rtol=1e-6, atol=0)


def test_one_diffusion_update_raises_the_logprob_of_positive_advantages_and_lowers_the_negative():
    policy = diffusion_policy().train()
    critic = ppo.Critic(TINY_MLP, [16])
    N = 32
    obs = observations(N)
    torch.manual_seed(1)
    with torch.no_grad():
        chains, _ = policy.sample_chain(obs, 3.0, 0.1, "sample")
    advantages = torch.tensor([1.0, -1.0]).repeat(N // 2)
    before = diffusion_logp(policy, obs, chains)
    opts = (torch.optim.Adam(policy.ft.parameters(), lr=1e-3), torch.optim.Adam(critic.parameters(), lr=1e-3))
    batch = {"obs": obs, "chains": chains, "advantages": advantages, "returns": torch.zeros(N)}
    _, bad = ppo.ppo_update(policy, critic, batch, update_args(clip_coef=0.2, clip_coef_base=0.2), opts, True, "cpu")
    change = diffusion_logp(policy, obs, chains) - before
    assert bad is None
    assert change[advantages > 0].mean() > 0 > change[advantages < 0].mean()
    assert (change[advantages > 0] > change[advantages < 0].max()).float().mean() > 0.5


def test_one_gaussian_update_raises_the_logprob_of_positive_advantages_and_lowers_the_negative():
    torch.manual_seed(0)
    policy, critic = pg.GaussianPolicy(GAUSS), ppo.Critic(GAUSS, [16])
    N = 32
    obs = observations(N)
    with torch.no_grad():
        actions = policy.dist(obs).sample()
    advantages = torch.tensor([1.0, -1.0]).repeat(N // 2)

    def logp():
        with torch.no_grad():
            return policy.dist(obs).log_prob(actions).sum(-1)

    before = logp()
    opts = (torch.optim.Adam(policy.parameters(), lr=1e-3), torch.optim.Adam(critic.parameters(), lr=1e-3))
    batch = {"obs": obs, "actions": actions, "advantages": advantages, "returns": torch.zeros(N)}
    _, bad = pg.gaussian_ppo_update(policy, critic, batch, update_args(clip_coef=0.2), opts, True, "cpu")
    change = logp() - before
    assert bad is None
    assert change[advantages > 0].mean() > 0 > change[advantages < 0].mean()


# ---------------------------------------------------------------------------------------------------------------
# A one-step task with a known optimum: reward -|a - 0.5|^2 in the normalised action space
# ---------------------------------------------------------------------------------------------------------------
TARGET = 0.5


def bandit(sample, update, iterations=12, N=64):
    """Mean squared distance of the sampled (normalised) actions to TARGET before and after PPO iterations on
    rewards -distance (advantages = returns - the batch mean; the critic is trained alongside)."""
    obs = observations(N, seed=3)
    distances = []
    for _ in range(iterations + 1):
        extras, a_norm = sample(obs)
        distance = ((a_norm - TARGET) ** 2).mean(dim=tuple(range(1, a_norm.dim())))
        distances.append(distance.mean().item())
        reward = -distance
        update({"obs": obs, **extras, "advantages": reward - reward.mean(), "returns": reward})
    return distances[0], distances[-1]


def test_diffusion_ppo_solves_a_bandit_with_a_known_optimum():
    policy = diffusion_policy(seed=2).train()
    critic = ppo.Critic(TINY_MLP, [16])
    opts = (torch.optim.Adam(policy.ft.parameters(), lr=1e-3), torch.optim.Adam(critic.parameters(), lr=1e-3))
    args = update_args(update_epochs=4, minibatch_size=80, clip_coef=0.2, clip_coef_base=0.2)

    def sample(obs):
        with torch.no_grad():
            chains, _ = policy.sample_chain(obs, 3.0, 0.1, "sample")
        return {"chains": chains}, chains[:, -1].clamp(-1, 1)

    def update(batch):
        _, bad = ppo.ppo_update(policy, critic, batch, args, opts, True, "cpu")
        assert bad is None

    torch.manual_seed(0)
    first, last = bandit(sample, update)
    assert last < 0.4 * first, (first, last)  # measured: 0.89 -> 0.14 (diffusion), see the Gaussian's below


def test_gaussian_ppo_solves_a_bandit_with_a_known_optimum():
    torch.manual_seed(2)
    policy, critic = pg.GaussianPolicy(GAUSS), ppo.Critic(GAUSS, [16])
    opts = (torch.optim.Adam(policy.parameters(), lr=3e-3), torch.optim.Adam(critic.parameters(), lr=1e-3))
    args = update_args(update_epochs=4, minibatch_size=16, clip_coef=0.2)

    def sample(obs):
        with torch.no_grad():
            a = policy.dist(obs).sample()
        return {"actions": a}, a.clamp(-1, 1)

    def update(batch):
        _, bad = pg.gaussian_ppo_update(policy, critic, batch, args, opts, True, "cpu")
        assert bad is None

    torch.manual_seed(0)
    first, last = bandit(sample, update)
    assert last < 0.4 * first, (first, last)  # measured: 0.89 -> 0.14 (diffusion), see the Gaussian's below


# ---------------------------------------------------------------------------------------------------------------
# Critic targets at episode ends, through the Rollout and the value bootstrap
# ---------------------------------------------------------------------------------------------------------------
class FakeVectorEnv:
    """VectorLiberoEnv's interface over scripted episodes of ``max_steps`` actions: env i succeeds when its episode
    reaches ``success_at[i]`` actions (None: never, so it times out). The object state carries the env's t."""

    def __init__(self, max_steps: int, success_at: list):
        self.task = SimpleNamespace(max_steps=max_steps)
        self.num_envs, self.success_at, self.obs_mode = len(success_at), success_at, "state"
        self.t = [0] * self.num_envs
        self.resets, self.layouts = [], []  # env ids reset, and the (init state, seed) of each reset

    def _obs(self, i):
        return {"ee_pos": np.zeros(3), "ee_ori": np.zeros(3), "gripper_states": np.zeros(2),
                "object_state": np.full(5, float(self.t[i]))}  # fmt: skip

    def reset(self, env_ids, init_states, seeds, render=False):
        self.resets += list(env_ids)
        self.layouts += [(int(s), int(sd)) for s, sd in zip(init_states, seeds)]
        for i in env_ids:
            self.t[i] = 0
        return [self._obs(i) for i in env_ids]

    def step_chunk(self, env_ids, actions, render=False):
        out = []
        for i, a in zip(env_ids, actions):
            n = min(len(a), self.task.max_steps - self.t[i])
            self.t[i] += n
            done = self.success_at[i] is not None and self.t[i] >= self.success_at[i]
            truncated = not done and self.t[i] >= self.task.max_steps
            out.append(le.ChunkResult(self._obs(i), float(done), done, truncated, n, self.t[i]))
        return out


def preprocess(obs):
    return {"proprio": torch.zeros(len(obs["object_state"]), 8),
            "object_state": torch.as_tensor(obs["object_state"], dtype=torch.float32)}  # fmt: skip


def zero_act(obs_t):
    E = len(obs_t["proprio"])
    return np.zeros((E, 4, 7)), {"chains": torch.zeros(E, 1)}


def test_critic_targets_of_a_success_a_time_out_and_a_cut_through_the_rollout():
    """Step limit 12 actions = 3 chunks of 4, 4 chunk steps in the iteration, gamma 0.5, lambda 1, V(s, t) = 10 t/12
    + 1 (so every target that bootstraps shows it). Env 0 succeeds after 2 chunks, twice; env 1 times out after 3
    chunks (value 0, no bootstrap) and its next episode is cut after one chunk (bootstraps V(t = 4)); env 2 succeeds
    on its last chunk, then is cut like env 1."""
    venv = FakeVectorEnv(12, [8, None, 12])
    rollout = core.Rollout(venv, preprocess, seed=0, render=False)
    batch = rollout.collect(4, zero_act, {"env": 0.0, "policy": 0.0})
    third = 1 / 3
    expected_time = torch.tensor([[0, 0, 0], [third, third, third], [0, 2 * third, 2 * third], [third, 0, 0]])
    torch.testing.assert_close(batch["obs"]["time"], expected_time.float(), rtol=0, atol=1e-7)
    assert batch["truncated"][:, 1].tolist() == [0, 0, 1, 0] and batch["terminated"][:, 0].tolist() == [0, 1, 0, 1]
    assert sorted(rollout.episode_returns) == [0.0, 1.0, 1.0, 1.0]

    def critic(obs_t):
        return 10 * obs_t["time"] + 1

    obs = {k: v.flatten(0, 1) for k, v in batch["obs"].items()}
    values, next_values = core.bootstrap_values(batch, obs, critic, 100, "cpu")
    _, returns = core.gae(batch["rewards"], values, next_values, batch["terminated"], batch["truncated"], 0.5, 1.0)
    v_cut = 10 * third + 1  # V of the observation the iteration stopped at (t = 4 of a new episode)
    expected = torch.tensor([[0.5, 0.0, 0.25], [1.0, 0.0, 0.5], [0.5, 0.0, 1.0], [1.0, 0.5 * v_cut, 0.5 * v_cut]])
    torch.testing.assert_close(returns, expected, rtol=0, atol=1e-6)
    # the next iteration, started fresh (reset_at_iteration): every env on a new episode at t = 0
    venv.resets.clear()
    batch = rollout.collect(1, zero_act, {"env": 0.0, "policy": 0.0}, reset=True)
    assert sorted(venv.resets) == [0, 1, 2] and batch["obs"]["time"][0].tolist() == [0.0, 0.0, 0.0]


def test_reward_until_limit_pays_an_earlier_success_more_through_the_rollout():
    """--reward-until-limit: a success at env step t pays 1 + gamma + ... + gamma^n for the n = ceil((limit - t) / 4)
    chunks left, by hand at gamma 0.5 and limit 12: success after 1 chunk (t = 4, n = 2) 1.75, after 2 (t = 8, n = 1)
    1.5, after 3 (t = 12, n = 0) 1; a time-out still pays 0; the logged outcome stays 1 per success."""
    assert core.success_return(4, 12, 4, 0.5) == pytest.approx(1.75, abs=1e-12)
    assert core.success_return(5, 12, 4, 0.5) == pytest.approx(1.75, abs=1e-12)  # 7 steps left: 2 chunks, one short
    assert core.success_return(9, 12, 4, 0.5) == pytest.approx(1.5, abs=1e-12)
    assert core.success_return(12, 12, 4, 1.0) == 1.0 and core.success_return(3, 12, 4, 1.0) == 4.0
    args = SimpleNamespace(reward_until_limit=True, gamma=0.5)
    assert core.success_reward_fn(SimpleNamespace(reward_until_limit=False, gamma=0.5), 12, 4) is None
    venv = FakeVectorEnv(12, [4, 8, 12, None])
    rollout = core.Rollout(venv, preprocess, seed=0, render=False, success_reward=core.success_reward_fn(args, 12, 4))
    batch = rollout.collect(3, zero_act, {"env": 0.0, "policy": 0.0})
    expected = torch.tensor([[1.75, 0, 0, 0], [1.75, 1.5, 0, 0], [1.75, 0, 1.0, 0]])
    torch.testing.assert_close(batch["rewards"], expected, rtol=0, atol=1e-6)
    assert batch["terminated"].sum(0).tolist() == [3, 1, 1, 0] and batch["truncated"][:, 3].tolist() == [0, 0, 1]
    assert sorted(rollout.episode_returns) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_the_rollout_state_restores_the_same_init_states():
    venv = FakeVectorEnv(12, [None, None])
    a = core.Rollout(venv, preprocess, seed=3, render=False)
    a.collect(1, zero_act, {"env": 0.0, "policy": 0.0})
    state = a.state_dict()
    expected = a.rng.integers(0, 50, 5).tolist()
    b = core.Rollout(venv, preprocess, seed=99, render=False)
    b.load_state_dict(state)
    assert b.rng.integers(0, 50, 5).tolist() == expected and b.episodes == a.episodes == 2


def test_training_episodes_start_from_sampled_layouts_by_default_never_from_the_protocol():
    """The protocol's 50 init states are held out: every training episode asks the env for the layout sampled from
    its own seed (10^6 + seed + episode counter), unless the run trains on the protocol's states explicitly."""
    venv = FakeVectorEnv(8, [None, 4])
    rollout = core.Rollout(venv, preprocess, seed=5, render=False)
    rollout.collect(3, zero_act, {"env": 0.0, "policy": 0.0})
    inits, seeds = zip(*venv.layouts)
    # 2 first episodes, env 1's 3 successes after a chunk each, env 0's time-out after 2 chunks: 6 resets
    assert set(inits) == {le.SAMPLED} and list(seeds) == [1_000_005 + n for n in range(6)]
    venv = FakeVectorEnv(8, [None, 4])
    core.Rollout(venv, preprocess, seed=5, render=False, layouts="protocol").collect(
        3, zero_act, {"env": 0.0, "policy": 0.0}
    )
    assert all(0 <= s < le.NUM_INIT_STATES for s, _ in venv.layouts)
    with pytest.raises(ValueError, match="layouts must be one of protocol, sampled, got 'random'"):
        core.Rollout(venv, preprocess, seed=5, render=False, layouts="random")


@pytest.mark.sim
def test_a_pipelined_rollout_gives_the_same_batch_for_any_worker_grouping_and_its_state_carries_the_streams():
    """--pipeline: every worker's envs step on their own, so which worker answers first varies from run to run; the
    batch must not. Three envs of a task cut to 16 steps (4 chunks of 4: every env resets twice inside the 9 chunk
    steps), one worker (strictly in turn) against two (interleaved): the same observations, actions, rewards and
    episode ends, and the state dict restores every env's episode count and noise stream."""
    task = dataclasses.replace(le.resolve_task("libero_object", 0), max_steps=16)

    def act(obs_t, generators):  # exploration noise from each env's own stream, as the PPO scripts' act
        a = torch.stack([0.5 * torch.randn(4, 7, generator=g) for g in generators])
        return a.numpy(), {"a": a}

    batches, states = [], []
    for workers in (1, 2):
        with ve.VectorLiberoEnv(task, 3, obs_mode="state", num_workers=workers, fast_step=True) as venv:
            rollout = core.Rollout(venv, preprocess, seed=7, render=False, pipelined=True)
            timers = {"env": 0.0, "policy": 0.0}
            torch.set_num_threads(2)
            threads = []  # the policy runs on one torch thread while the workers step; the caller's count comes back

            def counted(obs_t, generators, seen=threads):
                seen.append(torch.get_num_threads())
                return act(obs_t, generators)

            batches.append(rollout.collect(9, counted, timers))
            assert set(threads) == {1} and torch.get_num_threads() == 2
            states.append(rollout.state_dict())
            assert timers["env"] > 0 and timers["policy"] > 0
    one, two = batches
    assert one["truncated"].sum().item() == 6 and one["truncated"][3::4].sum().item() == 6  # every 4th chunk step
    for key in ("rewards", "terminated", "truncated"):
        assert torch.equal(one[key], two[key]), key
    assert torch.equal(one["extras"]["a"], two["extras"]["a"]) and one["extras"]["a"].std() > 0.3
    for key in one["obs"]:  # the same dynamics (worker processes step the same floats)
        torch.testing.assert_close(one["obs"][key], two["obs"][key], rtol=0, atol=1e-9)
    assert states[0]["env_episodes"] == states[1]["env_episodes"] == [3, 3, 3]  # the first, then two resets each
    with ve.VectorLiberoEnv(task, 3, obs_mode="state", num_workers=1, fast_step=True) as venv:
        resumed = core.Rollout(venv, preprocess, seed=0, render=False, pipelined=True)
        resumed.load_state_dict(states[1])
        for g, g_state in zip(resumed.generators, states[1]["generators"]):
            assert torch.equal(g.get_state(), g_state)
        assert resumed.env_episodes.tolist() == [3, 3, 3]


def test_a_run_resumes_on_the_layouts_it_started_on():
    core.check_resumed_layouts("latest.pt", {"train_layouts": "sampled"}, "sampled")
    with pytest.raises(run_utils.CheckpointError, match="latest.pt was trained with --train-layouts protocol; resume"):
        core.check_resumed_layouts("latest.pt", {}, "sampled")  # a checkpoint from before the split: the protocol's


# ---------------------------------------------------------------------------------------------------------------
# The reward scaler over several iterations
# ---------------------------------------------------------------------------------------------------------------
def test_reward_scaler_tracks_the_variance_of_all_returns_so_far_across_iterations_and_a_checkpoint(tmp_path):
    """Against a plain reference: the per-env discounted returns of every iteration so far (carried across
    iterations until an episode ends), their variance over all of them, rewards divided by its square root. The
    scaler starts from a prior of weight 1e-4 (mean 0, variance 1): relative effect < 1e-5 here, tolerance 1e-4."""
    rng = np.random.default_rng(0)
    E, T, gamma = 3, 20, 0.99
    scaler = core.RunningRewardScaler(E, gamma, clip=10.0)
    running, seen = np.zeros(E), []
    for it in range(5):
        rewards = (rng.random((T, E)) < 0.2) * rng.uniform(0.5, 2.0, (T, E))
        dones = rng.random((T, E)) < 0.1
        for t in range(T):
            running = running * gamma + rewards[t]
            seen.append(running.copy())
            running[dones[t]] = 0.0
        got = scaler(rewards, dones)
        std = math.sqrt(np.var(np.concatenate(seen)) + 1e-8)
        np.testing.assert_allclose(got, np.clip(rewards / std, -10, 10), rtol=1e-4, atol=1e-9)
        if it == 2:  # through a checkpoint file: the resumed scaler continues the same statistics
            torch.save(scaler.state_dict(), tmp_path / "scaler.pt")
            scaler = core.RunningRewardScaler(E, gamma, clip=10.0)
            scaler.load_state_dict(torch.load(tmp_path / "scaler.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------------------------
# On the real simulator: kill-and-resume, and evaluation that does not depend on the worker count
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.sim
@pytest.mark.parametrize("kill", ["SIGKILL to the run", "SIGTERM to its process group"])
def test_a_killed_and_resumed_ppo_run_ends_like_an_uninterrupted_one(tmp_path, kill):
    """Same weights, critic, reward-scaler state, env steps and episode count: every iteration starts fresh
    episodes (reset_at_iteration) and the checkpoint carries the init-state RNG, the episode counter and every RNG.

    SIGKILL: the run resumes from the last iteration's checkpoint. SIGTERM to the whole process group (what SLURM,
    `kill -- -PGID` and a terminal send: the env workers get it too): the run finishes its iteration with its workers,
    writes the checkpoint and says so (a worker that died of the signal made the run crash instead)."""
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    tiny = "--feature-dim 16 --state-encoder-dims 32 --denoiser mlp --mlp-dims 32 --step-embed-dim 16".split()
    bc_cli = ["bc_diffusion.py", *tiny, "--obs-mode", "state", "--demo-paths", demo, "--run-root", str(tmp_path / "bc")]
    run_script([*bc_cli, "--total-steps", "4", "--batch-size", "8", "--eval-episodes", "0"], cwd=ROOT)
    bc_ckpt = str(tmp_path / "bc" / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints" / "final.pt")
    base = [sys.executable, "ppo_diffusion.py", "--bc-ckpt", bc_ckpt, "--num-envs", "2", "--num-workers", "1",
            "--num-steps", "12", "--num-iterations", "4", "--eval-episodes", "0", "--final-eval-episodes", "0",
            "--minibatch-size", "20", "--update-epochs", "2", "--critic-warmup-iters", "1"]  # fmt: skip
    run_script([*base[1:], "--run-root", str(tmp_path / "a")], cwd=ROOT, timeout=900)
    ckpts = tmp_path / "b" / "ppo_diffusion" / "libero_object" / "task00__seed0" / "checkpoints"
    env = {k: v for k, v in script_env().items() if not k.startswith("SLURM_")}  # no requeue of a job the test is in
    log_path = tmp_path / "b.log"  # a file, not a pipe nobody reads while the run goes on
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([*base, "--run-root", str(tmp_path / "b")], cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        killed_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            if (ckpts / "latest.pt").exists():
                killed_at = torch.load(ckpts / "latest.pt", weights_only=True)["step"]
                if killed_at >= 2:
                    break
            time.sleep(0.05)
        if kill.startswith("SIGKILL"):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)  # a run that hangs on its way out fails here
            log = log_path.read_text()
            assert proc.returncode == 143, f"exit code {proc.returncode}, not the pre-emption's 143:\n{log[-3000:]}"
            assert "pre-empted (SIGTERM): checkpoint written; rerun with --resume auto" in log
            assert "EnvWorkerError" not in log
            killed_at = torch.load(ckpts / "latest.pt", weights_only=True)["step"]  # the iteration it finished
    finally:  # nothing of the run outlives the test, whatever failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (ckpts / "final.pt").exists() and killed_at is not None, "the run finished before it could be killed"
    out = run_script([*base[1:], "--run-root", str(tmp_path / "b")], cwd=ROOT, timeout=900).stdout
    assert f"resumed from {ckpts / 'latest.pt'} at iteration {killed_at}" in out
    a = torch.load(tmp_path / "a/ppo_diffusion/libero_object/task00__seed0/checkpoints/final.pt", weights_only=True)
    b = torch.load(ckpts / "final.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["env_steps"] == b["env_steps"]
    assert a["rollout"]["episodes"] == b["rollout"]["episodes"] == 2 * 4
    # exact on purpose, as BC's resume test: the same code on the same batches and kernels on this machine
    for key in ("model", "critic"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after kill and resume"
    for name in ("ret", "stats"):
        assert torch.equal(a["reward_scaler"][name], b["reward_scaler"][name])


@pytest.mark.sim
@pytest.mark.parametrize("kind", ["diffusion", "gaussian"])
def test_evaluation_outcomes_do_not_depend_on_the_worker_count_and_leave_the_training_rng(kind):
    """Each episode draws its policy noise from its own generator: with 1 or 3 envs the same per-episode actions
    (up to kernel rounding of other batch sizes) and outcomes; the global RNG is where it was."""

    task = dataclasses.replace(le.resolve_task("libero_object", 0), max_steps=16)
    runs, act = {}, None
    for num_envs in (1, 3):
        with ve.VectorLiberoEnv(task, num_envs, obs_mode="state", fast_step=True) as venv:
            if act is None:  # an untrained policy sized for the task's object state
                dim = len(venv.reset([0], [0], [0], render=False)[0]["object_state"])
                torch.manual_seed(5)
                if kind == "diffusion":
                    base = bc.DiffusionPolicy({**TINY_MLP, "object_state_dim": dim})
                    sched = dm.DenoisingSchedule(base.alphas_cumprod, "ddim", 5, 1.0)
                    policy = dm.FineTunedDiffusion(base, sched, 5, base.cfg)
                else:
                    policy = pg.GaussianPolicy({**GAUSS, "object_state_dim": dim})
                act = policy.eval().acting("sample")
            torch.manual_seed(11)
            learned = ve.LearnedPolicy(act, 4, "state", 0, seed=7)
            runs[num_envs] = ve.run_episodes(venv, learned, range(4), seed=7, replan_steps=4, record=True,
                                             render=False, reset_policy=learned.reset)  # fmt: skip
            after = torch.rand(2)
            torch.manual_seed(11)
            assert torch.equal(after, torch.rand(2))  # the training RNG was not advanced
    for r1, r3 in zip(runs[1], runs[3]):
        assert (r1.episode, r1.success, r1.length) == (r3.episode, r3.success, r3.length)
        a1, a3 = (np.stack([s["action"] for s in r.steps]) for r in (r1, r3))
        np.testing.assert_allclose(a1, a3, rtol=0, atol=1e-4)
    first_actions = [r.steps[0]["action"] for r in runs[1]]
    assert not np.allclose(first_actions[0], first_actions[1])  # episodes do draw different noise


@pytest.mark.sim
def test_a_pre_emption_during_the_final_evaluation_stops_it_and_the_resumed_run_only_evaluates_what_is_missing(
    tmp_path,
):
    """A one-iteration run goes on into its final evaluation (3 modes x 20 episodes of 280 steps, one env): SIGTERM
    once its first mode is kept stops it within a chunk step (before, it ran the whole evaluation and ended as if
    never signalled), and the rerun keeps that mode and evaluates only the other two, without training again."""
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    tiny = "--feature-dim 16 --state-encoder-dims 32 --denoiser mlp --mlp-dims 32 --step-embed-dim 16".split()
    run_script(["bc_diffusion.py", *tiny, "--obs-mode", "state", "--demo-paths", demo, "--run-root",
                str(tmp_path / "bc"), "--total-steps", "4", "--batch-size", "8", "--eval-episodes", "0"],
               cwd=ROOT)  # fmt: skip
    bc_ckpt = str(tmp_path / "bc" / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints" / "final.pt")
    cmd = ["ppo_diffusion.py", "--bc-ckpt", bc_ckpt, "--num-envs", "1", "--num-steps", "4", "--num-iterations", "1",
           "--eval-episodes", "0", "--final-eval-episodes", "20", "--minibatch-size", "10", "--update-epochs", "1",
           "--run-root", str(tmp_path / "runs")]  # fmt: skip
    run_dir = tmp_path / "runs" / "ppo_diffusion" / "libero_object" / "task00__seed0"
    partial = run_dir / "final_eval.partial.json"
    env = {k: v for k, v in script_env().items() if not k.startswith("SLURM_")}  # no requeue of a job the test is in
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), (tmp_path / "run.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=120)
        stopped_in = time.monotonic() - signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 143 and "pre-empted (SIGTERM)" in log, log[-3000:]
    assert stopped_in < 15, f"took {stopped_in:.0f} s to stop"  # the rest: 2 modes x 20 x 280 env steps
    kept = json.loads(partial.read_text())
    assert list(kept) == ["sample"] and not (run_dir / "final_eval.json").exists()
    out = run_script(cmd, cwd=ROOT, timeout=900).stdout
    assert "at iteration 1" in out and "iteration 1: train success" not in out  # no training again
    assert f"evaluation: sample kept from {partial}" in out
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["sample"] == kept["sample"] and set(dm.ACTION_MODES) <= set(final) and not partial.exists()
    assert all(len(final[m]["successes"]) == 20 for m in dm.ACTION_MODES)
