"""scripted_expert.py — a goal-driven scripted expert for LIBERO, from privileged simulator state.

The project's offline source of demonstrations (no human data is downloaded): ``collect.py --policy scripted``
rolls it out and keeps the successes. The BDDL goal, a conjunction of atoms, becomes an ordered list of primitives:

* ``(On X Y)``, ``(In X region)``: pick and place with a top-down grasp (:class:`PickPlace`);
* ``(Open drawer)``, ``(Close drawer)``: grasp the handle from the front and slide the drawer along its joint
  (:class:`Drawer`);
* ``(Turnon stove)``, ``(Turnoff stove)``: grasp the knob from above and turn the wrist about its hinge
  (:class:`Knob`);
* ``(Close microwave)``: push its door round the hinge (:class:`Door`).

Atoms that already hold are skipped. A primitive ends with LIBERO's own predicate for its atom (observed as
``obs["goal_atoms"]``); one that does not hold is attempted again, at most ``MAX_ATTEMPTS`` times. Atoms are ordered
so that a drawer is opened before something is put into it, closed after, and an object is moved before another is
stacked on it. Joint state (kind, axis, anchor, range, LIBERO's thresholds, the moving body's parts) is read from
the simulator by libero_env (``obs["articulation"]``), not written down per scene. Which tasks this solves is
measured, not assumed: docs/scripted_expert_table.md (``bash scripts/scripted_expert_table.sh``).

    python collect.py --policy scripted --suite libero_goal --task-id 7 --num-success 5 --obs-mode state
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

import libero_env as le

MAX_ATTEMPTS = 3  # per atom, the first one included
SETTLE_STEPS = 10  # after a primitive, steps its atom may take to hold before the attempt counts as failed
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "scripted_expert_table.md")
LISTED_RATE = 0.8  # --list-scripted-tasks: tasks measured at >= 80 % over the 50 init states


class UnsupportedTask(ValueError):
    """The scripted expert has no primitive for some atom of this task's goal."""


# ================================================================================================================
# Goals: parsing, primitives per atom, order
# ================================================================================================================
@dataclass(frozen=True)
class Atom:
    predicate: str  # LIBERO's lower-case name: on, in, open, close, turnon, turnoff
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"({self.predicate} {' '.join(self.args)})"


@dataclass(frozen=True)
class Step:
    index: int  # position of the atom in the BDDL goal (= in obs["goal_atoms"]); -1: a precondition the goal omits
    atom: Atom
    primitive: str  # "pick_place", "drawer" or "knob"

    def holds(self, obs: dict) -> bool:
        """LIBERO's predicate for a goal atom; for a precondition (an unlisted drawer opening) the same test on the
        joint (past the end of LIBERO's open range nearest to closed)."""
        if self.index >= 0:
            return bool(obs["goal_atoms"][self.index])
        return drawer_is_open(obs["articulation"][self.atom.args[0]])


def drawer_is_open(info: dict) -> bool:
    open_q, close_q = np.mean(info["ranges"]["open"]), np.mean(info["ranges"]["close"])
    threshold = min(info["ranges"]["open"], key=lambda q: abs(q - close_q))
    return (info["qpos"] - threshold) * np.sign(open_q - close_q) >= 0


def _bddl_regions(text: str) -> dict[str, str]:
    """Site name ``<target>_<region>`` -> the fixture/object the region belongs to."""
    block = text[text.index("(:regions") : text.index("(:fixtures")] if "(:regions" in text else ""
    return {f"{target}_{name}": target for name, target in re.findall(r"\(\s*([\w]+)\s*\(:target\s+([\w]+)\)", block)}


def _bddl_types(text: str) -> dict[str, str]:
    """Object/fixture name -> its type, from the :fixtures and :objects blocks."""
    types = {}
    for block in re.findall(r"\(:(?:fixtures|objects)(.*?)\)", text, re.S):
        for line in block.strip().splitlines():
            if " - " in line:
                names, kind = line.split(" - ")
                types.update({n: kind.strip() for n in names.split()})
    return types


def parse_goal(task: le.Task) -> tuple[list[Atom], dict[str, str], dict[str, str]]:
    """The goal atoms in BDDL order (LIBERO's ``goal_state`` order), the object types and the region owners."""
    with open(task.bddl_file) as f:
        text = f.read()
    goal_text = " ".join(text[text.index("(:goal") :].split())
    atoms = [Atom(p.lower(), tuple(a.split())) for p, a in re.findall(r"\((\w+)((?:\s+[\w]+)+)\)", goal_text)]
    return [a for a in atoms if a.predicate != "and"], _bddl_types(text), _bddl_regions(text)


def primitive_for(atom: Atom, types: dict, regions: dict) -> str:
    """The primitive that achieves ``atom``, or :class:`UnsupportedTask` saying why there is none."""
    pred, args = atom.predicate, atom.args
    owner_type = types.get(regions.get(args[-1], args[-1]), "")
    if pred in ("on", "in") and len(args) == 2:
        target = args[1]
        if pred == "in" and target.endswith("_contain_region"):  # basket, tray, caddy compartments
            return "pick_place"
        if pred == "on" and (target in types or target.endswith(("_top_side", "_cook_region"))):
            return "pick_place"
        if pred == "on" and owner_type.endswith("table"):  # a table region
            return "pick_place"
        if pred == "in" and owner_type.endswith("cabinet"):  # a drawer, opened first if the goal does not say so
            return "pick_place"
        raise UnsupportedTask(f"{atom}: a place it cannot reach from above ({owner_type or target})")
    if pred in ("open", "close") and owner_type.endswith("cabinet"):
        return "drawer"
    if pred in ("turnon", "turnoff") and owner_type.endswith("stove"):
        return "knob"
    if pred == "close" and owner_type.endswith("microwave"):
        return "door"
    if pred == "open" and owner_type.endswith("microwave"):
        raise UnsupportedTask(f"{atom}: swinging a hinged door open (by its handle) is not implemented")
    raise UnsupportedTask(f"{atom}: no primitive for {pred} on a {owner_type or args[-1]}")


