"""expert_primitives.py — the scripted expert's motions, from privileged simulator state: the shared base and joints.

A :class:`Primitive` is one closed-loop motion for one goal atom, in OSC_POSE delta actions (``act(obs)`` -> 7-D
action), with the pieces every motion shares (gripper events, wrist yaw limits, approach and retreat). The joint
motions are here too: :class:`Drawer` (grasp the handle from the front, slide along the joint), :class:`Knob` (grasp
from above, turn the wrist about the hinge), :class:`Door` (push the microwave door round its hinge). Joint state
(kind, axis, anchor, range, LIBERO's thresholds, the moving body's parts) is read from the simulator by libero_env
(``obs["articulation"]``), not written down per scene. Pick and place builds on these in expert_pick_place.py; the
planner that orders and retries the motions is scripted_expert.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Atom:
    predicate: str  # LIBERO's lower-case name: on, in, open, close, turnon, turnoff
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"({self.predicate} {' '.join(self.args)})"


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
