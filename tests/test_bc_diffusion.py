"""bc_diffusion.py: schedule and samplers against diffusers, the loss by hand, checkpoints, learning, the CLI."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import ROOT, run_script, script_env, write_tiny_demo_file

import bc_diffusion as bc
import run_utils

TINY = dict(
    obs_mode="state", image_size=32, encoder="resnet18", encoder_head="spatial_softmax", shared_encoder=True,
    num_keypoints=4, feature_dim=16, state_encoder_dims=[32], denoiser="unet", unet_down_dims=[16, 32],
    unet_kernel_size=3, step_embed_dim=16, mlp_dims=[64, 64], horizon=8, act_steps=4, num_train_timesteps=100,
    object_state_dim=4,
)  # fmt: skip
TINY_CLI = (
    "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --unet-kernel-size 3 --step-embed-dim 16 "
    "--horizon 8 --act-steps 4 --num-keypoints 4 --batch-size 8 --eval-episodes 0 --log-every 5"
).split()


def tiny_policy(seed=0, **overrides):
    torch.manual_seed(seed)
    return bc.DiffusionPolicy({**TINY, **overrides}).eval()


def fixed_inputs(policy, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, policy.encoder.out_dim, generator=g)
    x = torch.randn(B, policy.cfg["horizon"], 7, generator=g)
    return cond, x


def diffusers_kwargs():
    return dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon")


def test_cosine_betas_match_diffusers():
    ours = bc.cosine_betas(100)
    theirs = DDPMScheduler(**diffusers_kwargs()).betas
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7)
    assert bc.ddim_timesteps(100, 5) == [80, 60, 40, 20, 0]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_matches_diffusers(eta):
    policy = tiny_policy()
    cond, x = fixed_inputs(policy)
    sched = DDIMScheduler(**diffusers_kwargs(), set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [80, 60, 40, 20, 0]
    # our sampler draws x.shape noise per step from its generator (none at the last step, where sigma = 0)
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(x.shape, generator=g) for _ in range(4)] + [torch.zeros_like(x)]
    ref = x.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = policy.denoise(ref, t.expand(len(ref)), cond)
            ref = sched.step(eps, t, ref, eta=eta, use_clipped_model_output=True, variance_noise=noise[i]).prev_sample
    g = torch.Generator().manual_seed(7)
    ours = bc.sample_actions(policy, cond, x.clone(), "ddim", 5, eta=eta, generator=g)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_ddpm_sampler_matches_diffusers():
    policy = tiny_policy()
    cond, x = fixed_inputs(policy)
    sched = DDPMScheduler(**diffusers_kwargs(), variance_type="fixed_small")
    sched.set_timesteps(100)
    ref, g = x.clone(), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = policy.denoise(ref, t.expand(len(ref)), cond)
            ref = sched.step(eps, t, ref, generator=g).prev_sample
    ours = bc.sample_actions(policy, cond, x.clone(), "ddpm", 100, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_deterministic_ddim_repeats_exactly_for_the_same_noise():
    policy = tiny_policy()
    cond, x = fixed_inputs(policy)
    a = bc.sample_actions(policy, cond, x.clone(), "ddim", 5, eta=0.0)
    b = bc.sample_actions(policy, cond, x.clone(), "ddim", 5, eta=0.0)
    assert torch.equal(a, b) and a.abs().max() <= 1.0


def test_bc_loss_equals_a_hand_computation():
    policy = tiny_policy()
    g = torch.Generator().manual_seed(5)
    a0 = torch.rand(4, 8, 7, generator=g) * 2 - 1
    eps = torch.randn(4, 8, 7, generator=g)
    t = torch.tensor([0, 17, 63, 99])
    cond = torch.randn(4, policy.encoder.out_dim, generator=g)
    x_t = DDPMScheduler(**diffusers_kwargs()).add_noise(a0, eps, t)  # the reference forward process
    pred = policy.denoise(x_t, t, cond)
    by_hand = ((pred - eps) ** 2).sum() / pred.numel()
    torch.testing.assert_close(bc.ddpm_loss(policy, a0, cond, t, eps), by_hand, atol=1e-6, rtol=1e-5)


def obs_batch(object_state, B):
    return {"ee_pos": np.zeros((B, 3)), "ee_ori": np.zeros((B, 3)), "gripper_states": np.zeros((B, 2)),
            "object_state": object_state}  # fmt: skip


def test_checkpoint_round_trip_reproduces_actions_with_weights_only(tmp_path):
    policy = tiny_policy(seed=3)
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.uniform(-1, 1, (50, 7)), rng.normal(size=(50, 8)), rng.normal(size=(50, 4)))
    path = str(tmp_path / "checkpoints" / "final.pt")
    ckpt = {"format": "bc_diffusion/v1", "model": policy.state_dict(), "ema": None, "config": policy.cfg, "step": 0}
    run_utils.save_checkpoint(path, ckpt)
    loaded = bc.load_policy(path)
    obs = obs_batch(np.random.default_rng(3).normal(size=(5, 4)), 5)
    noise = torch.randn(5, 8, 7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(policy.act(obs, noise=noise), loaded.act(obs, noise=noise))
    assert policy.act(obs, noise=noise).shape == (5, 4, 7)


def synthetic_chunks(context: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(N, 4) contexts -> (N, 8, 7) demonstrated chunks: arm motion whose amplitude and phase depend smoothly on the
    context, gripper closed when context[3] > 0."""
    t = np.arange(8)[None, :, None]
    arm = 0.7 * np.tanh(context @ W)[:, None, :] * np.cos(t / 4 + context[:, :1, None])
    grip = np.where(context[:, 3:4] > 0, 1.0, -1.0)[:, None, :].repeat(8, 1)
    return np.concatenate([arm, grip], -1).astype(np.float32)


