"""What the protocol episodes of a learned policy did with the object it moves: lifted, dropped, placed.

    python scripts/failure_modes.py --ckpt runs/ppo_diffusion/libero_spatial/task00__seed0/checkpoints/final.pt \\
        --suite libero_spatial --task-id 0 --episodes 26 27 31 50 --object akita_black_bowl_1

Replays protocol episodes exactly as evaluate.py runs them (episode e: init state e % 50, env seed seed + e, the
policy's noise from the generator of (seed, e)) on the fast step path, with the simulator's ground-truth poses,
and prints per episode: outcome, length, the gripper commands (closes, re-opens), the object's highest lift above
its start, the time it spent lifted, where it ended relative to its start and relative to the goal's target (the
goal atom's second argument: the plate of "on bowl plate", the basket region of "in ... basket_1_contain_region"):
its xy distance from the target's centre at the end and at its closest, its height above the target, and which
goal atoms held at the last step. LIBERO's On between two objects needs the object within 3 cm (xy) of the
target's centre and touching it, so a bowl set down on the plate 4 cm off centre is a failure. Writes the same as
JSON (--out).
"""

import argparse
import json
import os
import re
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LIFTED = 0.02  # m above the object's start height that counts as lifted
ON_RADIUS = 0.03  # LIBERO's On between two objects: centres within 3 cm (xy), and touching


def joint_facts(result, fixture: str, predicate: str) -> dict:
    """For a goal on an articulated fixture (open a drawer, turn on a stove): how far its joint got toward the range
    where LIBERO's predicate holds, as a fraction of the way from where it started to the nearest edge of that range
    (1 = the predicate's threshold), at most and at the end, and the first step it was 10 % of the way."""
    info = result.steps[0]["obs"]["articulation"][fixture]
    q = np.array([s["obs"]["articulation"][fixture]["qpos"] for s in result.steps])
    lo, hi = sorted(info["ranges"][predicate])
    edge = lo if q[0] < lo else hi if q[0] > hi else q[0]
    progress = (q - q[0]) / (edge - q[0]) if edge != q[0] else np.ones_like(q)
    moved = progress >= 0.1
    return {
        "joint_predicate": predicate,
        "joint_start": round(float(q[0]), 4),
        "joint_threshold": round(float(edge), 4),
        "joint_max_progress": round(float(progress.max()), 3),
        "joint_final_progress": round(float(progress[-1]), 3),
        "joint_first_moved_step": int(np.argmax(moved)) if moved.any() else None,
    }


def summarize(result, obj: str, target: Optional[str] = None, predicate: Optional[str] = None) -> dict:
    """Per-episode facts from the recorded steps (each holds the pre-action observation and the action); with
    ``target``, where the object ended relative to it; when ``obj`` is an articulated fixture (the goal's
    ``predicate`` acts on its joint), how far the joint got (:func:`joint_facts`)."""
    z = np.array([s["obs"]["poses"][obj][2] for s in result.steps])
    xy = np.array([s["obs"]["poses"][obj][:2] for s in result.steps])
    grip = np.array([s["action"][-1] for s in result.steps])  # +1 close, -1 open
    closes = int(np.sum((grip[1:] > 0) & (grip[:-1] <= 0)) + (grip[0] > 0))
    lift = z - z[0]
    lifted = lift > LIFTED
    drops = int(np.sum(lifted[:-1] & ~lifted[1:]))
    facts = {
        "episode": result.episode,
        "init_state": result.init_state,
        "success": bool(result.success),
        "length": result.length,
        "gripper_closes": closes,
        "first_close_step": int(np.argmax(grip > 0)) if closes else None,
        "max_lift_m": round(float(lift.max()), 4),
        "steps_lifted": int(lifted.sum()),
        "lifted_then_lowered": drops,
        # robosuite moves the fingers by the sign of the command: a flip while the object is up opens or closes them
        "grip_sign_flips_while_lifted": int(
            np.sum(lifted[1:] & lifted[:-1] & (np.sign(grip[1:]) != np.sign(grip[:-1])))
        ),
        "open_cmds_while_lifted": int(np.sum(lifted & (grip < 0))),
        "final_xy_shift_m": round(float(np.linalg.norm(xy[-1] - xy[0])), 4),
        "final_lift_m": round(float(lift[-1]), 4),
        "final_gripper_closed": bool(grip[-1] > 0),  # the last command
    }
    if target is not None:
        to_target = np.array([s["obs"]["poses"][obj][:3] - s["obs"]["poses"][target][:3] for s in result.steps])
        reach = np.linalg.norm(to_target[:, :2], axis=1)
        over = reach < ON_RADIUS
        facts.update(target=target, final_target_xy_m=round(float(reach[-1]), 4),
                     min_target_xy_m=round(float(reach.min()), 4),
                     final_above_target_m=round(float(to_target[-1, 2]), 4),
                     first_over_target_step=int(np.argmax(over)) if over.any() else None,
                     steps_over_target=int(over.sum()))  # fmt: skip
        if over.any():  # what the policy commanded there: down (< 0) but blocked, or not down at all
            dz = np.array([s["action"][2] for s in result.steps])[over]
            facts.update(z_cmd_over_target_mean=round(float(dz.mean()), 4),
                         z_cmd_over_target_down=round(float((dz < 0).mean()), 3),
                         open_cmds_over_target=int((grip[over] < 0).sum()))  # fmt: skip
    fixture = result.steps[0]["obs"].get("articulation", {}).get(obj)
    if fixture is not None and predicate in fixture["ranges"]:
        facts.update(joint_facts(result, obj, predicate))
    if "goal_atoms" in result.steps[-1]["obs"]:
        facts["final_goal_atoms"] = [bool(a) for a in result.steps[-1]["obs"]["goal_atoms"]]
    return facts


