"""collect.py — phase 3: roll out a policy in parallel LIBERO environments and keep successful trajectories.

Episodes cycle through the task's 50 fixed init states (episode e starts from init state e % 50). Every step
records the observation the action was chosen from (both cameras, proprio, ee/joint states, LIBERO's
object-state vector, the simulator state), failed episodes are dropped, actions are stored as executed (no
filtering: no-op statistics are analyze.py's to measure), and the file is written atomically to
``data/<source>/<suite>/<task_name>_demo.hdf5``. A killed run leaves ``<file>.partial``; rerunning continues
from it.

Policies: ``scripted`` — a pick-and-place expert that reads ground-truth object poses from the simulator
(privileged information; a way to get real LIBERO demonstrations without downloading LIBERO's human data);
``diffusion`` / ``gaussian`` — checkpoints of bc_diffusion.py / ppo_diffusion.py / ppo_gaussian.py;
``vla`` — a pi0 checkpoint of finetune_vla.py.

    python collect.py --policy scripted --suite libero_object --task-id 0 --num-success 50
    python collect.py --list-scripted-tasks
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro
from tqdm import tqdm

import demo_hdf5
import libero_env as le


@dataclass
class Args:
    exp_name: str = "collect"
    """name of this run (used in logs only)"""
    seed: int = 0
    """episode e: env seed ``seed + e``; also seeds a learned policy's sampling noise and the scripted expert's"""
    cuda: bool = True
    """run learned policies on CUDA when available"""
    fast_step: bool = True
    """step the simulator on libero_env's fast path (same dynamics up to MuJoCo's solver tolerance; --no-fast-step:
    robosuite's own loop)"""

    policy: Literal["scripted", "diffusion", "gaussian", "vla"] = "scripted"
    """which policy generates the data"""
    ckpt: Optional[str] = None
    """checkpoint of a learned policy (default: the path convention of its phase)"""
    ckpt_phase: str = "ppo"
    """for --policy diffusion without --ckpt: load the 'ppo' (ppo_diffusion) or 'bc' (bc_diffusion) checkpoint"""
    instruction: Optional[Literal["bddl", "benchmark"]] = None
    """prompt of a vla policy: bddl (the BDDL :language) or benchmark (LIBERO's task.language); default: the
    convention its checkpoint was trained with"""
    suite: str = "all"
    """libero_spatial | libero_object | libero_goal | libero_10 | libero_90 | all (then --task-id is global)"""
    task_id: int = 10
    """task index (global 0-129 with --suite all, else within the suite)"""
    num_success: int = 50
    """successful trajectories to keep"""
    max_episodes: int = 500
    """give up after this many episodes (successes or not)"""
    num_envs: int = 2
    """parallel environment workers"""
    image_size: int = 256
    """stored camera resolution (OpenVLA's regenerated LIBERO data uses 256)"""
    obs_mode: Literal["rgb", "state"] = "rgb"
    """rgb: store both cameras; state: no rendering, no images (fast; enough for --obs-mode state policies)"""
    deterministic: bool = True
    """learned policies act deterministically (DDIM eta=0 / Gaussian mean); off: sample as in RL rollouts"""
    replan_steps: int = 0
    """actions executed per policy query (0: the policy's default: scripted 1, diffusion act_steps, vla 5)"""
    ddim_steps: int = 5
    """DDIM steps of a BC diffusion policy's sampler (a ppo_diffusion checkpoint runs its fine-tuned schedule)"""
    scripted_noise: float = 0.0
    """std of Gaussian noise added to the scripted expert's executed arm actions (perturbed, varied demos)"""
    scripted_label: Literal["expert", "executed"] = "expert"
    """action stored with --scripted-noise: the expert's noise-free action (DART, Laskey et al. 2017: the demos
    show how to correct perturbed states, which BC needs against compounding errors) or the noisy executed one"""
    data_root: str = "data"
    """root of the data convention data/<source>/<suite>/<task_name>_demo.hdf5"""
    run_root: str = "runs"
    """root of the checkpoint convention (learned policies)"""
    source: Optional[str] = None
    """source tag of the file (default: scripted | diffusion_rl | gaussian_rl | vla by --policy)"""
    save: bool = True
    """write the HDF5 file (off: only measure the success rate)"""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from a .partial left by a killed run; never: start clean"""
    list_scripted_tasks: bool = False
    """print the tasks the scripted expert handles and exit"""


DEFAULT_SOURCE = {"scripted": "scripted", "diffusion": "diffusion_rl", "gaussian": "gaussian_rl", "vla": "vla"}


# ================================================================================================================
# The scripted expert
# ================================================================================================================
class UnsupportedTask(ValueError):
    """The scripted expert does not handle this task's goal."""


