"""analyze.py: metrics on synthetic trajectories with known answers, and the CLI on files of two sources."""

import json
import os

import h5py
import numpy as np
import pytest
from helpers import ROOT, run_script, write_tiny_demo_file

import analyze
import demo_hdf5
import libero_env as le


def test_cubic_path_gives_the_analytic_jerk():
    dt, a, b = 0.05, 0.7, -1.3
    t = np.arange(40) * dt
    path = np.stack([a * t**3, b * t**3 + 2 * t, 0.5 * t**2 - 1], axis=1)  # d3/dt3 = (6a, 6b, 0)
    assert analyze.mean_squared_jerk(path, dt) == pytest.approx(36 * (a**2 + b**2), rel=1e-9)
    assert np.isnan(analyze.mean_squared_jerk(path[:3], dt))
    assert analyze.mean_squared_jerk(np.outer(t, [1, 2, 3]), dt) == pytest.approx(0.0, abs=1e-9)


def test_identical_trajectories_have_zero_consistency_std_and_a_stated_std_is_recovered():
    base = np.random.default_rng(0).normal(size=(30, 7))
    same = analyze.action_consistency([base, base.copy(), base.copy()])
    np.testing.assert_allclose(same["mean_std"], 0.0, atol=1e-12)
    assert np.all(same["count"] == 3)
    sigma = np.array([0.1, 0.2, 0.3, 0.0, 0.05, 0.5, 1.0])
    plus, minus = base + sigma, base - sigma  # two trajectories: population std exactly sigma at every step
    shorter = (base + 5)[:10]  # a third, shorter one changes only its first 10 steps
    cons = analyze.action_consistency([plus, minus, shorter])
    np.testing.assert_allclose(cons["std"][10:], np.tile(sigma, (20, 1)), atol=1e-12)
    assert cons["count"].tolist() == [3] * 10 + [2] * 20
    np.testing.assert_allclose(cons["mean"][10:], base[10:], atol=1e-12)


def test_consistency_standard_error_is_the_jackknife_of_the_spread_of_offsets():
    """Trajectories base + c_i (one offset per trajectory) have consistency std(c) at every step and axis, so the
    jackknife over trajectories reduces to the jackknife of a population std of the offsets (computed here)."""
    rng = np.random.default_rng(1)
    base, c = rng.normal(size=(25, 7)), rng.normal(size=12)
    se = analyze.consistency_se([base + ci for ci in c])
    loo = np.array([np.std(np.delete(c, i)) for i in range(len(c))])
    expected = np.sqrt((len(c) - 1) / len(c) * np.sum((loo - loo.mean()) ** 2))
    np.testing.assert_allclose(se, expected, rtol=1e-9)
    assert 0.05 < se < 0.5  # a real spread: about std(c) / sqrt(2 n) = 0.2 for 12 standard-normal offsets
    assert analyze.consistency_se([base, base.copy(), base.copy()]) == 0.0
    assert np.isnan(analyze.consistency_se([base, base + 1]))


def test_chunk_smoothness_puts_planted_jumps_at_chunk_starts():
    """A constant ramp has the same change at every step (ratio 1); jumps planted at chunk starts raise the boundary
    mean by a known amount and make the largest change fall on a chunk start."""
    ramp = np.outer(np.arange(33), np.full(7, 0.1))  # change 6 * 0.01 = 0.06 at every step
    flat = analyze.chunk_smoothness([ramp, ramp.copy()])
    assert flat["boundary"] == pytest.approx(0.06) and flat["within"] == pytest.approx(0.06)
    assert flat["ratio"] == pytest.approx(1.0) and flat["trajectories"] == 2
    jumpy = ramp.copy()
    for t in (8, 16, 24, 32):  # a jump of 1 on the x axis into each chunk start after the first
        jumpy[t:, 0] += 1.0
    m = analyze.chunk_smoothness([jumpy, ramp[:1]])  # a one-step trajectory has no change and is not counted
    # at a chunk start the x change is 1.1 instead of 0.1: 1.21 + 5 * 0.01
    assert m["boundary"] == pytest.approx(1.26) and m["within"] == pytest.approx(0.06)
    assert m["ratio"] == pytest.approx(1.26 / 0.06) and m["largest_at_boundary"] == 1 and m["trajectories"] == 1
    gripper_only = ramp.copy()
    gripper_only[8:, 6] += 5.0  # the gripper (axis 6) is not part of the arm action
    assert analyze.chunk_smoothness([gripper_only])["ratio"] == pytest.approx(1.0)


