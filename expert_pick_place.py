"""expert_pick_place.py — the scripted expert's pick and place: ``(On X Y)`` and ``(In X region)`` goals.

:class:`PickPlace` grasps top-down, carries the object over its target (a surface, a container, a region, an open
drawer) and sets it down; :class:`Push` slides a flat object that cannot be grasped from above into its region.
Both are :class:`~expert_primitives.Primitive` motions; scripted_expert.py's planner picks them per goal atom.
"""

from __future__ import annotations

import numpy as np

from expert_primitives import (
    Atom,
    Drawer,
    Primitive,
    axisangle_to_mat,
    footprint,
    quat_wxyz_to_mat,
    union_box,
    world_box,
)


class PickPlace(Primitive):
    """``(On X Y)`` / ``(In X region)`` with a top-down grasp from ground-truth poses.

    Phases: approach (hover above the grasp point, yaw aligned) -> descend -> grasp -> lift (to an altitude that
    clears the target and everything between) -> transport (servo the object's body position over the target)
    -> lower -> release -> retreat. Objects narrower than the gripper's opening are grasped across their short
    horizontal axis at mid-height; wider ones (bowls) by the rim on the side facing the robot. Heights and
    clearances come from the objects' collision geometry; a dropped object is re-grasped.

    ``placement`` on top of another object (a bowl on a plate): "release" lowers the object to 1 cm above the
    target's top and opens there (it drops the last centimetre); "set-down" aims it SET_DOWN below the top and opens
    only once it rests (its bottom stopped sinking), so it touches the target still held, where LIBERO's On already
    holds. Onto a region (a stove, an area of the table), into a container or a drawer both release as before
    (set down on a stove, the second of two moka pots failed 4 of 10 times, against 0 released).
    """

    MAX_OPENING = 0.075  # widest object the Panda's fingers close around (m)
    FLAT = 0.025  # m: lower than this and too wide to grasp, an object is pushed (a 1.9 cm plate; a 3.4 cm bowl is not)
    CLEARANCE, FINGER_REACH = 0.03, 0.05  # m
    MAX_REGRASPS = 2
    PLACEMENTS = ("release", "set-down")
    SET_DOWN = 0.02  # m below the target's top that "set-down" aims the held object's bottom at
    RESTING = 0.001  # m: the bottom sank less than this in a step (twice running): the object rests

    def __init__(self, atom: Atom, scene: dict, placement: str = "release"):
        super().__init__(atom)
        self.check_placement(placement)
        self.relation, (self.obj, self.target) = atom.predicate, atom.args
        self.geometry, self.regions, self.parts = scene["geometry"], scene["regions"], scene.get("parts", {})
        self.plan, self.regrasps, self.grasp_dz = None, 0, 0.0
        self.placement, self.last_bottom, self.rest_steps = placement, None, 0

    @classmethod
    def check_placement(cls, placement: str) -> None:
        if placement not in cls.PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(cls.PLACEMENTS)}, got '{placement}'.")

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
        on_object = target in geom and target not in obs.get("articulation", {}) and self.relation != "in"
        set_down = self.placement == "set-down" and on_object
        above = -self.SET_DOWN if set_down else 0.01  # where the object's bottom is aimed, over the target's top
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
            place_bottom += above
        elif self.relation == "in":  # into a container region: release low inside it
            target_xy, target_top = poses[target][:2], poses[target][2] + 0.08
            place_bottom = poses[target][2] - 0.05
            turn = self.alignment(poses[target], self.regions.get(target), short_dir, short_half, long_half)
        else:  # onto a flat surface region
            target_xy, target_top = self.free_spot(poses, target), poses[target][2]
            place_bottom = target_top + above
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
            set_down=set_down,
        )

    def rests(self, obs: dict) -> bool:
        """Set-down: whether the object lowered onto its target has come to rest (its bottom sank less than RESTING
        in each of the last two steps, after the first three of the phase)."""
        bottom = obs["poses"][self.obj][2] - self.plan["bottom_offset"]
        sank = self.last_bottom is not None and self.last_bottom - bottom < self.RESTING and self.t_phase > 3
        self.rest_steps = self.rest_steps + 1 if sank else 0
        self.last_bottom = bottom
        return self.rest_steps >= 2

    def act(self, obs: dict) -> np.ndarray:
        poses, eef = obs["poses"], obs["ee_pos"]
        R_cur, wrist = axisangle_to_mat(obs["ee_ori"]), obs["joint_states"][6]
        if self.plan is None:
            self.plan = self.make_plan(obs)
            self.choose_yaw(R_cur, self.plan["close_dir"], wrist, turn=self.plan["turn"])
        p, obj_pos = self.plan, poses[self.obj][:3]
        if self.phase == "lower" and p["set_down"] and self.rests(obs):
            self.go("release")  # this step already opens
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
