"""collect.py: the CLI, kill-and-resume, errors before any work, the scripted expert through it."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import ROOT, run_script

import demo_hdf5
import libero_env as le
import scripted_expert
import vector_env as ve


@pytest.mark.parametrize(
    "cli, message",
    [
        (["--suite", "libero_100"], "Unknown suite 'libero_100'"),
        (["--suite", "all", "--task-id", "130"], "Task id 130 is out of range for suite 'all' (valid: 0-129)"),
        (
            ["--suite", "libero_goal", "--task-id", "9"],
            "The scripted expert cannot do task 'put_the_wine_bottle_on_the_rack'",
        ),
    ],
)
def test_bad_input_fails_before_any_environment_is_built(tmp_path, cli, message):
    start = time.monotonic()
    proc = run_script(["collect.py", "--data-root", str(tmp_path), *cli], cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 20 and not os.listdir(tmp_path)


@pytest.mark.sim
def test_collect_cli_writes_a_valid_file(tmp_path):
    """The acceptance command: 2 successful scripted demos of LIBERO-Object task 0 at the default 256 x 256."""
    out = run_script(
        "collect.py --policy scripted --suite libero_object --task-id 0 --num-success 2 --num-envs 1".split()
        + ["--data-root", str(tmp_path)],
        cwd=ROOT,
    ).stdout
    task = le.resolve_task("libero_object", 0)
    path = demo_hdf5.demo_path(str(tmp_path), "scripted", "libero_object", task.name)
    assert "success rate" in out and os.path.exists(path) and not os.path.exists(path + ".partial")
    env = le.make_env(task, obs_mode="state", fast_step=True)  # the step path collect.py uses by default
    with demo_hdf5.DemoFile(path) as f:
        assert len(f) == 2 and f.aligned and f.attrs["obs_alignment"] == "pre_action"
        assert f.instruction == task.instruction and f.source == "scripted" and f.attrs["image_size"] == 256
        assert f.benchmark_instruction == task.language and f.problem_info["benchmark_instruction"] == task.language
        assert 0 < f.attrs["success_rate"] <= 1
        for key in f.demo_keys:
            d, attrs = f.read(key), f.demo_attrs(key)
            T = len(d["actions"])
            assert d["dones"][-1] == 1 and d["rewards"][-1] == 1 and d["dones"][:-1].sum() == 0
            assert np.all(np.abs(d["actions"]) <= 1.0) and d["actions"].shape == (T, 7)
            for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                assert d["obs"][cam].shape == (T, 256, 256, 3) and d["obs"][cam].dtype == np.uint8
            dims = {
                "ee_pos": 3,
                "ee_ori": 3,
                "ee_states": 6,
                "gripper_states": 2,
                "joint_states": 7,
                "object_state": 98,
            }
            for k, dim in dims.items():
                assert d["obs"][k].shape == (T, dim)
            # the demo starts (after the wait steps) from the layout sampled from its seed, none of the protocol's
            # 50 init states, which evaluation holds out
            assert int(attrs["init_state_index"]) == le.SAMPLED and f.attrs["layouts"] == "sampled"
            first = env.reset(le.SAMPLED, seed=int(attrs["seed"]))
            np.testing.assert_allclose(d["states"][0], first["sim_state"])
            np.testing.assert_allclose(d["obs"]["object_state"][0], first["object_state"])
            assert env.layout_info()["protocol_distance"] >= le.MIN_PROTOCOL_DISTANCE
    env.close()


def _num_complete_demos(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(1 for k in f["data"] if f["data"][k].attrs.get("complete", False))
    except Exception:  # noqa: BLE001 - the writer may be mid-flush
        return 0


@pytest.mark.sim
def test_a_killed_collection_leaves_no_file_and_the_rerun_continues(tmp_path):
    task = le.resolve_task("libero_spatial", 2)
    path = demo_hdf5.demo_path(str(tmp_path), "scripted", task.suite, task.name)
    cmd = [sys.executable, *"collect.py --suite libero_spatial --task-id 2 --num-success 3 --num-envs 1".split()]
    cmd += ["--obs-mode", "state", "--data-root", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _num_complete_demos(path + ".partial") < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(path), "a killed collection must not leave a file under the final name"
    kept = _num_complete_demos(path + ".partial")
    assert 1 <= kept < 3
    out = run_script(cmd[1:], cwd=ROOT).stdout
    assert "continuing a killed run" in out and f"{kept} demos kept" in out
    with demo_hdf5.DemoFile(path) as f:
        assert len(f) == 3
        episodes = [int(f.demo_attrs(k)["episode"]) for k in f.demo_keys]
        assert len(set(episodes)) == 3 and episodes == sorted(episodes)
        # the attempt counter survived the kill: never fewer attempts than kept demos
        assert f.attrs["num_attempts"] >= 3 and 0 < f.attrs["success_rate"] <= 1
    # A damaged .partial is discarded and the run starts clean.
    os.remove(path)
    with open(path + ".partial", "wb") as fh:
        fh.write(b"not hdf5")
    out = run_script([*cmd[1:], "--num-success", "1"], cwd=ROOT).stdout
    assert "starting clean (discarded an unreadable .partial)" in out and os.path.exists(path)


@pytest.mark.sim
def test_a_resumed_collection_refuses_other_layouts_or_placement(tmp_path):
    """A .partial continued with another --layouts or --scripted-placement would mix two kinds of demos in one file:
    refused with one sentence, the partial kept."""
    task = le.resolve_task("libero_spatial", 2)
    path = demo_hdf5.demo_path(str(tmp_path), "scripted", task.suite, task.name)
    cmd = ["collect.py", *"--suite libero_spatial --task-id 2 --num-envs 1 --obs-mode state".split()]
    cmd += ["--data-root", str(tmp_path)]
    run_script([*cmd, "--num-success", "1"], cwd=ROOT)
    os.rename(path, path + ".partial")  # as a killed run leaves it, one demo in
    mismatches = [
        (["--layouts", "protocol"], "was started with --layouts sampled; rerun with --layouts sampled"),
        (["--scripted-placement", "set-down"], "was started with --scripted-placement release"),
    ]
    for extra, sentence in mismatches:
        proc = run_script([*cmd, "--num-success", "2", *extra], cwd=ROOT, check=False)
        assert proc.returncode != 0 and sentence in proc.stderr, proc.stderr
        assert os.path.exists(path + ".partial") and not os.path.exists(path)


@pytest.mark.sim
def test_scripted_expert_solves_a_spatial_task_closed_loop():
    task = le.resolve_task("libero_spatial", 0)
    with ve.VectorLiberoEnv(task, 1, obs_mode="state", privileged=True) as venv:
        policy = scripted_expert.ScriptedPolicy(scripted_expert.plan(task), venv.call("scene")[0], 0.0, seed=0)
        results = ve.run_episodes(venv, policy, [3, 17], replan_steps=1, render=False, reset_policy=policy.reset)
    assert [r.success for r in results] == [True, True]
    assert all(r.length < task.max_steps for r in results)


@pytest.mark.sim
def test_noisy_scripted_demos_store_the_experts_noise_free_labels(tmp_path):
    """DART: the noise moves the robot (states differ from the noise-free run) but the stored action of every step is
    what the expert commanded there; with --scripted-label executed the noisy action is stored instead."""
    base = "collect.py --policy scripted --suite libero_object --task-id 0 --num-envs 1 --obs-mode state"
    task = le.resolve_task("libero_object", 0)
    demos = {}
    for name, extra in [("clean", ["--num-success", "3"]), ("expert", ["--scripted-noise", "0.3"]),
                        ("executed", ["--scripted-noise", "0.3", "--scripted-label", "executed"])]:  # fmt: skip
        run_script([*base.split(), "--num-success", "1", "--data-root", str(tmp_path), "--source", name, *extra],
                   cwd=ROOT)  # fmt: skip
        with demo_hdf5.DemoFile(demo_hdf5.demo_path(str(tmp_path), name, task.suite, task.name)) as f:
            for key in f.demo_keys:  # by episode (a failed noisy episode shifts which one is kept)
                demos[name, int(f.demo_attrs(key)["episode"])] = f.read(key, ["ee_pos", "gripper_states"])
            assert f.attrs["scripted_label"] == ("executed" if name == "executed" else "expert")
    e = next(e for n, e in demos if n == "expert")
    clean, expert, executed = demos["clean", e], demos["expert", e], demos["executed", e]
    # same init state and seed: the first observation and the expert's first command agree with the clean run
    np.testing.assert_allclose(expert["states"][0], clean["states"][0])
    np.testing.assert_allclose(expert["actions"][0], clean["actions"][0])
    # the executed noise moved the robot off the clean path, and the noisy run stored noisy actions
    assert np.abs(expert["obs"]["ee_pos"][20] - clean["obs"]["ee_pos"][20]).max() > 1e-3
    assert np.abs(executed["actions"][0, :6] - clean["actions"][0, :6]).max() > 0.05
    np.testing.assert_allclose(executed["states"], expert["states"])  # same noise stream, same executed path

    # expert labels are smooth like the clean expert's; executed ones carry the 0.3 noise
    def roughness(a):
        return np.abs(np.diff(a[:, :3], axis=0)).mean()

    assert roughness(expert["actions"]) < 0.5 * roughness(executed["actions"])


@pytest.mark.sim
def test_collect_rolls_out_a_bc_diffusion_checkpoint_found_by_convention(tmp_path):
    from helpers import write_tiny_demo_file

    demo = write_tiny_demo_file(str(tmp_path / "demo.hdf5"), num_demos=2, T=10, state_dim=98)
    runs = str(tmp_path / "runs")
    tiny = "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16 --act-steps 8"
    run_script(["bc_diffusion.py", *tiny.split(), "--obs-mode", "state", "--demo-paths", demo, "--run-root", runs,
                "--total-steps", "3", "--batch-size", "4", "--eval-episodes", "0"], cwd=ROOT)  # fmt: skip
    cli = "collect.py --policy diffusion --ckpt-phase bc --obs-mode state --no-save --max-episodes 2 --num-envs 2"
    out = run_script([*cli.split(), "--run-root", runs], cwd=ROOT).stdout
    assert "success rate 0.000 (0/2 episodes, 0 kept)" in out  # an untrained policy; the point is the plumbing
    missing = run_script([*cli.split(), "--run-root", str(tmp_path / "none")], cwd=ROOT, check=False)
    assert missing.returncode != 0 and "error: No checkpoint at" in missing.stderr


@pytest.mark.sim
def test_the_success_rate_counts_the_episodes_still_running_when_the_last_demo_is_kept(tmp_path):
    """Two envs, one demo wanted: both first episodes run to their end (init states 0 and 1, which the scripted expert
    solves: 50/50 on this task), one is kept, and the rate is 2/2, not 1/2."""
    out = run_script(
        "collect.py --policy scripted --suite libero_object --task-id 0 --num-success 1 --num-envs 2".split()
        + ["--obs-mode", "state", "--data-root", str(tmp_path)],
        cwd=ROOT,
    ).stdout
    path = demo_hdf5.demo_path(str(tmp_path), "scripted", "libero_object", le.resolve_task("libero_object", 0).name)
    with demo_hdf5.DemoFile(path) as f:
        assert len(f) == 1 and f.attrs["num_attempts"] == 2 and f.attrs["num_successful"] == 2
        assert abs(f.attrs["success_rate"] - 1.0) < 1e-9
    assert "success rate 1.000 (2/2 episodes, 1 kept)" in out