def order_atoms(atoms: list[Atom], regions: dict) -> list[int]:
    """Indices of ``atoms`` in execution order: BDDL order, except that a drawer opens before something goes into
    it and closes after, and an object is moved before another one is put on or into it (stable topological)."""

    def owner(name: str) -> str:
        return regions.get(name, name)

    def before(a: Atom, b: Atom) -> bool:
        if a.predicate == "open" and b.predicate in ("on", "in") and b.args[1] == a.args[0]:
            return True
        if a.predicate in ("on", "in") and b.predicate == "close" and b.args[0] in (a.args[1], owner(a.args[1])):
            return True
        moved = a.args[0] if a.predicate in ("on", "in") else None
        return b.predicate in ("on", "in") and moved is not None and moved in (b.args[1], owner(b.args[1]))

    order, left = [], list(range(len(atoms)))
    while left:
        free = [i for i in left if not any(before(atoms[j], atoms[i]) for j in left if j != i)]
        pick = free[0] if free else left[0]  # a cycle cannot come from a consistent goal; keep BDDL order then
        order.append(pick)
        left.remove(pick)
    return order


def plan(task: le.Task) -> list[Step]:
    """The task's goal as ordered primitive steps; :class:`UnsupportedTask` (one sentence) if any atom has none."""
    atoms, types, regions = parse_goal(task)
    steps = []
    for i in order_atoms(atoms, regions):
        try:
            step = Step(i, atoms[i], primitive_for(atoms[i], types, regions))
        except UnsupportedTask as e:
            raise UnsupportedTask(
                f"The scripted expert cannot do task '{task.name}': {e}. "
                "Run `python collect.py --list-scripted-tasks` for the measured tasks."
            ) from None
        region = step.atom.args[-1]
        into_drawer = step.atom.predicate == "in" and types.get(regions.get(region, ""), "").endswith("cabinet")
        if into_drawer and Atom("open", (region,)) not in atoms:  # "put the bowl in the drawer" with it closed
            steps.append(Step(-1, Atom("open", (region,)), "drawer"))
        steps.append(step)
    return steps


