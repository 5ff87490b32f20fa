"""fast_step.py: the fast step path against robosuite's own loop, its compiled arm controller against robosuite's
``run_controller``, and its observable clocks against robosuite's ``Observable.update``."""

import numpy as np
import pytest

import fast_step as fs
import libero_env as le
import osc_controller as osc

# ---------------------------------------------------------------------------------------------- kernel pieces


def random_spd(rng, n):
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


@pytest.mark.parametrize("compiled", [False, True])
def test_small_matrix_routines_against_numpy(compiled):
    """The kernel's loops (the readable Python functions, and the numba build of the same code) against NumPy/LAPACK,
    on matrices with condition numbers up to ~1e4 (a Panda arm's mass matrix is ~1e3)."""
    matmul, spd_inverse = osc._matmul, osc._spd_inverse
    if compiled:
        matmul, spd_inverse = osc.compiled("_matmul"), osc.compiled("_spd_inverse")
    rng = np.random.default_rng(0)
    for n in (3, 6, 7):
        a, b = rng.normal(size=(n, 7)), rng.normal(size=(7, 5))
        np.testing.assert_allclose(matmul(a, b), a @ b, rtol=0, atol=1e-13)
        np.testing.assert_allclose(matmul(a, b.T.copy(), True), a @ b, rtol=0, atol=1e-13)
        spd = random_spd(rng, n)
        inverse = spd_inverse(spd)
        assert np.abs(inverse - np.linalg.inv(spd)).max() < 1e-12 * np.linalg.cond(spd) * np.abs(inverse).max()
        np.testing.assert_allclose(inverse @ spd, np.eye(n), rtol=0, atol=1e-9)


def test_bad_physics_or_controller_is_one_clear_sentence():
    with pytest.raises(ValueError, match=r"physics must be one of \('split', 'split1', 'robosuite'\), got 'fast'"):
        fs.FastStep(object(), physics="fast")
    with pytest.raises(ValueError, match=r"controller must be one of \('compiled', 'robosuite'\), got 'numba'"):
        fs.FastStep(object(), controller="numba")


# ----------------------------------------------------------------------------------------- observable clocks


def make_observables(calls, delays):
    """robosuite Observables at two sampling rates (one of them every substep's multiple), one with a random delay:
    each sensor counts its calls and returns the count, plus the value an earlier sensor put in the cache."""
    from robosuite.utils.observables import Observable, sensor

    def make_sensor(name, reads=None):
        @sensor(modality="test")
        def read(obs_cache):  # the first call is Observable's validity check
            calls[name] = calls.get(name, 0) + 1
            return np.array([calls[name], obs_cache.get(reads, np.zeros(2))[0] if reads else 0.0])

        return read

    rng = np.random.default_rng(0)
    specs = [("a", None, 20, None), ("b", "a", 20, None), ("c", None, 10, None), ("d", "c", 20, None),
             ("e", None, 20, lambda: delays.append(rng.uniform(0, 0.01)) or delays[-1])]  # fmt: skip
    return [Observable(n, make_sensor(n, r), sampling_rate=hz, delayer=dl) for n, r, hz, dl in specs]


def test_observable_clocks_sample_and_time_like_robosuites_update():
    """Five env steps of 25 substeps: robosuite's loop (``update`` on every observable every substep) against
    :class:`fast_step._ObservableClocks` (updates only where one samples or wraps its timer): the same sensor calls,
    in the same order (a sensor reading an earlier one's cache entry), the same values, timers and flags."""
    le.configure_rendering()
    dt = 0.002
    runs = []
    for clocks in (False, True):
        calls, delays, cache = {}, [], {}
        observables = make_observables(calls, delays)
        for _ in range(5):
            tick = fs._ObservableClocks(observables, dt, cache) if clocks else None
            for _ in range(25):
                if clocks:
                    tick.tick()
                else:
                    for o in observables:
                        o.update(timestep=dt, obs_cache=cache)
            if clocks:
                tick.write_back()
        state = [(o.name, o._time_since_last_sample, o._sampled, np.array(o.obs).tolist()) for o in observables]
        runs.append((dict(calls), state, {k: np.array(v).tolist() for k, v in cache.items()}, len(delays)))
    assert runs[0] == runs[1]
    assert runs[0][0]["a"] == 1 + 5 and runs[0][0]["c"] == 1 + 3  # 20 Hz and 10 Hz over 0.25 s: two clocks
    assert runs[0][3] >= 5  # the random delay was drawn at each of its samples


