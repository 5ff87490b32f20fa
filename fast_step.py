"""fast_step.py — LIBERO's environment step without robosuite's per-substep overhead, checked against robosuite.

One LIBERO env step is 25 MuJoCo substeps, and in each robosuite runs its Python arm controller (operational space
control, OSC) and two extra forward passes. :class:`FastStep` runs the same dynamics with:

1. **Physics** (``physics``). robosuite runs, per substep, ``mj_forward``, the controller (which runs ``mj_forward``
   again) and ``mj_step`` (a third forward pass, then integration): three position/velocity passes (kinematics,
   collisions, mass matrix) and three constraint solves. ``split`` (default) runs ``mj_step1`` (one
   position/velocity pass: all that the controller reads), the first two passes' constraint solves, the controller,
   then ``mj_step2``: the solver still runs three times, as each solve warm-starts the next (skipping them,
   ``split1``, changes the solution within the solver's tolerance, and contacts amplify that: up to 0.19 in a
   velocity and 0.3 mm in a resting bowl's position over 320 steps). ``robosuite`` keeps its three forward passes.
2. **The arm controller** (``controller``). ``compiled`` (default): robosuite's OSC (``OSC_POSE``, fixed impedance, no
   interpolator: LIBERO's configuration) and the Panda gripper's ramp as one numba routine per substep
   (:func:`osc_substep`, in osc_controller.py), fed by two MuJoCo calls (``mj_jacSite``, ``mj_fullM``); the dozens
   of NumPy calls on 7x7 matrices robosuite makes per substep were ~43 % of the step. The substeps after the
   first of an env step run as one compiled call (:func:`osc_substeps`: MuJoCo's C functions called directly, the
   physics of a substep before the observable ticks that only advance timers), so a substep costs no Python.
   Its torques agree with robosuite's ``run_controller`` to ~1e-12 (the inverses are Cholesky-based, robosuite's are
   LAPACK's ``inv`` and SVD ``pinv``: the same matrices, other rounding). ``robosuite``: robosuite's own
   ``set_goal``/``run_controller`` with its state update done by one ``mj_jacSite`` instead of four; with
   ``physics="robosuite"`` the whole step is then bit-identical to robosuite's loop.
3. **Observations.** Observables advance their timers each substep but compute their sensors only on the substeps
   where robosuite samples them (the first of each step: the same observations); LIBERO's success predicates run
   once per step (twice for tasks whose object states change in ``_post_process``, e.g. a stove turned on).

robosuite's loop stays the reference: tests/test_fast_step.py steps five tasks of four suites side by side (320
steps, every chunk compared, states within 1e-9), compares the compiled torques with ``run_controller`` on
recorded states (1e-10) and the compiled substep loop with the Python one (bit for bit).
``benchmarks/env_speed.py`` measures each variant against the stock loop.
"""

from __future__ import annotations

import types
from functools import partial
from typing import Optional

import numpy as np

import osc_controller as osc

FAST_PHYSICS = ("split", "split1", "robosuite")
CONTROLLERS = ("compiled", "robosuite")