def measured_table(path: str = TABLE) -> dict[tuple[str, int], tuple[int, int]]:
    """(suite, local id) -> (successes, episodes) from docs/scripted_expert_table.md."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                m = re.match(r"\|\s*(libero_\w+)\s*\|\s*(\d+)\s*\|.*\|\s*(\d+)/(\d+)(?:\s*†)?\s*\|", line)
                if m:
                    out[m.group(1), int(m.group(2))] = (int(m.group(3)), int(m.group(4)))
    return out


def listed_tasks() -> list[le.Task]:
    """The tasks measured at >= LISTED_RATE (what ``--list-scripted-tasks`` prints and collect.py accepts)."""
    table = measured_table()
    ok = {k for k, (s, n) in table.items() if n and s / n >= LISTED_RATE}
    return [t for t in le.task_registry() if (t.suite, t.local_id) in ok]


# ================================================================================================================
# Geometry helpers (world frame; quaternions wxyz as MuJoCo stores them)
# ================================================================================================================
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


def union_box(boxes) -> tuple[np.ndarray, np.ndarray]:
    return np.min([lo for lo, _ in boxes], 0), np.max([hi for _, hi in boxes], 0)


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


# ================================================================================================================
# Primitives
# ================================================================================================================
class Primitive:
    """One closed-loop motion for one atom, in OSC_POSE delta actions (``act`` -> 7-D action); ``finished`` once
    its motion is over (whether the atom holds is then LIBERO's predicate's call, see :class:`ScriptedExpert`)."""

    POS_SCALE, ROT_SCALE = 0.05, 0.5  # OSC_POSE output per unit action (m, rad)
    R_DOWN = np.diag([1.0, -1.0, -1.0])  # gripper pointing down, fingers closing along world y (LIBERO's start)
    # Grasp and release end when the fingers stop moving (an observable event, so the demos stay Markovian in the
    # observation; a fixed hold time would not be), within these bounds in control steps.
    GRIP_MIN_STEPS, GRIP_MAX_STEPS, FINGERS_STILL = 3, 15, 2e-4
    GRIP_TRAVEL = {"grasp": -0.005, "release": 0.01}  # finger-gap change (m) before "still" counts
    HOVER = 0.08  # m
    WRIST_LIMIT = 2.5  # rad: plan yaws that keep Panda joint 7 inside +-2.5 (its limit is +-2.90)
    WRIST_SWITCH = 2.75  # rad: past this before the grasp, switch to the other yaw solution
    RETREAT_STEPS = 8

    def __init__(self, atom: Atom):
        self.atom, self.phase, self.t_phase, self.finished = atom, "approach", 0, False
        self.yaw: Optional[float] = None
        self.yaw_switched, self.last_width = False, None
        self.phase_width = 0.0

    # -- shared pieces ---------------------------------------------------------------------------------------
    def go(self, phase: str) -> None:
        self.phase, self.t_phase = phase, 0
        self.phase_width = self.last_width or 0.0

    def observe(self, obs: dict) -> tuple[float, bool]:
        """Finger gap and whether the fingers stopped moving; counts the step in the phase."""
        width = obs["gripper_states"][0] - obs["gripper_states"][1]
        still = self.last_width is not None and abs(width - self.last_width) < self.FINGERS_STILL and self.t_phase > 0
        self.last_width = width
        self.t_phase += 1
        return width, still

    def gripper_settled(self, width: float, still: bool, closing: bool) -> bool:
        """The fingers moved the intended way (closed on something / opened) and stopped, or time ran out."""
        travel = width - self.phase_width
        moved = travel < self.GRIP_TRAVEL["grasp"] if closing else travel > self.GRIP_TRAVEL["release"]
        return (moved and still and self.t_phase >= self.GRIP_MIN_STEPS) or self.t_phase >= self.GRIP_MAX_STEPS

    def choose_yaw(self, R_cur: np.ndarray, close_dir: np.ndarray, wrist: float, turn: float = 0.0) -> None:
        """Pointing down, fingers along ``close_dir``. A two-finger grasp is symmetric under a 180-degree yaw: take
        the smaller turn unless it (or a later wrist ``turn``) would drive the wrist (Panda joint 7, limit +-2.90
        rad, turning opposite to the yaw) into its limit, then the other one. Chosen once and held: re-choosing
        every step flips between the two solutions near the threshold and spins the gripper mid-task."""
        finger = R_cur[:2, 1]
        theta_cur = np.arctan2(finger[1], finger[0])
        d = (np.arctan2(close_dir[1], close_dir[0]) - theta_cur + np.pi / 2) % np.pi - np.pi / 2
        candidates = sorted([d, d - np.pi * np.sign(d)], key=abs)

        def worst(c):
            return max(abs(wrist - c), abs(wrist - c - turn))

        limit_ok = [c for c in candidates if worst(c) < self.WRIST_LIMIT]
        d = limit_ok[0] if limit_ok else min(candidates, key=worst)
        self.yaw = theta_cur + d

    def rotation(self, R_cur: np.ndarray, wrist: float, may_switch: bool) -> np.ndarray:
        """The desired orientation for the held yaw; one switch to the other solution is allowed before a grasp
        when the wrist nears its limit anyway (the prediction was off: other joints share the yaw)."""
        finger = R_cur[:2, 1]
        theta_cur = np.arctan2(finger[1], finger[0])
        remaining = (self.yaw - theta_cur + np.pi) % (2 * np.pi) - np.pi
        if may_switch and abs(wrist) > self.WRIST_SWITCH and not self.yaw_switched:
            self.yaw = theta_cur + remaining - np.pi * np.sign(remaining)
            self.yaw_switched = True
        theta_down = np.arctan2(self.R_DOWN[1, 1], self.R_DOWN[0, 1])
        return rot_z(self.yaw - theta_down) @ self.R_DOWN

    def action(self, eef, target, R_cur, R_des, grip: float, speed: float = 1.0) -> np.ndarray:
        a = np.zeros(7)
        a[:3] = np.clip((target - eef) / self.POS_SCALE, -speed, speed)
        a[3:6] = np.clip(mat_to_axisangle(R_des @ R_cur.T) / self.ROT_SCALE, -1, 1)
        a[6] = grip
        return np.clip(a, -1.0, 1.0)

    def hover_target(self, eef: np.ndarray, hover: np.ndarray) -> tuple[np.ndarray, bool]:
        """Towards ``hover``: horizontally first (not lower than now, at most 10 cm above it), then down; and
        whether it is reached."""
        near = np.linalg.norm(eef[:2] - hover[:2]) < 0.03
        target = hover if near else np.array([*hover[:2], max(hover[2], min(eef[2], hover[2] + 0.1))])
        reached = np.linalg.norm(eef[:2] - hover[:2]) < 0.01 and abs(eef[2] - hover[2]) < 0.03
        return target, reached

    @staticmethod
    def parts_world(info: dict) -> list:
        """World boxes of the parts of an articulated fixture's moving body."""
        return [world_box(info["pose"], box) for box in info["parts"]]

    def come_down(self, eef: np.ndarray, point: np.ndarray, hover: float, tol: float, speed: float, then: str):
        """The opening every top-down primitive shares: "approach" (to ``hover`` above ``point``), then "descend"
        (to ``point``, until within ``tol`` or blocked for 30 steps), then phase ``then``. (target, speed) during
        those two phases, else None."""
        if self.phase == "approach":
            target, reached = self.hover_target(eef, point + np.array([0.0, 0.0, hover]))
            if reached:
                self.go("descend")
            return target, 1.0
        if self.phase == "descend":
            if np.linalg.norm(eef - point) < tol or self.t_phase > 30:  # or blocked by what is under it
                self.go(then)
            return point, speed
        return None

    def let_go(self, eef: np.ndarray, width: float, still: bool, hold: np.ndarray):
        """The ending the grasping primitives share: "release" (fingers open, holding ``hold``) until they settle,
        then "retreat" (up) for RETREAT_STEPS, then finished. The target during those phases, else None."""
        if self.phase == "release":
            if self.gripper_settled(width, still, closing=False):
                self.go("retreat")
            return hold
        if self.phase == "retreat":
            self.finished = self.t_phase >= self.RETREAT_STEPS
            return eef + np.array([0.0, 0.0, 0.05])
        return None

    def act(self, obs: dict) -> np.ndarray:
        raise NotImplementedError


