"""libero_env.py — the one place that knows LIBERO.

Everything the phase scripts need from the simulator lives here, once:

* the task registry (130 tasks; global ids 0-129 in the order spatial, object, goal, libero_10, libero_90),
  with the instruction read from each BDDL file's ``:language`` (never parsed from the file name);
* the evaluation protocol as data (``SUITE_MAX_STEPS``, ``NUM_WAIT_STEPS``, ``WAIT_ACTION``) and as code
  (:meth:`LiberoEnv.reset`, :func:`run_episodes`, and :func:`evaluate_success` for the training scripts);
* the layout split: resets to the protocol's 50 fixed init states (held out for evaluation) or to layouts LIBERO's
  placement initializer samples from the episode's seed (training, demonstrations, collection), never one of the 50;
* :class:`LiberoEnv`, a single environment with soft resets and rendering only when asked for;
* :class:`VectorLiberoEnv`, environments grouped over subprocess workers (several per process) with
  deterministic init-state assignment and worker failures surfaced as :class:`EnvWorkerError` (naming the env,
  with the child's traceback);
* the single observation conversion (:func:`upright`, :func:`resize_images`, :func:`proprio`, :func:`policy_obs`).

The simulator (libero, robosuite, mujoco) is imported lazily, only where an environment is built, so networks
and training steps import this module on machines without LIBERO.

    python libero_env.py --list-tasks
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

from fast_step import CONTROLLERS, FAST_PHYSICS, FastStep  # noqa: F401  (the fast step path's options)

# ----------------------------------------------------------------------------------------------------------------
# Protocol constants (OpenVLA / openpi LIBERO evaluation protocol)
# ----------------------------------------------------------------------------------------------------------------
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# Steps allowed after the wait steps. LeRobot's wrapper uses 280 for spatial; we follow OpenVLA/openpi (220).
INSTRUCTION_CONVENTIONS = ("bddl", "benchmark")  # see Task.prompt
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_WAIT_STEPS = 10  # objects settle after set_init_state; these steps do not count toward the limit
WAIT_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # hold still, gripper open
NUM_INIT_STATES = 50  # fixed init states per task; episode e uses init state e
# Layouts: the protocol's 50 fixed init states are held out for evaluation; training, demonstrations and collection
# use layouts LIBERO's own placement initializer samples (the BDDL regions) from the episode's seed.
LAYOUTS = ("protocol", "sampled")
SAMPLED = -1  # the ``init_state`` of a reset to a sampled layout (recorded as such in results and HDF5 files)
MIN_PROTOCOL_DISTANCE = 0.001  # m: a sampled layout whose every object lies this close to a protocol state is one
SETTLE_TOLERANCE = 0.01  # m: how much further than in any protocol state an object may slide while settling
MAX_LAYOUT_DRAWS = 100  # redraws allowed before a sampled reset gives up (none needed more than a few, measured)
CONTROL_HZ = 20
ACTION_DIM = 7
PROPRIO_DIM = 8  # eef pos (3), eef axis-angle (3), gripper qpos (2)
PRIVILEGED_KEYS = ("poses", "articulation", "goal_atoms")  # observations only the scripted expert may see
CAMERAS = {"agentview_rgb": "agentview", "eye_in_hand_rgb": "robot0_eye_in_hand"}  # HDF5 key -> MuJoCo camera


class TaskError(ValueError):
    """A task selection the user can fix (unknown suite, task id out of range)."""


class Interrupted(RuntimeError):
    """:func:`run_episodes` stopped before its episodes were done because its ``stop()`` said so (pre-emption)."""


class EnvWorkerError(RuntimeError):
    """An environment worker process raised, died or stopped answering."""


# ----------------------------------------------------------------------------------------------------------------
# Task registry
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    global_id: int  # 0-129 across the five suites
    suite: str
    local_id: int  # index within the suite (LIBERO's task order 0)
    name: str  # BDDL file stem; also the HDF5 file stem of LIBERO's demos
    instruction: str  # the BDDL ``:language`` text (what LIBERO's demo files and ours store)
    bddl_file: str
    max_steps: int  # protocol step limit after the wait steps
    language: str = ""  # LIBERO's ``task.language``, derived from the file name: OpenVLA's/openpi's prompt

    def prompt(self, convention: str) -> str:
        """The instruction text of a convention: ``bddl`` (the BDDL ``:language``) or ``benchmark`` (LIBERO's
        file-name-derived ``task.language``, which OpenVLA, openpi and LeRobot train and evaluate with)."""
        if convention not in INSTRUCTION_CONVENTIONS:
            raise ValueError(f"Unknown instruction convention '{convention}'; choose bddl or benchmark.")
        return self.instruction if convention == "bddl" else self.language


def bddl_language(path: str) -> str:
    """The task instruction: the ``(:language ...)`` clause of a BDDL file."""
    with open(path) as f:
        text = f.read()
    match = re.search(r"\(:language\s+([^)]*)\)", text)
    if match is None:
        raise ValueError(f"{path} has no (:language ...) clause; is it a LIBERO BDDL file?")
    return " ".join(match.group(1).split())


@lru_cache(maxsize=1)
def task_registry() -> tuple[Task, ...]:
    """All 130 tasks in global-id order."""
    from libero.libero import benchmark

    tasks = []
    for suite_name in SUITES:
        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO-PRO prints its task order on construction
            suite = benchmark.get_benchmark_dict()[suite_name]()
        assert suite.n_tasks == SUITE_SIZES[suite_name], f"{suite_name}: expected {SUITE_SIZES[suite_name]} tasks"
        for local_id in range(suite.n_tasks):
            bddl = os.path.normpath(suite.get_task_bddl_file_path(local_id))
            tasks.append(
                Task(
                    global_id=len(tasks),
                    suite=suite_name,
                    local_id=local_id,
                    name=suite.get_task(local_id).name,
                    instruction=bddl_language(bddl),
                    bddl_file=bddl,
                    max_steps=SUITE_MAX_STEPS[suite_name],
                    language=suite.get_task(local_id).language,
                )
            )
    return tuple(tasks)


def check_task_args(suite: str, task_id: Optional[int]) -> None:
    """Validate --suite/--task-id without importing LIBERO (so scripts fail before any work starts)."""
    if suite != "all" and suite not in SUITES:
        raise TaskError(f"Unknown suite '{suite}'; choose one of: all, {', '.join(SUITES)}.")
    if task_id is None:
        return
    n = sum(SUITE_SIZES.values()) if suite == "all" else SUITE_SIZES[suite]
    if not 0 <= task_id < n:
        raise TaskError(
            f"Task id {task_id} is out of range for suite '{suite}' (valid: 0-{n - 1}); "
            "run `python libero_env.py --list-tasks` to see the ids."
        )


def resolve_task(suite: str, task_id: int) -> Task:
    """--suite all: task_id is the global id 0-129; a named suite: task_id indexes within it."""
    check_task_args(suite, task_id)
    if suite == "all":
        return task_registry()[task_id]
    return next(t for t in task_registry() if t.suite == suite and t.local_id == task_id)


def suite_tasks(suite: str) -> list[Task]:
    check_task_args(suite, None)
    return [t for t in task_registry() if suite == "all" or t.suite == suite]


def load_init_states(task: Task) -> np.ndarray:
    """The task's fixed initial simulator states, (50, D) float64."""
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):
        states = benchmark.get_benchmark_dict()[task.suite]().get_task_init_states(task.local_id)
    assert len(states) == NUM_INIT_STATES, f"{task.name}: expected {NUM_INIT_STATES} init states, got {len(states)}"
    return np.asarray(states, dtype=np.float64)