# ----------------------------------------------------------------------------------------------------------------
# One robot's control per substep
# ----------------------------------------------------------------------------------------------------------------
class _Arm:
    """One single-arm robot with a gripper (LIBERO's Panda): robosuite's ``SingleArm.control`` per substep, with the
    limits and actuator ids it re-derives from the model every substep computed once (the model does not change)."""

    def __init__(self, robot, start: int):
        controller = robot.controller
        if not robot.has_gripper or controller.control_dim + robot.gripper.dof != robot.action_dim:
            raise ValueError(
                "fast_step handles single-arm robots with a gripper (LIBERO's Panda); use fast_step=False."
            )
        self.robot, self.start, self.stop = robot, start, start + robot.action_dim
        model = robot.sim.model
        self.torque_low, self.torque_high = robot.torque_limits
        self.gripper_ids = [model.actuator_name2id(a) for a in robot.gripper.actuators]
        ctrl_range = model.actuator_ctrlrange[self.gripper_ids]
        self.gripper_bias = 0.5 * (ctrl_range[:, 1] + ctrl_range[:, 0])
        self.gripper_weight = 0.5 * (ctrl_range[:, 1] - ctrl_range[:, 0])
        self.compilable = (
            type(controller).__name__ == "OperationalSpaceController"
            and controller.impedance_mode == "fixed"
            and controller.interpolator_pos is None
            and controller.interpolator_ori is None
            and controller.use_delta
            and controller.use_ori
            and controller.position_limits is None
            and controller.orientation_limits is None
            and type(robot.gripper).__name__ == "PandaGripper"
        )
        n, nv, g = len(controller.qvel_index), model.nv, len(self.gripper_ids)
        self.ids = np.zeros((4, max(n, 1 + g)), dtype=np.int64)
        self.ids[0, :n], self.ids[1, :n] = controller.qpos_index, controller.qvel_index
        self.ids[2, :n] = robot._ref_joint_actuator_indexes
        self.ids[3, 0] = model.site_name2id(controller.eef_name)
        self.ids[3, 1 : 1 + g] = self.gripper_ids
        self.jacp, self.jacr, self.full_mass = np.zeros((3, nv)), np.zeros((3, nv)), np.zeros((nv, nv))
        self.joints = np.stack([np.zeros(n), self.torque_low, self.torque_high])
        self.goal, self.gains = np.zeros(12), np.zeros((2, 6))
        self.gripper = np.stack([np.zeros(g), np.zeros(g), self.gripper_bias, self.gripper_weight])
        self.uncouple = bool(getattr(controller, "uncoupling", True))
        if self.compilable:  # robosuite's scale_action as rows: input min, max, centre, scale, output centre
            low, high = controller.input_min * np.ones(6), controller.input_max * np.ones(6)
            out_low, out_high = controller.output_min * np.ones(6), controller.output_max * np.ones(6)
            scale = np.abs(out_high - out_low) / np.abs(high - low)
            self.scaling = np.stack([low, high, (high + low) / 2.0, scale, (out_high + out_low) / 2.0])
        self._goal_pos = self._goal_ori = None  # the arrays last handed to robosuite's controller

    # robosuite's controller (controller="robosuite"), its state update by _osc_update
    def control(self, action: np.ndarray, policy_step: bool) -> None:
        robot = self.robot
        controller, data = robot.controller, robot.sim.data
        if policy_step:
            controller.set_goal(action[: controller.control_dim])
        robot.torques = np.clip(controller.run_controller(), self.torque_low, self.torque_high)
        gripper_action = robot.gripper.format_action(action[controller.control_dim :])
        data.ctrl[self.gripper_ids] = self.gripper_bias + self.gripper_weight * gripper_action
        data.ctrl[robot._ref_joint_actuator_indexes] = robot.torques

    # the compiled controller (controller="compiled")
    def set_goal(self, action: np.ndarray, data) -> None:
        """The first substep of an env step: the goal from the fresh end-effector pose (:func:`osc_goal`), the
        gripper's increment for this step, the controller's posture and gains."""
        controller = self.robot.controller
        if controller.goal_pos is not self._goal_pos or controller.goal_ori is not self._goal_ori:
            self.goal[:3], self.goal[3:] = controller.goal_pos, np.asarray(controller.goal_ori).reshape(-1)  # reset
        osc.compiled("osc_goal")(action, data.site_xpos, data.site_xmat, self.ids[3, 0], self.scaling, self.goal)
        self.pack_step(action)

    def pack(self, action: np.ndarray) -> None:
        """After robosuite's own ``set_goal``: its goal, and the rest of the step's controller inputs."""
        controller = self.robot.controller
        self.goal[:3], self.goal[3:] = controller.goal_pos, np.asarray(controller.goal_ori).reshape(-1)
        self.pack_step(action)

    def pack_step(self, action: np.ndarray) -> None:
        robot, controller = self.robot, self.robot.controller
        self.gains[0], self.gains[1] = controller.kp, controller.kd
        self.joints[0] = controller.initial_joint
        gripper = robot.gripper
        self.gripper[0] = gripper.current_action
        self.gripper[1] = np.array([-1.0, 1.0]) * gripper.speed * np.sign(action[controller.control_dim :])

    def bind(self, kernel, model, data, mujoco):
        """The per-substep controller for this step: a function of no arguments with MuJoCo's arrays looked up once
        (each attribute access of the bindings builds a new array view)."""
        jac_site, full_m, qM = mujoco.mj_jacSite, mujoco.mj_fullM, data.qM
        jacp, jacr, full_mass, site = self.jacp, self.jacr, self.full_mass, int(self.ids[3, 0])
        args = (data.qpos, data.qvel, data.qfrc_bias, data.site_xpos, data.site_xmat, jacp, jacr, full_mass, data.ctrl,
                self.goal, self.gains, self.joints, self.ids, self.gripper, self.uncouple)  # fmt: skip

        def substep() -> np.ndarray:
            jac_site(model, data, jacp, jacr, site)
            full_m(model, full_mass, qM)
            return kernel(*args)

        return substep

    def bind_substeps(self, kernel, mj, model, data, solves: int):
        """The substeps after the first of this step as one compiled call (:func:`osc_substeps`): a function of the
        number of substeps to run, returning the last torques."""
        args = (mj, model._address, data._address, solves, int(self.ids[3, 0]), self.jacp, self.jacr, self.full_mass,
                data.qM, data.qpos, data.qvel, data.qfrc_bias, data.site_xpos, data.site_xmat, data.ctrl, self.goal,
                self.gains, self.joints, self.ids, self.gripper, self.uncouple)  # fmt: skip
        return lambda count: kernel(count, *args)

    def finish_step(self, torques: np.ndarray) -> None:
        """Leave robosuite's objects as its own step would: the gripper's ramped command, the last torques, and the
        controller due for a state update at the next ``set_goal``."""
        robot, controller = self.robot, self.robot.controller
        robot.gripper.current_action = self.gripper[0].copy()
        robot.torques = torques
        controller.goal_pos, controller.goal_ori = self.goal[:3].copy(), self.goal[3:].reshape(3, 3).copy()
        self._goal_pos, self._goal_ori = controller.goal_pos, controller.goal_ori
        controller.new_update = True


