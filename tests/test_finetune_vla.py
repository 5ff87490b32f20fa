"""finetune_vla.py with a tiny randomly initialised PI0 and a tiny tokenizer built here (no downloads)."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, write_tiny_demo_file

import finetune_vla as fv
import vla_data as vd


def tiny_tokenizer(instructions):
    """A word-level tokenizer built with the `tokenizers` library (the script builds the same kind itself)."""
    return fv.word_tokenizer(instructions)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data" / "scripted" / "libero_object"
    write_tiny_demo_file(str(root / "a_demo.hdf5"), num_demos=3, T=20, image_size=32)
    write_tiny_demo_file(str(root / "b_demo.hdf5"), num_demos=2, T=16, image_size=32, seed=1,
                         instruction="put the bowl on the plate")  # fmt: skip
    return tmp_path / "data"


def tiny_model(tokenizer, seed=0):
    from transformers import PI0ForConditionalGeneration

    torch.manual_seed(seed)
    model = PI0ForConditionalGeneration(fv.named_config("tiny", len(tokenizer), 32, 50))
    return model, vd.prepare_tokenizer(tokenizer, model)


def test_a_few_steps_lower_the_loss_on_a_batch(data):
    dataset = vd.TrajectoryDataset(vd.find_files([str(data)]), 50, filter_noops=True)
    model, tokenizer = tiny_model(tiny_tokenizer(dataset.instructions))
    batch = vd.collate([dataset[i] for i in (0, 7, 30, 60)])
    inputs = vd.training_batch(model, tokenizer, dataset.stats, batch, 32)
    assert inputs["pixel_values"].shape == (4, 2, 3, 32, 32) and inputs["state"].shape == (4, 32)
    assert (
        inputs["actions"].shape == (4, 50, 32)
        and (inputs["input_ids"] == model.config.vlm_config.image_token_id).sum() == 4 * 2 * 4
    )
    g = torch.Generator().manual_seed(0)
    noise, tau = torch.randn(4, 50, 32, generator=g), torch.rand(4, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        return model(**inputs, noise=noise, timestep=tau).loss

    before = loss().item()
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss().item()
    assert after < 0.8 * before, (before, after)


def test_dataset_filters_noops_pads_chunks_and_computes_stats(tmp_path):
    path = write_tiny_demo_file(str(tmp_path / "d" / "libero_object" / "x_demo.hdf5"), num_demos=1, T=12)
    import h5py

    with h5py.File(path, "r+") as f:  # plant two no-ops (still, gripper unchanged) at steps 3 and 4
        a = f["data/demo_0/actions"][:]
        a[3:5, :6] = 0.0
        a[3:5, 6] = a[2, 6]
        f["data/demo_0/actions"][:] = a
    ds = vd.TrajectoryDataset([path], chunk=50, filter_noops=True)
    assert len(ds) == 10
    kept = np.delete(a, [3, 4], axis=0)
    sample = ds[8]  # two kept steps left, then the last action repeats
    np.testing.assert_allclose(sample["actions"][:2], kept[8:10], rtol=1e-6)
    np.testing.assert_allclose(sample["actions"][2:], np.repeat(kept[9:10], 48, 0), rtol=1e-6)
    np.testing.assert_allclose(ds.stats["action_mean"].numpy(), kept.mean(0), rtol=1e-5, atol=1e-6)
    assert len(vd.TrajectoryDataset([path], chunk=50, filter_noops=False)) == 12


def test_no_matching_files_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^No \*_demo.hdf5 files under .* for suites \['libero_90'\]; collect"):
        vd.find_files([str(tmp_path)], suites=["libero_90"])
    proc = run_script(
        ["finetune_vla.py", "--config-only", "tiny", "--data", str(tmp_path / "none")], cwd=ROOT, check=False
    )
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: No *_demo.hdf5 files under")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_pretrained_model_is_one_sentence(data):
    proc = run_script(["finetune_vla.py", "--model-path", "/nonexistent/pi0_base", "--data", str(data)], cwd=ROOT,
                      check=False, env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode != 0
    assert "pi0 model '/nonexistent/pi0_base' is not available here; download it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_checkpoint_reload_resume_and_normalisation_round_trip(data, tmp_path):
    runs = str(tmp_path / "runs")
    cli = ["finetune_vla.py", "--config-only", "tiny", "--data", str(data), "--image-size", "32", "--batch-size", "2",
           "--num-workers", "0", "--warmup-steps", "2", "--log-every", "2", "--run-root", runs]  # fmt: skip
    run_script([*cli, "--total-steps", "4"], cwd=ROOT)
    ckpt = tmp_path / "runs" / "finetune_vla" / "pi0__seed0" / "checkpoints" / "final"
    assert (ckpt / "model" / "config.json").exists() and (ckpt / "model" / "tokenizer.json").exists()
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["format"] == "finetune_vla/v1"
    # normalisation statistics round-trip: the saved ones are the dataset's
    ds = vd.TrajectoryDataset(vd.find_files([str(data)]), 50, True)
    saved = vd.load_stats(str(ckpt / "norm_stats.json"))
    for k, v in ds.stats.items():
        torch.testing.assert_close(saved[k], v)
    # the reloaded policy gives identical actions for the same noise
    policy = vd.Pi0Policy(str(ckpt), "pick up the tiny thing and place it in the basket")
    obs = ds[5]["obs"]
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    noise = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(0))
    a1 = policy.act(batch, noise=noise)
    a2 = vd.Pi0Policy(str(ckpt), "pick up the tiny thing and place it in the basket").act(batch, noise=noise)
    assert a1.shape == (2, 50, 7) and np.array_equal(a1, a2)
    with open(ckpt / "train_info.json") as f:
        assert json.load(f)["suites"] == ["libero_object"]
    # resume continues at the right step
    out = run_script([*cli, "--total-steps", "7"], cwd=ROOT).stdout
    assert "resumed from" in out and "at step 4" in out
    assert torch.load(ckpt / "training_state.pt", weights_only=True)["step"] == 7
    rows = [json.loads(line) for line in open(os.path.join(runs, "finetune_vla", "pi0__seed0", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6, 7] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.sim
def test_the_instruction_convention_is_recorded_checked_on_resume_and_used_by_evaluation(tmp_path):
    """--instruction benchmark (the default) trains on LIBERO's task.language and records it; a resume with the
    other convention is refused; evaluate.py prompts a vla checkpoint with its own convention unless overridden."""
    import libero_env as le

    task = le.resolve_task("libero_object", 0)
    data = tmp_path / "data" / "scripted" / "libero_object"
    write_tiny_demo_file(str(data / f"{task.name}_demo.hdf5"), num_demos=2, T=12, image_size=32,
                         instruction=task.instruction)  # fmt: skip
    ds = vd.TrajectoryDataset(vd.find_files([str(data)]), 50, True, instruction="benchmark")
    assert ds.instructions == [task.language] != vd.TrajectoryDataset(ds.paths, 50, True, "bddl").instructions
    runs = str(tmp_path / "runs")
    cli = ["finetune_vla.py", "--config-only", "tiny", "--data", str(data), "--image-size", "32", "--batch-size", "2",
           "--num-workers", "0", "--run-root", runs]  # fmt: skip
    run_script([*cli, "--total-steps", "2"], cwd=ROOT)
    ckpt = tmp_path / "runs" / "finetune_vla" / "pi0__seed0" / "checkpoints" / "final"
    with open(ckpt / "train_info.json") as f:
        assert json.load(f)["instruction"] == "benchmark"
    proc = run_script([*cli, "--total-steps", "3", "--instruction", "bddl"], cwd=ROOT, check=False)
    assert proc.returncode != 0 and "was trained with --instruction benchmark" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for override, expected in ((None, task.language), ("bddl", task.instruction)):
        extra = ["--instruction", override] if override else []
        run_script(["evaluate.py", "--policy", "vla", "--ckpt", str(ckpt), "--suite", "libero_object", "--task-id", "0",
                    "--num-episodes", "1", "--num-envs", "1", "--results-root", str(tmp_path / "results"),
                    "--tag", "t", *extra], cwd=ROOT, timeout=900)  # fmt: skip
        with open(tmp_path / "results" / "eval" / "t" / "libero_object" / "task00.json") as f:
            info = json.load(f)["policy_info"]
        assert info["prompt"] == expected and info["prompt_convention"] == (override or "benchmark")
