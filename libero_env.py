"""libero_env.py — the one place that builds a LIBERO simulator.

* :class:`LiberoEnv`, one task's environment with soft resets, rendering only when asked for, and the layout split:
  resets to one of the protocol's 50 fixed init states (held out for evaluation) or to the layout LIBERO's placement
  initializer samples from the episode's seed (training, demonstrations, collection), never one of the 50;
* the single observation conversion (:func:`upright`, :func:`resize_images`, :func:`proprio`, :func:`policy_obs`);
* headless rendering setup (:func:`configure_rendering`).

The task registry and the protocol's numbers live below it in libero_tasks.py and are re-exported here
(``le.resolve_task``, ``le.SUITE_MAX_STEPS``); environments over worker processes and the episode loop live above
it in vector_env.py. The simulator (libero, robosuite, mujoco) is imported lazily, only where an environment is
built, so networks and training steps import this module on machines without LIBERO.

    python libero_env.py --list-tasks
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fast_step import CONTROLLERS, FAST_PHYSICS, FastStep  # noqa: F401  (the fast step path's options)
from libero_tasks import (  # noqa: F401  (re-exported: the phase scripts import one module for LIBERO)
    INSTRUCTION_CONVENTIONS,
    LAYOUTS,
    MAX_LAYOUT_DRAWS,
    MIN_PROTOCOL_DISTANCE,
    NUM_INIT_STATES,
    NUM_WAIT_STEPS,
    SAMPLED,
    SETTLE_TOLERANCE,
    SUITE_MAX_STEPS,
    SUITE_SIZES,
    SUITES,
    WAIT_ACTION,
    Task,
    TaskError,
    bddl_language,
    check_task_args,
    load_init_states,
    resolve_task,
    suite_tasks,
    task_dir_name,
    task_registry,
)

CONTROL_HZ = 20
ACTION_DIM = 7
PROPRIO_DIM = 8  # eef pos (3), eef axis-angle (3), gripper qpos (2)
PRIVILEGED_KEYS = ("poses", "articulation", "goal_atoms")  # observations only the scripted expert may see
CAMERAS = {"agentview_rgb": "agentview", "eye_in_hand_rgb": "robot0_eye_in_hand"}  # HDF5 key -> MuJoCo camera


# ----------------------------------------------------------------------------------------------------------------
# Observation conversion: the one place images are turned upright and proprioception is assembled
# ----------------------------------------------------------------------------------------------------------------
def upright(images: np.ndarray) -> np.ndarray:
    """Turn raw renders upright: a 180° rotation (flip rows AND columns) of (..., H, W, C) images.

    LIBERO renders in the OpenGL convention (upside down) and stores images that way; training, rollout and
    evaluation all call this function, so a flip-vs-rotation mismatch cannot creep in.
    """
    return np.ascontiguousarray(images[..., ::-1, ::-1, :])


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (..., H, W, 3) uint8 images to (..., size, size, 3) with antialiased bilinear interpolation."""
    if images.shape[-3] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    lead = images.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.reshape(*lead, size, size, 3).numpy()