def goal_atoms(bddl_file: str) -> list[str]:
    """The goal's atoms in the order LIBERO evaluates them (the ``goal_atoms`` an episode records), each as written
    in the BDDL file: ``["Close wooden_cabinet_1_bottom_region", "In black_bowl_1 wooden_cabinet_1_bottom_region"]``."""
    with open(bddl_file) as f:
        text = f.read()
    start = text.lower().find("(:goal")
    goal = text[start + len("(:goal") :] if start >= 0 else ""
    atoms = re.findall(r"\((?!and\b)(\w+)((?:\s+\w+)+)\)", goal, flags=re.IGNORECASE)
    return [f"{predicate} {' '.join(arguments.split())}" for predicate, arguments in atoms]


def goal_arguments(bddl_file: str) -> tuple[str, str, Optional[str]]:
    """The task's first goal atom: its predicate (lower case), the object it moves (or the fixture region it acts on)
    and its target (None for a one-argument atom: open, turnon...)."""
    atoms = goal_atoms(bddl_file)
    if not atoms:
        sys.exit(f"error: no goal atom found in {bddl_file}; pass --object.")
    predicate, obj, *target = atoms[0].split()
    return predicate.lower(), obj, target[0] if target else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--policy", default="diffusion", choices=("diffusion", "gaussian"))
    parser.add_argument("--suite", required=True)
    parser.add_argument("--task-id", type=int, required=True)
    parser.add_argument("--episodes", type=int, nargs="+", required=True)
    parser.add_argument(
        "--object",
        default=None,
        help="the object the task moves, as the scene names it (default: the first the goal names)",
    )
    parser.add_argument("--action-mode", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import collect
    import libero_env as le
    import vector_env as ve

    task = le.resolve_task(args.suite, args.task_id)
    policy = collect.load_learned_policy(args.policy, args.ckpt, task, args.action_mode, seed=args.seed, cuda=False)
    venv = ve.VectorLiberoEnv(task, args.num_envs, obs_mode=policy.obs_mode, fast_step=True, privileged=True)
    try:
        objects = venv.call("poses", env_ids=[0])[0]
        predicate, goal_object, target = goal_arguments(task.bddl_file)
        if args.object is not None and args.object != goal_object:
            target = None  # another object than the goal's: no target to measure against
        args.object = args.object or goal_object
        target = target if target in objects else None
        if args.object not in objects:
            sys.exit(f"error: no object '{args.object}' in this scene; pass one of: {', '.join(sorted(objects))}.")
        results = ve.run_episodes(venv, policy, args.episodes, args.seed, policy.replan_steps, record=True,
                                  reset_policy=policy.reset)  # fmt: skip
    finally:
        venv.close()
    predicate = predicate if args.object == goal_object else None
    rows = [summarize(r, args.object, target, predicate) for r in sorted(results, key=lambda r: r.episode)]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        import run_utils  # atomic: a killed run leaves no half-written file that a resumed study would take as done

        run_utils.write_json(args.out, {"ckpt": args.ckpt, "task": f"{task.suite} {task.local_id}",
                                        "object": args.object, "target": target, "action_mode": args.action_mode,
                                        "seed": args.seed, "goal_atoms": goal_atoms(task.bddl_file),
                                        "episodes": rows})  # fmt: skip


if __name__ == "__main__":
    main()
