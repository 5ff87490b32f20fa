"""demo_hdf5.py: round trip, LIBERO-layout re-alignment, clear errors, atomic writes, the no-op rule."""

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from helpers import ROOT, write_tiny_demo_file

import demo_hdf5 as dh


def make_info(**kw):
    base = dict(
        instruction="pick up the thing",
        problem_name="libero_floor_manipulation",
        bddl_file_name="x.bddl",
        source="scripted",
        suite="libero_object",
        task_name="pick_up_the_thing",
        image_size=16,
    )
    base.update(kw)
    return dh.FileInfo(**base)


def random_demo(rng, T, size=16):
    obs = {
        "agentview_rgb": rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8),
        "eye_in_hand_rgb": rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8),
        "ee_pos": rng.normal(size=(T, 3)),
        "ee_ori": rng.normal(size=(T, 3)),
        "ee_states": rng.normal(size=(T, 6)),
        "gripper_states": rng.normal(size=(T, 2)),
        "joint_states": rng.normal(size=(T, 7)),
        "object_state": rng.normal(size=(T, 20)),
    }
    rewards = np.zeros(T)
    rewards[-1] = 1
    return dict(
        actions=rng.uniform(-1, 1, (T, 7)),
        obs=obs,
        states=rng.normal(size=(T, 30)),
        robot_states=rng.normal(size=(T, 9)),
        rewards=rewards,
        dones=rewards.copy(),
    )


def test_round_trip_of_our_format(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "scripted" / "libero_object" / "pick_up_the_thing_demo.hdf5")
    demos = [random_demo(rng, T) for T in (7, 11)]
    writer = dh.DemoWriter(path, make_info())
    for i, d in enumerate(demos):
        writer.add_demo(**d, attrs={"init_state_index": i + 3, "success": True})
    assert not os.path.exists(path)  # nothing under the final name before commit
    writer.commit({"success_rate": 0.5})
    assert os.path.exists(path) and not os.path.exists(path + ".partial")
    with dh.DemoFile(path) as f:
        assert f.aligned and f.instruction == "pick up the thing" and f.source == "scripted"
        assert f.demo_keys == ["demo_0", "demo_1"] and f.attrs["total"] == 18 and f.attrs["num_demos"] == 2
        assert f.attrs["success_rate"] == 0.5 and json.loads(f.attrs["env_args"])["bddl_file"] == "x.bddl"
        for key, d in zip(f.demo_keys, demos):
            got = f.read(key)
            assert f.num_samples(key) == len(d["actions"])
            for k in ("actions", "states", "robot_states"):
                np.testing.assert_array_equal(got[k], d[k])
            for k, v in d["obs"].items():
                np.testing.assert_array_equal(got["obs"][k], v)
            assert got["obs"]["agentview_rgb"].dtype == np.uint8
        assert f.demo_attrs("demo_1")["init_state_index"] == 4
        part = f.read("demo_1", ["ee_pos"], start=3, stop=6)
        np.testing.assert_array_equal(part["obs"]["ee_pos"], demos[1]["obs"]["ee_pos"][3:6])
        np.testing.assert_array_equal(part["actions"], demos[1]["actions"][3:6])


def write_libero_original(path, lengths, seed=0, gap=False):
    """A file in LIBERO's original layout: states[t] before action t, observations recorded AFTER action t.

    The dynamics are an integrator, x_{t+1} = x_t + 0.01 a_t[:3], observed as ee_pos.
    """
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"language_instruction": "put the bowl on the plate", "problem_name": "libero_tabletop_manipulation"}
        )
        data.attrs["env_args"] = json.dumps({"type": 1})
        data.attrs["bddl_file_name"] = "put_the_bowl_on_the_plate.bddl"
        for i, T in enumerate(lengths):
            actions = rng.uniform(-1, 1, (T, 7))
            x = np.zeros((T + 1, 3))
            for t in range(T):
                x[t + 1] = x[t] + 0.01 * actions[t, :3]
            g = data.create_group(f"demo_{2 * i if gap else i}")
            g.create_dataset("actions", data=actions)
            g.create_dataset("states", data=x[:-1])  # pre-action
            g.create_dataset("robot_states", data=np.concatenate([np.zeros((T, 2)), x[1:], np.zeros((T, 4))], 1))
            rewards = np.zeros(T, np.uint8)
            rewards[-1] = 1
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=rewards)
            g.create_dataset("obs/ee_pos", data=x[1:])  # post-action
            g.create_dataset("obs/agentview_rgb", data=np.zeros((T, 8, 8, 3), np.uint8))
            g.attrs["num_samples"] = T
        data.attrs["total"] = sum(lengths)


