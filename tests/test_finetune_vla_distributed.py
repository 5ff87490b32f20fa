"""finetune_vla.py on several processes: real `torchrun` launches with 2 CPU ranks (gloo), DDP and FSDP2, against a
1-process run with the same global batch and seed; kill and resume; freeze flags across a resume.

A tiny randomly initialised pi0 (the script's --config-only tiny) trains for a few steps on a small trajectory file.
"""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, run_script, script_env, write_tiny_demo_file
from safetensors.torch import load_file

import finetune_vla as fv
import vla_data as vd

STEPS = 12
COMMON = (
    "--config-only tiny --image-size 32 --batch-size 4 --num-workers 0 --lr 1e-3 --lr-min 1e-4 --warmup-steps 2 "
    "--log-every 1 --save-every 2 --ema-decay 0.9 --no-cuda"  # the gloo CPU ranks this module is about, on any node
).split()


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def launch(data, run_root, nproc, *extra, steps=STEPS, check=True):
    """One training run through the real CLI: plain python for 1 process, torchrun for more."""
    cmd = ["finetune_vla.py", *COMMON, "--data", str(data), "--run-root", str(run_root), "--total-steps", str(steps)]
    cmd += list(extra)
    if nproc == 1:
        return run_script(cmd, cwd=ROOT, timeout=600, check=check)
    proc = subprocess.run([*torchrun(nproc), *cmd], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def ckpt(run_root, name="final"):
    return run_root / "finetune_vla" / "pi0__seed0" / "checkpoints" / name


def weights(run_root, name="final"):
    return load_file(str(ckpt(run_root, name) / "model" / "model.safetensors"))


def losses(run_root):
    import json

    with open(run_root / "finetune_vla" / "pi0__seed0" / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla_data")
    write_tiny_demo_file(str(root / "scripted" / "libero_object" / "a_demo.hdf5"), num_demos=3, T=20, image_size=32)
    return root / "scripted"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs of STEPS steps, global batch 4: one process (2 accumulated micro-batches of 2, so that
    accumulation is exercised too), 2 DDP ranks, 2 FSDP ranks."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("single", "ddp", "fsdp")}
    launch(data, roots["single"], 1, "--grad-accum", "2")
    launch(data, roots["ddp"], 2)
    launch(data, roots["fsdp"], 2, "--fsdp")
    return roots


def test_the_parameters_frozen_as_unused_are_exactly_those_without_a_gradient(data):
    """DDP fails on (and would all-reduce) parameters that never get a gradient: `freeze` must freeze exactly the
    ones a training backward leaves without one, and every parameter it leaves trainable must get one."""
    dataset = vd.TrajectoryDataset(vd.find_files([str(data)]), 50, filter_noops=True)
    from types import SimpleNamespace

    model, tokenizer = fv.load_model(
        SimpleNamespace(config_only="tiny", tokenizer_path=None, image_size=32, chunk_size=50), dataset.instructions
    )
    inputs = vd.training_batch(model, tokenizer, dataset.stats, vd.collate([dataset[i] for i in (0, 9)]), 32)
    model(**inputs).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    model.zero_grad(set_to_none=True)
    fv.freeze(model, freeze_vision=False, freeze_vlm=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == no_grad and "model.dit.embed_tokens.weight" in frozen
    assert "model.vlm.language_model.layers.1.self_attn.k_proj.weight" not in frozen  # feeds the expert's cache
    model(**inputs).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ddp_and_fsdp_on_two_ranks_match_one_process(reference):
    """Same global batch, seed, data order and flow-matching draws on 1 or 2 processes: the losses and weights agree
    up to the float rounding of gradient reduction (gloo sums in another order than one process's backward, and
    AdamW amplifies a few ulps in the first steps). Measured here: see the assertion messages."""
    single = losses(reference["single"])
    assert sorted(single) == list(range(1, STEPS + 1))
    for mode in ("ddp", "fsdp"):
        other = losses(reference[mode])
        assert sorted(other) == sorted(single)
        worst = max(abs(other[s] - single[s]) / abs(single[s]) for s in single)
        assert worst < 1e-4, f"{mode}: relative loss difference {worst:.2e}"
        for name in ("latest", "final"):  # latest: the trained weights; final: the EMA written for evaluation
            diff = max_diff(weights(reference[mode], name), weights(reference["single"], name))
            assert diff < 1e-4, f"{mode} {name}: max weight difference {diff:.2e}"
    # the EMA is not the raw weights, and training moved them
    assert max_diff(weights(reference["ddp"], "final"), weights(reference["ddp"], "latest")) > 1e-4


def kill_after_first_checkpoint(data, run_root, *extra):
    """Start a 2-rank run, SIGKILL every process of it once a checkpoint exists, and return its step."""
    cmd = [*torchrun(2), "finetune_vla.py", *COMMON, "--data", str(data), "--run-root", str(run_root),
           "--total-steps", str(STEPS), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = ckpt(run_root, "latest") / "training_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    # torchrun's workers run in their own sessions: kill them by their command line (the unique run root)
    subprocess.run(["pkill", "-KILL", "-f", str(run_root)], check=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not ckpt(run_root, "final").exists(), "the run finished before it could be killed"
    return torch.load(state, weights_only=True)["step"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_killed_two_rank_run_resumes_to_the_same_weights(data, reference, tmp_path, mode):
    extra = ["--fsdp"] if mode == "fsdp" else []
    killed_at = kill_after_first_checkpoint(data, tmp_path, *extra)
    assert 0 < killed_at < STEPS
    out = launch(data, tmp_path, 2, *extra).stdout
    assert f"resumed from {ckpt(tmp_path, 'latest')} at step {killed_at}" in out
    assert torch.load(ckpt(tmp_path) / "training_state.pt", weights_only=True)["step"] == STEPS
    # model, AdamW moments (optimizer.pt), EMA, schedule, data order and noise all continue where they stopped:
    # same machine, same kernels, same reduction order, so the weights agree to the last bit up to 1e-6
    for name in ("latest", "final"):
        diff = max_diff(weights(tmp_path, name), weights(reference[mode], name))
        assert diff < 1e-6, f"{mode} {name}: {diff:.2e} after kill at step {killed_at} and resume"
    optim = torch.load(ckpt(tmp_path) / "optimizer.pt", weights_only=True)
    assert optim["state"] and all("exp_avg" in s for s in optim["state"].values())


def test_freeze_flags_survive_a_resume_and_other_flags_are_refused(data, tmp_path):
    launch(data, tmp_path, 2, "--freeze-vision", steps=2)
    before = weights(tmp_path, "latest")
    out = launch(data, tmp_path, 2, "--freeze-vision", steps=4).stdout  # failed to load AdamW's state before
    assert f"resumed from {ckpt(tmp_path, 'latest')} at step 2" in out
    after = weights(tmp_path, "latest")
    vision = [k for k in before if ".vision_tower." in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # still frozen after the resume
    assert not torch.equal(before["action_out_proj.weight"], after["action_out_proj.weight"])
    proc = launch(data, tmp_path, 1, steps=6, check=False)  # the same run without --freeze-vision
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "--freeze-vision" in proc.stderr


@pytest.mark.gpu
def test_on_a_gpu_node_one_nccl_rank_per_gpu_trains_and_more_ranks_are_refused(data, tmp_path):
    """The CUDA path (NCCL, bf16 autocast): as many ranks as GPUs train and write their checkpoint; one rank more
    than there are GPUs is refused in one sentence before any work (it used to fail deep in NCCL or FSDP)."""
    gpus = torch.cuda.device_count()
    on_gpu = [c for c in COMMON if c != "--no-cuda"]

    def run(nproc, root):
        cmd = [*torchrun(nproc), "finetune_vla.py", *on_gpu, "--data", str(data), "--run-root", str(root),
               "--total-steps", "4"]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)

    over = run(gpus + 1, tmp_path / "over")
    assert over.returncode != 0
    assert f"error: {gpus + 1} processes per node but {gpus} GPU(s) here" in over.stderr, over.stderr[-3000:]
    # torchrun prints its own traceback for a failed child; the script itself must stop without one
    assert 'finetune_vla.py", line' not in over.stderr and not (tmp_path / "over" / "finetune_vla").exists()
    ok = run(gpus, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert sorted(losses(tmp_path / "ok")) == [1, 2, 3, 4] and all(map(math.isfinite, losses(tmp_path / "ok").values()))
    assert (ckpt(tmp_path / "ok") / "model" / "model.safetensors").exists()
