"""scripted_expert.py: goal parsing and ordering, the measured list, the simulator's joint state, and one real
episode per primitive family (pick and place, drawer, knob) and for a two-step goal."""

import json
import os
import re

import numpy as np
import pytest
from helpers import ROOT, run_script

import demo_hdf5
import expert_primitives as ep
import libero_env as le
import scripted_expert as se


def steps_of(suite, local_id):
    return [(str(s.atom), s.primitive) for s in se.plan(le.resolve_task(suite, local_id))]


def test_goal_atoms_become_ordered_primitives():
    assert steps_of("libero_object", 7) == [("(in milk_1 basket_1_contain_region)", "pick_place")]
    assert steps_of("libero_goal", 0) == [("(open wooden_cabinet_1_middle_region)", "drawer")]
    assert steps_of("libero_90", 39) == [("(turnoff flat_stove_1)", "knob")]
    # BDDL order is kept where nothing depends on it (turn the stove on first, then the pot) ...
    assert [p for _, p in steps_of("libero_10", 2)] == ["knob", "pick_place"]
    # ... and changed where it does: the bowl that is stacked on goes into the tray first (BDDL lists it second)
    atoms, _, regions = se.parse_goal(le.resolve_task("libero_90", 63))
    assert [str(a) for a in atoms] == ["(on akita_black_bowl_1 akita_black_bowl_2)",
                                       "(in akita_black_bowl_2 wooden_tray_1_contain_region)"]  # fmt: skip
    assert se.order_atoms(atoms, regions) == [1, 0]
    # a drawer opens before something goes in and closes after, whatever the BDDL order
    open_, put, close = (se.Atom("open", ("c_1_top_region",)), se.Atom("in", ("bowl_1", "c_1_top_region")),
                         se.Atom("close", ("c_1_top_region",)))  # fmt: skip
    assert se.order_atoms([close, put, open_], {"c_1_top_region": "c_1"}) == [2, 1, 0]
    # "open the top drawer and put the bowl inside": the goal only says (In bowl drawer); opening is a precondition
    steps = se.plan(le.resolve_task("libero_goal", 3))
    assert [(s.index, str(s.atom), s.primitive) for s in steps] == [
        (-1, "(open wooden_cabinet_1_top_region)", "drawer"),
        (0, "(in akita_black_bowl_1 wooden_cabinet_1_top_region)", "pick_place"),
    ]


@pytest.mark.parametrize(
    "suite, local_id, reason",
    [
        ("libero_goal", 9, "a place it cannot reach from above"),  # the wine rack
        ("libero_90", 40, "a place it cannot reach from above"),  # inside a shelf
        ("libero_90", 35, "swinging a hinged door open"),  # the microwave
    ],
)
def test_tasks_without_a_primitive_are_refused_with_the_reason(suite, local_id, reason):
    task = le.resolve_task(suite, local_id)
    with pytest.raises(se.UnsupportedTask, match=reason) as err:
        se.plan(task)
    assert f"cannot do task '{task.name}'" in str(err.value) and "--list-scripted-tasks" in str(err.value)


def test_the_listed_tasks_are_the_ones_measured_at_80_percent():
    table = se.measured_table()
    assert len(table) >= 20 and all(n == 50 for _, n in table.values())  # every row over the 50 init states
    listed = {(t.suite, t.local_id) for t in se.listed_tasks()}
    # pinned against the committed table (docs/scripted_expert_table.md), not re-derived from the same rule: its
    # headline count, the boundary (40/50 is listed), and tasks below it (30/50, 20/50, 2/50) that are not
    headline = re.search(r"\*\*(\d+) of 130 tasks at >= 80 %\*\*", open(os.path.join(ROOT, "docs",
                         "scripted_expert_table.md")).read())  # fmt: skip
    assert headline and len(listed) == int(headline.group(1))
    assert table["libero_10", 1] == (40, 50) and ("libero_10", 1) in listed
    for below in (("libero_spatial", 5), ("libero_goal", 3), ("libero_goal", 5)):
        assert below in table and below not in listed
    assert ("libero_object", 0) in listed and ("libero_goal", 9) not in listed  # 50/50; not attempted
    out = run_script(["collect.py", "--list-scripted-tasks"], cwd=ROOT).stdout
    assert out.startswith(f"{len(listed)} tasks measured at >= 80%")
    array = out.strip().splitlines()[-1].removeprefix("array: ")  # the SLURM array spec of the listed global ids
    spec = [r.split("-") for r in array.split(",")]
    expanded = {i for r in spec for i in range(int(r[0]), int(r[-1]) + 1)}
    assert expanded == {t.global_id for t in se.listed_tasks()}
    below = [k for k, (s, n) in table.items() if s < 0.8 * n]
    if below:  # a measured task under 80 % is attempted only when asked for
        suite, local_id = below[0]
        proc = run_script(["collect.py", "--suite", suite, "--task-id", str(local_id), "--no-save"], cwd=ROOT,
                          check=False)  # fmt: skip
        assert proc.returncode != 0 and "pass --scripted-unlisted to attempt it anyway" in proc.stderr