def test_original_libero_layout_is_realigned_to_pre_action_observations(tmp_path):
    path = str(tmp_path / "put_the_bowl_on_the_plate_demo.hdf5")
    write_libero_original(path, [9, 5, 12], gap=True)
    with dh.DemoFile(path) as f:
        assert not f.aligned and f.source == "human" and f.instruction == "put the bowl on the plate"
        assert f.demo_keys == ["demo_0", "demo_2", "demo_4"]  # numeric order, gaps tolerated
        for key, T in zip(f.demo_keys, [9, 5, 12]):
            d = f.read(key)
            assert f.num_samples(key) == T - 1 and len(d["actions"]) == T - 1 and len(d["obs"]["ee_pos"]) == T - 1
            # After re-alignment the observation of sample t is the state action t was chosen from ...
            np.testing.assert_allclose(d["obs"]["ee_pos"], d["states"])
            # ... and applying action t to it gives the next sample's observation.
            np.testing.assert_allclose(d["obs"]["ee_pos"][:-1] + 0.01 * d["actions"][:-1, :3], d["obs"]["ee_pos"][1:])
            assert d["dones"][-1] == 1 and d["rewards"].sum() == 1


def test_libero_files_get_the_benchmark_instruction_derived_from_their_task_name(tmp_path):
    """LIBERO's own files store only the BDDL text; the reader derives task.language from the file name."""
    name = "KITCHEN_SCENE10_put_the_butter_at_the_back_in_the_top_drawer_of_the_cabinet_and_close_it"
    path = write_tiny_demo_file(str(tmp_path / f"{name}_demo.hdf5"), layout="libero", instruction="Put the butter")
    with dh.DemoFile(path) as f:
        assert f.instruction == "Put the butter"
        assert f.benchmark_instruction == "put the butter at the back in the top drawer of the cabinet and close it"
    assert dh.benchmark_language("LIVING_ROOM_SCENE2_pick_up_the_ketchup") == "pick up the ketchup"
    assert dh.benchmark_language("open_the_microwave") == "open the microwave"


def test_truncated_file_gives_one_sentence_naming_the_file(tmp_path):
    path = str(tmp_path / "t_demo.hdf5")
    writer = dh.DemoWriter(path, make_info())
    writer.add_demo(**random_demo(np.random.default_rng(0), 50, size=32))
    writer.commit()
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(dh.TrajectoryFileError) as err:
        with dh.DemoFile(path) as f:
            f.read(f.demo_keys[0])
    msg = str(err.value)
    assert path in msg and "truncated" in msg and "\n" not in msg