def _osc_update(self, force: bool = False) -> None:
    """robosuite's ``Controller.update`` for the fast step path, bound to a controller instance: the same state
    (end-effector pose and velocity, joint positions and velocities, Jacobians, mass matrix) computed by the same
    floating-point operations, without the ``sim.forward()`` (``mj_step1`` just ran), with one ``mj_jacSite`` call
    instead of four (robosuite computes the Jacobian anew for each velocity and each Jacobian half) and the site id
    looked up once."""
    import mujoco

    if not (self.new_update or force):
        return
    sim = self.sim
    model, data = sim.model._model, sim.data._data
    if self._fast_forward:  # physics="robosuite": its second forward pass, kept
        mujoco.mj_forward(model, data)
    cache = self.__dict__.setdefault("_fast_cache", {})
    if not cache:
        cache["sid"] = sim.model.site_name2id(self.eef_name)
        cache["jacp"], cache["jacr"] = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    sid, jacp, jacr = cache["sid"], cache["jacp"], cache["jacr"]
    mujoco.mj_jacSite(model, data, jacp, jacr, sid)
    qvel = sim.data.qvel
    self.ee_pos = np.array(data.site_xpos[sid])
    self.ee_ori_mat = np.array(data.site_xmat[sid].reshape([3, 3]))
    self.ee_pos_vel = np.array(np.dot(jacp, qvel))
    self.ee_ori_vel = np.array(np.dot(jacr, qvel))
    self.joint_pos = np.array(sim.data.qpos[self.qpos_index])
    self.joint_vel = np.array(qvel[self.qvel_index])
    self.J_pos = np.array(jacp[:, self.qvel_index])
    self.J_ori = np.array(jacr[:, self.qvel_index])
    self.J_full = np.array(np.vstack([self.J_pos, self.J_ori]))
    mass_matrix = np.ndarray(shape=(model.nv, model.nv), dtype=np.float64, order="C")
    mujoco.mj_fullM(model, mass_matrix, data.qM)
    self.mass_matrix = mass_matrix[self.qvel_index, :][:, self.qvel_index]
    self.new_update = False


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------
class _ObservableClocks:
    """robosuite's ``Observable.update`` run per substep for every enabled observable, without calling it where it
    would only advance its timer: observables whose timers agree (all of LIBERO's: one sampling rate, no delay) share
    one timer between their samples, so a substep costs one addition per group instead of a call per observable.
    ``update`` runs exactly where robosuite's would do more than add ``dt`` (sample or wrap the timer), on the same
    timer values, so the observations and timers are the same."""

    def __init__(self, observables: list, dt: float, obs_cache: dict):
        self.observables, self.dt, self.obs_cache = observables, dt, obs_cache
        by_state: dict = {}
        for o in observables:
            by_state.setdefault((o._time_since_last_sample, o._sampled, o._sampling_timestep), []).append(o)
        self.groups = [[t, sampled, period, members] for (t, sampled, period), members in by_state.items()]

    def tick(self) -> None:
        due = []
        for group in self.groups:
            t, sampled, period, members = group
            if not sampled:
                due.append(group)
                continue
            t += self.dt  # update() would only advance the timer, and wrap it at the sampling period
            if t >= period:
                t %= period
                group[1] = False
            group[0] = t
        if not due:
            return
        for t, sampled, _, members in due:
            for o in members:
                o._time_since_last_sample, o._sampled = t, sampled
        members = due[0][3] if len(due) == 1 else [o for o in self.observables if any(o in g[3] for g in due)]
        for o in members:  # robosuite's order: a sensor may read what an earlier one just put in the cache
            o.update(timestep=self.dt, obs_cache=self.obs_cache)
        split = False
        for group in due:
            first = group[3][0]
            group[0], group[1] = first._time_since_last_sample, first._sampled
            split |= any((o._time_since_last_sample, o._sampled) != (group[0], group[1]) for o in group[3])
        if split:  # members diverged (e.g. a random sampling delay): regroup by their own timers
            self.write_back()
            self.__init__(self.observables, self.dt, self.obs_cache)

    def quiet(self, limit: int) -> int:
        """How many of the next ``limit`` ticks would only advance timers (no observable samples or regroups): the
        physics of that many substeps, and of the one after, can run before their ticks."""
        state = [(t, sampled, period) for t, sampled, period, _ in self.groups]
        for k in range(limit):
            if not all(sampled for _, sampled, _ in state):
                return k
            advanced = []
            for t, sampled, period in state:  # as tick() does
                t += self.dt
                if t >= period:
                    t %= period
                    sampled = False
                advanced.append((t, sampled, period))
            state = advanced
        return limit

    def write_back(self) -> None:
        for t, sampled, _, members in self.groups:
            for o in members:
                o._time_since_last_sample, o._sampled = t, sampled


