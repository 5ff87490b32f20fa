"""osc_controller.py — robosuite's arm controller for LIBERO as compiled arithmetic: fast_step.py's controller.

LIBERO drives the Panda with robosuite's operational space controller (``OSC_POSE``, fixed impedance, no
interpolator) and the Panda gripper's ramp. Here they are plain functions on arrays, one substep at a time:
:func:`osc_goal` (the pose goal from a delta action), :func:`osc_substep` (torques from the state, mass matrix and
Jacobians; Cholesky-based inverses where robosuite uses LAPACK's ``inv`` and SVD ``pinv``: the same matrices, other
rounding, ~1e-12) and :func:`osc_substeps` (the substeps after the first of an env step, calling MuJoCo's C
functions directly). The Python functions are the readable reference; :func:`compiled` returns their numba builds
(robosuite's own dependency), which run the same arithmetic. tests/test_fast_step.py checks both against
robosuite's ``run_controller``.
"""

from __future__ import annotations

import types
from functools import cache

import numpy as np

NULLSPACE_KP = 10.0  # robosuite's nullspace_torques default gain (joint_kp), and its kv = 2 sqrt(kp)


# ----------------------------------------------------------------------------------------------------------------
# The compiled controller: robosuite's OSC_POSE + PandaGripper for one substep, in one routine
# ----------------------------------------------------------------------------------------------------------------
def _matmul(a, b, transpose_b=False):
    """``a @ b`` (or ``a @ b.T``) as plain loops: for matrices this small (at most 7 x 7) a BLAS call costs more than
    the arithmetic."""
    rows, inner = a.shape
    cols = b.shape[0] if transpose_b else b.shape[1]
    out = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            s = 0.0
            for k in range(inner):
                s += a[i, k] * (b[j, k] if transpose_b else b[k, j])
            out[i, j] = s
    return out


def _matvec(a, x):
    """``a @ x`` as plain loops (see :func:`_matmul`)."""
    out = np.zeros(a.shape[0])
    for i in range(a.shape[0]):
        for k in range(a.shape[1]):
            out[i] += a[i, k] * x[k]
    return out


def _spd_inverse(a):
    """Inverse of a symmetric positive definite matrix by Cholesky (small matrices; no LAPACK call overhead)."""
    n = a.shape[0]
    low = np.zeros((n, n))
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= low[j, k] * low[j, k]
        low[j, j] = np.sqrt(s)
        for i in range(j + 1, n):
            s = a[i, j]
            for k in range(j):
                s -= low[i, k] * low[j, k]
            low[i, j] = s / low[j, j]
    inv_low = np.zeros((n, n))  # L^-1 by forward substitution, then A^-1 = L^-T L^-1
    for j in range(n):
        inv_low[j, j] = 1.0 / low[j, j]
        for i in range(j + 1, n):
            s = 0.0
            for k in range(j, i):
                s -= low[i, k] * inv_low[k, j]
            inv_low[i, j] = s / low[i, i]
    return _matmul(inv_low.T.copy(), inv_low)


def _lambda(jac, mass_inv):
    """The operational-space inertia (J M^-1 J^T)^-1 of the rows ``jac``."""
    return _spd_inverse(_matmul(_matmul(jac, mass_inv), jac, transpose_b=True))


def quat2mat(quaternion):
    """robosuite's ``transform_utils.quat2mat`` (it rounds the quaternion to float32 first); the compiled kernel
    calls robosuite's own compiled function."""
    from robosuite.utils.transform_utils import quat2mat as robosuite_quat2mat

    return robosuite_quat2mat(quaternion)


def osc_goal(action, site_xpos, site_xmat, site, scaling, goal):
    """robosuite's ``OperationalSpaceController.set_goal`` for LIBERO's delta pose actions, once per env step: the
    6-D action clipped and scaled (``scale_action``; ``scaling`` rows: input min, input max, input centre, scale,
    output centre), the goal position the end effector's plus the position delta, and the goal orientation the end
    effector's rotated by the axis-angle delta, unless that delta is exactly zero (the previous goal orientation
    stays). Writes ``goal`` (12: position, row-major orientation)."""
    delta = np.empty(6)
    for i in range(6):
        delta[i] = (min(max(action[i], scaling[0, i]), scaling[1, i]) - scaling[2, i]) * scaling[3, i] + scaling[4, i]
    if delta[3] != 0.0 or delta[4] != 0.0 or delta[5] != 0.0:
        angle = np.sqrt(delta[3] * delta[3] + delta[4] * delta[4] + delta[5] * delta[5])
        quat = np.array([0.0, 0.0, 0.0, 1.0])  # robosuite's axisangle2quat
        if angle != 0.0:
            quat[3] = np.cos(angle / 2.0)
            for i in range(3):
                quat[i] = delta[3 + i] / angle * np.sin(angle / 2.0)
        rotation = quat2mat(quat)
        current = site_xmat[site].reshape(3, 3)
        for i in range(3):
            for j in range(3):
                goal[3 + 3 * i + j] = (
                    rotation[i, 0] * current[0, j] + rotation[i, 1] * current[1, j] + rotation[i, 2] * current[2, j]
                )
    for i in range(3):
        goal[i] = site_xpos[site, i] + delta[i]