def test_observable_clocks_know_which_ticks_only_advance_timers():
    """``quiet(k)`` (how many of the next ticks only advance timers, which lets the compiled loop run the physics of
    those substeps before their ticks) against the ticks themselves: none of the next ``quiet`` ticks calls an
    observable's ``update``, and the tick after them does; two clocks and a random sampling delay, 150 substeps."""
    le.configure_rendering()
    calls, delays, cache = {}, [], {}
    observables = make_observables(calls, delays)
    updates = []
    for o in observables:  # count robosuite's update calls, sampling or not
        o.update = (lambda original: lambda **kw: updates.append(1) or original(**kw))(o.update)
    clocks = fs._ObservableClocks(observables, 0.002, cache)
    checked = 0
    for _ in range(150):
        quiet = clocks.quiet(30)
        for _ in range(quiet):
            before = len(updates)
            clocks.tick()
            assert len(updates) == before, "a tick that quiet() counted as timer-only called update"
            checked += 1
        if quiet < 30:
            before = len(updates)
            clocks.tick()
            assert len(updates) > before, "quiet() stopped before a tick that only advanced timers"
    assert checked > 1000 and len(delays) >= 5  # mostly timer-only ticks; the delayed clock sampled


# ------------------------------------------------------------------------------------- against robosuite (sim)

FAST_STEP_TASKS = [
    ("libero_object", 0),
    ("libero_spatial", 0),
    ("libero_goal", 0),
    ("libero_goal", 7),
    ("libero_10", 0),
]  # goal 0: the cabinet's drawer joints; goal 7: a stove whose state LIBERO tracks


def random_actions(steps, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-0.5, 0.5, (steps, 6)), np.sign(rng.uniform(-1, 1, (steps, 1)))], 1)


def stepped_side_by_side(task, physics, steps=320, chunk=8):
    """Stock and fast envs from the same init state with the same random actions: per-chunk observations."""
    actions = random_actions(steps)
    runs = []
    for fast in (False, True):
        env = le.make_env(task, obs_mode="state", fast_step=fast, physics=physics)
        obs = [env.reset(3, 7, render=False)]
        for c in range(0, steps, chunk):
            r = env.step_chunk(actions[c : c + chunk], render=False)
            obs.append({**r.obs, "reward": r.reward, "done": r.done, "t": r.t})
        if fast:
            assert env._fast.compiled == (physics != "robosuite")  # the default controller ran where it applies
        env.close()
        runs.append(obs)
    return runs


@pytest.mark.sim
@pytest.mark.parametrize("suite,local_id", FAST_STEP_TASKS)
def test_fast_step_keeps_robosuites_dynamics(suite, local_id):
    """The fast step path against robosuite's own loop, 320 env steps in chunks of 8, on five tasks of four suites.

    * With robosuite's physics order (``physics="robosuite"``, robosuite's controller) every other change is
      bit-identical: the same sim_state, observations (robosuite samples them on the first substep of a step, and so
      do we), rewards.
    * The default (``split`` physics: one position/velocity pass and the same three constraint solves per substep;
      the compiled controller) agrees to ~1e-12: measured max |delta| 1.7e-14 to 4.5e-12 (LIBERO-Spatial 0) over the
      five tasks (2026-12-02).
      Bound: 1e-9.
    """
    task = le.resolve_task(suite, local_id)
    stock, exact = stepped_side_by_side(task, "robosuite")
    for a, b in zip(stock, exact):
        assert a.keys() == b.keys()
        for key in a:  # the same computations on the same inputs in one process: exact
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    stock, fast = stepped_side_by_side(task, "split")
    for a, b in zip(stock, fast):
        deviation = max(np.abs(np.asarray(a[k], float) - np.asarray(b[k], float)).max() for k in a)
        assert deviation < 1e-9, f"{suite} {local_id}: fast path deviation {deviation:.2e}"
    assert [(a["reward"], a["done"], a["t"]) for a in stock[1:]] == [(b["reward"], b["done"], b["t"]) for b in fast[1:]]


@pytest.mark.sim
@pytest.mark.parametrize("suite,local_id", [("libero_object", 0), ("libero_goal", 7)])
def test_compiled_substep_loop_matches_the_python_loop(suite, local_id):
    """The substeps after the first of each env step as one compiled call (:func:`osc_controller.osc_substeps`, MuJoCo's
    C functions called directly) against the same step with the substep loop in Python, 160 steps: the same states
    and observations, bit for bit. Exact, as the two paths run the same MuJoCo functions and the same numba kernel
    (no fast-math: LLVM keeps IEEE rounding when it inlines it) in the same order, in one process. A tolerance would
    hide a wrong call sequence: one constraint solve fewer per substep moves this rollout by only 3e-13."""
    assert osc.mujoco_c_functions() is not None, "MuJoCo's shared library was not found next to the mujoco package"
    task = le.resolve_task(suite, local_id)
    actions = random_actions(160, seed=2)
    runs = []
    for loop in (True, False):
        env = le.make_env(task, obs_mode="state", fast_step=True)
        env._fast.compiled_loop = loop
        obs = [env.reset(2, 4, render=False)]
        for c in range(0, len(actions), 8):
            obs.append(env.step_chunk(actions[c : c + 8], render=False).obs)
        env.close()
        runs.append(obs)
    for a, b in zip(*runs):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.sim
