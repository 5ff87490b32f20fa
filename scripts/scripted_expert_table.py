"""Success of the scripted expert over the 50 fixed init states of every LIBERO task (state mode, nothing saved),
and docs/scripted_expert_table.md from the results. Resumable: one JSON per task under --out, written atomically;
a task with a result is skipped unless it was measured with another version of the expert (--rerun-stale).

    python scripts/scripted_expert_table.py                          # every task, then the table
    python scripts/scripted_expert_table.py --tasks libero_goal:7 libero_10:0
    python scripts/scripted_expert_table.py --table-only             # rewrite the table from the results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import inspect
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import libero_env as le  # noqa: E402
import scripted_expert as se  # noqa: E402
import vector_env as ve  # noqa: E402


def expert_version(task: le.Task) -> str:
    """Hash of the code that decides this task's episodes: the planner, the primitives its plan uses and the
    simulator wrapper (so that a new primitive does not make every other row stale)."""
    parts = [se.parse_goal, se.primitive_for, se.order_atoms, se.plan, se.Step, se.drawer_is_open, se.ScriptedExpert,
             se.ScriptedPolicy, se.Primitive]  # fmt: skip
    try:
        used = {s.primitive for s in se.plan(task)}
    except se.UnsupportedTask:
        used = set()
    primitives = {"pick_place": [se.PickPlace, se.Push], "drawer": [se.Drawer], "knob": [se.Knob], "door": [se.Door]}
    parts += sorted({c for u in used for c in primitives[u]}, key=lambda c: c.__name__)
    h = hashlib.sha1("".join(inspect.getsource(p) for p in parts).encode())
    with open(os.path.join(ROOT, "libero_env.py"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:10]


def result_path(out: str, task: le.Task) -> str:
    return os.path.join(out, f"{task.suite}_task{task.local_id:02d}.json")


def measure(task: le.Task, num_envs: int, num_episodes: int) -> dict:
    """50 protocol episodes (init state e, seed e) of the expert; per episode success, length and what failed."""
    try:
        steps = se.plan(task)
    except se.UnsupportedTask as e:
        return {"attempted": False, "reason": str(e).split(": ", 1)[1].split(". Run")[0]}
    episodes = []
    with ve.VectorLiberoEnv(task, num_envs, obs_mode="state", privileged=True, fast_step=True) as venv:
        policy = se.ScriptedPolicy(steps, venv.call("scene", env_ids=[0])[0], 0.0, seed=0)

        def on_end(result: ve.EpisodeResult) -> None:
            expert = policy.by_episode.pop(result.episode)
            stuck = (
                None
                if result.success
                else f"{expert.step.atom if expert.step else '-'} "
                + (f"({expert.current.phase})" if expert.current is not None else "(attempts spent)")
            )
            attempts = len(expert.log) + (expert.current is not None)
            episodes.append({"episode": result.episode, "success": result.success, "length": result.length,
                             "attempts": attempts, "failed_at": stuck})  # fmt: skip

        ve.run_episodes(venv, policy, range(num_episodes), seed=0, replan_steps=1, render=False, on_episode_end=on_end,
                        reset_policy=policy.reset)  # fmt: skip
    episodes.sort(key=lambda r: r["episode"])
    return {"attempted": True, "plan": [f"{s.atom}:{s.primitive}" for s in steps], "episodes": episodes,
            "successes": sum(r["success"] for r in episodes)}  # fmt: skip


# Why a task stays below 80 %, where a debugging session found out (episodes replayed with the expert's phase log,
# contacts and fixture geometry); shown in the table before the measured failure phases.
BOOK_FRONT = (
    "the front compartment is 5.6 x 12.4 cm and the book's footprint 3 x 11 cm; the book is carried with the yaw it "
    "was picked up with, its 11 cm side along x across the compartment, and rests on the caddy's walls (replayed: "
    "LIBERO-90 81, init state 0); it needs turning to the compartment's long side before lowering"
)
ANALYSED = {
    "libero_goal:3": "in most failed episodes the bowl stands where the opened top drawer sticks out, its bottom "
    "10 cm above the bowl's rim: the hand (10 cm tall above the grip) does not fit between for a top-down rim grasp, "
    "and approaching over the drawer's front sweeps it half shut, after which the bowl does not fit in; needs a side "
    "approach under the drawer",
    "libero_90:6": "the hand, turned horizontal in front of the bottom drawer's handle with its fingers closing "
    "vertically, spans about 21 cm and meets the table before the fingers reach the handle; needs another grasp of "
    "the handle (from above)",
    "libero_90:73": BOOK_FRONT,
    "libero_90:78": BOOK_FRONT,
    "libero_90:81": BOOK_FRONT,
    "libero_90:32": "the ketchup is put into the drawer standing, as it was picked up; its origin is then 1.6 cm "
    "above the drawer region's top and LIBERO's In tests the origin (replayed: init state 0); it would have to be "
    "laid down",
    "libero_goal:5": "the plate is pushed from behind and the cabinet stands about 1 cm behind it: the hand (21 cm "
    "along the fingers, 7 cm across) does not fit there; pushing from inside the plate rides over its 1 cm rim "
    "(tried)",
}


def write_json(path: str, data: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def write_table(out: str, path: str) -> None:
    rows, count, attempted, dates = [], 0, 0, set()
    for task in le.task_registry():
        p = result_path(out, task)
        r = json.load(open(p)) if os.path.exists(p) else None
        if r is None:
            cell, note = "not measured yet", ""
        elif not r["attempted"]:
            cell, note = "not attempted", r["reason"]
        else:
            attempted += 1
            dates.add(r["date"])
            k = r["successes"]
            n = len(r["episodes"])
            count += n == le.NUM_INIT_STATES and k >= se.LISTED_RATE * n
            cell = f"{k}/{n}"
            modes = collections.Counter(e["failed_at"] for e in r["episodes"] if not e["success"])
            note = "; ".join(f"{n}x {m}" for m, n in modes.most_common(2))
            why = ANALYSED.get(f"{task.suite}:{task.local_id}")
            note = f"{why}. Stopped at: {note}" if why and k < se.LISTED_RATE * n else note
            if r["version"] != expert_version(task):
                cell += " †"
        rows.append(f"| {task.suite} | {task.local_id} | {task.instruction} | {cell} | {note} |")
    stamp = max(dates, default="no measurements")  # the latest measurement's date: the table regenerates identically
    lines = [
        "# Scripted expert: success over the 50 fixed init states",
        "",
        f"Command: `bash scripts/scripted_expert_table.sh` (state mode, fast step, seeds 0-49; {platform.machine()}"
        f" CPU, {stamp}). Per-task results, with every episode: docs/scripted_expert/.",
        "",
        f"**{count} of 130 tasks at >= 80 %** ({attempted} attempted; `python collect.py --list-scripted-tasks` lists "
        "them). † measured with an earlier version of the code this task runs (`--rerun-stale` measures it again). "
        "Failure column: the atom and phase where the failed episodes stopped, the two most frequent, after the "
        "reason where it was analysed.",
        "",
        "| suite | task | instruction | success (50 init states) | failures / reason |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    with open(path + ".partial", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".partial", path)
    print(f"wrote {path}: {count} of 130 tasks at >= 80 % ({attempted} attempted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=None, help="suite:local_id ... (default: all 130)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "scripted_expert"))
    parser.add_argument("--table", default=se.TABLE)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=le.NUM_INIT_STATES, help="init states 0..N-1 (a smoke run)")
    parser.add_argument("--rerun-stale", action="store_true", help="measure again tasks measured by another version")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tasks = le.task_registry()
    if args.tasks:
        tasks = [le.resolve_task(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.tasks]
    for task in [] if args.table_only else tasks:
        path = result_path(args.out, task)
        if os.path.exists(path):  # kept unless stale and asked for; "not attempted" is re-planned (cheap)
            old = json.load(open(path))
            if old["attempted"] and (old["version"] == expert_version(task) or not args.rerun_stale):
                continue
        start = time.time()
        result = {"task": f"{task.suite}:{task.local_id}", "name": task.name, "version": expert_version(task),
                  "date": datetime.date.today().isoformat()}  # fmt: skip
        result.update(measure(task, args.num_envs, args.episodes), seconds=round(time.time() - start, 1))
        write_json(path, result)
        got = f"{result['successes']}/{args.episodes}" if result["attempted"] else "not attempted"
        print(f"{task.suite} {task.local_id}: {got} ({result['seconds']} s)", flush=True)
        write_table(args.out, args.table)
    write_table(args.out, args.table)


if __name__ == "__main__":
    main()
