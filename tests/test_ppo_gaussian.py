"""ppo_gaussian.py: the policy's log-probs, first-minibatch ratios, NaN guard, and a CLI run into collect.py."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, write_tiny_demo_file

import demo_hdf5
import ppo_diffusion as ppo
import ppo_gaussian as pg
import run_utils

CFG = dict(obs_mode="state", image_size=32, encoder="resnet18", encoder_head="spatial_softmax", shared_encoder=True,
           num_keypoints=4, feature_dim=16, state_encoder_dims=[32], act_steps=4, head_dims=[32],
           object_state_dim=5)  # fmt: skip


def batch(policy, N=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {"proprio": torch.randn(N, 8, generator=g), "object_state": torch.randn(N, 5, generator=g),
           "time": torch.rand(N, generator=g)}  # fmt: skip
    with torch.no_grad():
        actions = policy.dist(policy.normalize_obs(obs)).sample()
    return {
        "obs": obs,
        "actions": actions,
        "advantages": torch.randn(N, generator=g),
        "returns": torch.randn(N, generator=g),
    }


def args(**kw):
    base = dict(minibatch_size=5, update_epochs=2, clip_coef=0.01, vf_coef=0.5, ent_coef=0.0, max_grad_norm=1.0,
                target_kl=None, logprob_clip=(-5.0, 2.0))  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def opts(policy, critic):
    return torch.optim.AdamW(policy.parameters(), lr=1e-4), torch.optim.AdamW(critic.parameters(), lr=1e-3)


def test_chunk_log_prob_is_clamped_per_element_and_averaged_like_the_denoising_log_probs():
    torch.manual_seed(0)
    policy = pg.GaussianPolicy(CFG, init_log_std=-1.0)
    obs = policy.normalize_obs({"proprio": torch.randn(3, 8), "object_state": torch.randn(3, 5)})
    d = policy.dist(obs)
    a = torch.randn(3, 28) * 2
    mean = torch.tanh(policy.head(policy.encoder(obs)))
    per_element = -((a - mean) ** 2) / (2 * np.exp(-2.0)) - (-1.0) - 0.5 * np.log(2 * np.pi)
    assert (per_element < -5).any()  # some elements are clamped
    torch.testing.assert_close(pg.chunk_logprob(d, a, (-5.0, 2.0)), per_element.clamp(-5, 2).mean(-1),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # executed actions are the clamped chunk in environment units
    assert policy.to_actions(a).shape == (3, 4, 7)


def test_the_gaussian_baseline_shares_every_default_with_the_diffusion_scripts():
    """The paper's Gaussian agent uses "the same architecture and training procedure": every field ppo_gaussian.py
    shares with ppo_diffusion.py (PPO) or bc_diffusion.py (BC warm start, data, encoder) has the same default, except
    the differences listed here with their reason. Fails when either script's defaults drift."""
    import dataclasses

    import bc_diffusion as bc

    fields = lambda cls: {f.name: f.default for f in dataclasses.fields(cls)}  # noqa: E731
    gauss, diff, bcd = fields(pg.Args), fields(ppo.Args), fields(bc.Args)
    deliberate = {
        "exp_name": "the run's name",
        "minibatch_size": "chunks here, (chunk, denoising step) pairs there: checked below to give equal steps",
        "task_id": None,
    }
    shared_ppo = (set(gauss) & set(diff)) - set(deliberate)
    assert len(shared_ppo) > 30
    assert {k: gauss[k] for k in shared_ppo} == {k: diff[k] for k in shared_ppo}
    # the same gradient steps per iteration: N chunks / 3000 = N x 5 pairs / 15000
    assert gauss["minibatch_size"] * diff["ft_denoising_steps"] == diff["minibatch_size"]
    # the BC warm start is bc_diffusion.py's recipe under bc_* names
    renamed = {"bc_steps": "total_steps", "bc_batch_size": "batch_size", "bc_lr": "lr", "bc_betas": "betas",
               "bc_weight_decay": "weight_decay", "bc_warmup_steps": "warmup_steps", "bc_grad_clip": "grad_clip",
               "bc_ema_power": "ema_power", "bc_ema_max_decay": "ema_max_decay"}  # fmt: skip
    assert {k: gauss[k] for k in renamed} == {k: bcd[v] for k, v in renamed.items()}
    # the PPO phase's own weight decay, evaluation and checkpoint cadence were compared with ppo_diffusion above
    shared_bc = (
        (set(gauss) & set(bcd)) - set(deliberate) - {"weight_decay", "eval_every", "eval_episodes", "save_every"}
    )
    assert {"obs_mode", "random_shift", "feature_dim", "state_encoder_dims", "demo_source", "act_steps"} <= shared_bc
    assert {k: gauss[k] for k in shared_bc} == {k: bcd[k] for k in shared_bc}