@dataclass(frozen=True)
class PickPlaceGoal:
    relation: str  # "On" or "In"
    obj: str  # the object to move
    target: str  # an object, or a site (region) name


def _bddl_regions(text: str) -> dict[str, str]:
    """Site name ``<target>_<region>`` -> the fixture/object the region belongs to."""
    block = text[text.index("(:regions") : text.index("(:fixtures")] if "(:regions" in text else ""
    regions = {}
    for name, target in re.findall(r"\(\s*([\w]+)\s*\(:target\s+([\w]+)\)", block):
        regions[f"{target}_{name}"] = target
    return regions


def _bddl_types(text: str) -> dict[str, str]:
    """Object/fixture name -> its type, from the :fixtures and :objects blocks."""
    types = {}
    for block in re.findall(r"\(:(?:fixtures|objects)(.*?)\)", text, re.S):
        for line in block.strip().splitlines():
            if " - " in line:
                names, kind = line.split(" - ")
                for n in names.split():
                    types[n] = kind.strip()
    return types


def parse_pick_place_goal(task: le.Task) -> PickPlaceGoal:
    """The task's goal if it is a single pick-and-place the expert handles, else :class:`UnsupportedTask`.

    Handled, from the BDDL alone: ``(In X <container>_contain_region)`` (basket, tray, caddy compartments),
    ``(On X <object>)``, and ``(On X <site>)`` where the site is a flat surface: a table region, a fixture's
    ``top_side`` or a stove's ``cook_region``. Not handled: goals with several predicates, articulation goals
    (Open/Close/Turnon), drawer, shelf and microwave interiors, the wine rack.
    """
    with open(task.bddl_file) as f:
        text = f.read()
    goal_text = " ".join(text[text.index("(:goal") :].split())
    preds = re.findall(r"\((\w+)((?:\s+[\w]+)+)\)", goal_text)
    preds = [(p, args.split()) for p, args in preds if p != "And"]
    supported = "single (In X <container>_contain_region) or (On X <object or flat surface>) goals"
    if len(preds) != 1 or preds[0][0] not in ("On", "In") or len(preds[0][1]) != 2:
        raise UnsupportedTask(
            f"The scripted expert handles {supported}; task '{task.name}' has goal {goal_text[7:-2].strip()}. "
            "Run `python collect.py --list-scripted-tasks` for the supported tasks."
        )
    relation, (obj, target) = preds[0][0], preds[0][1]
    types, regions = _bddl_types(text), _bddl_regions(text)
    if relation == "In":
        ok = target.endswith("_contain_region")
    elif target in types:
        ok = True
    else:
        owner = regions.get(target, "")
        ok = target.endswith(("_top_side", "_cook_region")) or types.get(owner, "").endswith("table")
    if not ok:
        raise UnsupportedTask(
            f"The scripted expert handles {supported}; task '{task.name}' asks for ({relation} {obj} {target}), "
            "a place it cannot reach from above. Run `python collect.py --list-scripted-tasks` for the supported tasks."
        )
    return PickPlaceGoal(relation, obj, target)


def scripted_tasks() -> list[le.Task]:
    out = []
    for task in le.task_registry():
        try:
            parse_pick_place_goal(task)
            out.append(task)
        except UnsupportedTask:
            pass
    return out