def test_learns_synthetic_chunks():
    """Tiny U-Net on CPU (< 1 min): the loss falls by at least half, and deterministic DDIM-5 samples land within
    a mean absolute error of 0.12 (90th percentile 0.25) of the demonstrated chunk, in action units."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 6)) * 0.5
    torch.manual_seed(0)
    policy = tiny_policy(unet_down_dims=[32, 64], feature_dim=32, state_encoder_dims=[64]).train()
    contexts = rng.uniform(-1, 1, (4000, 4))
    policy.fit_normalizer(synthetic_chunks(contexts, W).reshape(-1, 7), np.zeros((4, 8)), contexts)
    steps, B = 1000, 128
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, run_utils.cosine_with_warmup(50, steps))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        c = torch.rand(B, 4, generator=g).numpy() * 2 - 1
        obs = policy.normalize_obs({"proprio": torch.zeros(B, 8), "object_state": torch.from_numpy(c).float()})
        a0 = policy.normalize_actions(torch.from_numpy(synthetic_chunks(c, W)))
        t = torch.randint(0, 100, (B,), generator=g)
        loss = bc.ddpm_loss(policy, a0, policy.encode(obs), t, torch.randn(a0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert np.mean(losses[-100:]) <= 0.5 * np.mean(losses[:100])
    policy.eval()
    test = rng.uniform(-1, 1, (64, 4))
    test[:, 3] = np.sign(test[:, 3]) * np.maximum(np.abs(test[:, 3]), 0.3)  # away from the gripper switch
    sampled = policy.act(obs_batch(test, 64), generator=torch.Generator().manual_seed(1))  # (64, act_steps, 7)
    error = np.abs(sampled - synthetic_chunks(test, W)[:, :4])
    assert error.mean() < 0.12 and np.percentile(error, 90) < 0.25, (error.mean(), np.percentile(error, 90))


def test_default_model_is_about_12m_parameters():
    cfg = bc.policy_config(bc.Args())
    n = run_utils.count_parameters(bc.DiffusionPolicy(cfg))
    assert 11.5e6 < n < 13.5e6, n


@pytest.mark.parametrize("layout", ["libero", "ours"])
def test_cli_smoke_on_both_file_layouts(tmp_path, layout):
    demo = write_tiny_demo_file(str(tmp_path / f"{layout}_demo.hdf5"), layout=layout, image_size=32)
    mode = "--obs-mode rgb --image-size 32 --random-shift 2" if layout == "libero" else "--obs-mode state"
    cli = ["bc_diffusion.py", *TINY_CLI, *mode.split(), "--demo-paths", demo, "--run-root", str(tmp_path / "runs"),
           "--total-steps", "6"]  # fmt: skip
    out = run_script(cli, cwd=ROOT).stdout
    run_dir = tmp_path / "runs" / "bc_diffusion" / "libero_object" / "task00__seed0"
    assert "parameters:" in out
    assert (run_dir / "args.json").exists() and (run_dir / "checkpoints" / "final.pt").exists()
    rows = run_utils.read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == [5, 6] and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["format"] == "bc_diffusion/v1" and ckpt["step"] == 6
    assert set(ckpt["normalizer"]) >= {"action_mid", "action_scale", "proprio_mid", "proprio_scale"}
    # Resuming with another architecture is refused, naming the difference.
    other = run_script([*cli, "--unet-down-dims", "16", "16", "--total-steps", "8"], cwd=ROOT, check=False)
    assert other.returncode != 0
    assert "another architecture (unet_down_dims: checkpoint [16, 32] vs requested [16, 16])" in other.stderr


def test_missing_demos_fail_with_one_sentence(tmp_path):
    proc = run_script(["bc_diffusion.py", "--data-root", str(tmp_path)], cwd=ROOT, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: No demonstrations at")
    assert "collect.py" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    demo = write_tiny_demo_file(str(tmp_path / "d_demo.hdf5"), num_demos=4, T=30)
    base = [sys.executable, "bc_diffusion.py", *TINY_CLI, "--demo-paths", demo, "--obs-mode", "state",
            "--total-steps", "200", "--save-every", "20", "--log-every", "100"]  # fmt: skip
    run_script([*base[1:], "--run-root", str(tmp_path / "a")], cwd=ROOT)
    b_root = tmp_path / "b"
    ckpts = b_root / "bc_diffusion" / "libero_object" / "task00__seed0" / "checkpoints"
    proc = subprocess.Popen([*base, "--run-root", str(b_root)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (ckpts / "latest.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "final.pt").exists(), "the run finished before it could be killed"
    killed_at = torch.load(ckpts / "latest.pt", weights_only=True)["step"]
    out = run_script([*base[1:], "--run-root", str(b_root)], cwd=ROOT).stdout
    assert f"resumed from {ckpts / 'latest.pt'} at step {killed_at}" in out
    a = torch.load(tmp_path / "a/bc_diffusion/libero_object/task00__seed0/checkpoints/final.pt", weights_only=True)
    b = torch.load(ckpts / "final.pt", weights_only=True)
    assert a["step"] == b["step"] == 200
    # exact on purpose: both runs execute the same code on the same batches on this machine (same kernels, same
    # thread count), so resuming must not change a single bit; a tolerance would hide a lost RNG or optimiser state
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after kill and resume"
