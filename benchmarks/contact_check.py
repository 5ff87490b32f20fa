"""LIBERO's success predicates on the fast step path: robosuite's check_contact (a Python loop over the contacts, four
name lookups each) against FastStep.check_contact (masks over geom ids), in whole env steps of scripted episodes.

    python benchmarks/contact_check.py [--task libero_spatial:0] [--rounds 3]

The scripted expert's episode (sampled layout of seed 3) is recorded once, then its actions are replayed from the same
layout as a PPO worker steps (no privileged state), with each check alternately, A B A B; the script prints env steps
per second of each and their ratio per round (the answers are identical: tests/test_fast_step.py).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast_step  # noqa: E402
import libero_env as le  # noqa: E402
import scripted_expert  # noqa: E402


def scripted_actions(task: le.Task, steps: int) -> list:
    """The scripted expert's actions of one episode (sampled layout of seed 3; at most ``steps``)."""
    env = le.make_env(task, obs_mode="state", fast_step=True, privileged=True)
    policy = scripted_expert.ScriptedPolicy(scripted_expert.plan(task), env.scene(), 0.0, seed=0)
    obs, actions = env.reset(le.SAMPLED, seed=3), []
    policy.reset([0], [0])
    while len(actions) < steps:
        actions.append(policy(le.stack_obs([obs]), [0])[0][:1])
        out = env.step_chunk(actions[-1], render=False)
        obs = out.obs
        if out.done:
            break
    env.close()
    return actions


def episode_rate(env, actions: list, robosuite_check: bool) -> float:
    """Env steps per second replaying ``actions`` from the same layout (as a PPO worker steps: no privileged state)."""
    original = fast_step.FastStep.check_contact
    if robosuite_check:  # the fast step's shadow calls robosuite's own method instead
        fast_step.FastStep.check_contact = lambda self, a, b=None: type(self.env).check_contact(self.env, a, b)
    try:
        env.reset(le.SAMPLED, seed=3, render=False)
        start = time.perf_counter()
        for action in actions:
            env.step_chunk(action, render=False)
        return len(actions) / (time.perf_counter() - start)
    finally:
        fast_step.FastStep.check_contact = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="libero_spatial:0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=220, help="env steps of the episode (at most)")
    args = parser.parse_args()
    suite, local_id = args.task.split(":")
    task = le.resolve_task(suite, int(local_id))
    actions = scripted_actions(task, args.steps)
    env = le.make_env(task, obs_mode="state", fast_step=True)
    episode_rate(env, actions[:20], False)  # warm-up: numba, the masks, the sampled layouts' reference
    print(f"{args.task}: the scripted expert's episode, {len(actions)} env steps replayed per measurement")
    for r in range(args.rounds):
        old, new = episode_rate(env, actions, True), episode_rate(env, actions, False)
        print(f"round {r}: robosuite's check_contact {old:.1f} env-steps/s, FastStep.check_contact {new:.1f} "
              f"env-steps/s: {new / old:.2f}x", flush=True)  # fmt: skip
    env.close()


if __name__ == "__main__":
    main()