def test_foreign_files_are_refused_clearly(tmp_path):
    text = tmp_path / "notes_demo.hdf5"
    text.write_text("hello")
    with pytest.raises(dh.TrajectoryFileError, match="truncated or not an HDF5 file"):
        dh.DemoFile(str(text))
    other = str(tmp_path / "other.hdf5")
    with h5py.File(other, "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(dh.TrajectoryFileError, match=r"is not a trajectory file \(no 'data' group"):
        dh.DemoFile(other)
    with pytest.raises(dh.TrajectoryFileError, match="does not exist"):
        dh.DemoFile(str(tmp_path / "missing.hdf5"))


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import demo_hdf5 as dh
    from test_demo_hdf5 import make_info, random_demo
    writer = dh.DemoWriter({path!r}, make_info())
    rng = np.random.default_rng(0)
    for i in range(3):
        writer.add_demo(**random_demo(rng, 10))
    os.kill(os.getpid(), signal.SIGKILL)  # killed before commit
    """
)


def test_a_killed_writer_leaves_no_final_file_and_the_rerun_continues(tmp_path):
    path = str(tmp_path / "k_demo.hdf5")
    script = KILLED_WRITER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), path=path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not os.path.exists(path) and os.path.exists(path + ".partial")
    writer = dh.DemoWriter(path, make_info(), resume=True)
    assert writer.resumed_demos == 3 and not writer.discarded_partial
    writer.add_demo(**random_demo(np.random.default_rng(5), 4))
    writer.commit()
    with dh.DemoFile(path) as f:
        assert len(f) == 4 and f.attrs["total"] == 34


def test_a_damaged_partial_is_discarded_and_the_rerun_starts_clean(tmp_path):
    path = str(tmp_path / "d_demo.hdf5")
    with open(path + ".partial", "wb") as fh:
        fh.write(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    writer = dh.DemoWriter(path, make_info(), resume=True)
    assert writer.discarded_partial and writer.resumed_demos == 0 and writer.num_demos == 0
    writer.close()


def test_noop_mask_counts_planted_noops_with_the_gripper_exception():
    a = np.zeros((8, 7))
    a[:, 6] = -1
    a[0, :3] = 0.5  # motion: kept
    a[3, 6] = 1  # still, but the gripper command changes: kept (grasp onset)
    a[4, 6] = 1  # still, gripper unchanged vs previous kept: no-op
    a[5, :3] = 5e-5  # below threshold, gripper unchanged: no-op
    a[5, 6] = 1
    a[6, 6] = -1  # still, gripper changes back: kept
    a[7, 6] = -1  # no-op
    # rows 1, 2 are still with the same gripper as row 0 -> no-ops
    np.testing.assert_array_equal(dh.noop_mask(a), [False, True, True, False, True, True, False, True])
    first_still = np.zeros((2, 7))
    assert dh.noop_mask(first_still).tolist() == [True, True]


def test_training_batches_come_channels_first_and_randomly_shifted():
    import torch

    rng = np.random.default_rng(0)
    demos = [random_demo(rng, T) for T in (9, 6)]
    for d in demos:  # policy_obs reads the 8-d proprioception from these keys
        d["obs"] = {k: d["obs"][k] for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states")}
    data = dh.ChunkDataset(demos, "rgb", image_size=16, horizon=4)
    plain, _ = data.sample(5, torch.Generator().manual_seed(3))
    shifted, actions = data.sample(5, torch.Generator().manual_seed(3), shift=2)
    assert actions.shape == (5, 4, 7)
    pad = 2
    for key in ("agentview_rgb", "eye_in_hand_rgb"):
        assert plain[key].shape == shifted[key].shape == (5, 3, 16, 16)
        assert shifted[key].dtype == torch.uint8  # augmented in the stored dtype (4x less memory on a GPU)
        padded = torch.nn.functional.pad(plain[key].float(), (pad, pad, pad, pad), mode="replicate")
        offsets = []
        for b in range(5):  # each sample is a 16x16 crop of its own replicate-padded image at some offset
            matches = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
                       if torch.equal(padded[b, :, y : y + 16, x : x + 16], shifted[key][b].float())]  # fmt: skip
            assert matches, f"{key}[{b}] is not a shifted crop of the sampled image"
            offsets.append(matches[0])
        assert len(set(offsets)) > 1  # the offset is drawn per sample
    # the same generator state gives the same draws: indices first, then one offset pair per sample and camera
    again, _ = data.sample(5, torch.Generator().manual_seed(3), shift=2)
    assert all(torch.equal(again[k], shifted[k]) for k in shifted)
    # action chunks: the sampled step and the next H-1 of its own episode, the last action repeated past its end
    idx = torch.randint(0, data.num_samples, (5,), generator=torch.Generator().manual_seed(3)).numpy()
    ends = np.repeat(np.cumsum([9, 6]), [9, 6])
    expected = data.actions[np.minimum(idx[:, None] + np.arange(4), ends[idx, None] - 1)]
    np.testing.assert_array_equal(actions.numpy(), expected)  # pure indexing: exact