def quat2axisangle(quat_xyzw: np.ndarray) -> np.ndarray:
    """(..., 4) quaternion (x, y, z, w) -> (..., 3) axis-angle, as robosuite's ``quat2axisangle``."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    angle = 2.0 * np.arccos(w)
    safe = den > 1e-8
    scale = np.where(safe, angle / np.where(safe, den, 1.0), 0.0)
    return q[..., :3] * scale[..., None]


def proprio(obs: dict) -> np.ndarray:
    """8-d proprioception (OpenVLA/openpi/LeRobot convention): eef pos, eef axis-angle, gripper qpos."""
    return np.concatenate([obs["ee_pos"], obs["ee_ori"], obs["gripper_states"]], axis=-1).astype(np.float32)


def policy_obs(obs: dict, image_size: Optional[int]) -> dict:
    """The single conversion from stored/rendered observations to policy inputs.

    ``obs`` holds arrays in the HDF5 naming (raw images ``agentview_rgb``/``eye_in_hand_rgb`` when rendered,
    ``ee_pos``, ``ee_ori``, ``gripper_states``, ``object_state``), batched or not. Returns upright images resized
    to ``image_size`` (uint8, channels last), 8-d ``proprio`` and float32 ``object_state``.
    """
    out = {"proprio": proprio(obs)}
    if "object_state" in obs:
        out["object_state"] = np.asarray(obs["object_state"], dtype=np.float32)
    for key in CAMERAS:
        if key in obs and image_size is not None:
            out[key] = resize_images(upright(np.asarray(obs[key])), image_size)
    return out


def stack_obs(obs_list: Sequence[dict]) -> dict:
    """List of per-env observation dicts -> dict of batched arrays (keys present in every element)."""
    keys = set(obs_list[0]).intersection(*obs_list[1:])
    out = {}
    for k in keys:
        if isinstance(obs_list[0][k], dict):
            out[k] = [o[k] for o in obs_list]  # per-env dicts (privileged poses) stay a list
        else:
            out[k] = np.stack([o[k] for o in obs_list])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering setup
# ----------------------------------------------------------------------------------------------------------------
def configure_rendering(environ=os.environ) -> None:
    """Headless MuJoCo rendering: EGL by default, the user's choice respected, EGL device follows the GPU.

    * ``MUJOCO_GL`` is set to ``egl`` only when the user has not set it (EGL runs on CPU through Mesa too).
    * On GPU nodes, ``MUJOCO_EGL_DEVICE_ID`` follows the first entry of ``CUDA_VISIBLE_DEVICES`` (EGL enumerates
      physical devices, and robosuite insists the two agree), unless the user set it.
    """
    environ.setdefault("MUJOCO_GL", "egl")
    if environ["MUJOCO_GL"] == "egl":
        environ.setdefault("PYOPENGL_PLATFORM", "egl")
    # robosuite warns at import (three lines per process) unless a `robosuite.macros_private` module exists; its
    # defaults (robosuite/macros.py) are the ones we want, so an empty stand-in keeps worker logs readable.
    sys.modules.setdefault("robosuite.macros_private", types.ModuleType("robosuite.macros_private"))
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if "MUJOCO_EGL_DEVICE_ID" not in environ and visible.isdigit():
        environ["MUJOCO_EGL_DEVICE_ID"] = visible


def _patch_robosuite_rendering() -> None:
    """Make several rendering envs in one process safe, and their teardown quiet.

    robosuite frees a render context's MuJoCo GL objects (``mjr_freeContext``) in whatever GL context happens
    to be current, so a hard reset or ``close()`` of one env deleted the framebuffers of another and its renders
    came back as garbage. The patched destructor binds its own context first. EGL errors raised by destructors
    at interpreter exit are harmless and are kept off stderr, where they would hide real errors.
    """
    from robosuite.utils import binding_utils

    if getattr(binding_utils.MjRenderContext, "_libero_env_patched", False):
        return

    def free_own_context(self):
        with contextlib.suppress(Exception):
            self.gl_ctx.make_current()
            self.con.free()
        with contextlib.suppress(Exception):
            self.gl_ctx.free()

    def quiet(fn):
        def wrapper(self, *args, **kwargs):
            with contextlib.suppress(Exception):
                fn(self, *args, **kwargs)

        return wrapper

    binding_utils.MjRenderContext.__del__ = free_own_context
    binding_utils.MjRenderContext._libero_env_patched = True
    if os.environ.get("MUJOCO_GL") == "egl":
        from robosuite.renderers.context import egl_context

        egl_context.EGLGLContext.__del__ = quiet(egl_context.EGLGLContext.__del__)
        egl_context.EGLGLContext.free = quiet(egl_context.EGLGLContext.free)


# ----------------------------------------------------------------------------------------------------------------
# Single environment
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ChunkResult:
    """Outcome of executing (up to) a chunk of actions in one environment."""

    obs: dict  # observation after the last executed action
    reward: float  # sum of the sparse rewards over the executed actions
    done: bool  # task success (the env's ``done``)
    truncated: bool  # step limit reached without success
    steps: int  # actions executed (fewer than the chunk when the episode ended inside it)
    t: int  # steps since the wait steps, i.e. the episode length so far
    records: Optional[list] = None  # per-step {"obs": pre-action obs, "action", "reward", "done"} when recording


class LiberoEnv:
    """One LIBERO task with soft resets, protocol resets and rendering on demand.

    Observations use the HDF5 naming of demo_hdf5.py: ``ee_pos, ee_ori, ee_states, gripper_states, joint_states,
    robot_states, object_state, sim_state`` every step, and the *raw* camera images ``agentview_rgb,
    eye_in_hand_rgb`` (upside down, as LIBERO stores them) only when rendered. ``privileged=True`` adds
    ``poses`` (ground-truth poses of every object and site), ``articulation`` (the fixtures' joints) and
    ``goal_atoms`` (LIBERO's predicate for each goal atom): for the scripted expert only.
    """

    def __init__(
        self,
        task: Task,
        obs_mode: str = "rgb",
        image_size: int = 128,
        hard_reset: bool = False,
        privileged: bool = False,
        num_wait_steps: int = NUM_WAIT_STEPS,
        fast_step: bool = False,
        physics: str = "split",
        controller: str = "compiled",
    ):
        if obs_mode not in ("rgb", "state"):
            raise ValueError(f"obs_mode must be 'rgb' or 'state', got '{obs_mode}'.")
        configure_rendering()
        from libero.libero.envs import OffScreenRenderEnv

        if obs_mode == "rgb":
            _patch_robosuite_rendering()
        self.task, self.obs_mode, self.image_size = task, obs_mode, image_size
        self.privileged, self.num_wait_steps = privileged, num_wait_steps
        self.init_states = load_init_states(task)
        # Cameras are rendered by us (``render``) rather than as robosuite observables, so a chunked policy pays
        # for one render per chunk. ``hard_reset=False`` keeps the model loaded across resets (~70x faster).
        self._wrapper = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            camera_heights=image_size,
            camera_widths=image_size,
            use_camera_obs=False,
            has_offscreen_renderer=obs_mode == "rgb",
            hard_reset=hard_reset,
            ignore_done=True,  # the step limit is ours (protocol), not robosuite's horizon
            horizon=100_000,
        )
        self.env = self._wrapper.env  # the robosuite/LIBERO environment
        self.fast_step, self.physics, self.controller = fast_step, physics, controller
        self._fast = FastStep(self.env, physics, controller)  # checks physics and controller
        self.t = 0
        self._obs: Optional[dict] = None

    # -- observations --------------------------------------------------------------------------------------------
    def render(self) -> dict:
        """Raw (upside-down) camera images at ``image_size``."""
        if self.obs_mode != "rgb":
            raise RuntimeError("This environment was built with obs_mode='state' and has no renderer.")
        # robosuite binds a GL context only when it is created, and freeing *any* env calls eglReleaseThread():
        # with several envs in one process, rendering without re-binding our own context returns another scene
        # or garbage (see also _patch_robosuite_rendering). Binding an already-current context is cheap.
        self.env.sim._render_context_offscreen.gl_ctx.make_current()
        s = self.image_size
        return {k: self.env.sim.render(camera_name=cam, width=s, height=s) for k, cam in CAMERAS.items()}

    def _convert(self, raw: dict, render: bool) -> dict:
        ee_ori = quat2axisangle(raw["robot0_eef_quat"])
        obs = {
            "ee_pos": raw["robot0_eef_pos"].copy(),
            "ee_ori": ee_ori,
            "ee_states": np.concatenate([raw["robot0_eef_pos"], ee_ori]),
            "gripper_states": raw["robot0_gripper_qpos"].copy(),
            "joint_states": raw["robot0_joint_pos"].copy(),
            # LIBERO's robot_states layout: gripper qpos (2), eef pos (3), eef quat (4, xyzw)
            "robot_states": np.concatenate([raw["robot0_gripper_qpos"], raw["robot0_eef_pos"], raw["robot0_eef_quat"]]),
            "object_state": raw["object-state"].copy(),
            "sim_state": self.env.sim.get_state().flatten(),
        }
        if render:
            obs.update(self.render())
        if self.privileged:
            obs["poses"] = self.poses()
            obs["articulation"] = self.articulation()
            obs["goal_atoms"] = self.goal_atoms()
        return obs

    def scene(self) -> dict:
        """Static scene facts for the scripted expert: ``geometry`` (:meth:`geometry`), ``parts`` (the body-frame
        boxes of each object's collision geoms: handles) and ``regions``, the half-sizes of every region site
        (LIBERO's ``in_box`` tests ``|R @ size|`` around the site)."""
        regions = {n: np.asarray(s.size, dtype=float) for n, s in self.env.object_sites_dict.items()
                   if s.size is not None}  # fmt: skip
        parts = {n: self._part_boxes(self.env.obj_body_id[n]) for n in self.env.objects_dict}
        return {"geometry": self.geometry(), "regions": regions, "parts": parts}

    def goal_atoms(self) -> np.ndarray:
        """Whether each atom of the BDDL goal holds now, by LIBERO's own predicates (``goal_state`` order)."""
        env = self.env
        return np.array([bool(env._eval_predicate(atom)) for atom in env.parsed_problem["goal_state"]])

    def poses(self) -> dict:
        """Ground-truth world poses ``name -> (pos(3), quat wxyz(4))`` of every object, fixture and site."""
        data, out = self.env.sim.data, {}
        for name in list(self.env.objects_dict) + list(self.env.fixtures_dict):
            body = self.env.obj_body_id[name]
            out[name] = np.concatenate([data.body_xpos[body], data.body_xquat[body]])
        import mujoco

        for name in self.env.object_sites_dict:
            quat = np.zeros(4)
            mujoco.mju_mat2Quat(quat, np.asarray(data.get_site_xmat(name), dtype=np.float64).reshape(9))
            out[name] = np.concatenate([data.get_site_xpos(name), quat])
        return out

    def geometry(self) -> dict:
        """Collision-geometry bounding boxes ``name -> (lo(3), hi(3))`` of every object and fixture, in the
        object's body frame (static; combine with ``poses`` for world coordinates)."""
        out = {}
        for name in list(self.env.objects_dict) + list(self.env.fixtures_dict):
            boxes = self._part_boxes(self.env.obj_body_id[name]) or [(np.zeros(3), np.zeros(3))]
            out[name] = (np.min([lo for lo, _ in boxes], 0), np.max([hi for _, hi in boxes], 0))
        return out

    def articulation(self) -> dict:
        """Every articulated fixture the goal can name (a cabinet's drawer regions, a microwave, a stove's knob):
        ``name -> dict`` of its joint, read from the simulator. Static: ``kind`` ("slide" or "hinge"), ``range``,
        LIBERO's predicate thresholds ``ranges`` (``default_open_ranges`` ... of the fixture, keys open, close,
        turnon, turnoff where the fixture has them), ``parts`` (body-frame boxes (lo, hi) of the moving body's
        collision geoms, its handle or knob among them). Now: ``qpos``, the world ``anchor`` and ``axis`` of the
        joint and the moving body's world ``pose`` (pos, quat wxyz)."""
        if not hasattr(self, "_articulated"):
            self._articulated = self._articulated_joints()
        data, out = self.env.sim.data._data, {}
        for name, static in self._articulated.items():
            j, b = static["joint_id"], static["body_id"]
            out[name] = dict(static, qpos=float(data.qpos[static["qpos_adr"]]), anchor=data.xanchor[j].copy(),
                             axis=data.xaxis[j].copy(), pose=np.concatenate([data.xpos[b], data.xquat[b]]))  # fmt: skip
        return out

    def _articulated_joints(self) -> dict:
        import mujoco

        env = self.env
        model = env.sim.model._model
        named = [(n, s.joints, env.get_object(s.parent_name)) for n, s in env.object_sites_dict.items()
                 if getattr(s, "joints", None)]  # fmt: skip
        named += [(n, o.joints, o) for n, o in {**env.fixtures_dict, **env.objects_dict}.items()
                  if len(getattr(o, "joints", None) or []) == 1]  # fmt: skip
        kinds = {mujoco.mjtJoint.mjJNT_SLIDE: "slide", mujoco.mjtJoint.mjJNT_HINGE: "hinge"}
        out = {}
        for name, joints, owner in named:
            props = (getattr(owner, "object_properties", None) or {}).get("articulation")
            joint = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, joints[0])
            if joint < 0 or props is None or model.jnt_type[joint] not in kinds:
                continue
            body = int(model.jnt_bodyid[joint])
            ranges = {k[len("default_") : -len("_ranges")]: tuple(v) for k, v in props.items() if v}
            out[name] = dict(joint=joints[0], joint_id=joint, body_id=body, qpos_adr=int(model.jnt_qposadr[joint]),
                             kind=kinds[model.jnt_type[joint]], range=tuple(model.jnt_range[joint]), ranges=ranges,
                             parts=self._part_boxes(body))  # fmt: skip
        return out

    def _part_boxes(self, root: int) -> list:
        """Body-frame boxes (lo, hi) of the collision geoms of body ``root`` and its descendants."""
        model, data = self.env.sim.model._model, self.env.sim.data._data
        rot, pos = data.xmat[root].reshape(3, 3), data.xpos[root]
        signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
        boxes = []
        for g in range(model.ngeom):
            if self._descends_from(model, model.geom_bodyid[g], root) and (
                model.geom_contype[g] or model.geom_conaffinity[g]
            ):
                local = model.geom_aabb[g][:3] + signs * model.geom_aabb[g][3:]  # 8 corners in the geom frame
                world = data.geom_xpos[g] + local @ data.geom_xmat[g].reshape(3, 3).T
                body_frame = (world - pos) @ rot
                boxes.append((body_frame.min(0), body_frame.max(0)))
        return boxes

    @staticmethod
    def _descends_from(model, body: int, root: int) -> bool:
        while body not in (root, 0):
            body = model.body_parentid[body]
        return body == root

    # -- protocol and sampled layouts ----------------------------------------------------------------------------
    def reset(self, init_state: int, seed: int, render: bool = True) -> dict:
        """Seed, soft reset, restore the layout, then the wait steps (which do not count toward the step limit).

        ``init_state`` 0-49: the protocol's fixed init state (``set_init_state(init_states[init_state])``), chosen by
        the caller (episode e -> init state e), never by which worker is free. ``SAMPLED``: the layout LIBERO's
        placement initializer samples from ``seed`` (:meth:`_sampled_layout`), never one of the protocol's 50.
        ``layout_info()`` describes the layout of the last reset.
        """
        if init_state == SAMPLED:
            raw = self._sampled_layout(seed)
        else:
            if not 0 <= init_state < len(self.init_states):
                raise IndexError(f"init state {init_state} out of range 0-{len(self.init_states) - 1}")
            raw, state, settle = self._start(seed, self.init_states[init_state])
            self.layout = {"init_state": init_state, "seed": seed, "draws": 1, "settle": settle,
                           "positions": self.object_positions(state)}  # fmt: skip
        self.t = 0
        self._obs = self._convert(raw, render and self.obs_mode == "rgb")
        return self._obs

    def layout_info(self) -> dict:
        """The last reset's layout: ``init_state`` (0-49, or SAMPLED), ``seed``, ``draws`` (sampled: the draws it took),
        ``positions`` (:meth:`object_positions` before the wait steps), ``settle`` (how far, xy in m, an object slid
        over the wait steps), ``protocol_distance`` (sampled: to the nearest protocol state, :func:`layout_distance`).
        """
        return dict(self.layout)

    def _start(self, seed: int, state: Optional[np.ndarray]):
        """Seed, soft reset (LIBERO's reset samples a layout from the seed), clear the carried state, restore
        ``state`` (None: the sampled layout itself, through the same ``set_init_state`` as a protocol state), run the
        wait steps. Returns (raw observation, the restored state, the largest xy distance an object slid)."""
        self._wrapper.seed(seed)
        if state is None:
            self._unplace_fixtures()
        self._wrapper.reset()
        self._clear_carried_state()
        if state is None:
            state = self.env.sim.get_state().flatten()
        raw = self._wrapper.set_init_state(state)
        for _ in range(self.num_wait_steps):
            raw, _, _, _ = self._step(WAIT_ACTION)
        slid = self.object_positions(self.env.sim.get_state().flatten()) - self.object_positions(state)
        return raw, state, float(np.linalg.norm(slid[:, :2], axis=1).max(initial=0.0))

    def _unplace_fixtures(self) -> None:
        """Put the fixtures back where a freshly loaded model has them (their MJCF pose, the origin) before a soft reset
        samples a layout. LIBERO places an object that stands on a fixture's site (a bowl on the cabinet) at the
        fixture's sampled pose plus the site's world position, read before the fixtures are moved: right after a hard
        reset, which reloads the model, that is the site's offset on the fixture; after a soft reset it already holds
        the fixture's previous pose, and the object lands ~1 m up and off to the side (measured on LIBERO-Spatial 3:
        its second bowl fell on the robot). With the fixtures put back, a soft reset samples the hard reset's layout."""
        if not hasattr(self, "_fixture_mjcf_poses"):
            import xml.etree.ElementTree as ET

            bodies = {b.get("name"): b for b in ET.fromstring(self.env.model.get_xml()).iter("body")}
            self._fixture_mjcf_poses = []
            for fixture in self.env.fixtures_dict.values():
                body = bodies[fixture.root_body]
                pos = np.array([float(v) for v in body.get("pos", "0 0 0").split()])
                quat = np.array([float(v) for v in body.get("quat", "1 0 0 0").split()])
                self._fixture_mjcf_poses.append((self.env.sim.model.body_name2id(fixture.root_body), pos, quat))
        model = self.env.sim.model
        for body, pos, quat in self._fixture_mjcf_poses:
            model.body_pos[body], model.body_quat[body] = pos, quat

    def object_positions(self, state: np.ndarray) -> np.ndarray:
        """(n_objects, 3) world positions of the movable objects (their free joints) in a flattened sim state
        (time, qpos, qvel): the layout as LIBERO's init states store it."""
        if not hasattr(self, "_object_qpos"):
            model = self.env.sim.model
            self._object_qpos = [model.get_joint_qpos_addr(o.joints[-1])[0] for o in self.env.objects_dict.values()]
        qpos = np.asarray(state)[1 : 1 + self.env.sim.model.nq]
        return np.array([qpos[a : a + 3] for a in self._object_qpos]).reshape(-1, 3)

    def protocol_layouts(self) -> dict:
        """The protocol's 50 layouts, which sampled ones are checked against: ``positions`` (50, n_objects, 3) as
        stored and ``settle`` (50,), how far an object slides over the wait steps from each. Computed once per task
        and process (50 resets with their wait steps, 2-7 s)."""
        if self.task.name not in _PROTOCOL_LAYOUTS:
            positions = np.stack([self.object_positions(s) for s in self.init_states])
            settle = np.array([self._start(e, s)[2] for e, s in enumerate(self.init_states)])
            _PROTOCOL_LAYOUTS[self.task.name] = {"positions": positions, "settle": settle}
        return _PROTOCOL_LAYOUTS[self.task.name]

    def _sampled_layout(self, seed: int) -> dict:
        """A layout of LIBERO's placement initializer (every object placed uniformly in its BDDL region, the
        fixtures and articulated joints as LIBERO's reset samples them), drawn from ``seed``, so the same (seed,
        episode) gives the same layout in any worker. A draw is redrawn (from a seed derived from (seed, draw))
        when it is one of the protocol's 50 (every object within MIN_PROTOCOL_DISTANCE of a protocol state's), or
        when an object slides further over the wait steps than in any protocol state, by more than SETTLE_TOLERANCE:
        LIBERO's sampler lets objects overlap, and the solver then throws one out (measured on LIBERO-Spatial 0: the
        bowl between plate and ramekin thrown up to 61 cm from an overlapping plate in ~10 % of draws, against at
        most 5.6 cm over the 50 protocol states)."""
        ref = self.protocol_layouts()
        bound = ref["settle"].max() + SETTLE_TOLERANCE
        for draw in range(MAX_LAYOUT_DRAWS):
            draw_seed = seed if draw == 0 else int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])
            raw, state, settle = self._start(draw_seed, None)
            distance = layout_distance(self.object_positions(state), ref["positions"])
            if distance >= MIN_PROTOCOL_DISTANCE and settle <= bound:
                self.layout = {"init_state": SAMPLED, "seed": seed, "draws": draw + 1, "settle": settle,
                               "protocol_distance": distance, "positions": self.object_positions(state)}  # fmt: skip
                return raw
        raise RuntimeError(f"{self.task.name}: no sampled layout of seed {seed} passed the checks in "
                           f"{MAX_LAYOUT_DRAWS} draws; use the protocol's layouts for this task.")  # fmt: skip

    def _clear_carried_state(self) -> None:
        """A soft reset keeps two pieces of state a hard reset rebuilds: the Panda gripper's ramped command
        (robosuite never zeroes ``gripper.current_action``) and MuJoCo's solver warm start and actuator inputs.
        Clearing them makes the same init state give the same episode whatever ran before, soft or hard."""
        for robot in self.env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        data = self.env.sim.data._data
        for name in ("qacc_warmstart", "ctrl", "act", "qfrc_applied", "xfrc_applied"):
            getattr(data, name)[:] = 0.0

    def step_chunk(self, actions: np.ndarray, render: bool = True, record: bool = False) -> ChunkResult:
        """Execute up to ``len(actions)`` actions open loop; stop early on success or at the step limit.

        Renders only after the last executed action (``render``), or before every action when ``record`` (a
        dataset needs the pre-action image of every step).
        """
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
        render = render and self.obs_mode == "rgb"
        records = [] if record else None
        total, done, steps, raw = 0.0, False, 0, None
        for i, action in enumerate(actions):
            if self.t >= self.task.max_steps:
                break
            raw, reward, done, _ = self._step(action)
            self.t += 1
            steps += 1
            total += float(reward)
            last = done or self.t >= self.task.max_steps or i == len(actions) - 1
            next_obs = self._convert(raw, render and (record or last))
            if record:
                records.append({"obs": self._obs, "action": action.copy(), "reward": float(reward), "done": done})
            self._obs = next_obs
            if done:
                break
        truncated = not done and self.t >= self.task.max_steps
        return ChunkResult(self._obs, total, bool(done), truncated, steps, self.t, records)

    # -- stepping ------------------------------------------------------------------------------------------------
    def _step(self, action: np.ndarray):
        """One environment step (``control_timestep``, 25 physics substeps): robosuite's and LIBERO's own loop, or
        with ``fast_step`` the same dynamics without their per-substep overhead (fast_step.py: ``physics`` and
        ``controller`` choose its variant)."""
        return self._fast(action) if self.fast_step else self._wrapper.step(action)

    def close(self) -> None:
        self._wrapper.close()


_PROTOCOL_LAYOUTS: dict = {}  # task name -> LiberoEnv.protocol_layouts(), shared by the envs of a process


def layout_distance(positions: np.ndarray, protocol: np.ndarray) -> float:
    """How far a layout (n_objects, 3) lies from the nearest of the protocol's (50, n_objects, 3): the smallest,
    over the protocol states, of the largest distance an object would have to move (m). 0 for the same layout;
    inf for a task without movable objects (nothing to compare)."""
    if positions.size == 0:
        return float("inf")
    return float(np.linalg.norm(protocol - positions[None], axis=-1).max(-1).min())


def make_env(task: Task, **kwargs) -> LiberoEnv:
    """Build one environment for ``task`` (see :class:`LiberoEnv` for the options)."""
    return LiberoEnv(task, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list-tasks", action="store_true", help="print the 130-task table and exit")
    cli = parser.parse_args()
    if not cli.list_tasks:
        parser.print_help()
        sys.exit(0)
    print(f"{'id':>3}  {'suite':<15} {'local':>5}  {'steps':>5}  instruction")
    for t in task_registry():
        print(f"{t.global_id:>3}  {t.suite:<15} {t.local_id:>5}  {t.max_steps:>5}  {t.instruction}")