@pytest.mark.parametrize("suite,local_id", [("libero_object", 0), ("libero_goal", 0)])
def test_compiled_controller_matches_robosuites_set_goal_and_run_controller(suite, local_id):
    """On 40 states recorded along a random-action rollout (every 4th action without rotation: the goal orientation
    stays): robosuite's ``set_goal`` against :func:`osc_controller.osc_goal` (compiled and Python), then
    ``run_controller`` (+ the torque clip of ``SingleArm.control``) against the compiled kernel and its Python
    reference, with the position/orientation decoupling LIBERO uses and without it. Bounds: goal 1e-12, torques
    1e-10 (torques up to ~80 N m)."""
    import mujoco

    task = le.resolve_task(suite, local_id)
    env = le.make_env(task, obs_mode="state", fast_step=True)
    kernel, goal_kernel = osc.compiled_osc_substep(), osc.compiled("osc_goal")
    worst, worst_goal, largest = 0.0, 0.0, 0.0
    actions = random_actions(40, seed=1)
    actions[::4, 3:6] = 0.0
    try:
        env.reset(5, 5, render=False)
        sim = env.env.sim
        model, data = sim.model._model, sim.data._data
        arm = env._fast.arms()[0]
        controller = arm.robot.controller
        site = arm.ids[3, 0]
        for action in actions:
            env.step_chunk(action[None], render=False)
            mujoco.mj_forward(model, data)
            for uncouple in (True, False):
                ctrl, gripper = data.ctrl.copy(), arm.robot.gripper.current_action.copy()
                previous = np.concatenate([controller.goal_pos, np.asarray(controller.goal_ori).reshape(-1)])
                controller.uncoupling = arm.uncouple = uncouple
                controller.update(force=True)
                controller.set_goal(action[:6])
                reference = np.clip(controller.run_controller(), arm.torque_low, arm.torque_high)
                for goal_fn in (goal_kernel, osc.osc_goal):
                    goal = previous.copy()
                    goal_fn(action, data.site_xpos, data.site_xmat, site, arm.scaling, goal)
                    expected = np.concatenate([controller.goal_pos, np.asarray(controller.goal_ori).reshape(-1)])
                    worst_goal = max(worst_goal, np.abs(goal - expected).max())
                arm.pack(action)
                gripper_state = arm.gripper.copy()
                compiled = arm.bind(kernel, model, data, mujoco)()  # also fills jacp, jacr, full_mass
                python = osc.osc_substep(data.qpos, data.qvel, data.qfrc_bias, data.site_xpos, data.site_xmat, arm.jacp,
                                        arm.jacr, arm.full_mass, data.ctrl, arm.goal, arm.gains, arm.joints, arm.ids,
                                        gripper_state, uncouple)  # fmt: skip
                worst = max(worst, np.abs(compiled - reference).max())
                largest = max(largest, np.abs(reference).max())
                np.testing.assert_allclose(python, compiled, rtol=0, atol=1e-12)
                assert compiled.shape == (7,)
                data.ctrl[:] = ctrl  # leave the episode as it was
                arm.robot.gripper.current_action = gripper
            controller.uncoupling = arm.uncouple = True
            controller.new_update = True
    finally:
        env.close()
    assert largest > 5.0  # the rollout drove the arm: torques well above gravity compensation's noise
    assert worst_goal < 1e-12, f"goals differ from robosuite's set_goal by {worst_goal:.2e}"
    assert worst < 1e-10, f"compiled torques differ from robosuite's by {worst:.2e}"


@pytest.mark.sim
def test_the_fast_contact_check_answers_as_robosuites_on_every_pair():
    """FastStep.check_contact against robosuite's check_contact (the loop over the contacts LIBERO's On predicate
    calls), for every pair of objects and fixtures and each against anything, at every step of scripted episodes that
    grasp, carry and place (contacts made and broken: LIBERO-Spatial 0 bowl on plate, LIBERO-Goal 8 too)."""
    import scripted_expert

    for suite, local_id in (("libero_spatial", 0), ("libero_goal", 8)):
        task = le.resolve_task(suite, local_id)
        env = le.make_env(task, obs_mode="state", fast_step=True, privileged=True)
        policy = scripted_expert.ScriptedPolicy(scripted_expert.plan(task), env.scene(), 0.0, seed=0)
        models = [env.env.get_object(n) for n in list(env.env.objects_dict) + list(env.env.fixtures_dict)]
        pairs = [(a, b) for a in models for b in [*models, None] if a is not b]
        pairs += [("gripper0_finger1_collision", models[0]), (["table_collision", "gripper0_finger2_collision"], None)]
        touching, checked = 0, 0
        obs = env.reset(le.SAMPLED, seed=3)
        policy.reset([0], [0])
        for _ in range(180):
            for a, b in pairs:
                expected = env.env.__class__.check_contact(env.env, a, b)
                assert env._fast.check_contact(a, b) == expected, (a, b)
                touching += expected
                checked += 1
            out = env.step_chunk(policy(le.stack_obs([obs]), [0])[0][:1], render=False)
            obs = out.obs
            if out.done:
                break
        assert touching > 0.05 * checked and touching < checked  # both answers seen, many times
        env.close()