def task_dir_name(task: Task) -> str:
    """Run-directory component of DESIGN.md: ``task<NN>`` with the two-digit index within the suite."""
    return f"task{task.local_id:02d}"


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
# Vector environment over subprocess workers
# ----------------------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies, so a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(conn, task: Task, env_ids: list[int], env_kwargs: dict) -> None:
    """One worker process: the environments ``env_ids`` (constructed here, stepped one after the other)."""
    _die_with_parent()
    # Ctrl-C, SLURM's pre-emption signal and SIGTERM are the parent's to handle: SLURM, `kill -- -PGID` and a
    # terminal signal every process of the job or group, and a training parent finishes its iteration and writes
    # its checkpoint with these workers still stepping. The workers end with the parent: its exit closes them
    # (_close_open_vector_envs), or the kernel's parent-death SIGKILL above when it is killed.
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    envs: dict[int, LiberoEnv] = {}
    try:
        for i in env_ids:
            try:
                envs[i] = LiberoEnv(task, **env_kwargs)
            except Exception:  # noqa: BLE001 - construction failed: the parent names the env
                conn.send(("error", i, traceback.format_exc()))
                return
        conn.send(("ok", None, None))
        while True:
            cmd, calls = conn.recv()
            if cmd == "close":
                break
            results, failed = [], None
            for i, args in calls:  # (env id, arguments) in the order the parent asked
                try:
                    results.append(getattr(envs[i], cmd)(*args))
                except Exception:  # noqa: BLE001 - every error goes to the parent with its env and traceback
                    failed = ("error", i, traceback.format_exc())
                    break
            conn.send(failed or ("ok", None, results))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        for env in envs.values():
            with contextlib.suppress(Exception):
                env.close()
        conn.close()