def osc_substep(qpos, qvel, qfrc_bias, site_xpos, site_xmat, jacp, jacr, full_mass, ctrl, goal, gains, joints,
                ids, gripper, uncouple):  # fmt: skip
    """One substep of robosuite's ``OSC_POSE`` controller and the Panda gripper: writes the actuator controls.

    The same equations as robosuite's ``OperationalSpaceController.run_controller`` (Khatib's OSC with decoupled
    position/orientation, gravity compensation and nullspace joint-posture torques), ``SingleArm.control``'s torque
    clip, and ``PandaGripper.format_action``'s ramp, on MuJoCo's arrays after ``mj_step1``:

    * ``jacp, jacr`` (3 x nv): the end-effector site's Jacobian (``mj_jacSite``); ``full_mass`` (nv x nv): ``mj_fullM``;
    * ``goal`` (12): goal position (3) and row-major goal orientation (9), set per env step by ``set_goal``;
    * ``gains`` (2, 6): kp and kd; ``joints`` (3, n): the nullspace posture (initial joints) and the torque limits;
    * ``ids`` (4, n) int: the arm's qpos and qvel indexes, its actuators, then (site id, gripper actuator ids...);
    * ``gripper`` (4, g): the ramped command (updated in place), its per-substep increment, ctrl bias and weight.

    Returns the clipped arm torques (robosuite's ``robot.torques``).
    """
    qpos_ids, dof_ids, act_ids = ids[0], ids[1], ids[2]
    site, grip_ids = ids[3, 0], ids[3, 1 : 1 + gripper.shape[1]]
    n = dof_ids.shape[0]
    jac = np.empty((6, n))  # J_full = [J_pos; J_ori] on the arm's dofs
    mass = np.empty((n, n))
    joint_pos, joint_vel = np.empty(n), np.empty(n)
    for c in range(n):
        d = dof_ids[c]
        for r in range(3):
            jac[r, c], jac[3 + r, c] = jacp[r, d], jacr[r, d]
        for r in range(n):
            mass[r, c] = full_mass[dof_ids[r], d]
        joint_pos[c], joint_vel[c] = qpos[qpos_ids[c]], qvel[d]
    ee_vel = np.zeros(6)  # (J over all dofs) qvel, as robosuite computes the end-effector velocity
    for r in range(3):
        for d in range(qvel.shape[0]):
            ee_vel[r] += jacp[r, d] * qvel[d]
            ee_vel[3 + r] += jacr[r, d] * qvel[d]
    # desired force and torque: kp * error - kd * velocity; orientation error as robosuite's orientation_error
    wrench_goal = np.empty(6)
    cur, des = site_xmat[site].reshape(3, 3), goal[3:].reshape(3, 3)
    ori_error = 0.5 * (np.cross(cur[:, 0], des[:, 0]) + np.cross(cur[:, 1], des[:, 1]) + np.cross(cur[:, 2], des[:, 2]))
    for r in range(3):
        wrench_goal[r] = (goal[r] - site_xpos[site, r]) * gains[0, r] + (-ee_vel[r]) * gains[1, r]
        wrench_goal[3 + r] = ori_error[r] * gains[0, 3 + r] + (-ee_vel[3 + r]) * gains[1, 3 + r]
    # operational space matrices (robosuite's opspace_matrices): Lambda = (J M^-1 J^T)^-1, nullspace I - Jbar J
    mass_inv = _spd_inverse(mass)
    lambda_full = _lambda(jac, mass_inv)
    if uncouple:
        wrench = np.concatenate((_matvec(_lambda(jac[:3].copy(), mass_inv), wrench_goal[:3]),
                                 _matvec(_lambda(jac[3:].copy(), mass_inv), wrench_goal[3:])))  # fmt: skip
    else:
        wrench = _matvec(lambda_full, wrench_goal)
    jbar = _matmul(_matmul(mass_inv, jac, transpose_b=True), lambda_full)
    nullspace = np.eye(n) - _matmul(jbar, jac)
    kv = np.sqrt(NULLSPACE_KP) * 2.0
    posture = _matvec(mass, NULLSPACE_KP * (joints[0] - joint_pos) - kv * joint_vel)
    torques = np.zeros(n)  # J^T wrench + gravity compensation + N^T posture
    for c in range(n):
        s = qfrc_bias[dof_ids[c]]
        for r in range(6):
            s += jac[r, c] * wrench[r]
        for r in range(n):
            s += nullspace[r, c] * posture[r]
        torques[c] = s
    for c in range(n):
        torques[c] = min(max(torques[c], joints[1, c]), joints[2, c])
        ctrl[act_ids[c]] = torques[c]
    for g in range(gripper.shape[1]):  # PandaGripper.format_action's ramp, then the actuator's ctrl range
        gripper[0, g] = min(max(gripper[0, g] + gripper[1, g], -1.0), 1.0)
        ctrl[grip_ids[g]] = gripper[2, g] + gripper[3, g] * gripper[0, g]
    return torques