# -- rotations (world frame; quaternions wxyz as MuJoCo stores them) ------------------------------------------------
def quat_wxyz_to_mat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def axisangle_to_mat(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def mat_to_axisangle(R: np.ndarray) -> np.ndarray:
    angle = np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))
    if angle < 1e-9:
        return np.zeros(3)
    if np.pi - angle < 1e-6:  # 180 degrees: the axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(R) + 1) / 2, 0))
        i = int(np.argmax(axis))
        others = np.arange(3) != i
        axis[others] = R[i, others] / (2 * axis[i])
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def rot_z(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def world_box(pose: np.ndarray, local_box) -> tuple[np.ndarray, np.ndarray]:
    """World-axis-aligned bounds of a body-frame box at ``pose`` (pos, quat wxyz)."""
    lo, hi = local_box
    corners = lo + np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T * (hi - lo)
    world = pose[:3] + corners @ quat_wxyz_to_mat(pose[3:]).T
    return world.min(0), world.max(0)


def footprint(pose: np.ndarray, local_box):
    """Horizontal footprint: centre (3), unit short axis (2), half extents along the short and long axes."""
    lo, hi = local_box
    R = quat_wxyz_to_mat(pose[3:])
    center = pose[:3] + R @ ((lo + hi) / 2)
    half = (hi - lo) / 2
    axes = np.argsort(np.abs(R[2, :]))[:2]  # the two body axes closest to horizontal
    dirs = [R[:2, a] / max(np.linalg.norm(R[:2, a]), 1e-9) for a in axes]
    ext = [half[a] * np.linalg.norm(R[:2, a]) for a in axes]
    short = int(np.argmin(ext))
    return center, dirs[short], ext[short], ext[1 - short]


class ScriptedExpert:
    """Pick-and-place in OSC_POSE delta actions from ground-truth poses (one instance per episode).

    Phases: approach (hover above the grasp point, yaw aligned) -> descend -> grasp -> lift (to an altitude that
    clears the target and everything between) -> transport (servo the object's body position over the target)
    -> lower -> release -> retreat. Objects narrower than the gripper's opening are grasped across their short
    horizontal axis at mid-height; wider ones (bowls) by the rim on the side facing the robot. Heights and
    clearances come from the objects' collision geometry; a dropped object is re-grasped.
    """

    MAX_OPENING = 0.075  # widest object the Panda's fingers close around (m)
    POS_SCALE, ROT_SCALE = 0.05, 0.5  # OSC_POSE output per unit action (m, rad)
    R_DOWN = np.diag([1.0, -1.0, -1.0])  # gripper pointing down, fingers closing along world y (LIBERO's start)
    # Grasp and release end when the fingers stop moving (an observable event, so the demos stay Markovian in the
    # observation; a fixed hold time would not be), within these bounds in control steps.
    GRIP_MIN_STEPS, GRIP_MAX_STEPS, FINGERS_STILL = 3, 15, 2e-4
    GRIP_TRAVEL = {"grasp": -0.005, "release": 0.01}  # finger-gap change (m) before "still" counts
    HOVER, CLEARANCE, FINGER_REACH = 0.08, 0.03, 0.05  # m
    MAX_REGRASPS = 2
    WRIST_LIMIT = 2.5  # rad: plan yaws that keep Panda joint 7 inside +-2.5 (its limit is +-2.90)
    WRIST_SWITCH = 2.75  # rad: past this before the grasp, switch to the other yaw solution

    def __init__(self, goal: PickPlaceGoal, geometry: dict, noise: float = 0.0, rng=None):
        self.goal, self.geometry, self.noise = goal, geometry, noise
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.phase, self.t_phase, self.plan, self.regrasps = "approach", 0, None, 0
        self.labels: list[np.ndarray] = []  # the noise-free action of every step (DART labels)

    def _go(self, phase: str) -> None:
        self.phase, self.t_phase = phase, 0
        self.phase_width = getattr(self, "last_width", 0.0)

    def _gripper_settled(self, width: float, still: bool) -> bool:
        """The fingers moved the intended way (closed on the object / opened) and stopped, or time ran out."""
        travel = width - self.phase_width
        moved = travel < self.GRIP_TRAVEL["grasp"] if self.phase == "grasp" else travel > self.GRIP_TRAVEL["release"]
        return (moved and still and self.t_phase >= self.GRIP_MIN_STEPS) or self.t_phase >= self.GRIP_MAX_STEPS

    def _make_plan(self, poses: dict) -> dict:
        goal, geom = self.goal, self.geometry
        lo, hi = world_box(poses[goal.obj], geom[goal.obj])
        center, short_dir, short_half, long_half = footprint(poses[goal.obj], geom[goal.obj])
        if 2 * short_half <= self.MAX_OPENING:  # across the short axis, mid-height (palm clear of the top)
            grasp_xy, close_dir = center[:2], short_dir
            grasp_z = max(lo[2] + 0.5 * (hi[2] - lo[2]), hi[2] - self.FINGER_REACH, lo[2] + 0.01)
        else:  # by the rim facing the robot (the robot's base is at -x), fingers closing radially
            close_dir = np.array([-1.0, 0.0])
            grasp_xy, grasp_z = center[:2] + close_dir * (short_half - 0.012), hi[2] - 0.02
        if goal.target in geom:  # on top of another object: body centres within LIBERO's 3 cm
            target_xy = poses[goal.target][:2]
            place_bottom = target_top = world_box(poses[goal.target], geom[goal.target])[1][2]
            place_bottom += 0.01
        elif goal.relation == "In":  # into a container region: release low inside it
            target_xy, target_top, place_bottom = poses[goal.target][:2], poses[goal.target][2] + 0.08, None
        else:  # onto a flat surface region
            target_xy, target_top = poses[goal.target][:2], poses[goal.target][2]
            place_bottom = target_top + 0.01
        if place_bottom is None:
            place_bottom = poses[goal.target][2] - 0.05
        # Carry altitude: above the target and above anything the object passes over on the way.
        tops = [target_top, hi[2]]
        for name, box in geom.items():
            if name == goal.obj or name not in poses:
                continue
            olo, ohi = world_box(poses[name], box)
            for s in np.linspace(0.0, 1.0, 11):
                p = center[:2] + s * (target_xy - center[:2])
                margin = long_half + 0.02
                if np.all(p > olo[:2] - margin) and np.all(p < ohi[:2] + margin):
                    tops.append(ohi[2])
                    break
        return dict(
            grasp=np.array([*grasp_xy, grasp_z]),
            close_dir=close_dir,
            bottom_offset=poses[goal.obj][2] - lo[2],  # body position above the object's lowest point
            target_xy=np.asarray(target_xy),
            place_bottom=place_bottom,
            carry_bottom=max(tops) + self.CLEARANCE,
        )

    def _desired_rotation(self, R_cur: np.ndarray, close_dir: np.ndarray, wrist: float) -> np.ndarray:
        """Pointing down, fingers along ``close_dir``. A two-finger grasp is symmetric under a 180-degree yaw: take
        the smaller turn unless it would drive the wrist (Panda joint 7, limit +-2.90 rad, turning opposite to
        the yaw) into its limit, then the other one. Chosen once per plan and held: re-choosing every step flips
        between the two solutions near the threshold and spins the gripper mid-task; one switch is allowed when the
        wrist nears its limit anyway."""
        if self.plan.get("yaw") is None:
            finger = R_cur[:2, 1]
            theta_cur = np.arctan2(finger[1], finger[0])
            d = (np.arctan2(close_dir[1], close_dir[0]) - theta_cur + np.pi / 2) % np.pi - np.pi / 2
            candidates = sorted([d, d - np.pi * np.sign(d)], key=abs)
            limit_ok = [c for c in candidates if abs(wrist - c) < self.WRIST_LIMIT]
            d = limit_ok[0] if limit_ok else min(candidates, key=lambda c: abs(wrist - c))
            self.plan["yaw"], self.plan["yaw_switched"] = theta_cur + d, False
        finger = R_cur[:2, 1]
        theta_cur = np.arctan2(finger[1], finger[0])
        remaining = (self.plan["yaw"] - theta_cur + np.pi) % (2 * np.pi) - np.pi
        if self.phase in ("approach", "descend") and abs(wrist) > self.WRIST_SWITCH and not self.plan["yaw_switched"]:
            # the prediction was off (other joints share the yaw) and the wrist is pinned before the grasp:
            # reach the grasp with the other solution (once; never while holding the object)
            self.plan["yaw"] = theta_cur + remaining - np.pi * np.sign(remaining)
            self.plan["yaw_switched"] = True
        theta_down = np.arctan2(self.R_DOWN[1, 1], self.R_DOWN[0, 1])
        return rot_z(self.plan["yaw"] - theta_down) @ self.R_DOWN

    def act(self, obs: dict) -> np.ndarray:
        poses, eef = obs["poses"], obs["ee_pos"]
        R_cur = axisangle_to_mat(obs["ee_ori"])
        if self.plan is None:
            self.plan = self._make_plan(poses)
        p, obj_pos = self.plan, poses[self.goal.obj][:3]
        carry_z = p["carry_bottom"] + p["bottom_offset"] - getattr(self, "grasp_dz", 0.0)
        grip, target, speed = -1.0, eef.copy(), 1.0
        width = obs["gripper_states"][0] - obs["gripper_states"][1]
        fingers_still = abs(width - getattr(self, "last_width", width)) < self.FINGERS_STILL and self.t_phase > 0
        self.last_width = width
        self.t_phase += 1
        if self.phase == "approach":
            hover = p["grasp"] + np.array([0.0, 0.0, self.HOVER])
            near = np.linalg.norm(eef[:2] - hover[:2]) < 0.03
            target = hover if near else np.array([*hover[:2], max(hover[2], min(eef[2], hover[2] + 0.1))])
            if np.linalg.norm(eef[:2] - hover[:2]) < 0.01 and abs(eef[2] - hover[2]) < 0.03:
                self._go("descend")
        elif self.phase == "descend":
            target, speed = p["grasp"], 0.6
            if np.linalg.norm(eef - p["grasp"]) < 0.008 or self.t_phase > 30:  # or blocked by the support
                self._go("grasp")
        elif self.phase == "grasp":
            target, grip = p["grasp"], 1.0
            if self._gripper_settled(width, fingers_still):
                self.grasp_dz = obj_pos[2] - eef[2]  # object body height relative to the gripper
                self._go("lift")
        elif self.phase == "lift":
            grip, target = 1.0, np.array([eef[0], eef[1], carry_z])
            if obj_pos[2] - eef[2] < self.grasp_dz - 0.03:  # the object stayed behind: grasp again
                self._regrasp(poses)
            elif eef[2] > carry_z - 0.02:
                self._go("transport")
        elif self.phase in ("transport", "lower"):
            grip = 1.0
            err_xy = p["target_xy"] - obj_pos[:2]
            if self.phase == "transport":
                target = np.array([eef[0] + err_xy[0], eef[1] + err_xy[1], carry_z])
                if obj_pos[2] - eef[2] < self.grasp_dz - 0.03:
                    self._regrasp(poses)
                elif np.linalg.norm(err_xy) < 0.01:
                    self._go("lower")
            else:
                bottom = obj_pos[2] - p["bottom_offset"]
                target = eef + np.array([err_xy[0], err_xy[1], p["place_bottom"] - bottom])
                speed = 0.5
                if bottom < p["place_bottom"] + 0.005 or self.t_phase > 40:
                    self._go("release")
        elif self.phase == "release":
            if self._gripper_settled(width, fingers_still):
                self._go("retreat")
        elif self.phase == "retreat":
            target = eef + np.array([0.0, 0.0, 0.05])
        action = np.zeros(7)
        action[:3] = np.clip((target - eef) / self.POS_SCALE, -speed, speed)
        R_des = self._desired_rotation(R_cur, p["close_dir"], obs["joint_states"][6])
        action[3:6] = np.clip(mat_to_axisangle(R_des @ R_cur.T) / self.ROT_SCALE, -1, 1)
        action[6] = grip
        action = np.clip(action, -1.0, 1.0)
        self.labels.append(action.copy())
        if self.noise:
            action[:6] = np.clip(action[:6] + self.rng.normal(0.0, self.noise, 6), -1.0, 1.0)
        return action

    def _regrasp(self, poses: dict) -> None:
        if self.regrasps < self.MAX_REGRASPS:
            self.regrasps += 1
            self.plan = self._make_plan(poses)
            self._go("approach")


class ScriptedPolicy:
    """Rollout interface around one :class:`ScriptedExpert` per environment (closed loop, one action per query)."""

    replan_steps, image_size, needs_privileged = 1, None, True

    def __init__(self, goal: PickPlaceGoal, geometry: dict, noise: float, seed: int):
        self.goal, self.geometry, self.noise, self.seed = goal, geometry, noise, seed
        self.experts: dict[int, ScriptedExpert] = {}
        self.by_episode: dict[int, ScriptedExpert] = {}

    def reset(self, env_ids, episodes) -> None:
        for i, e in zip(env_ids, episodes):
            rng = np.random.default_rng([self.seed, e])
            self.experts[i] = self.by_episode[e] = ScriptedExpert(self.goal, self.geometry, self.noise, rng)

    def expert_labels(self, episode: int) -> np.ndarray:
        """The noise-free actions of an episode's steps (forgotten once read)."""
        return np.stack(self.by_episode.pop(episode).labels)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        rows = []
        for j, i in enumerate(env_ids):
            single = {k: v[j] for k, v in obs.items()}
            rows.append(self.experts[i].act(single))
        return np.stack(rows)[:, None]  # (B, 1, 7)


# ================================================================================================================
# Policies and episode recording
# ================================================================================================================
CKPT_PHASES = {"diffusion": {"ppo": "ppo_diffusion", "bc": "bc_diffusion"}, "gaussian": {"ppo": "ppo_gaussian"}}


def default_checkpoint(args: Args, task: le.Task) -> str:
    """The checkpoint convention: runs/<phase>/<suite>/task<NN>__seed<S>/checkpoints/final.pt."""
    import run_utils

    phases = CKPT_PHASES[args.policy]
    if args.ckpt_phase not in phases:
        raise ValueError(f"--ckpt-phase for --policy {args.policy} must be one of {sorted(phases)}.")
    run_dir = run_utils.task_run_dir(args.run_root, phases[args.ckpt_phase], task.suite, task.local_id, args.seed)
    return os.path.join(run_dir, "checkpoints", "final.pt")


def check_args(args: Args) -> Optional[PickPlaceGoal]:
    """Everything a user can get wrong, checked before any environment is built."""
    le.check_task_args(args.suite, args.task_id)
    if args.num_success < 1 or args.max_episodes < 1 or args.num_envs < 1:
        raise ValueError("--num-success, --max-episodes and --num-envs must be at least 1.")
    task = le.resolve_task(args.suite, args.task_id)
    if args.policy == "scripted":
        return parse_pick_place_goal(task)
    if args.policy == "vla":
        if args.ckpt is None:
            raise ValueError("--policy vla needs --ckpt (a finetune_vla.py checkpoint directory).")
    else:
        args.ckpt = args.ckpt or default_checkpoint(args, task)
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"No checkpoint at {args.ckpt}; train that phase first or pass --ckpt.")
    return None


