"""evaluate.py — phase 5: success rates under the standard LIBERO protocol, per task and aggregated.

The OpenVLA/openpi protocol (libero_env.py): per task, episode e starts from fixed init state e (0-49) with env
seed ``seed + e`` — whichever worker runs it — then 10 wait steps of [0,0,0,0,0,0,-1] that do not count, then at
most the suite's step limit (spatial 220, object 280, goal 300, libero_10 520, libero_90 400); success is the
env's ``done``. Chunked policies re-plan every ``--replan-steps`` actions (pi0: 5).

Each task writes ``results/eval/<tag>/<suite>/task<NN>.json``; ``--summarize`` aggregates whatever task files
exist into ``results/eval/summary.md`` / ``summary.csv`` in the layout of the paper's Table I (per suite and
average) and Table II (trained on LIBERO-90, zero-shot on Long/Goal/Object), flagging missing tasks rather than
averaging over them.

    python evaluate.py --policy diffusion --suite libero_object --task-id 0       # one task (a SLURM array element)
    python evaluate.py --policy vla --ckpt runs/finetune_vla/rl__seed0/checkpoints/final --suite libero_object
    python evaluate.py --summarize
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro

import collect
import libero_env as le
import run_utils
import scripted_expert
import vector_env as ve

SUITE_COLUMNS = [
    ("libero_spatial", "Spatial"),
    ("libero_object", "Object"),
    ("libero_goal", "Goal"),
    ("libero_10", "Long"),
    ("libero_90", "LIBERO-90"),
]
OOD_COLUMNS = [("libero_10", "Long"), ("libero_goal", "Goal"), ("libero_object", "Object")]


@dataclass
class Args:
    exp_name: str = "evaluate"
    """name of this run (logs only)"""
    seed: int = 0
    """episode e uses env seed seed + e; also seeds the policy's sampling noise (diffusion x_K)"""
    cuda: bool = True
    """run the policy on CUDA when available"""
    fast_step: bool = False
    """step the simulator on libero_env's fast path (not the protocol's exact dynamics: states differ from
    robosuite's loop at MuJoCo's solver tolerance); the default is robosuite's own loop"""

    policy: Literal["diffusion", "gaussian", "vla", "scripted"] = "diffusion"
    """what to evaluate"""
    ckpt: Optional[str] = None
    """checkpoint (file, or finetune_vla directory); default: the path convention for diffusion/gaussian"""
    ckpt_phase: str = "ppo"
    """diffusion without --ckpt: 'ppo' (ppo_diffusion) or 'bc' (bc_diffusion)"""
    instruction: Optional[Literal["bddl", "benchmark"]] = None
    """prompt of a vla policy: bddl (the BDDL :language) or benchmark (LIBERO's task.language); default: the
    convention its checkpoint was trained with"""
    tag: Optional[str] = None
    """name of the results directory (default: scripted | diffusion_ppo | diffusion_bc | gaussian | <vla run name>)"""
    suite: str = "libero_object"
    """suite (or 'all', then --task-id is global)"""
    task_id: Optional[int] = None
    """one task (None: every task of the suite)"""
    num_episodes: int = 50
    """episodes per task: init states 0..N-1"""
    layouts: Literal["protocol", "sampled"] = "protocol"
    """protocol: the LIBERO protocol's fixed init states (episode e from init state e % 50, the held-out
    evaluation); sampled: layouts LIBERO's placement initializer draws from each episode's seed (the training
    distribution; results go under the tag with '_sampled' appended unless --tag is given)"""
    num_envs: int = 2
    """parallel environment workers"""
    replan_steps: int = 0
    """actions executed per policy query (0: the policy's default)"""
    action_mode: Literal["auto", "sample", "mean", "eta0"] = "auto"
    """how a learned policy acts: auto, the mode its checkpoint names (a PPO run's --eval-mode, mean by default; eta0
    for a BC diffusion checkpoint); sample / mean / eta0 (collect.py's --action-mode)"""
    ddim_steps: int = 5
    """DDIM steps of BC diffusion policies (run as the chain a PPO run starts from; ppo_diffusion checkpoints run
    their fine-tuned schedule)"""
    image_size: int = 0
    """rendered camera size (0: the policy's input size; 256 for pi0, as its training data)"""
    capture_video: bool = False
    """save mp4 videos of the first --video-episodes episodes of each task"""
    video_episodes: int = 2
    """episodes per task recorded with --capture-video"""
    run_root: str = "runs"
    """root of the checkpoint convention"""
    results_root: str = "results"
    """results/eval/<tag>/<suite>/task<NN>.json"""
    summarize: bool = False
    """aggregate existing task files into summary.md / summary.csv and exit"""