def osc_substeps(count, mj, model, data, solves, site, jacp, jacr, full_mass, qM, qpos, qvel, qfrc_bias, site_xpos,
                 site_xmat, ctrl, goal, gains, joints, ids, gripper, uncouple):  # fmt: skip
    """``count`` substeps of the ``split`` physics with the controller (:func:`osc_substep`) in between, for an arm
    whose goal is set: the substeps that follow the first of an env step, in one call. ``mj``: MuJoCo's C functions
    (:func:`mujoco_c_functions`), called with the addresses of the ``mjModel`` and ``mjData`` (``model``, ``data``),
    in the order the Python loop of :class:`FastStep` calls them; ``solves``: the constraint solves before the
    controller's (2 for ``split``, 0 for ``split1``); the arrays are views of ``data`` and the controller's inputs,
    as for :func:`osc_substep`. Returns the last substep's torques."""
    step1, actuation, acceleration, constraint, jac_site, full_m, step2 = mj
    torques = np.zeros(0)
    for _ in range(count):
        step1(model, data)
        if solves > 0:
            actuation(model, data)  # the solves' inputs: the same for each, as neither ctrl nor the state changes
            acceleration(model, data)
            for _ in range(solves):
                constraint(model, data)
        jac_site(model, data, jacp.ctypes.data, jacr.ctypes.data, site)
        full_m(model, full_mass.ctypes.data, qM.ctypes.data)
        torques = osc_substep(qpos, qvel, qfrc_bias, site_xpos, site_xmat, jacp, jacr, full_mass, ctrl, goal, gains,
                              joints, ids, gripper, uncouple)  # fmt: skip
        step2(model, data)
    return torques


KERNEL = (
    "_matmul",
    "_matvec",
    "_spd_inverse",
    "_lambda",
    "osc_goal",
    "osc_substep",
    "osc_substeps",
)  # compiled together


def compiled(name: str = "osc_substep"):
    """A kernel function (:data:`KERNEL`) compiled by numba (robosuite's own dependency; cached on disk after the
    first build). The Python functions above stay the readable reference and run the same arithmetic uncompiled."""
    return _compiled_kernel()[name]


@cache
def _compiled_kernel() -> dict:
    import numba
    from robosuite.utils.transform_utils import quat2mat as robosuite_quat2mat

    namespace = dict(globals())  # the kernel's callees resolve to their compiled versions
    is_compiled = isinstance(robosuite_quat2mat, numba.core.registry.CPUDispatcher)  # robosuite's ENABLE_NUMBA
    namespace["quat2mat"] = robosuite_quat2mat if is_compiled else numba.njit(robosuite_quat2mat)
    for fn_name in KERNEL:
        fn = globals()[fn_name]
        code = types.FunctionType(fn.__code__, namespace, fn_name, fn.__defaults__)
        namespace[fn_name] = numba.njit(cache=True)(code)
    return namespace


def compiled_osc_substep():
    return compiled("osc_substep")


MUJOCO_C_FUNCTIONS = (  # what osc_substeps calls, with its argument types: "p" a pointer, "i" an int
    ("mj_step1", "pp"), ("mj_fwdActuation", "pp"), ("mj_fwdAcceleration", "pp"), ("mj_fwdConstraint", "pp"),
    ("mj_jacSite", "ppppi"), ("mj_fullM", "ppp"), ("mj_step2", "pp"),
)  # fmt: skip


@cache
def mujoco_c_functions() -> tuple | None:
    """MuJoCo's C functions that :func:`osc_substeps` calls, from the shared library the ``mujoco`` package loaded
    (ctypes; pointers passed as addresses), or None where that library cannot be found or is another version (the
    step then stays in Python, with the same results)."""
    import ctypes
    import glob
    import os

    import mujoco

    folder = os.path.dirname(mujoco.__file__)
    paths = sorted(glob.glob(os.path.join(folder, "libmujoco.so*")) + glob.glob(os.path.join(folder, "*mujoco*.dylib")))
    paths += glob.glob(os.path.join(folder, "mujoco.dll"))
    if not paths:
        return None
    try:
        lib = ctypes.CDLL(paths[0])
        lib.mj_version.restype = ctypes.c_int
        if lib.mj_version() != mujoco.mj_version():
            return None
        types_ = {"p": ctypes.c_size_t, "i": ctypes.c_int}  # a pointer is passed as a size_t (the same ABI)
        functions = []
        for name, args in MUJOCO_C_FUNCTIONS:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [types_[a] for a in args], None
            functions.append(fn)
    except (OSError, AttributeError):
        return None
    return tuple(functions)