def plant_noops(path):
    """Make demo_0 of a file have exactly 3 no-op steps, one of them next to a gripper change that is kept."""
    with h5py.File(path, "r+") as f:
        a = f["data/demo_0/actions"][:]
        a[4:6, :6] = 0.0  # still, gripper unchanged: 2 no-ops
        a[4:6, 6] = a[3, 6]
        a[8, :6] = 0.0  # still but the gripper command flips: kept (grasp onset) ...
        a[8, 6] = -a[7, 6]
        a[9, :6] = 0.0  # ... and the next still step with the same command is a no-op
        a[9, 6] = a[8, 6]
        f["data/demo_0/actions"][:] = a
    return 3


def test_planted_noops_are_counted_exactly(tmp_path):
    path = write_tiny_demo_file(str(tmp_path / "x_demo.hdf5"), num_demos=2, T=14)
    expected = plant_noops(path)
    m = analyze.task_metrics([path], 0.05)
    assert m["noop_steps"] == expected and m["steps"] == 28
    assert m["noop_fraction"] == pytest.approx(expected / 28)
    assert m["successful"] == 2 and m["length_mean"] == 14 and m["repeated"] == 0


def test_a_trajectory_replayed_action_for_action_is_counted_as_repeated(tmp_path):
    path = write_tiny_demo_file(str(tmp_path / "x_demo.hdf5"), num_demos=4, T=14)
    with h5py.File(path, "r+") as f:  # demos 2 and 3 replay demo 0 (a noise-free policy from the same init state)
        for k in (2, 3):
            f[f"data/demo_{k}/actions"][:] = f["data/demo_0/actions"][:]
        f["data/demo_1/actions"][0, 0] += 1e-6  # a near-copy is a trajectory of its own
    m = analyze.task_metrics([path], 0.05)
    assert m["successful"] == 4 and m["repeated"] == 2