class PickPlace(Primitive):
    """``(On X Y)`` / ``(In X region)`` with a top-down grasp from ground-truth poses.

    Phases: approach (hover above the grasp point, yaw aligned) -> descend -> grasp -> lift (to an altitude that
    clears the target and everything between) -> transport (servo the object's body position over the target)
    -> lower -> release -> retreat. Objects narrower than the gripper's opening are grasped across their short
    horizontal axis at mid-height; wider ones (bowls) by the rim on the side facing the robot. Heights and
    clearances come from the objects' collision geometry; a dropped object is re-grasped.
    """

    MAX_OPENING = 0.075  # widest object the Panda's fingers close around (m)
    FLAT = 0.025  # m: lower than this and too wide to grasp, an object is pushed (a 1.9 cm plate; a 3.4 cm bowl is not)
    CLEARANCE, FINGER_REACH = 0.03, 0.05  # m
    MAX_REGRASPS = 2

    def __init__(self, atom: Atom, scene: dict):
        super().__init__(atom)
        self.relation, (self.obj, self.target) = atom.predicate, atom.args
        self.geometry, self.regions, self.parts = scene["geometry"], scene["regions"], scene.get("parts", {})
        self.plan, self.regrasps, self.grasp_dz = None, 0, 0.0

    @staticmethod
    def handle(pose: np.ndarray, parts: list, bottom: float, top: float):
        """(xy, closing direction, z) of a handle to grasp, or None. An object has one when a tall part at least 3 cm
        wide makes its body solid (a moka pot; a bowl's thin walls are grasped by the rim instead) and some narrow
        part (<= 2.5 cm across) stands outside that body; the one furthest out is taken, across its narrow side."""
        height = top - bottom
        core = [(lo, hi) for lo, hi in parts if hi[2] - lo[2] >= 0.6 * height and min((hi - lo)[:2]) >= 0.03]
        if not core:
            return None
        c_lo, c_hi = union_box(core)
        best, best_dist = None, 0.0
        for lo, hi in parts:
            size, mid = hi - lo, (lo + hi) / 2
            outside = np.any(mid[:2] < c_lo[:2]) or np.any(mid[:2] > c_hi[:2])
            dist = np.linalg.norm(mid[:2] - (c_lo + c_hi)[:2] / 2)
            if min(size[:2]) <= 0.025 and size[2] >= 0.02 and outside and dist > best_dist:
                best, best_dist = (lo, hi), dist
        if best is None:
            return None
        R = quat_wxyz_to_mat(pose[3:])
        lo, hi = best
        mid = pose[:3] + R @ ((lo + hi) / 2)
        narrow = R[:2, int(np.argmin((hi - lo)[:2]))]
        return mid[:2], narrow / max(np.linalg.norm(narrow), 1e-9), float(mid[2])

    def free_spot(self, poses: dict, region: str) -> np.ndarray:
        """The region's centre, or, when other objects already stand in the region (a second moka pot for the same
        stove), the point of its inner part furthest from them."""
        pose = poses[region]
        half = np.abs(quat_wxyz_to_mat(pose[3:]) @ self.regions.get(region, np.zeros(3)))[:2]
        others = [poses[n][:2] for n in self.geometry if n != self.obj and n in poses and n not in self.regions
                  and np.all(np.abs(poses[n][:2] - pose[:2]) < half)]  # fmt: skip
        if not others:
            return pose[:2]
        grid = np.stack(np.meshgrid(np.linspace(-0.7, 0.7, 15), np.linspace(-0.7, 0.7, 15)), -1).reshape(-1, 2)
        candidates = pose[:2] + grid * half
        clearance = np.min(np.linalg.norm(candidates[:, None] - np.array(others)[None], axis=-1), axis=1)
        return candidates[int(np.argmax(clearance))]

    def drawer_target(self, obs: dict) -> tuple[np.ndarray, float]:
        """Into an open drawer: the middle of its part that is out of the cabinet (between the cabinet's front,
        where the drawer's front panel is when closed, and the panel now), and the bottom of the region."""
        info, pose = obs["articulation"][self.target], obs["poses"][self.target]
        d_open = Drawer(Atom("open", (self.target,))).directions(info)[0]
        handle_front = Drawer.handle(info, d_open)[2][:2] @ d_open
        reach = [max(lo[:2] @ d_open, hi[:2] @ d_open) for lo, hi in Primitive.parts_world(info)]
        panel = max(r for r in reach if r < handle_front - 0.005)  # the front panel, without the handle
        out = abs(info["qpos"] - np.mean(info["ranges"]["close"]))  # slide joints: metres out of the cabinet
        middle = panel - 0.01 - out / 2
        xy = pose[:2] + d_open * (middle - pose[:2] @ d_open)
        half = np.abs(quat_wxyz_to_mat(pose[3:]) @ self.regions[self.target])
        return xy, pose[2] - half[2]

    @staticmethod
    def alignment(region_pose, size, short_dir, short_half: float, long_half: float) -> float:
        """Yaw (rad, |.| <= pi/2) to turn an elongated object by while carrying it so that its long side lies along
        a narrow container's long side (a book into a 5.6 x 12.4 cm caddy compartment); 0 when either is not
        elongated (1.5 : 1) or the region is unknown."""
        if size is None or long_half < 1.5 * short_half:
            return 0.0
        half = np.abs(quat_wxyz_to_mat(region_pose[3:]) @ size)[:2]
        if max(half) < 1.5 * min(half):
            return 0.0
        region_long = 0.0 if half[0] > half[1] else np.pi / 2
        object_long = np.arctan2(short_dir[0], -short_dir[1])  # the long axis is the short one turned by -90 deg
        return float((region_long - object_long + np.pi / 2) % np.pi - np.pi / 2)

    def make_plan(self, obs: dict) -> dict:
        poses = obs["poses"]
        geom, obj, target = self.geometry, self.obj, self.target
        lo, hi = world_box(poses[obj], geom[obj])
        center, short_dir, short_half, long_half = footprint(poses[obj], geom[obj])
        turn = 0.0
        handle = self.handle(poses[obj], self.parts.get(obj, []), lo[2], hi[2])
        if 2 * short_half <= self.MAX_OPENING:  # across the short axis, mid-height (palm clear of the top)
            grasp_xy, close_dir = center[:2], short_dir
            grasp_z = max(lo[2] + 0.5 * (hi[2] - lo[2]), hi[2] - self.FINGER_REACH, lo[2] + 0.01)
        elif handle is not None:  # a solid body too wide for the fingers: by its handle
            grasp_xy, close_dir, grasp_z = handle
        else:  # by the rim facing the robot (the robot's base is at -x), fingers closing radially
            close_dir = np.array([-1.0, 0.0])
            grasp_xy, grasp_z = center[:2] + close_dir * (short_half - 0.012), hi[2] - 0.02
        if target in obs.get("articulation", {}):  # into a drawer
            target_xy, place_bottom = self.drawer_target(obs)
            target_top = place_bottom
        elif target in geom:  # on top of another object: body centres within LIBERO's 3 cm
            target_xy = poses[target][:2]
            place_bottom = target_top = world_box(poses[target], geom[target])[1][2]
            place_bottom += 0.01
        elif self.relation == "in":  # into a container region: release low inside it
            target_xy, target_top = poses[target][:2], poses[target][2] + 0.08
            place_bottom = poses[target][2] - 0.05
            turn = self.alignment(poses[target], self.regions.get(target), short_dir, short_half, long_half)
        else:  # onto a flat surface region
            target_xy, target_top = self.free_spot(poses, target), poses[target][2]
            place_bottom = target_top + 0.01
        # Carry altitude: above the target and above anything the object passes over on the way.
        tops = [target_top, hi[2]]
        for name, box in geom.items():
            if name == obj or name not in poses:
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
            bottom_offset=poses[obj][2] - lo[2],  # body position above the object's lowest point
            target_xy=np.asarray(target_xy),
            place_bottom=place_bottom,
            carry_bottom=max(tops) + self.CLEARANCE,
            turn=turn,
            by_footprint=bool(turn),
        )

    def act(self, obs: dict) -> np.ndarray:
        poses, eef = obs["poses"], obs["ee_pos"]
        R_cur, wrist = axisangle_to_mat(obs["ee_ori"]), obs["joint_states"][6]
        if self.plan is None:
            self.plan = self.make_plan(obs)
            self.choose_yaw(R_cur, self.plan["close_dir"], wrist, turn=self.plan["turn"])
        p, obj_pos = self.plan, poses[self.obj][:3]
        carry_z = p["carry_bottom"] + p["bottom_offset"] - self.grasp_dz
        grip, target, speed = -1.0, eef.copy(), 1.0
        width, still = self.observe(obs)
        opening = self.come_down(eef, p["grasp"], self.HOVER, 0.008, 0.6, then="grasp")
        ending = self.let_go(eef, width, still, hold=eef)
        if opening is not None:
            target, speed = opening
        elif ending is not None:
            target = ending
        elif self.phase == "grasp":
            target, grip = p["grasp"], 1.0
            if self.gripper_settled(width, still, closing=True):
                self.grasp_dz = obj_pos[2] - eef[2]  # object body height relative to the gripper
                self.go("lift")
        elif self.phase == "lift":
            grip, target = 1.0, np.array([eef[0], eef[1], carry_z])
            if obj_pos[2] - eef[2] < self.grasp_dz - 0.03:  # the object stayed behind: grasp again
                self.regrasp(obs, R_cur, wrist)
            elif eef[2] > carry_z - 0.02:
                self.yaw += p["turn"]  # carried turned (held from here on)
                self.go("transport")
        elif self.phase in ("transport", "lower"):
            grip = 1.0
            # a container takes the object's footprint centred on it (a book's body origin is 1 cm off its middle;
            # LIBERO's In tests the origin, which stays well inside); other targets test the body origin itself
            held = footprint(poses[self.obj], self.geometry[self.obj])[0][:2] if p["by_footprint"] else obj_pos[:2]
            err_xy = p["target_xy"] - held
            if self.phase == "transport":
                target = np.array([eef[0] + err_xy[0], eef[1] + err_xy[1], carry_z])
                if obj_pos[2] - eef[2] < self.grasp_dz - 0.03:
                    self.regrasp(obs, R_cur, wrist)
                elif np.linalg.norm(err_xy) < 0.01 and (not p["turn"] or abs(self.yaw_error(R_cur)) < 0.1):
                    self.go("lower")
            else:
                bottom = obj_pos[2] - p["bottom_offset"]
                target = eef + np.array([err_xy[0], err_xy[1], p["place_bottom"] - bottom])
                speed = 0.5
                if bottom < p["place_bottom"] + 0.005 or self.t_phase > 40:
                    self.go("release")
        R_des = self.rotation(R_cur, wrist, may_switch=self.phase in ("approach", "descend"))
        return self.action(eef, target, R_cur, R_des, grip, speed)

    def yaw_error(self, R_cur: np.ndarray) -> float:
        """Held yaw minus the gripper's yaw now (rad, wrapped)."""
        return float((self.yaw - np.arctan2(R_cur[1, 1], R_cur[0, 1]) + np.pi) % (2 * np.pi) - np.pi)

    def regrasp(self, obs: dict, R_cur: np.ndarray, wrist: float) -> None:
        if self.regrasps < self.MAX_REGRASPS:
            self.regrasps += 1
            self.plan = self.make_plan(obs)
            self.choose_yaw(R_cur, self.plan["close_dir"], wrist, turn=self.plan["turn"])
            self.yaw_switched = False
            self.go("approach")
        else:  # out of grasps: this attempt is over (the planner may start another)
            self.finished = True

    @classmethod
    def pushes(cls, atom: Atom, scene: dict, poses: dict) -> bool:
        """Too wide to grasp, too flat for a rim grasp and without a handle (a plate onto a table region): push."""
        obj, target = atom.args
        if atom.predicate != "on" or target not in scene["regions"] or obj not in scene["geometry"]:
            return False
        lo, hi = world_box(poses[obj], scene["geometry"][obj])
        wide = 2 * footprint(poses[obj], scene["geometry"][obj])[2] > cls.MAX_OPENING
        handle = cls.handle(poses[obj], scene.get("parts", {}).get(obj, []), lo[2], hi[2])
        return wide and hi[2] - lo[2] < cls.FLAT and handle is None