# ================================================================================================================
# Evaluation
# ================================================================================================================
def make_policy(args: Args, task: le.Task, venv_factory):
    """(policy, venv, info) for one task; the venv renders what the policy needs."""

    if args.policy == "scripted":
        steps = scripted_expert.plan(task)
        venv = venv_factory("state" if not args.capture_video else "rgb", args.image_size or 128, privileged=True)
        scene = venv.call("scene", env_ids=[0])[0]
        return scripted_expert.ScriptedPolicy(steps, scene, 0.0, args.seed), venv, {"train_task": None}
    policy = collect.load_learned_policy(args.policy, args.ckpt, task, args.action_mode, args.ddim_steps, args.seed,
                                         args.cuda, args.instruction)  # fmt: skip
    obs_mode = "rgb" if args.capture_video else policy.obs_mode
    venv = venv_factory(obs_mode, args.image_size or policy.image_size, privileged=False)
    return policy, venv, policy.info


def default_tag(args: Args) -> str:
    if args.tag:
        return args.tag
    suffix = "_sampled" if args.layouts == "sampled" else ""  # never summarised with the protocol's numbers
    if args.policy == "vla":
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))).split("__")[0] + suffix
    if args.policy == "diffusion":
        return f"diffusion_{args.ckpt_phase}{suffix}"
    return args.policy + suffix


def task_result_path(results_root: str, tag: str, task: le.Task) -> str:
    return os.path.join(results_root, "eval", tag, task.suite, f"{le.task_dir_name(task)}.json")


def save_video(path: str, steps: list[dict]) -> None:
    import imageio

    frames = [
        np.concatenate([le.upright(s["obs"]["agentview_rgb"]), le.upright(s["obs"]["eye_in_hand_rgb"])], 1)
        for s in steps
        if "agentview_rgb" in s["obs"]
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, fps=le.CONTROL_HZ)


def evaluate_task(args: Args, task: le.Task, tag: str) -> dict:
    def venv_factory(obs_mode, image_size, privileged):
        return ve.VectorLiberoEnv(task, args.num_envs, obs_mode=obs_mode, image_size=image_size, privileged=privileged,
                                  fast_step=args.fast_step)  # fmt: skip

    policy, venv, info = make_policy(args, task, venv_factory)
    replan = args.replan_steps or policy.replan_steps
    out_path = task_result_path(args.results_root, tag, task)
    video_dir = os.path.join(os.path.dirname(out_path), "videos")
    done = []

    def on_episode_end(r: ve.EpisodeResult) -> None:
        done.append(r.success)
        if args.capture_video and r.episode < args.video_episodes:
            save_video(os.path.join(video_dir, f"{le.task_dir_name(task)}_ep{r.episode:02d}.mp4"), r.steps)
        r.steps = []
        where = "sampled layout" if r.init_state == le.SAMPLED else f"init state {r.init_state:2d}"
        print(
            f"  episode {r.episode:2d} ({where}): {'success' if r.success else 'failure'} "
            f"after {r.length} steps  [{sum(done)}/{len(done)}]",
            flush=True,
        )

    start = time.time()
    try:
        results = ve.run_episodes(
            venv,
            policy,
            range(args.num_episodes),
            seed=args.seed,
            replan_steps=replan,
            record=args.capture_video,
            render=venv.obs_mode == "rgb",
            on_episode_end=on_episode_end,
            reset_policy=getattr(policy, "reset", None),
            layouts=args.layouts,
        )
    finally:
        venv.close()
    report = {
        "tag": tag,
        "policy": args.policy,
        "ckpt": args.ckpt,
        "policy_info": info,
        "task": {
            "suite": task.suite,
            "local_id": task.local_id,
            "global_id": task.global_id,
            "name": task.name,
            "instruction": task.instruction,
            "benchmark_instruction": task.language,
        },
        "protocol": {
            "max_steps": task.max_steps,
            "num_wait_steps": le.NUM_WAIT_STEPS,
            "replan_steps": replan,
            "seed": args.seed,
            "layouts": args.layouts,
        },
        "num_episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])),
        "episodes": [
            {
                "episode": r.episode,
                "init_state": r.init_state,
                "seed": r.seed,
                "success": bool(r.success),
                "length": r.length,
            }
            for r in results
        ],
        "wall_s": round(time.time() - start, 1),
    }
    run_utils.write_json(out_path, report)
    return report