_OPEN_VECTOR_ENVS: weakref.WeakSet = weakref.WeakSet()


def _close_open_vector_envs() -> None:
    """At interpreter exit, before multiprocessing's own exit handler: close every vector env still open. That
    handler would SIGTERM the daemonic workers and wait for them, and the workers ignore SIGTERM."""
    for venv in list(_OPEN_VECTOR_ENVS):
        venv.close()


def split_envs(num_envs: int, num_workers: int) -> list[list[int]]:
    """Env ids 0..num_envs-1 in contiguous groups, one per worker, sizes differing by at most one."""
    bounds = np.linspace(0, num_envs, num_workers + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def default_num_workers(num_envs: int) -> int:
    """One worker per CPU core this process may use (never more workers than envs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_envs, cores))


# Resident memory of the envs (benchmarks/env_speed.py --grouped-only, LIBERO-Object 0, state mode, 2026-12-02): 16
# envs grouped on 2 workers held 941 MB per env (15.1 GB), 8 on 2 workers 1101 MB (8.8 GB), one env per process 1951
# MB: ~0.8 GB per env (its compiled model alone is 271 MB) and ~1.3 GB per worker interpreter.
ENV_MEMORY_GB = 0.8
WORKER_MEMORY_GB = 1.3
CPU_RECIPE = "--num-envs 16 --num-steps 140 --minibatch-size 2800"  # the 2-core recipe (docs/convergence.md), ~15 GB


class ResourceError(ValueError):
    """The run cannot fit this machine (raised before any worker starts)."""


def env_memory_gb(num_envs: int, num_workers: Optional[int] = None) -> float:
    """Estimated resident memory of ``num_envs`` envs over ``num_workers`` workers (default: one per core), GB."""
    return num_envs * ENV_MEMORY_GB + (num_workers or default_num_workers(num_envs)) * WORKER_MEMORY_GB


def available_memory_gb() -> float:
    """Memory this job may still use, GB: the machine's MemAvailable, capped by the job's cgroup limit (SLURM sets
    one); ``LIBERO_MEMORY_GB`` overrides (to plan a run for another machine)."""
    if os.environ.get("LIBERO_MEMORY_GB"):
        return float(os.environ["LIBERO_MEMORY_GB"])
    have = float("inf")
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) / 2**20
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: the job's limit less what it already uses
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            have = min(have, (int(limit) - used) / 2**30)
    return have


def check_memory(num_envs: int, num_workers: Optional[int] = None, flag: str = "--num-envs") -> None:
    """Raise :class:`ResourceError`, naming the largest env count that fits, when the envs cannot fit in memory."""
    need, have = env_memory_gb(num_envs, num_workers), available_memory_gb()
    if need <= have:
        return
    fits = [n for n in range(num_envs - 1, 0, -1) if env_memory_gb(n, min(num_workers, n) if num_workers else None)
            <= have]  # fmt: skip
    advice = f"use {flag} {fits[0]} or fewer" if fits else "not even one env fits: free memory or use a larger machine"
    raise ResourceError(
        f"{num_envs} environments need ~{need:.0f} GB of memory (~{ENV_MEMORY_GB} GB each, "
        f"{WORKER_MEMORY_GB} GB per worker process) but {have:.0f} GB are available; {advice} (on "
        f"a 2-core CPU machine the recipe's {CPU_RECIPE} needs ~{env_memory_gb(16, 2):.0f} GB)."
    )


class VectorLiberoEnv:
    """``num_envs`` copies of one task in ``num_workers`` subprocesses (one MuJoCo/EGL context per env).

    Envs are grouped contiguously over the workers (default: one worker per CPU core, so 16-50 envs run on a
    2-core machine without 50 interpreters); a worker steps its envs one after the other, and all workers run at
    once. Every call names the environments it addresses (``env_ids``) and, for resets, the init state each one
    starts from, so which episode runs on which init state never depends on the grouping or on which worker
    finished first: the same init states, seeds and actions give the same episodes for any ``num_workers``.
    A worker that raises, dies or does not answer within ``timeout_s`` raises :class:`EnvWorkerError` in the
    parent, naming the env; all workers are then shut down.
    """

    def __init__(self, task: Task, num_envs: int, timeout_s: float = 600.0, num_workers: Optional[int] = None,
                 **env_kwargs):  # fmt: skip
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
        num_workers = default_num_workers(num_envs) if not num_workers else num_workers
        if not 1 <= num_workers <= num_envs:
            raise ValueError(f"num_workers must be in 1..num_envs ({num_envs}), got {num_workers}.")
        check_memory(num_envs, num_workers)  # before any worker starts
        self.task, self.num_envs, self.num_workers, self.timeout_s = task, num_envs, num_workers, timeout_s
        self.obs_mode = env_kwargs.get("obs_mode", "rgb")
        self.groups = split_envs(num_envs, num_workers)
        self.worker_of = {i: w for w, group in enumerate(self.groups) for i in group}
        configure_rendering()  # inherited by the workers' environment
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no inherited EGL/OpenMP state
        self._conns, self._procs, self._closed = [], [], False
        for w, group in enumerate(self.groups):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, task, group, env_kwargs), daemon=True,
                               name=f"libero-env-worker-{w}")  # fmt: skip
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        _OPEN_VECTOR_ENVS.add(self)
        # (re-)registered after multiprocessing's exit handler, which the Pipe above imported: exit handlers run last
        # registered first, so this one closes the workers before that one would wait for them
        atexit.unregister(_close_open_vector_envs)
        atexit.register(_close_open_vector_envs)
        for w in range(num_workers):  # construction errors surface here
            self._recv(w, "construct")

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _describe(self, w: int) -> str:
        group, pid = self.groups[w], self._procs[w].pid
        envs = f"env {group[0]}" if len(group) == 1 else f"envs {group[0]}-{group[-1]}"
        return f"env worker {w} (pid {pid}, {envs})"

    def _recv(self, w: int, cmd: str):
        conn, proc, deadline = self._conns[w], self._procs[w], time.monotonic() + self.timeout_s
        while True:
            try:
                if conn.poll(0.05):
                    status, env_id, payload = conn.recv()
                    break
            except (EOFError, OSError):
                status, env_id, payload = "died", None, None
                break
            if not proc.is_alive():
                status, env_id, payload = "died", None, None
                break
            if time.monotonic() > deadline:
                self.close()
                raise EnvWorkerError(f"{self._describe(w)} did not answer '{cmd}' within {self.timeout_s:.0f} s.")
        if status == "ok":
            return payload
        self.close()
        if status == "died":
            proc.join(1.0)
            raise EnvWorkerError(f"{self._describe(w)} died (exit code {proc.exitcode}) during '{cmd}'.")
        raise EnvWorkerError(f"env {env_id} (worker {w}, pid {proc.pid}) raised during '{cmd}':\n{payload}")

    def _call(self, env_ids: Sequence[int], cmd: str, args_per_env: Sequence[tuple]) -> list:
        if self._closed:
            raise EnvWorkerError("the vector env is closed.")
        calls: dict[int, list] = {}
        for i, args in zip(env_ids, args_per_env):
            if i not in self.worker_of:
                raise IndexError(f"env id {i} out of range 0-{self.num_envs - 1}.")
            calls.setdefault(self.worker_of[i], []).append((i, args))
        for w, work in calls.items():  # every worker starts before any answer is awaited
            try:
                self._conns[w].send((cmd, work))
            except (BrokenPipeError, OSError):
                self._recv(w, cmd)  # reports the death
        results = {}
        for w, work in calls.items():
            results.update(zip([i for i, _ in work], self._recv(w, cmd)))
        return [results[i] for i in env_ids]

    # -- API -----------------------------------------------------------------------------------------------------
    def reset(self, env_ids: Sequence[int], init_states: Sequence[int], seeds: Sequence[int], render: bool = True):
        """Protocol-reset ``env_ids[j]`` to init state ``init_states[j]`` with seed ``seeds[j]``; list of obs."""
        return self._call(env_ids, "reset", [(int(s), int(sd), render) for s, sd in zip(init_states, seeds)])

    def step_chunk(self, env_ids: Sequence[int], actions: np.ndarray, render: bool = True, record: bool = False):
        """Send ``actions[j]`` (T, 7) to env ``env_ids[j]``; list of :class:`ChunkResult`."""
        return self._call(env_ids, "step_chunk", [(np.asarray(a), render, record) for a in actions])

    def call(self, name: str, *args, env_ids: Optional[Sequence[int]] = None) -> list:
        """Call a method of :class:`LiberoEnv` in each (or the given) worker."""
        ids = range(self.num_envs) if env_ids is None else env_ids
        return self._call(list(ids), name, [args] * len(ids))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN_VECTOR_ENVS.discard(self)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("close", None))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()

    @property
    def pids(self) -> list[int]:
        """Process id of each worker (``groups[w]`` are the envs of worker ``w``)."""
        return [p.pid for p in self._procs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------------------------
# The evaluation protocol as code
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EpisodeResult:
    episode: int
    init_state: int
    seed: int
    success: bool
    length: int  # steps after the wait steps
    steps: list = field(default_factory=list)  # recorded per-step dicts (record=True)


def episode_init_state(episode: int, layouts: str = "protocol") -> int:
    """Episode e uses init state e (cycling after the 50 fixed states), or a layout sampled from its seed."""
    if layouts not in LAYOUTS:
        raise ValueError(f"layouts must be one of {', '.join(LAYOUTS)}, got '{layouts}'.")
    return SAMPLED if layouts == "sampled" else episode % NUM_INIT_STATES


def run_episodes(
    venv: VectorLiberoEnv,
    policy: Callable,
    episodes: Iterable[int],
    seed: int = 0,
    replan_steps: int = 8,
    record: bool = False,
    render: bool = True,
    on_episode_end: Optional[Callable[[EpisodeResult], None]] = None,
    reset_policy: Optional[Callable[[list[int], list[int]], None]] = None,
    layouts: str = "protocol",
    stop: Optional[Callable[[], bool]] = None,
) -> list[EpisodeResult]:
    """Run protocol episodes over a vector env; results sorted by episode.

    Episode ``e`` starts with env seed ``seed + e`` whichever worker runs it, from init state ``e % 50``
    (``layouts="protocol"``) or from the layout LIBERO samples from that seed (``"sampled"``, init state SAMPLED).
    ``episodes`` is consumed lazily, one episode each time a worker is free, so a generator may stop early (a
    collection that has enough successes). Each query, ``policy(obs_batch, env_ids) -> (B, T, 7)`` returns an
    action chunk per active env, of which the first ``replan_steps`` run open loop (fewer when the episode ends).
    Episodes that end on the same step are all counted. ``reset_policy(env_ids, episodes)`` is called when envs
    start new episodes (stateful policies). ``stop()`` is asked before every chunk step: True raises
    :class:`Interrupted` (a pre-empted job stops within one chunk step).
    """
    episode_init_state(0, layouts)  # an unknown split fails before any env is reset
    upcoming = iter(episodes)
    active: dict[int, dict] = {}
    results: list[EpisodeResult] = []

    def start(env_ids: list[int]) -> None:
        pairs = [(i, e) for i, e in zip(env_ids, upcoming)]  # zip stops when the iterator does
        if not pairs:
            return
        ids, eps = [i for i, _ in pairs], [e for _, e in pairs]
        inits = [episode_init_state(e, layouts) for e in eps]
        obs = venv.reset(ids, inits, [seed + e for e in eps], render=render)
        for i, e, o in zip(ids, eps, obs):
            active[i] = {"episode": e, "obs": o, "steps": []}
        if reset_policy is not None:
            reset_policy(ids, eps)

    start(list(range(venv.num_envs)))
    while active:
        if stop is not None and stop():
            raise Interrupted(f"stopped after {len(results)} episodes")
        env_ids = sorted(active)
        chunks = np.asarray(policy(stack_obs([active[i]["obs"] for i in env_ids]), env_ids))
        outs = venv.step_chunk(env_ids, chunks[:, :replan_steps], render=render, record=record)
        finished = []
        for i, out in zip(env_ids, outs):
            state = active[i]
            state["obs"] = out.obs
            if record:
                state["steps"].extend(out.records)
            if out.done or out.truncated:
                e = state["episode"]
                result = EpisodeResult(e, episode_init_state(e, layouts), seed + e, out.done, out.t, state["steps"])
                results.append(result)
                if on_episode_end is not None:
                    on_episode_end(result)
                finished.append(i)
        for i in finished:
            del active[i]
        if finished:
            start(finished)
    return sorted(results, key=lambda r: r.episode)


def episode_generator(seed: int, episode: int):
    """The noise stream of episode ``episode`` of a run seeded ``seed``: a CPU torch.Generator seeded by the pair,
    so an episode's actions depend neither on the worker count nor on what else shares its batch."""
    import torch  # (only learned policies need it: the simulator side of this module runs without torch)

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))