def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(0)
    for v in [*rng.normal(size=(10, 3)), np.array([np.pi, 0, 0]), np.array([0, 0, np.pi - 1e-9])]:
        R = ep.axisangle_to_mat(v)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        np.testing.assert_allclose(ep.axisangle_to_mat(ep.mat_to_axisangle(R)), R, atol=1e-6)


@pytest.mark.sim
def test_joint_state_and_goal_atoms_come_from_the_simulator():
    env = le.make_env(le.resolve_task("libero_goal", 0), obs_mode="state", privileged=True)
    try:
        obs = env.reset(0, 0, render=False)
        drawer, knob = obs["articulation"]["wooden_cabinet_1_middle_region"], obs["articulation"]["flat_stove_1"]
        assert drawer["kind"] == "slide" and knob["kind"] == "hinge"
        # LIBERO's own thresholds (WoodenCabinet / FlatStove object properties) and MuJoCo's joint range
        assert drawer["ranges"]["open"] == (-0.16, -0.14) and drawer["ranges"]["close"] == (0.0, 0.005)
        assert knob["ranges"]["turnon"] == (0.5, 2.1)
        np.testing.assert_allclose(drawer["range"], (-0.16, 0.01), atol=1e-6)
        assert abs(np.linalg.norm(drawer["axis"]) - 1) < 1e-9 and drawer["parts"]
        assert obs["goal_atoms"].tolist() == [False]  # the middle drawer starts closed
        # move the joint past LIBERO's threshold by hand: the atom holds, as LIBERO's success check says
        sim = env.env.sim
        sim.data.qpos[drawer["qpos_adr"]] = -0.15
        sim.forward()
        assert env.goal_atoms().tolist() == [True] and env.env._check_success()
        assert abs(env.articulation()["wooden_cabinet_1_middle_region"]["qpos"] + 0.15) < 1e-12
    finally:
        env.close()


def run_expert(suite, local_id, episode, placement="release"):
    task = le.resolve_task(suite, local_id)
    env = le.make_env(task, obs_mode="state", privileged=True, fast_step=True)
    try:
        obs = env.reset(episode, episode, render=False)
        expert = se.ScriptedExpert(se.plan(task), env.scene(), placement=placement)
        while True:
            result = env.step_chunk(expert.act(obs)[None], render=False)
            obs = result.obs
            if result.done or result.truncated:
                return result, expert, obs
    finally:
        env.close()


@pytest.mark.sim
@pytest.mark.parametrize(
    "suite, local_id, max_len",
    [
        ("libero_goal", 0, 160),  # open the middle drawer (front grasp, pull)
        ("libero_90", 0, 120),  # close the top drawer (push)
        ("libero_goal", 7, 130),  # turn on the stove (knob)
        ("libero_90", 39, 130),  # turn off the stove
        ("libero_90", 33, 130),  # close the microwave (push its door round the hinge)
    ],
)
def test_articulation_primitives_solve_their_task(suite, local_id, max_len):
    result, expert, obs = run_expert(suite, local_id, episode=3)
    assert result.done and result.t <= max_len and obs["goal_atoms"].all()


@pytest.mark.sim
def test_set_down_placement_ends_on_the_target_still_held():
    """On a plate, "release" opens the gripper ~1 cm above it (the bowl drops onto it); "set-down" lowers the held bowl
    until it touches, where LIBERO's On holds and the episode ends before any opening."""
    ends = {}
    for placement in ("release", "set-down"):
        result, expert, obs = run_expert("libero_spatial", 3, episode=3, placement=placement)
        assert result.done and obs["goal_atoms"].all(), placement
        actions = np.stack(expert.labels)
        lifted = int(np.argmax(actions[:, 6] > 0))  # the first close: the grasp
        ends[placement] = actions[-10:], int((actions[lifted:, 6] < 0).sum()), len(actions)
    last, opens, length = ends["release"]
    assert opens >= 3 and (last[:, 6] < 0).any()  # opened over the plate
    last, opens, length_held = ends["set-down"]
    assert opens == 0 and (last[:, 6] > 0).all()  # never opened: the touch ended it
    assert last[-5:, 2].mean() < -0.2  # still pressing down when it touched
    assert length_held <= length + 5  # and no slower
    with pytest.raises(ValueError, match="placement must be one of release, set-down, got 'drop'"):
        se.ScriptedPolicy([], {}, 0.0, seed=0, placement="drop")


def test_an_elongated_object_is_turned_to_a_narrow_containers_long_side():
    identity = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    compartment = np.array([0.028, 0.062, 0.036])  # long along world y (a caddy's front compartment)
    book_along_x = (np.array([0.0, 1.0]), 0.015, 0.055)  # (short axis, short half, long half): long side along x
    assert abs(abs(se.PickPlace.alignment(identity, compartment, *book_along_x)) - np.pi / 2) < 1e-9
    book_along_y = (np.array([1.0, 0.0]), 0.015, 0.055)
    assert abs(se.PickPlace.alignment(identity, compartment, *book_along_y)) < 1e-9
    diagonal = (np.array([np.sqrt(0.5), -np.sqrt(0.5)]), 0.015, 0.055)  # long side at +45 deg: turn by +45
    assert abs(se.PickPlace.alignment(identity, compartment, *diagonal) - np.pi / 4) < 1e-9
    # nothing to line up: a square region, a round object, an unknown region
    assert se.PickPlace.alignment(identity, np.array([0.06, 0.06, 0.06]), *book_along_x) == 0.0
    assert se.PickPlace.alignment(identity, compartment, np.array([0.0, 1.0]), 0.03, 0.035) == 0.0
    assert se.PickPlace.alignment(identity, None, *book_along_x) == 0.0


