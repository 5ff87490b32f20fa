"""scripts/failure_modes.py's per-episode facts on a planted episode: a grasp, a lift, a drop, a re-grasp, gripper
flips while the object is up."""

import os
import sys
from types import SimpleNamespace

import numpy as np
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import failure_modes  # noqa: E402


def test_lifts_drops_and_gripper_flips_of_a_planted_episode():
    # object height (start 0.9 m) and gripper command per step: open 3 steps, closed and lifted 4 steps (one open
    # command in the middle), dropped back for 2 steps, re-grasped and lifted 3 steps
    z = 0.9 + np.array([0, 0, 0, 0.01, 0.05, 0.08, 0.08, 0.08, 0.0, 0.0, 0.03, 0.06, 0.06])
    grip = np.array([-1, -1, -1, 1, 1, 1, -0.2, 1, -1, 1, 1, 1, 1])
    x = np.linspace(0.0, 0.12, len(z))
    steps = [{"obs": {"poses": {"bowl": np.array([x[t], 0.0, z[t], 1, 0, 0, 0])}}, "action": np.r_[np.zeros(6), g]}
             for t, g in enumerate(grip)]  # fmt: skip
    result = SimpleNamespace(episode=7, init_state=7, success=False, length=len(z), steps=steps)
    facts = failure_modes.summarize(result, "bowl")
    assert facts["gripper_closes"] == 3  # steps 3, 7 and 9 start a close
    assert facts["first_close_step"] == 3
    np.testing.assert_allclose(facts["max_lift_m"], 0.08, atol=1e-9)
    assert facts["steps_lifted"] == 7  # above 2 cm: steps 4-7 and 10-12
    assert facts["lifted_then_lowered"] == 1  # step 7 -> 8
    assert facts["grip_sign_flips_while_lifted"] == 2  # 5 -> 6 and 6 -> 7, both lifted; 7 -> 8 is not (dropped)
    assert facts["open_cmds_while_lifted"] == 1
    np.testing.assert_allclose(facts["final_xy_shift_m"], 0.12, atol=1e-9)
    np.testing.assert_allclose(facts["final_lift_m"], 0.06, atol=1e-9)
    assert facts["final_gripper_closed"]
    assert "target" not in facts and "final_goal_atoms" not in facts


def test_where_the_object_ended_relative_to_the_goal_target():
    """A bowl carried toward a plate at (0.10, 0.02, 0.88): it passes 1 cm from the plate's centre and is set down
    5 cm beyond it, off the 3 cm that LIBERO's On needs; the last step's goal atoms are reported as observed."""
    x = np.array([0.0, 0.05, 0.09, 0.12, 0.15])
    steps = [{"obs": {"poses": {"bowl": np.array([x[t], 0.02, 0.9, 1, 0, 0, 0]),
                                "plate": np.array([0.10, 0.02, 0.88, 1, 0, 0, 0])},
                      "goal_atoms": np.array([False])},
              "action": np.r_[0.0, 0.0, -0.1 * t, np.zeros(3), 1.0]} for t in range(len(x))]  # fmt: skip
    facts = failure_modes.summarize(SimpleNamespace(episode=1, init_state=1, success=False, length=5, steps=steps),
                                    "bowl", "plate")  # fmt: skip
    assert facts["target"] == "plate" and facts["final_goal_atoms"] == [False]
    np.testing.assert_allclose(facts["final_target_xy_m"], 0.05, atol=1e-9)
    np.testing.assert_allclose(facts["min_target_xy_m"], 0.01, atol=1e-9)
    np.testing.assert_allclose(facts["final_above_target_m"], 0.02, atol=1e-9)
    assert facts["first_over_target_step"] == 2 and facts["steps_over_target"] == 2  # 1 and 2 cm: steps 2 and 3
    np.testing.assert_allclose(facts["z_cmd_over_target_mean"], -0.25, atol=1e-9)  # z commands -0.2 and -0.3
    assert facts["z_cmd_over_target_down"] == 1.0 and facts["open_cmds_over_target"] == 0  # closed throughout


def test_the_goal_arguments_of_a_bddl_file(tmp_path):
    bddl = tmp_path / "t.bddl"
    bddl.write_text("(define (problem p)\n  (:goal\n    (And (On akita_black_bowl_1 plate_1) (Open drawer_1))\n  )\n)")
    assert failure_modes.goal_arguments(str(bddl)) == ("on", "akita_black_bowl_1", "plate_1")
    bddl.write_text("(:goal (And (Open wooden_cabinet_1_top_region)))")
    assert failure_modes.goal_arguments(str(bddl)) == ("open", "wooden_cabinet_1_top_region", None)


def test_the_goal_atoms_of_a_bddl_file_in_libero_s_order(tmp_path):
    """Every atom of the goal, in the order LIBERO's own BDDL parser evaluates them (the order of the goal_atoms an
    episode records); a real LIBERO-10 goal of three atoms is checked against that parser."""
    bddl = tmp_path / "t.bddl"
    bddl.write_text(
        "(:objects a b)\n(:goal\n  (And (Close cabinet_1_bottom_region)\n   (In  bowl_1 cabinet_1_bottom_region))\n)"
    )
    assert failure_modes.goal_atoms(str(bddl)) == ["Close cabinet_1_bottom_region", "In bowl_1 cabinet_1_bottom_region"]
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    import libero_env as le

    path = le.resolve_task("libero_10", 8).bddl_file
    parsed = [" ".join(atom) for atom in robosuite_parse_problem(path)["goal_state"]]
    atoms = failure_modes.goal_atoms(path)
    assert [a.lower() for a in atoms] == parsed and len(atoms) == 3  # both moka pots on the stove, the stove on


def test_how_far_a_drawer_got_toward_open():
    """A drawer whose joint starts at 0 and opens below -0.14 (LIBERO's open range [-0.16, -0.14]): pulled to -0.07
    (half way) by step 3, pushed back to -0.035; the facts say half way at most, a quarter at the end, first moved
    (10 % of the way) at step 1. Another predicate than the fixture's (on) adds nothing."""
    q = [0.0, -0.02, -0.05, -0.07, -0.035]
    ranges = {"open": [-0.16, -0.14], "close": [-0.005, 0.0]}
    steps = [{"obs": {"poses": {"drawer": np.array([0.5, 0.0, 0.8, 1, 0, 0, 0])},
                      "articulation": {"drawer": {"qpos": v, "ranges": ranges}}},
              "action": np.r_[np.zeros(6), 1.0]} for v in q]  # fmt: skip
    result = SimpleNamespace(episode=2, init_state=2, success=False, length=len(q), steps=steps)
    facts = failure_modes.summarize(result, "drawer", None, "open")
    assert facts["joint_predicate"] == "open" and facts["joint_threshold"] == -0.14 and facts["joint_start"] == 0.0
    np.testing.assert_allclose(facts["joint_max_progress"], 0.5, atol=1e-3)
    np.testing.assert_allclose(facts["joint_final_progress"], 0.25, atol=1e-3)
    assert facts["joint_first_moved_step"] == 1
    assert "joint_predicate" not in failure_modes.summarize(result, "drawer", None, "on")