class Push(Primitive):
    """``(On X region)`` for an object that cannot be picked (a plate): the closed fingers come down behind it, low,
    and push it along the line to the region's free spot, staying behind it as it turns and slides."""

    PUSH_STEPS, LOW = 150, 0.02

    def __init__(self, atom: Atom, scene: dict):
        super().__init__(atom)
        self.obj, self.target, self.scene, self.goal_xy = atom.args[0], atom.args[1], scene, None

    def act(self, obs: dict) -> np.ndarray:
        poses, eef = obs["poses"], obs["ee_pos"]
        R_cur, wrist = axisangle_to_mat(obs["ee_ori"]), obs["joint_states"][6]
        lo, hi = world_box(poses[self.obj], self.scene["geometry"][self.obj])
        center = (lo + hi)[:2] / 2
        radius = 0.5 * np.max((hi - lo)[:2])
        if self.goal_xy is None:
            spot = PickPlace(self.atom, self.scene).free_spot(poses, self.target)
            self.goal_xy = spot + (center - poses[self.obj][:2])  # the body, not the box centre, must land there
        to_goal = self.goal_xy - center
        d = to_goal / max(np.linalg.norm(to_goal), 1e-9)
        if self.yaw is None:
            self.choose_yaw(R_cur, np.array([-d[1], d[0]]), wrist)
        self.observe(obs)
        behind = np.array([*(center - d * (radius + 0.02)), lo[2] + self.LOW])
        target, speed = eef.copy(), 1.0
        opening = self.come_down(eef, behind, self.HOVER, 0.01, 0.5, then="push")
        if opening is not None:
            target, speed = opening
        elif self.phase == "push":  # the pusher's place behind the object, a little ahead
            target = np.array([*(center - d * (radius + 0.005) + d * 0.03), behind[2]])
            speed = 0.4
            if np.linalg.norm(to_goal) < 0.01 or self.t_phase > self.PUSH_STEPS:
                self.go("retreat")
        elif self.phase == "retreat":
            target = eef + np.array([*(-d * 0.02), 0.04])
            self.finished = self.t_phase >= self.RETREAT_STEPS
        R_des = self.rotation(R_cur, wrist, may_switch=self.phase == "approach")
        return self.action(eef, target, R_cur, R_des, 1.0, speed)


