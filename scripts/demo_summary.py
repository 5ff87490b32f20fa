"""Summary table of a `make demo` run: every phase's headline number and where its artefacts went.

python scripts/demo_summary.py demo [wall_seconds]
"""

import glob
import json
import os
import sys

import h5py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo_hdf5  # noqa: E402
import run_utils  # noqa: E402


def last(rows, key):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def main(root: str, wall: str = "") -> None:
    runs, data, results = (os.path.join(root, d) for d in ("runs", "data", "results"))
    task_dir = os.path.join("libero_object", "task00__seed0")
    rows = []

    def add(phase, result, where):
        rows.append((phase, result, where))

    fallback = glob.glob(os.path.join(data, "scripted_rgb", "libero_object", "*_demo.hdf5"))
    for source in ("scripted", "diffusion_rl") + (("scripted_rgb",) if fallback else ()):
        files = glob.glob(os.path.join(data, source, "libero_object", "*_demo.hdf5"))
        if files:
            with demo_hdf5.DemoFile(files[0]) as f:
                rate = f.attrs.get("success_rate", float("nan"))
                add(
                    f"collect ({source})",
                    f"{len(f)} demos, {f.attrs['total']} steps, success rate {rate:.2f}",
                    files[0],
                )
        elif source == "diffusion_rl" and fallback:  # demo.sh said so and trained pi0 on scripted_rgb instead
            partial = glob.glob(os.path.join(data, source, "libero_object", "*_demo.hdf5.partial"))
            kept = 0
            if partial:  # the successes it did keep, with its attempts (collect.py's progress attributes)
                with h5py.File(partial[0], "r") as f:
                    kept, tried = int(f["data"].attrs.get("num_successful", 0)), int(f["data"].attrs["num_attempts"])
            result = f"{kept} of the 5 successes wanted in {tried if partial else 20} episodes: pi0 used scripted_rgb"
            add(f"collect ({source})", result, partial[0] if partial else os.path.join(data, source))
        else:
            add(f"collect ({source})", "MISSING", os.path.join(data, source))
    for phase, key in (("bc_diffusion", "loss"), ("ppo_diffusion", "pg_loss")):
        run_dir = os.path.join(runs, phase, task_dir)
        metrics = run_utils.read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
        evals = [r["eval/success_rate"] for r in metrics if "eval/success_rate" in r]
        result = f"final {key} {last(metrics, key):.4f}" if last(metrics, key) is not None else "MISSING"
        if evals:
            result += ", eval success " + " -> ".join(f"{e:.2f}" for e in evals)
        add(phase, result, os.path.join(run_dir, "checkpoints", "final.pt"))
    vla_dir = os.path.join(runs, "finetune_vla", "demo_tiny_pi0__seed0")
    vla = run_utils.read_metrics(vla_dir) if os.path.exists(os.path.join(vla_dir, "metrics.jsonl")) else []
    add(
        "finetune_vla (tiny, random init)",
        f"loss {vla[0]['loss']:.3f} -> {vla[-1]['loss']:.3f}" if vla else "MISSING",
        os.path.join(vla_dir, "checkpoints", "final"),
    )
    for tag in ("diffusion_ppo", "demo_tiny_pi0"):
        path = os.path.join(results, "eval", tag, "libero_object", "task00.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            add(f"evaluate ({tag})", f"success {r['success_rate']:.2f} over {r['num_episodes']} episodes", path)
        else:
            add(f"evaluate ({tag})", "MISSING", path)
    analysis = os.path.join(results, "analysis", "demo", "metrics.json")
    if os.path.exists(analysis):
        with open(analysis) as f:
            agg = json.load(f)["aggregate"]
        text = "; ".join(
            f"{s}: length {g['overall']['length_mean']:.0f}, jerk {g['overall']['msj_mean']:.0f}, "
            f"no-ops {g['overall']['noop_steps']}"
            for s, g in agg.items()
        )
        add("analyze", text, os.path.dirname(analysis))
    else:
        add("analyze", "MISSING", analysis)
    width = max(len(r[0]) for r in rows)
    print(f"{'phase':<{width}}  result  ->  artefacts")
    for phase, result, where in rows:
        print(f"{phase:<{width}}  {result}  ->  {where}")
    if wall:
        print(f"\nwall time: {int(wall) / 60:.1f} min")
    missing = [r[0] for r in rows if r[1] == "MISSING"]
    if missing:
        sys.exit(f"error: no results for {', '.join(missing)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