class LearnedPolicy:
    """Rollout interface around a learned policy's ``act(obs) -> (B, T, 7)``."""

    needs_privileged = False

    def __init__(self, act, replan_steps: int, obs_mode: str, image_size: int, info: Optional[dict] = None):
        self.act, self.replan_steps, self.obs_mode, self.info = act, replan_steps, obs_mode, info or {}
        self.image_size = image_size  # the camera size the policy was trained on (evaluate.py renders at it)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        return self.act(obs)


def load_learned_policy(kind: str, ckpt: str, task: le.Task, deterministic=True, ddim_steps=5, seed=0, cuda=True,
                        instruction: Optional[str] = None):  # fmt: skip
    """A checkpoint of bc_diffusion / ppo_diffusion (``diffusion``), ppo_gaussian (``gaussian``) or finetune_vla
    (``vla``) as a :class:`LearnedPolicy`; deterministic (DDIM eta = 0 / Gaussian mean) unless asked otherwise.
    A vla policy is prompted in the instruction convention its checkpoint was trained with, or ``instruction``."""
    import torch

    import run_utils

    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(seed)  # the policy's sampling noise
    if kind == "vla":
        from finetune_vla import Pi0Policy, vla_prompt

        prompt, convention = vla_prompt(ckpt, task, instruction)
        policy = Pi0Policy(ckpt, prompt, device)
        info = {**policy.info, "prompt": prompt, "prompt_convention": convention}
        return LearnedPolicy(policy.act, policy.cfg["act_steps"], "rgb", 256, info)  # 256: its training data
    if kind == "gaussian":
        from ppo_gaussian import load_policy

        policy = load_policy(ckpt, device)
        act = lambda obs: policy.act(obs, deterministic, generator)  # noqa: E731
        cfg = policy.cfg
        return LearnedPolicy(
            act, cfg["act_steps"], cfg["obs_mode"], cfg["image_size"], {"ckpt_format": "ppo_gaussian/v1"}
        )
    fmt = run_utils.load_checkpoint(ckpt, ("bc_diffusion/v1", "ppo_diffusion/v1"))["format"]
    if fmt == "ppo_diffusion/v1":
        from ppo_diffusion import load_policy
    else:
        from bc_diffusion import load_policy
    policy = load_policy(ckpt, device)
    act = lambda obs: policy.act(obs, "ddim", ddim_steps, eta=0.0 if deterministic else 1.0, generator=generator)  # noqa: E731
    cfg = policy.cfg
    return LearnedPolicy(act, cfg["act_steps"], cfg["obs_mode"], cfg["image_size"], {"ckpt_format": fmt})