class FastStep:
    """robosuite's ``MujocoEnv.step`` + LIBERO's ``step`` for one environment (``env``: the robosuite/LIBERO env),
    returning the same observations, reward and done; see the module docstring for what changes and how it is
    checked."""

    def __init__(self, env, physics: str = "split", controller: str = "compiled"):
        if physics not in FAST_PHYSICS:
            raise ValueError(f"physics must be one of {FAST_PHYSICS}, got '{physics}'.")
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got '{controller}'.")
        self.env, self.physics, self.controller = env, physics, controller
        self.substeps = int(round(env.control_timestep / env.model_timestep))
        self._arms: list[_Arm] = []
        self.compiled = False  # whether the last step ran the compiled controller
        self.compiled_loop = True  # the substeps after an env step's first in one compiled call (osc_substeps)
        self._contact_masks: Optional[tuple] = None  # (model, {geom set key: mask over geom ids}), check_contact

    def _forward(self, model, data, mujoco):
        """What runs before the controller in each substep, as one function of no arguments."""
        if self.physics == "robosuite":  # its forward pass (the controller runs a second one)
            return partial(mujoco.mj_forward, model, data)
        step1 = partial(mujoco.mj_step1, model, data)  # positions and velocities: all the controller reads
        if self.physics == "split1":
            return step1
        actuation, acceleration, constraint = (
            partial(f, model, data)
            for f in (mujoco.mj_fwdActuation, mujoco.mj_fwdAcceleration, mujoco.mj_fwdConstraint)
        )

        def split() -> None:  # robosuite's two forward passes' constraint solves, each warm-starting the next
            step1()
            actuation()  # the solves' inputs (actuator forces, smooth acceleration): the same for both, as
            acceleration()  # neither ctrl nor the state changes between them
            constraint()
            constraint()

        return split

    def arms(self) -> list[_Arm]:
        """The robots' control, rebuilt when robosuite rebuilt its robots (a hard reset)."""
        if not self._arms or self._arms[0].robot is not self.env.robots[0]:
            start, self._arms = 0, []
            for robot in self.env.robots:
                self._arms.append(_Arm(robot, start))
                start += robot.action_dim
        return self._arms

    def __call__(self, action: np.ndarray):
        import mujoco

        env = self.env
        if env.done:
            raise ValueError("executing action in terminated episode")
        model, data = env.sim.model._model, env.sim.data._data
        dt = env.model_timestep
        clocks = _ObservableClocks([o for o in env._observables.values() if o._enabled], dt, env._obs_cache)
        env.timestep += 1
        arms = self.arms()
        # physics="robosuite" is the bit-identical reference: robosuite's controller with its forward passes
        compiled = self.controller == "compiled" and self.physics != "robosuite" and all(a.compilable for a in arms)
        kernel = osc.compiled_osc_substep() if compiled else None
        loop = compiled and self.compiled_loop and len(arms) == 1
        mj = osc.mujoco_c_functions() if loop else None  # the substep loop compiled too (None: not found)
        self.compiled = compiled
        for a in arms:  # shadows the class method for this step only (reset() still runs robosuite's)
            a.robot.controller.update = types.MethodType(_osc_update, a.robot.controller)
            a.robot.controller._fast_forward = self.physics == "robosuite"
        torques = [None] * len(arms)
        substeps = [a.bind(kernel, model, data, mujoco) for a in arms] if compiled else []
        forward = self._forward(model, data, mujoco)
        step2 = mujoco.mj_step if self.physics == "robosuite" else mujoco.mj_step2
        try:
            forward()
            for k, a in enumerate(arms):  # robosuite's RobotEnv._pre_action: each robot's slice of the action
                arm_action = action[a.start : a.stop]
                if not compiled:
                    a.control(arm_action, policy_step=True)
                elif a.robot.controller.new_update:
                    a.set_goal(arm_action, data)
                    torques[k] = substeps[k]()
                else:  # robosuite's controller state is stale (the first step after a reset, which updates it
                    a.control(arm_action, policy_step=True)  # once, forced): its own code, stale state too
                    a.pack(arm_action)
                    torques[k] = a.robot.torques
            step2(model, data)  # (mj_step2: actuation, acceleration, constraint solve, integration)
            clocks.tick()
            # the other substeps: the goal is set, so each is the physics, the controller and the clocks
            arm_actions = [action[a.start : a.stop] for a in arms]
            tick, i = clocks.tick, 1
            if mj is not None:  # in compiled runs up to each substep whose tick samples an observable
                solves = 2 if self.physics == "split" else 0
                run = arms[0].bind_substeps(osc.compiled("osc_substeps"), mj, model, data, solves)
                while i < self.substeps:
                    count = min(clocks.quiet(self.substeps - i) + 1, self.substeps - i)
                    torques[0] = run(count)
                    for _ in range(count):
                        tick()
                    i += count
            for _ in range(i, self.substeps):
                forward()
                if compiled:
                    for k, substep in enumerate(substeps):
                        torques[k] = substep()
                else:
                    for a, arm_action in zip(arms, arm_actions):
                        a.control(arm_action, policy_step=False)
                step2(model, data)
                tick()
        finally:
            clocks.write_back()
            for k, a in enumerate(arms):
                del a.robot.controller.update, a.robot.controller._fast_forward
                if compiled and torques[k] is not None:
                    a.finish_step(torques[k])
        env.cur_time += env.control_timestep
        env.check_contact = self.check_contact  # LIBERO's predicates call it (shadows the method for this step)
        try:
            success = env._check_success()  # LIBERO's reward: 1 on success (times reward_scale)
            reward = (1.0 if success else 0.0) * (env.reward_scale / 1.0 if env.reward_scale is not None else 1.0)
            env.done = (env.timestep >= env.horizon) and not env.ignore_done
            env._post_process()
            if env.tracking_object_states_change:  # LIBERO's done is checked after _post_process updated them
                success = env._check_success()
        finally:
            del env.check_contact
        return env._get_observations(), reward, success, {}

    def check_contact(self, geoms_1, geoms_2=None) -> bool:
        """robosuite's ``MujocoEnv.check_contact`` (is any geom of ``geoms_1`` touching any of ``geoms_2``, or any
        geom when None), the same answer from the contact arrays: robosuite loops over the contacts in Python and
        looks up four geom names per contact, ~9 % of a PPO worker's time in LIBERO's On predicate
        (benchmarks/RESULTS.md). Names become boolean masks over geom ids, cached until the model changes."""
        model = self.env.sim.model
        if self._contact_masks is None or self._contact_masks[0] is not model:
            self._contact_masks = (model, {})
        masks = self._contact_masks[1]

        def mask(geoms):
            if geoms is None:
                return None
            key = geoms if isinstance(geoms, str) else id(geoms) if hasattr(geoms, "contact_geoms") else tuple(geoms)
            if key not in masks:  # a MujocoModel is keyed by identity: the env's objects live as long as its model
                names = [geoms] if isinstance(geoms, str) else getattr(geoms, "contact_geoms", geoms)
                m = np.zeros(model.ngeom, dtype=bool)
                for name in names:
                    if name in model._geom_name2id:
                        m[model._geom_name2id[name]] = True
                masks[key] = (m, geoms)  # (the object itself kept alive: its id cannot be reused meanwhile)
            return masks[key][0]

        data = self.env.sim.data._data
        if data.ncon == 0:
            return False
        g1, g2 = data.contact.geom1, data.contact.geom2
        m1, m2 = mask(geoms_1), mask(geoms_2)
        if m2 is None:
            return bool((m1[g1] | m1[g2]).any())
        return bool(((m1[g1] & m2[g2]) | (m2[g1] & m1[g2])).any())