def test_act_is_the_mean_or_a_sample_seeded_by_each_rows_generator():
    torch.manual_seed(0)
    policy = pg.GaussianPolicy(CFG).eval()
    obs = {"ee_pos": np.zeros((3, 3)), "ee_ori": np.zeros((3, 3)), "gripper_states": np.zeros((3, 2)),
           "object_state": np.linspace(-1, 1, 15).reshape(3, 5)}  # fmt: skip
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    mean = policy.act(obs)
    with torch.no_grad():
        d = policy.dist(policy.obs_tensors(obs))
    assert np.array_equal(mean, policy.to_actions(d.mean).numpy()) and mean.shape == (3, 4, 7)
    assert np.array_equal(policy.acting("mean")(obs, gens(1, 2, 3)), mean)
    sample = policy.acting("sample")(obs, gens(1, 2, 3))
    z = torch.stack([torch.randn(28, generator=g) for g in gens(1, 2, 3)])
    np.testing.assert_allclose(sample, policy.to_actions(d.mean + d.stddev * z).numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(sample, policy.act(obs, False, gens(1, 2, 3)))
    changed = policy.act(obs, False, gens(4, 2, 3))
    assert not np.array_equal(sample[0], changed[0]) and np.array_equal(sample[1:], changed[1:])


def test_first_minibatch_ratios_are_one_and_nan_advantages_skip():
    torch.manual_seed(0)
    policy, critic = pg.GaussianPolicy(CFG), ppo.Critic(CFG, [16])
    stats, bad = pg.gaussian_ppo_update(policy, critic, batch(policy), args(), opts(policy, critic), True, "cpu")
    # 0 up to float rounding: old and new log-probs come from different batch compositions, whose kernels round
    # differently on different CPUs (see test_ppo_diffusion.py)
    assert bad is None and stats["ratio_first"] < 1e-5 and stats["epochs"] == 2
    b = batch(policy)
    b["advantages"][3] = float("nan")
    assert pg.gaussian_ppo_update(policy, critic, b, args(), opts(policy, critic), True, "cpu") == ({}, "advantages")


def test_a_last_minibatch_of_one_chunk_is_dropped_not_a_skipped_update():
    """13 chunks in minibatches of 4 leave one over, whose advantage std is NaN: full minibatches only."""
    torch.manual_seed(0)
    policy, critic = pg.GaussianPolicy(CFG), ppo.Critic(CFG, [16])
    b = batch(policy, N=13)
    stats, bad = pg.gaussian_ppo_update(policy, critic, b, args(minibatch_size=4), opts(policy, critic), True, "cpu")
    assert bad is None and np.isfinite(stats["pg_loss"]) and stats["epochs"] == 2


@pytest.mark.sim
def test_cli_bc_ppo_then_collect_with_the_checkpoint(tmp_path):
    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=3, T=12, state_dim=98)
    runs = str(tmp_path / "runs")
    cli = ["ppo_gaussian.py", "--obs-mode", "state", "--demo-paths", demo, "--run-root", runs]
    cli += "--bc-steps 30 --log-every 10 --num-envs 2 --num-steps 3 --num-iterations 3 --critic-warmup-iters 1".split()
    cli += "--eval-episodes 2 --minibatch-size 3 --feature-dim 16 --state-encoder-dims 32 --head-dims 32".split()
    cli += "--final-eval-episodes 2 --reward-until-limit".split()
    out = run_script(cli, cwd=ROOT, timeout=1200).stdout
    assert "iteration 0 (BC start): eval success" in out and "iteration 3: eval success" in out
    run_dir = tmp_path / "runs" / "ppo_gaussian" / "libero_object" / "task00__seed0"
    assert json.loads((run_dir / "args.json").read_text())["reward_until_limit"] is True
    rows = run_utils.read_metrics(str(run_dir))
    assert [r["bc_step"] for r in rows if "bc_loss" in r] == [10, 20, 30]
    updates = [r for r in rows if "pg_loss" in r]
    assert [r["step"] for r in updates] == [1, 2, 3] and all(np.isfinite(r["v_loss"]) for r in updates)
    assert updates[-1]["approx_kl"] > 0  # the actor moved after the critic warm-up
    assert all("explained_variance" in r for r in updates)  # NaN when no return varied (no success)
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["eval_mode"] == "mean" and {"sample", "mean"} <= set(final) and final["episodes"] == 2
    assert len(final["mean"]["successes"]) == 2 and np.mean(final["mean"]["successes"]) == final["mean"]["success_rate"]
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["format"] == "ppo_gaussian/v2" and ckpt["bc_step"] == 30 and ckpt["step"] == 3
    bc_start = torch.load(run_dir / "checkpoints" / "bc.pt", weights_only=True)
    assert bc_start["bc_step"] == 30 and bc_start["step"] == 0
    # collect.py --policy gaussian finds the checkpoint by convention and stores the data as gaussian_rl
    data = str(tmp_path / "data")
    out = run_script("collect.py --policy gaussian --obs-mode state --max-episodes 2 --num-success 2".split()
                     + ["--run-root", runs, "--data-root", data], cwd=ROOT, check=False)  # fmt: skip
    assert "success rate" in out.stdout
    if out.returncode == 0:
        path = demo_hdf5.demo_path(
            data, "gaussian_rl", "libero_object", "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
        )
        with demo_hdf5.DemoFile(path) as f:
            assert f.source == "gaussian_rl" and f.attrs["checkpoint"].endswith("final.pt")
    else:
        assert "only 0 of 2 successes" in out.stderr or "only 1 of 2 successes" in out.stderr