def episode_arrays(steps: list[dict]) -> dict:
    """Recorded steps of one episode -> the arrays of one HDF5 demo (observation t precedes action t)."""
    obs_keys = [k for k in steps[0]["obs"] if k not in ("sim_state", "robot_states", "poses")]
    rewards = np.array([s["reward"] for s in steps])
    dones = np.array([s["done"] for s in steps], dtype=np.uint8)
    return dict(
        actions=np.stack([s["action"] for s in steps]),
        obs={k: np.stack([s["obs"][k] for s in steps]) for k in obs_keys},
        states=np.stack([s["obs"]["sim_state"] for s in steps]),
        robot_states=np.stack([s["obs"]["robot_states"] for s in steps]),
        rewards=rewards,
        dones=dones,
    )


def file_info(args: Args, task: le.Task, source: str, checkpoint: str) -> demo_hdf5.FileInfo:
    with open(task.bddl_file) as f:
        problem = re.search(r"\(problem\s+([\w]+)\)", f.read()).group(1).lower()
    env_kwargs = {
        "bddl_file_name": task.bddl_file,
        "camera_heights": args.image_size,
        "camera_widths": args.image_size,
        "camera_names": list(le.CAMERAS.values()),
        "controller": "OSC_POSE",
        "control_freq": le.CONTROL_HZ,
    }
    return demo_hdf5.FileInfo(
        instruction=task.instruction,
        benchmark_instruction=task.language,
        problem_name=problem,
        bddl_file_name=task.bddl_file,
        source=source,
        suite=task.suite,
        task_name=task.name,
        image_size=args.image_size if args.obs_mode == "rgb" else 0,
        checkpoint=checkpoint,
        env_kwargs=env_kwargs,
    )


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.list_scripted_tasks:
        print(f"{'id':>3}  {'suite':<15} {'local':>5}  goal")
        for t in scripted_tasks():
            g = parse_pick_place_goal(t)
            print(
                f"{t.global_id:>3}  {t.suite:<15} {t.local_id:>5}  ({g.relation} {g.obj} {g.target})  {t.instruction}"
            )
        sys.exit(0)
    try:
        goal = check_args(args)
        task = le.resolve_task(args.suite, args.task_id)
        policy = None
        if args.policy != "scripted":
            policy = load_learned_policy(args.policy, args.ckpt, task, args.deterministic, args.ddim_steps,
                                         args.seed, args.cuda, args.instruction)  # fmt: skip
    except (ValueError, FileNotFoundError, le.TaskError) as e:
        sys.exit(f"error: {e}")
    if policy is not None and policy.obs_mode == "rgb" and args.obs_mode == "state":
        sys.exit("error: this policy sees camera images; collect with --obs-mode rgb.")
    source = args.source or DEFAULT_SOURCE[args.policy]
    out_path = demo_hdf5.demo_path(args.data_root, source, task.suite, task.name)
    print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'")
    print(f"policy: {args.policy}  ->  {out_path if args.save else '(not saved)'}")

    # ALGO LOGIC: resume or start clean
    writer, first_episode, attempts, successes = None, 0, 0, 0
    if args.save:
        if args.resume == "auto" and os.path.exists(out_path):
            with demo_hdf5.DemoFile(out_path) as existing:
                if len(existing) >= args.num_success:
                    print(f"{out_path} already holds {len(existing)} successful demos; nothing to do.")
                    sys.exit(0)
        writer = demo_hdf5.DemoWriter(
            out_path, file_info(args, task, source, args.ckpt or ""), resume=args.resume == "auto"
        )
        if writer.resumed_demos:
            successes = writer.resumed_demos
            attempts = max(int(writer.file_attrs.get("num_attempts", successes)), successes)
            first_episode = int(writer.file_attrs.get("next_episode", attempts))
            print(f"continuing a killed run from {writer.partial}: {successes} demos kept, {attempts} episodes run")
        else:
            reason = " (discarded an unreadable .partial)" if writer.discarded_partial else ""
            print(f"starting clean{reason}")
        if args.policy == "scripted":
            writer.set_attrs(scripted_noise=args.scripted_noise, scripted_label=args.scripted_label)

    venv = le.VectorLiberoEnv(
        task,
        args.num_envs,
        obs_mode=args.obs_mode,
        image_size=args.image_size,
        privileged=args.policy == "scripted",
        fast_step=args.fast_step,
    )
    if policy is None:
        policy = ScriptedPolicy(goal, venv.call("geometry", env_ids=[0])[0], args.scripted_noise, args.seed)
    replan = args.replan_steps or policy.replan_steps
    bar = tqdm(total=args.num_success, initial=successes, desc="successes", unit="demo")
    state = {"attempts": attempts, "successes": successes, "started": first_episode}

    def episodes():
        e = first_episode
        while state["successes"] < args.num_success and e < first_episode + args.max_episodes - attempts:
            state["started"] = e + 1
            yield e
            e += 1

    def on_episode_end(result: le.EpisodeResult) -> None:
        state["attempts"] += 1
        keep = result.success and state["successes"] < args.num_success
        if keep:
            state["successes"] += 1
            bar.update(1)
        if writer is not None:
            # progress counters first: add_demo flushes them together with the demo, so a run killed right after
            # never resumes with fewer attempts than demos or re-runs the episode it just kept
            writer.set_attrs(num_attempts=state["attempts"], next_episode=state["started"])
            if keep:
                if args.scripted_noise and args.scripted_label == "expert" and hasattr(policy, "expert_labels"):
                    labels = policy.expert_labels(result.episode)
                    assert len(labels) == len(result.steps), (len(labels), len(result.steps))
                    for step, label in zip(result.steps, labels):
                        step["action"] = label
                attrs = {"init_state_index": result.init_state, "seed": result.seed, "episode": result.episode,
                         "success": True}  # fmt: skip
                writer.add_demo(**episode_arrays(result.steps), attrs=attrs)
        if hasattr(policy, "by_episode"):
            policy.by_episode.pop(result.episode, None)
        bar.set_postfix(attempts=state["attempts"], rate=f"{state['successes'] / state['attempts']:.2f}")
        result.steps.clear()  # recorded images are large; keep only what was written

    start = time.time()
    try:
        le.run_episodes(
            venv,
            policy,
            episodes(),
            seed=args.seed,
            replan_steps=replan,
            record=args.save,
            render=args.obs_mode == "rgb",
            on_episode_end=on_episode_end,
            reset_policy=getattr(policy, "reset", None),
        )
    finally:
        bar.close()
        venv.close()
    rate = state["successes"] / max(state["attempts"], 1)
    print(f"success rate {rate:.3f} ({state['successes']}/{state['attempts']} episodes) in {time.time() - start:.0f} s")
    if writer is not None:
        if state["successes"] >= args.num_success:
            writer.commit({"num_attempts": state["attempts"], "success_rate": rate})
            print(f"wrote {out_path}")
        else:
            writer.close()
            sys.exit(
                f"error: only {state['successes']} of {args.num_success} successes in {args.max_episodes} episodes; "
                f"kept them in {writer.partial} (rerun with a larger --max-episodes to continue)."
            )
