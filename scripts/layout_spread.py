"""How sampled layouts spread against the protocol's 50 init states, per task (the layout split, docs/coverage.md).

    python scripts/layout_spread.py --tasks libero_spatial:3 libero_goal:0 --out docs/coverage/layouts

For each task: the movable objects' positions in the protocol's 50 init states as LIBERO stores them and in N layouts
sampled by LIBERO's placement initializer (libero_env's SAMPLED resets, seeds 5,000,000 + n: used by no study), each
object's xy range in both, how far each sampled layout lies from its nearest protocol state against how far the
protocol states lie from each other (the largest object displacement, libero_env.layout_distance), the draws the
sampled resets took and the largest distance an object slid while settling. Resumable: a task whose file exists is
skipped.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import libero_env as le  # noqa: E402
import run_utils  # noqa: E402

SEED = 5_000_000


def spread(task: le.Task, num_layouts: int) -> dict:
    env = le.make_env(task, obs_mode="state", fast_step=True)
    try:
        protocol = env.protocol_layouts()
        sampled, infos = [], []
        for n in range(num_layouts):
            env.reset(le.SAMPLED, SEED + n, render=False)
            infos.append(env.layout_info())
            sampled.append(infos[-1]["positions"])
        names = list(env.env.objects_dict)
    finally:
        env.close()
    P, S = protocol["positions"], np.stack(sampled)
    between = np.linalg.norm(P[:, None] - P[None], axis=-1).max(-1)
    np.fill_diagonal(between, np.inf)
    to_protocol = np.array([i["protocol_distance"] for i in infos])
    cm = lambda x: round(100 * float(x), 2)  # noqa: E731
    return {
        "task": f"{task.suite}:{task.local_id}", "num_sampled": num_layouts, "seed": SEED,
        "objects": {n: {"protocol_xy_range_cm": [cm(v) for v in np.ptp(P[:, k, :2], 0)],
                        "sampled_xy_range_cm": [cm(v) for v in np.ptp(S[:, k, :2], 0)],
                        "mean_shift_cm": cm(np.linalg.norm(S[:, k].mean(0) - P[:, k].mean(0)))}
                    for k, n in enumerate(names)},
        "sampled_to_nearest_protocol_cm": {"min": cm(to_protocol.min()), "median": cm(np.median(to_protocol))},
        "protocol_to_nearest_protocol_cm": {"min": cm(between.min()), "median": cm(np.median(between.min(1)))},
        "draws": np.bincount([i["draws"] for i in infos]).tolist(),
        "settle_max_cm": {"protocol": cm(protocol["settle"].max()), "sampled": cm(max(i["settle"] for i in infos))},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="suite:local id")
    parser.add_argument("--num-layouts", type=int, default=200)
    parser.add_argument("--out", default="docs/coverage/layouts")
    args = parser.parse_args()
    tasks = [le.resolve_task(s.split(":")[0], int(s.split(":")[1])) for s in args.tasks]
    for task in tasks:
        path = os.path.join(args.out, f"{task.suite}_task{task.local_id:02d}.json")
        if os.path.exists(path):
            continue
        result = spread(task, args.num_layouts)
        run_utils.write_json(path, result)
        s, p = result["sampled_to_nearest_protocol_cm"], result["protocol_to_nearest_protocol_cm"]
        print(f"{result['task']}: sampled -> nearest protocol state {s['median']} cm (min {s['min']}), protocol -> "
              f"nearest other {p['median']} cm; draws {result['draws']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