def test_cli_two_sources_with_gaps_missing_tasks_and_original_libero_files(tmp_path):
    data = tmp_path / "data"
    # source "human": LIBERO's original layout, one task; demo numbering with a gap, different lengths
    human = data / "human" / "libero_90"
    write_tiny_demo_file(
        str(human / "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet_demo.hdf5"),
        layout="libero",
        num_demos=3,
        T=20,
        instruction="put the black bowl on top of the cabinet",
    )
    with h5py.File(human / "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet_demo.hdf5", "r+") as f:
        f.move("data/demo_2", "data/demo_7")
    # source "rl": ours, the same task plus one more
    rl = data / "diffusion_rl" / "libero_90"
    write_tiny_demo_file(
        str(rl / "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet_demo.hdf5"),
        num_demos=4,
        T=15,
        instruction="put the black bowl on top of the cabinet",
        source="diffusion_rl",
    )
    write_tiny_demo_file(
        str(rl / "KITCHEN_SCENE1_put_the_black_bowl_on_the_plate_demo.hdf5"),
        num_demos=2,
        T=12,
        instruction="put the black bowl on the plate",
        source="diffusion_rl",
    )
    out = run_script(
        [
            "analyze.py",
            "--sources",
            "human",
            "diffusion_rl",
            "gaussian_rl",
            "--suite",
            "libero_90",
            "--data-root",
            str(data),
            "--results-root",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
    ).stdout
    assert "source 'gaussian_rl': no files found (skipped)" in out
    out_dir = tmp_path / "results" / "analysis" / "human_vs_diffusion_rl"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["missing"] == {"human": ["KITCHEN_SCENE1_put_the_black_bowl_on_the_plate"], "diffusion_rl": []}
    task = metrics["per_task"]["KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet"]
    assert task["human"]["trajectories"] == 3 and task["human"]["length_mean"] == 19  # re-aligned: one step less
    assert task["diffusion_rl"]["length_mean"] == 15
    # the spread over the task's 4 trajectories, from the file itself: jerk std and the consistency's jackknife
    with demo_hdf5.DemoFile(str(rl / "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet_demo.hdf5")) as f:
        demos = [f.read(k, ["ee_pos"]) for k in f.demo_keys]
    jerks = [analyze.mean_squared_jerk(d["obs"]["ee_pos"], 1.0 / le.CONTROL_HZ) for d in demos]
    assert len(demos) == 4 and np.std(jerks) > 0
    assert task["diffusion_rl"]["msj_std"] == pytest.approx(np.std(jerks), rel=1e-9)
    se = analyze.consistency_se([d["actions"] for d in demos])
    assert se > 0 and task["diffusion_rl"]["consistency_se_all"] == pytest.approx(se, rel=1e-9)
    assert metrics["aggregate"]["diffusion_rl"]["libero_90"]["tasks"] == 2
    assert metrics["figure_task"] == "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet"
    assert metrics["figure_axis"] == "y" and len(metrics["figure_curves"]["human"]["mean"]) == 19
    report = (out_dir / "report.md").read_text()
    assert "| human | libero_90 | 1 | 3 |" in report and "`human` lacks 1 task(s)" in report
    import matplotlib.image

    for name in ("fig6a_length.png", "fig6b_jerk.png", "fig7_consistency.png"):
        image = matplotlib.image.imread(out_dir / name)
        assert image.shape[0] > 300 and image.shape[1] > 400, name
    assert os.path.getsize(out_dir / "fig7_consistency.png") > 10_000
    # one source alone, nested report name, no figures (how reproduce_cpu.sh reports each source of a task)
    one = f"diffusion_rl={rl}/*_demo.hdf5"
    run_script(["analyze.py", "--data", one, "--report-name", "task/diffusion_rl", "--no-figures",
                "--results-root", str(tmp_path / "results")], cwd=ROOT)  # fmt: skip
    alone = tmp_path / "results" / "analysis" / "task" / "diffusion_rl"
    assert sorted(os.listdir(alone)) == ["metrics.json", "report.md"]
    per_task = json.loads((alone / "metrics.json").read_text())["per_task"]
    name = "KITCHEN_SCENE1_put_the_black_bowl_on_top_of_the_cabinet"
    assert per_task[name]["diffusion_rl"]["length_mean"] == task["diffusion_rl"]["length_mean"]
    assert per_task[name]["diffusion_rl"]["chunk_smoothness"]["trajectories"] == 4


@pytest.mark.parametrize("content", [b"not an hdf5 file at all", "foreign"])
def test_a_corrupt_or_foreign_file_is_a_one_sentence_error_before_any_output(tmp_path, content):
    path = tmp_path / "data" / "diffusion_rl" / "libero_object" / "broken_demo.hdf5"
    path.parent.mkdir(parents=True)
    if content == "foreign":
        with h5py.File(path, "w") as f:  # a valid HDF5 file without LIBERO's layout
            f.create_dataset("weights", data=np.zeros(3))
    else:
        path.write_bytes(content)
    proc = run_script(["analyze.py", "--sources", "diffusion_rl", "--data-root", str(tmp_path / "data"),
                       "--results-root", str(tmp_path / "results")], cwd=ROOT, check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert not (tmp_path / "results" / "analysis").exists()