# ================================================================================================================
# Summaries (Table I / Table II)
# ================================================================================================================
def collect_results(results_root: str) -> dict:
    """tag -> suite -> {local task id: success rate}, and tag -> policy_info."""
    rates, infos = {}, {}
    for path in sorted(glob.glob(os.path.join(results_root, "eval", "*", "*", "task*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("protocol", {}).get("layouts", "protocol") != "protocol":
            continue  # Tables I/II are the protocol's: evaluations on sampled layouts are not held out
        rates.setdefault(r["tag"], {}).setdefault(r["task"]["suite"], {})[r["task"]["local_id"]] = r["success_rate"]
        infos[r["tag"]] = r.get("policy_info") or {}
    return {"rates": rates, "infos": infos}


def suite_cell(per_task: dict, suite: str):
    """(mean success in %, tasks present, complete?)"""
    n, expected = len(per_task), le.SUITE_SIZES[suite]
    mean = 100 * float(np.mean(list(per_task.values()))) if n else None
    return mean, n, n == expected


def format_cell(mean, n, complete, expected) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if complete else f"{mean:.2f}* ({n}/{expected} tasks)"


def table_row(tag: str, rates: dict, columns) -> tuple[str, list[dict]]:
    """One policy's markdown row (per-suite means, average only when every suite is complete) and its CSV cells."""
    texts, cells, means = [], [], []
    for suite, _ in columns:
        mean, n, complete = suite_cell(rates.get(suite, {}), suite)
        texts.append(format_cell(mean, n, complete, le.SUITE_SIZES[suite]))
        means.append(mean)
        cells.append({"suite": suite, "success_rate": "" if mean is None else round(mean, 2), "tasks": n,
                      "tasks_expected": le.SUITE_SIZES[suite], "complete": complete})  # fmt: skip
    average = f"{np.mean(means):.2f}" if all(c["complete"] for c in cells) else "n/a (incomplete)"
    return f"| {tag} | " + " | ".join(texts) + f" | {average} |", cells


def summarize(results_root: str) -> str:
    """Write summary.md / summary.csv; return the markdown."""
    data = collect_results(results_root)
    rates, infos = data["rates"], data["infos"]
    lines = [
        "# Evaluation summary",
        "",
        "Success rate (%) per suite over the protocol episodes of every task file found. `*` marks a suite "
        "with missing tasks: its mean covers only the tasks shown and no average is computed from it.",
        "",
        "## Table I — per suite",
        "",
        "| policy | " + " | ".join(c for _, c in SUITE_COLUMNS) + " | Average |",
        "|---|" + "---|" * (len(SUITE_COLUMNS) + 1),
    ]
    rows = []
    for tag in sorted(rates):
        line, cells = table_row(tag, rates[tag], SUITE_COLUMNS)
        lines.append(line)
        rows += [{"table": "I", "policy": tag, **c} for c in cells]
    ood = [t for t in sorted(rates) if infos.get(t, {}).get("suites") == ["libero_90"]]
    lines += ["", "## Table II — trained on LIBERO-90, zero-shot on other suites", ""]
    if ood:
        lines += ["| policy | " + " | ".join(c for _, c in OOD_COLUMNS) + " | Average |", "|---|" + "---|" * 4]
        for tag in ood:
            lines.append(table_row(tag, rates[tag], OOD_COLUMNS)[0])
    else:
        lines.append("No policy trained only on LIBERO-90 (finetune_vla.py --suites libero_90) has been evaluated.")
    markdown = "\n".join(lines) + "\n"
    out_dir = os.path.join(results_root, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["table", "policy", "suite", "success_rate", "tasks", "tasks_expected", "complete"])
        writer.writeheader()
        writer.writerows(rows)
    return markdown


def check_args(args: Args) -> list[le.Task]:
    """Validate before any environment is built; fill the default checkpoint; return the tasks."""
    le.check_task_args(args.suite, args.task_id)
    tasks = [le.resolve_task(args.suite, args.task_id)] if args.task_id is not None else le.suite_tasks(args.suite)
    if args.num_episodes < 1 or args.num_envs < 1:
        raise ValueError("--num-episodes and --num-envs must be at least 1.")
    ve.check_memory(args.num_envs)
    if args.policy == "scripted":
        for task in tasks:
            scripted_expert.plan(task)
    elif args.policy == "vla" and args.ckpt is None:
        raise ValueError("--policy vla needs --ckpt (a finetune_vla.py checkpoint directory).")
    if args.policy in ("diffusion", "gaussian") and args.ckpt is None and len(tasks) > 1:
        raise ValueError("without --ckpt, evaluate one task at a time (--task-id): checkpoints are per task.")
    return tasks


def default_checkpoint(args: Args, task: le.Task) -> str:
    return collect.default_checkpoint(args, task)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.summarize:
        print(summarize(args.results_root))
        sys.exit(0)
    try:
        tasks = check_args(args)
        if args.policy in ("diffusion", "gaussian") and args.ckpt is None:
            args.ckpt = default_checkpoint(args, tasks[0])
        if args.ckpt is not None and not os.path.exists(args.ckpt):
            raise FileNotFoundError(f"No checkpoint at {args.ckpt}; train that phase first or pass --ckpt.")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tag = default_tag(args)
    for task in tasks:
        print(f"task: {task.suite} {task.local_id} (global {task.global_id}) '{task.instruction}'  [{tag}]")
        report = evaluate_task(args, task, tag)
        print(
            f"success rate {report['success_rate']:.3f} over {report['num_episodes']} episodes -> "
            f"{task_result_path(args.results_root, tag, task)}"
        )
    print(summarize(args.results_root))