class _Articulated(Primitive):
    """Shared by the joint primitives: the fixture's joint from ``obs["articulation"]`` and its target."""

    def __init__(self, atom: Atom):
        super().__init__(atom)
        self.name = atom.args[0]

    def joint(self, obs: dict) -> dict:
        return obs["articulation"][self.name]


class Drawer(_Articulated):
    """``(Open drawer)`` / ``(Close drawer)`` along the drawer's slide joint, from the front of its handle.

    The opening direction is the joint axis signed by LIBERO's open and close thresholds; the handle is the part of
    the drawer that sticks out furthest that way. The gripper turns horizontal in front of the handle, pointing
    against the opening direction (from above, the drawers and handles over it are in the way, and the gap behind a
    handle's bar is thinner than a finger). Open: fingers closing vertically, it moves in until the bar is between
    them, grasps it, pulls the joint past LIBERO's threshold, releases and backs off. Close: fingers closed and
    side by side (the hand's 20 cm span horizontal, clear of the table under a bottom drawer), tilted down
    CLOSE_TILT (the forearm stays up, clear of a wine rack beside the cabinet), it pushes the bar in. A bottom drawer
    cannot be opened this way: the vertical span of the hand meets the table.
    """

    STANDOFF, MOVE_STEPS, APPROACH_STEPS = 0.10, 90, 60
    CLOSE_TILT = 0.9  # rad below horizontal when pushing: keeps the forearm up, clear of what stands beside

    def __init__(self, atom: Atom):
        super().__init__(atom)
        self.opening, self.R_front = atom.predicate == "open", None

    def directions(self, info: dict) -> tuple[np.ndarray, float, float]:
        """Unit horizontal opening direction (world), the joint value this primitive drives to, and the sign of
        joint motion that opens."""
        open_q, close_q = np.mean(info["ranges"]["open"]), np.mean(info["ranges"]["close"])
        opens = float(np.sign(open_q - close_q))
        d = info["axis"][:2] * opens
        d = d / max(np.linalg.norm(d), 1e-9)
        threshold = min(info["ranges"]["open"], key=lambda q: abs(q - close_q)) if self.opening else close_q
        return d, float(threshold + (opens * 0.01 if self.opening else 0.0)), opens  # a margin past the threshold

    @staticmethod
    def handle(info: dict, d_open: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World (centre, lo, hi) of the handle: the parts furthest along the opening direction."""
        boxes = Primitive.parts_world(info)
        reach = [max(lo[:2] @ d_open, hi[:2] @ d_open) for lo, hi in boxes]
        front = max(reach)
        lo, hi = union_box([b for b, r in zip(boxes, reach) if r > front - 0.005])
        return (lo + hi) / 2, lo, hi

    def front_rotation(self, R_cur: np.ndarray, d_open: np.ndarray) -> np.ndarray:
        """Horizontal, pointing against the opening direction, fingers closing vertically (open) or horizontally
        (close); of the two such orientations the one nearer the current one, chosen once."""
        if self.R_front is None:
            tilt = 0.0 if self.opening else self.CLOSE_TILT
            z = np.array([-d_open[0] * np.cos(tilt), -d_open[1] * np.cos(tilt), -np.sin(tilt)])
            side = np.array([0.0, 0.0, 1.0]) if self.opening else np.array([-d_open[1], d_open[0], 0.0])
            options = []
            for sign in (1.0, -1.0):
                y = sign * side
                options.append(np.column_stack([np.cross(y, z), y, z]))
            self.R_front = min(options, key=lambda R: np.linalg.norm(mat_to_axisangle(R @ R_cur.T)))
        return self.R_front

    def act(self, obs: dict) -> np.ndarray:
        eef, info = obs["ee_pos"], self.joint(obs)
        R_cur = axisangle_to_mat(obs["ee_ori"])
        d_open, goal_q, opens = self.directions(info)
        center, lo, hi = self.handle(info, d_open)
        bar = center + np.array([*(d_open * 0.005), 0.0])  # the grip site a little in front of the bar's middle
        standoff = bar + np.array([*(d_open * self.STANDOFF), 0.0])
        reached_q = (info["qpos"] - goal_q) * opens * (1 if self.opening else -1) >= 0
        R_des = self.front_rotation(R_cur, d_open)
        if self.phase == "approach" and abs(obs["joint_states"][6]) > self.WRIST_SWITCH and not self.yaw_switched:
            self.R_front = R_des = R_des @ np.diag([-1.0, -1.0, 1.0])  # the other roll: the wrist is at its limit
            self.yaw_switched = True
        width, still = self.observe(obs)
        grip, target, speed = (-1.0 if self.opening else 1.0), eef.copy(), 1.0
        if self.phase == "approach":  # to the standoff point, at or above the handle's height until close
            near = np.linalg.norm(eef[:2] - standoff[:2]) < 0.03
            target = standoff if near else np.array([*standoff[:2], max(standoff[2], eef[2])])
            turned = np.linalg.norm(mat_to_axisangle(R_des @ R_cur.T)) < 0.1
            if (np.linalg.norm(eef - standoff) < 0.015 and turned) or self.t_phase > self.APPROACH_STEPS:
                self.go("insert" if self.opening else "move")  # (or as near as it gets: the move follows the bar)
        elif self.phase == "insert":
            target, speed = bar, 0.4
            if np.linalg.norm(eef - bar) < 0.006 or self.t_phase > 40:
                self.go("grasp")
        elif self.phase == "grasp":
            target, grip = bar, 1.0
            if self.gripper_settled(width, still, closing=True):
                self.go("move")
        elif self.phase == "move":  # along the joint, following the handle sideways and in height
            grip, speed = 1.0, 0.6
            if not self.opening and reached_q:  # pushed in: back off without a release
                self.go("retreat")
            along = d_open if self.opening else -d_open
            offset = bar - eef
            lateral = offset[:2] - (offset[:2] @ d_open) * d_open
            target = np.array([*(eef[:2] + along * 0.03 + lateral), bar[2]])
            if reached_q or self.t_phase > self.MOVE_STEPS:
                self.go("release")
        elif self.phase == "release":
            target = eef
            if self.gripper_settled(width, still, closing=False):
                self.go("retreat")
        elif self.phase == "retreat":  # back off along the opening direction
            target = eef + np.array([*(d_open * 0.04), 0.0])
            self.finished = self.t_phase >= self.RETREAT_STEPS
        return self.action(eef, target, R_cur, R_des, grip, speed)


class Knob(_Articulated):
    """``(Turnon X)`` / ``(Turnoff X)`` of a knob on a vertical hinge: grasp its grip (the parts that rise highest)
    across the grip's short side from above, turn the wrist about the hinge until the joint passes LIBERO's
    threshold, release, retreat."""

    TURN_STEPS, GRIP_DEPTH = 60, 0.012

    def act(self, obs: dict) -> np.ndarray:
        eef, info = obs["ee_pos"], self.joint(obs)
        R_cur, wrist = axisangle_to_mat(obs["ee_ori"]), obs["joint_states"][6]
        on = self.atom.predicate == "turnon"
        lo_on, hi_on = info["ranges"]["turnon"]
        goal_q = min(lo_on + 0.4, hi_on) if on else min(info["ranges"]["turnoff"]) - 0.01
        sign = np.sign(info["axis"][2]) or 1.0  # the wrist's yaw turns the knob by sign * yaw
        boxes = self.parts_world(info)
        top = max(hi[2] for _, hi in boxes)
        grip_lo, grip_hi = union_box([(lo, hi) for lo, hi in boxes if hi[2] > top - 0.01])
        center = (grip_lo + grip_hi) / 2
        size = grip_hi[:2] - grip_lo[:2]
        close_dir = np.array([1.0, 0.0]) if size[0] < size[1] else np.array([0.0, 1.0])
        if self.yaw is None:
            self.choose_yaw(R_cur, close_dir, wrist, turn=sign * (goal_q - info["qpos"]))
        width, still = self.observe(obs)
        grasp = np.array([*center[:2], top - self.GRIP_DEPTH])
        grip, target, speed = -1.0, eef.copy(), 1.0
        remaining = goal_q - info["qpos"]
        opening = self.come_down(eef, grasp, self.HOVER, 0.006, 0.5, then="grasp")
        ending = self.let_go(eef, width, still, hold=grasp)
        if opening is not None:
            target, speed = opening
        elif ending is not None:
            target = ending
        elif self.phase == "grasp":
            target, grip = grasp, 1.0
            if self.gripper_settled(width, still, closing=True):
                self.go("turn")
        elif self.phase == "turn":
            target, grip = grasp, 1.0
            self.yaw = self.yaw_now(R_cur) + sign * float(np.clip(remaining, -0.3, 0.3))
            if (remaining <= 0 if on else remaining >= 0) or self.t_phase > self.TURN_STEPS:
                self.go("release")
        R_des = self.rotation(R_cur, wrist, may_switch=self.phase in ("approach", "descend"))
        return self.action(eef, target, R_cur, R_des, grip, speed)

    @staticmethod
    def yaw_now(R_cur: np.ndarray) -> float:
        return float(np.arctan2(R_cur[1, 1], R_cur[0, 1]))


class Door(_Articulated):
    """``(Close door)`` of a door on a vertical hinge (the microwave's): the closed fingers come down beside the
    door's outer face, part-way to its free edge, and push it round the hinge, following the face as the door turns,
    until the joint passes LIBERO's close threshold."""

    RADIUS, PUSH_STEPS, STANDOFF = 0.6, 120, 0.035

    def geometry(self, info: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """Contact point (world) at RADIUS of the door's length, the unit direction the door's face moves while
        closing there, and the door's top."""
        boxes = self.parts_world(info)
        lo, hi = union_box(boxes)
        hinge = info["anchor"][:2]
        corners = np.array([[x, y] for b in boxes for x in (b[0][0], b[1][0]) for y in (b[0][1], b[1][1])])
        length = np.max(np.linalg.norm(corners - hinge, axis=1))
        u = (lo + hi)[:2] / 2 - hinge
        u = u / max(np.linalg.norm(u), 1e-9)
        closing = np.sign(np.mean(info["ranges"]["close"]) - info["qpos"]) * np.sign(info["axis"][2] or 1.0)
        tangent = closing * np.array([-u[1], u[0]])  # d/dq of a point on the door, towards closed
        contact = np.array([*(hinge + u * self.RADIUS * length), hi[2] - 0.03])
        return contact, tangent, float(hi[2])

    def act(self, obs: dict) -> np.ndarray:
        eef, info = obs["ee_pos"], self.joint(obs)
        R_cur, wrist = axisangle_to_mat(obs["ee_ori"]), obs["joint_states"][6]
        contact, tangent, top = self.geometry(info)
        behind = contact - np.array([*(tangent * self.STANDOFF), 0.0])
        open_q = np.mean(info["ranges"]["open"])
        threshold = min(info["ranges"]["close"], key=lambda q: abs(q - open_q))
        closed = (info["qpos"] - threshold) * np.sign(np.mean(info["ranges"]["close"]) - open_q) >= 0
        if self.yaw is None:
            self.choose_yaw(R_cur, tangent, wrist)
        self.observe(obs)
        target, speed = eef.copy(), 1.0
        opening = self.come_down(eef, behind, top + 0.06 - behind[2], 0.01, 0.5, then="push")
        if opening is not None:
            target, speed = opening
        elif self.phase == "push":  # a little ahead of the face, which moves on as the door turns
            target, speed = contact + np.array([*(tangent * 0.03), 0.0]), 0.5
            if closed or self.t_phase > self.PUSH_STEPS:
                self.go("retreat")
        elif self.phase == "retreat":
            target = eef + np.array([*(-tangent * 0.02), 0.04])
            self.finished = self.t_phase >= self.RETREAT_STEPS
        R_des = self.rotation(R_cur, wrist, may_switch=self.phase == "approach")
        return self.action(eef, target, R_cur, R_des, 1.0, speed)


# ================================================================================================================
# The planner
# ================================================================================================================
class ScriptedExpert:
    """One episode: the steps of :func:`plan` in order, skipping atoms that hold, each primitive checked with
    LIBERO's predicate when its motion ends and attempted again (at most MAX_ATTEMPTS times) if the atom does not
    hold. Records the noise-free action of every step (``labels``, the DART labels of noisy demos)."""

    def __init__(self, steps: list[Step], scene: dict, noise: float = 0.0, rng=None):
        self.steps, self.scene, self.noise = steps, scene, noise
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.current: Optional[Primitive] = None
        self.step: Optional[Step] = None
        self.attempts: dict[Step, int] = {}
        self.settle = 0
        self.labels: list[np.ndarray] = []
        self.log: list[tuple[str, str]] = []  # (atom, outcome) per attempt, for debugging and tests

    def make(self, step: Step, obs: dict) -> Primitive:
        if step.primitive == "pick_place":
            if PickPlace.pushes(step.atom, self.scene, obs["poses"]):
                return Push(step.atom, self.scene)
            return PickPlace(step.atom, self.scene)
        return {"drawer": Drawer, "knob": Knob, "door": Door}[step.primitive](step.atom)

    def next_step(self, obs: dict) -> Optional[Step]:
        for step in self.steps:
            if not step.holds(obs) and self.attempts.get(step, 0) < MAX_ATTEMPTS:
                return step
        return None

    def act(self, obs: dict) -> np.ndarray:
        if self.current is not None and self.current.finished:
            # the atom may take a moment to hold (an object settling into a basket): wait a little before a retry
            self.settle += 1
            if self.step.holds(obs) or self.settle > SETTLE_STEPS:
                self.log.append((str(self.step.atom), "holds" if self.step.holds(obs) else "failed"))
                self.current, self.settle = None, 0
        if self.current is None:
            self.step = self.next_step(obs)
            if self.step is not None:
                self.attempts[self.step] = self.attempts.get(self.step, 0) + 1
                self.current = self.make(self.step, obs)
        if self.current is None or self.current.finished:  # settling; or all done / every attempt spent: stay still
            action = np.array([0, 0, 0, 0, 0, 0, -1.0])
        else:
            action = self.current.act(obs)
        self.labels.append(action.copy())
        if self.noise:
            action = action.copy()
            action[:6] = np.clip(action[:6] + self.rng.normal(0.0, self.noise, 6), -1.0, 1.0)
        return action


class ScriptedPolicy:
    """Rollout interface around one :class:`ScriptedExpert` per environment (closed loop, one action per query)."""

    replan_steps, image_size, needs_privileged = 1, None, True

    def __init__(self, steps: list[Step], scene: dict, noise: float, seed: int):
        self.steps, self.scene, self.noise, self.seed = steps, scene, noise, seed
        self.experts: dict[int, ScriptedExpert] = {}
        self.by_episode: dict[int, ScriptedExpert] = {}

    def reset(self, env_ids, episodes) -> None:
        for i, e in zip(env_ids, episodes):
            rng = np.random.default_rng([self.seed, e])
            self.experts[i] = self.by_episode[e] = ScriptedExpert(self.steps, self.scene, self.noise, rng)

    def expert_labels(self, episode: int) -> np.ndarray:
        """The noise-free actions of an episode's steps (forgotten once read)."""
        return np.stack(self.by_episode.pop(episode).labels)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        rows = []
        for j, i in enumerate(env_ids):
            single = {k: v[j] for k, v in obs.items()}
            rows.append(self.experts[i].act(single))
        return np.stack(rows)[:, None]  # (B, 1, 7)