class LearnedPolicy:
    """:func:`run_episodes`' policy interface around a learned policy's ``act(obs, generators) -> (B, T, 7)``: every
    episode draws its policy noise from its own generator (:func:`episode_generator`), made when the episode starts
    (``reset_policy=learned.reset``)."""

    needs_privileged = False

    def __init__(self, act, replan_steps: int, obs_mode: str, image_size: int, info: Optional[dict] = None,
                 seed: int = 0):  # fmt: skip
        self.act, self.replan_steps, self.obs_mode, self.info = act, replan_steps, obs_mode, info or {}
        self.image_size = image_size  # the camera size the policy was trained on (evaluate.py renders at it)
        self.seed, self.generators = seed, {}

    def reset(self, env_ids: list[int], episodes: list[int]) -> None:
        for i, e in zip(env_ids, episodes):
            self.generators[i] = episode_generator(self.seed, e)

    def __call__(self, obs: dict, env_ids) -> np.ndarray:
        return self.act(obs, [self.generators[i] for i in env_ids])


def evaluate_success(venv: VectorLiberoEnv, act: Callable, episodes: int, seed: int, replan_steps: int) -> dict:
    """Success rate and mean episode length of a deterministic ``act(obs) -> (B, T, 7)`` over protocol episodes
    0..episodes-1: the periodic evaluation of the training scripts."""
    results = run_episodes(
        venv, lambda obs, env_ids: act(obs), range(episodes), seed, replan_steps, render=venv.obs_mode == "rgb"
    )
    return {
        "success_rate": float(np.mean([r.success for r in results])),
        "episode_length": float(np.mean([r.length for r in results])),
    }


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