@pytest.mark.sim
def test_a_book_goes_into_a_narrow_compartment_turned_to_fit():
    """The caddy's front compartment is 5.6 cm wide, the book 11 cm long and picked up lying across it: it is carried
    turned by the alignment and goes in (before the turn: 0 of 50 init states)."""
    result, expert, obs = run_expert("libero_90", 81, episode=0)
    assert result.done and obs["goal_atoms"].all()
    assert abs(abs(expert.current.plan["turn"]) - np.pi / 2) < 0.3


@pytest.mark.sim
def test_a_two_step_goal_is_done_atom_by_atom():
    """Close the top drawer, then put the bowl on the cabinet: the first atom is checked with LIBERO's predicate
    before the second starts, and the episode succeeds with both."""
    result, expert, obs = run_expert("libero_90", 1, episode=3)
    assert result.done and obs["goal_atoms"].tolist() == [True, True]
    assert expert.log == [("(close wooden_cabinet_1_top_region)", "holds")]
    assert isinstance(expert.current, se.PickPlace)


@pytest.mark.sim
def test_articulated_and_two_step_demos_train_a_policy(tmp_path):
    """collect.py writes 5 successful image episodes of an articulated task (turn on the stove) and a two-step one
    (both soups into the basket), and bc_diffusion.py trains on them."""
    data = str(tmp_path / "data")
    for suite, local_id in [("libero_goal", 7), ("libero_10", 0)]:
        task = le.resolve_task(suite, local_id)
        run_script(["collect.py", "--policy", "scripted", "--suite", suite, "--task-id", str(local_id),
                    "--num-success", "5", "--max-episodes", "10", "--image-size", "32", "--num-envs", "2",
                    "--data-root", data, "--scripted-unlisted"], cwd=ROOT)  # fmt: skip
        path = demo_hdf5.demo_path(data, "scripted", suite, task.name)
        with demo_hdf5.DemoFile(path) as f:
            assert len(f) == 5
            demo = f.read(f.demo_keys[0], ["agentview_rgb", "ee_pos"])
            assert demo["obs"]["agentview_rgb"].shape[1:] == (32, 32, 3)
            assert not set(f.obs_keys()) & set(le.PRIVILEGED_KEYS)  # the expert's privileged state is not stored
        tiny = "--feature-dim 16 --state-encoder-dims 32 --unet-down-dims 16 32 --step-embed-dim 16"
        out = run_script(["bc_diffusion.py", *tiny.split(), "--obs-mode", "state", "--demo-paths", path,
                          "--suite", suite, "--task-id", str(local_id),
                          "--run-root", str(tmp_path / "runs"), "--total-steps", "3", "--batch-size", "8",
                          "--eval-episodes", "0"], cwd=ROOT).stdout  # fmt: skip
        assert "done: 3 steps" in out


@pytest.mark.sim
def test_the_table_script_measures_resumes_and_writes_the_table(tmp_path):
    out, table = tmp_path / "results", tmp_path / "table.md"
    cmd = ["scripts/scripted_expert_table.py", "--tasks", "libero_goal:9", "libero_goal:7", "--episodes", "2",
           "--num-envs", "1", "--out", str(out), "--table", str(table)]  # fmt: skip
    first = run_script(cmd, cwd=ROOT).stdout
    assert "libero_goal 9: not attempted" in first and "libero_goal 7: 2/2" in first
    result = json.loads((out / "libero_goal_task07.json").read_text())
    assert result["plan"] == ["(turnon flat_stove_1):knob"] and len(result["episodes"]) == 2
    assert all(e["success"] and e["failed_at"] is None for e in result["episodes"])
    rows = table.read_text()
    assert "| libero_goal | 7 | Turn on the stove | 2/2 |" in rows
    assert "| libero_goal | 9 | Put the wine bottle on the rack | not attempted | " in rows
    assert "| libero_goal | 0 | Open the middle layer of the drawer | not measured yet |" in rows
    assert "**0 of 130 tasks at >= 80 %**" in rows  # 2 episodes are not the 50 init states: not counted
    again = run_script(cmd, cwd=ROOT).stdout  # resumable: a measured task is not run again
    assert "libero_goal 7:" not in again and "libero_goal 9: not attempted" in again
    # the table is stamped with its latest measurement's date, not the day it was written: it regenerates identically
    result["date"] = "2001-02-03"
    (out / "libero_goal_task07.json").write_text(json.dumps(result))
    run_script([*cmd, "--table-only"], cwd=ROOT)
    assert "CPU, 2001-02-03)" in table.read_text()
